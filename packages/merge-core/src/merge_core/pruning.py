"""Token pruning with ToMe-style ``(merge, unmerge)`` closures: drop tokens instead of merging them.

``merge`` keeps the ``N - r`` highest-scored tokens (protected prefix always kept) in their original
order, so ``merge_wavg``, ``merge_source`` and ``merge_source_index`` work unchanged; dropped tokens'
sizes are discarded (sizes no longer sum to N, which is what pruning means). ``unmerge`` scatters the
kept tokens back to their positions and fills dropped positions with zeros; consequently an integer
source map built through ``merge_source_index`` sends dropped patches to token 0 (the first protected
token), and a dense ``merge_source`` has no row for them.

- ``prune_by_score(scores, r, protected)``: drop the ``r`` lowest-scored unprotected tokens (ties:
  the later token is dropped first).
- ``random_pruning(metric, r, protected, generator)``: drop ``r`` uniformly random unprotected tokens
  (the "random pruning" baseline of scorer ablations).
"""

from __future__ import annotations

import math

import torch

from ._checks import check_count, check_same_tokens
from .matching import MergeFn, do_nothing


def prune_by_score(scores: torch.Tensor, r: int, protected: int = 0) -> tuple[MergeFn, MergeFn]:
    """Drop the ``r`` lowest-``scores`` tokens; ``scores`` (..., N) is one importance value per token.

    ``r`` is clamped to the number of unprotected tokens. Returns ``(merge, unmerge)`` closures that
    apply to any tensor shaped (..., N, C) with the same leading dims as ``scores``.
    """
    r = check_count(r, "r")
    protected = check_count(protected, "protected")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() < 2:
        raise ValueError(f"scores must have shape (batch..., tokens), got shape {tuple(scores.shape)}")
    n_tokens = scores.shape[-1]
    r = min(r, max(n_tokens - protected, 0))
    if r <= 0:
        return do_nothing, do_nothing
    ref_shape = torch.Size((*scores.shape, 1))
    device = scores.device
    n_keep = n_tokens - r

    with torch.no_grad():
        flat = scores.reshape(-1, n_tokens).float().clone()
        if protected:
            flat[:, :protected] = math.inf
        order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
        keep_idx = order[:, :n_keep].sort(dim=-1).values[..., None]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        check_same_tokens(x, ref_shape, device, "x")
        lead, c = x.shape[:-2], x.shape[-1]
        flat_x = x.reshape(-1, n_tokens, c)
        out = flat_x.gather(dim=-2, index=keep_idx.expand(flat_x.shape[0], n_keep, c))
        return out.reshape(*lead, n_keep, c)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        lead, c = x.shape[:-2], x.shape[-1]
        if x.shape[-2] != n_keep:
            raise ValueError(f"x must have {n_keep} tokens (the kept ones), got shape {tuple(x.shape)}")
        flat_x = x.reshape(-1, n_keep, c)
        out = flat_x.new_zeros(flat_x.shape[0], n_tokens, c)
        out.scatter_(dim=-2, index=keep_idx.expand(flat_x.shape[0], n_keep, c), src=flat_x)
        return out.reshape(*lead, n_tokens, c)

    return merge, unmerge


def random_pruning(
    metric: torch.Tensor, r: int, protected: int = 0, generator: torch.Generator | None = None
) -> tuple[MergeFn, MergeFn]:
    """Drop ``r`` random unprotected tokens; ``metric`` (..., N, C) only gives the shape and device."""
    if not isinstance(metric, torch.Tensor) or metric.dim() < 3:
        shape = tuple(metric.shape) if isinstance(metric, torch.Tensor) else type(metric).__name__
        raise ValueError(f"metric must have shape (batch..., tokens, channels), got {shape}")
    scores = torch.rand(metric.shape[:-1], device=metric.device, generator=generator)
    return prune_by_score(scores, r, protected)
