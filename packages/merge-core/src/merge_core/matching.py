"""Matching ops that return ``(merge, unmerge)`` closures, ToMe-style.

All matchers compute their indices once under ``no_grad``; the closures then apply the same
reduction to any tensor with the metric's leading dims and token count (features, sizes, sources).
Leading dims are flattened internally, so ``metric`` may be (B, N, C) or (B, T, N, C), etc.

Tie-breaking (documented because ToMe's ``argsort`` leaves it unspecified): each source takes the
*first* destination with the highest score, and sources with equal best scores are ranked by
their position (stable descending sort). On inputs without exact ties this equals ToMe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ._checks import check_count, check_merged_tokens, check_same_tokens, check_tokens

MergeFn = Callable[..., torch.Tensor]
ScoreMod = Callable[[torch.Tensor], torch.Tensor]


class MergePlan(NamedTuple):
    """Indices of one bipartite matching, attached to its ``merge`` closure as ``merge.plan``.

    ``merge_wavg`` hands it to the fused gather/scatter kernel (``merge_core.kernels``).
    """

    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    protected_a: int
    protected_b: int
    r: int
    shape: torch.Size
    device: torch.device


def do_nothing(x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Identity merge/unmerge, returned when there is nothing to merge."""
    return x


def _normalise(metric: torch.Tensor) -> torch.Tensor:
    return metric / metric.norm(dim=-1, keepdim=True)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def best_destinations(
    a: torch.Tensor,
    b: torch.Tensor,
    protected_a: int = 0,
    protected_b: int = 0,
    score_mod: ScoreMod | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine score of every ``a`` token to its best ``b`` token: returns (best_score, best_index).

    ``a``, ``b``: (B, Na, C), (B, Nb, C) un-normalised metrics. The first ``protected_a`` rows and
    ``protected_b`` columns are excluded (score -inf). ``score_mod`` edits the (B, Na, Nb) cosine
    scores before protection (e.g. a per-pair penalty). CUDA tensors use the fused Triton kernel
    when it is available, which never writes the score matrix; the torch path is the reference.
    """
    from . import kernels

    if kernels.use_fused_match(a, score_mod):
        return kernels.fused_best_destinations(a, b, protected_a, protected_b, score_mod)
    return best_destinations_reference(a, b, protected_a, protected_b, score_mod)


def best_destinations_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    protected_a: int = 0,
    protected_b: int = 0,
    score_mod: ScoreMod | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path of ``best_destinations`` (no kernel dispatch): the reference every kernel is held to."""
    scores = _normalise(a) @ _normalise(b).transpose(-1, -2)
    if score_mod is not None:
        scores = score_mod(scores)
    if protected_a:
        scores[..., :protected_a, :] = -math.inf
    if protected_b:
        scores[..., :protected_b] = -math.inf
    return scores.max(dim=-1)


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = False,
    distill_token: bool = False,
    *,
    protected: int | None = None,
    score_mod: ScoreMod | None = None,
) -> tuple[MergeFn, MergeFn]:
    """ToMe's bipartite soft matching: merge ``r`` of the even tokens into the odd tokens.

    ``metric`` (..., N, C): similarity features (ToMe uses the mean key over heads).
    ``class_token`` / ``distill_token``: ToMe's flags; they protect the first 1 / 2 tokens.
    ``protected``: generalisation, the first ``protected`` tokens are never sources nor
    destinations (CLS + registers, or CLS + prompts per video frame); it overrides the flags.
    ``score_mod``: optional hook that edits cosine scores per pair (see ``merge_core.penalty``).

    ``r`` is clamped to half of the unprotected tokens, as in ToMe. The merged sequence is
    ``[protected tokens in original order, unmerged sources, destinations]``: identical to ToMe
    for the class/distillation token cases.
    """
    r = check_count(r, "r")
    check_tokens(metric, "metric")
    if protected is None:
        protected = int(class_token) + int(distill_token)
    protected = check_count(protected, "protected")
    t = metric.shape[-2]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return do_nothing, do_nothing
    shape, device = metric.shape, metric.device
    protected_a, protected_b = (protected + 1) // 2, protected // 2

    with torch.no_grad():
        flat = _flatten(metric)
        from . import kernels

        if kernels.use_fused_plan(flat, score_mod):  # CUDA: matcher + ranking in two launches, no sort
            unm_idx, src_idx, dst_idx = kernels.fused_match_plan(
                flat, protected_a, protected_b, r, score_mod, bool(protected)
            )
        else:
            a, b = flat[..., ::2, :], flat[..., 1::2, :]
            node_max, node_idx = best_destinations(a, b, protected_a, protected_b, score_mod)
            unm_idx, src_idx, dst_idx = plan_from_scores(node_max, node_idx, r, bool(protected))
    return _plan_closures(unm_idx, src_idx, dst_idx, protected_a, protected_b, r, shape, device)


def use_fused_heads(keys: torch.Tensor, score_mod: ScoreMod | None = None) -> bool:
    """Whether ``bipartite_soft_matching_heads`` computes the head mean inside the fused plan (CUDA or kernels
    forced, eager, the fused plan applies to the metric's shape); otherwise it falls back to ``keys.mean(1)``."""
    from . import kernels

    if keys.dim() != 4 or keys.shape[1] == 0 or torch.compiler.is_compiling():
        return False
    # the plan's rule reads dtype, device and the last two dims (N, D): the same for keys as for their mean
    # (longer sequences: the mean + the tiled plan for Na > MAX_PLAN_ROWS)
    return kernels.use_fused_plan(keys, score_mod) and (keys.shape[-2] + 1) // 2 <= kernels.MAX_PLAN_ROWS


def bipartite_soft_matching_heads(
    keys: torch.Tensor,
    r: int,
    *,
    protected: int = 0,
    score_mod: ScoreMod | None = None,
) -> tuple[MergeFn, MergeFn]:
    """``bipartite_soft_matching(keys.mean(1), r, protected=protected)`` from per-head keys (B, H, N, D).

    Why: ToMe's metric is the key averaged over heads; as its own torch reduce that is one more launch per
    layer, which batch-1 inference under CUDA graphs feels (4.5 us per ViT-L layer on an H200). Where the fused
    plan runs (``use_fused_heads``) the kernels average the heads themselves (``kernels._triton.match_plan_heads``,
    rounded like CUDA's ``k.mean(1)``); elsewhere (CPU, ``torch.compile``, long sequences, training) this is
    exactly the mean + ``bipartite_soft_matching``.
    """
    if keys.dim() != 4:
        raise ValueError(f"keys must be (B, H, N, D), got shape {tuple(keys.shape)}")
    if not use_fused_heads(keys, score_mod):
        return bipartite_soft_matching(keys.mean(1), r, protected=protected, score_mod=score_mod)
    r = check_count(r, "r")
    protected = check_count(protected, "protected")
    b, _, t, d = keys.shape
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return do_nothing, do_nothing
    protected_a, protected_b = (protected + 1) // 2, protected // 2
    from .kernels import _triton

    with torch.no_grad():
        plan = _triton.match_plan_heads(keys, protected_a, protected_b, r, score_mod, bool(protected))
    na = (t + 1) // 2
    unm_idx, src_idx, dst_idx = plan[:, : na - r, None], plan[:, na - r : na, None], plan[:, na:, None]
    shape = torch.Size((b, t, d))
    return _plan_closures(unm_idx, src_idx, dst_idx, protected_a, protected_b, r, shape, keys.device)


def _plan_closures(
    unm_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    protected_a: int,
    protected_b: int,
    r: int,
    shape: torch.Size,
    device: torch.device,
) -> tuple[MergeFn, MergeFn]:
    """The ``(merge, unmerge)`` closures of a bipartite plan over a metric of ``shape`` (..., T, C)."""
    t = shape[-2]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        check_same_tokens(x, shape, device, "x")
        lead = x.shape[:-2]
        out = apply_plan(_flatten(x), unm_idx, src_idx, dst_idx, protected_a, protected_b, mode)
        return out.reshape(*lead, out.shape[-2], out.shape[-1])

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        check_merged_tokens(x, shape, t - r, "x")
        lead = x.shape[:-2]
        x = _flatten(x)
        n, _, c = x.shape
        unm_len = unm_idx.shape[-2]
        unm, dst = _split(x, unm_len, protected_a, protected_b)
        src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))
        out = torch.zeros(n, t, c, device=x.device, dtype=x.dtype)
        out[..., 1::2, :] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, r, c), src=src)
        return out.reshape(*lead, t, c)

    # also under torch.compile: ``merge_wavg`` then calls the opaque ``merge_core::merge_wavg`` op with it
    merge.plan = MergePlan(unm_idx, src_idx, dst_idx, protected_a, protected_b, r, shape, device)
    return merge, unmerge


def plan_from_scores(
    node_max: torch.Tensor, node_idx: torch.Tensor, r: int, sort_unm: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unm_idx, src_idx, dst_idx), each (B, n, 1): the ``r`` best-scored rows merge (stable descending sort);
    with ``sort_unm`` the unmerged rows are in index order (needed when a protected prefix must stay first)."""
    edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if sort_unm:
        unm_idx = unm_idx.sort(dim=-2).values
    return unm_idx, src_idx, dst_idx


def apply_plan(
    x: torch.Tensor,
    unm_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    protected_a: int,
    protected_b: int,
    mode: str = "mean",
) -> torch.Tensor:
    """Merge (n, T, C) ``x`` with a bipartite plan: sources reduce into their destinations with ``mode``;
    output ``[protected prefix, unmerged, destinations]``."""
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    r = src_idx.shape[-2]
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
    return _join(unm, dst, protected_a, protected_b)


def _join(unm: torch.Tensor, dst: torch.Tensor, protected_a: int, protected_b: int) -> torch.Tensor:
    """Concatenate [protected prefix in original order, unmerged, destinations]."""
    if protected_a == 0:
        return torch.cat([unm, dst], dim=-2)
    pairs = torch.stack([unm[..., :protected_b, :], dst[..., :protected_b, :]], dim=-2).flatten(-3, -2)
    parts = [
        pairs,
        unm[..., protected_b:protected_a, :],
        unm[..., protected_a:, :],
        dst[..., protected_b:, :],
    ]
    return torch.cat(parts, dim=-2)


def _split(x: torch.Tensor, unm_len: int, protected_a: int, protected_b: int):
    """Inverse of ``_join``: recover the (unmerged, destinations) halves."""
    prefix = protected_a + protected_b
    head = x[..., :prefix, :]
    paired = head[..., : 2 * protected_b, :]
    unm_prefix = torch.cat([paired[..., 0::2, :], head[..., 2 * protected_b :, :]], dim=-2)
    dst_prefix = paired[..., 1::2, :]
    rest_unm = x[..., prefix : prefix + unm_len - protected_a, :]
    rest_dst = x[..., prefix + unm_len - protected_a :, :]
    return torch.cat([unm_prefix, rest_unm], dim=-2), torch.cat([dst_prefix, rest_dst], dim=-2)


def kth_bipartite_soft_matching(metric: torch.Tensor, k: int) -> tuple[MergeFn, MergeFn]:
    """ToMe's k-th variant: every k-th token is a destination, all others merge into one.

    Tokens past the last full group of ``k`` are dropped by ``merge`` (as in ToMe); ``unmerge``
    returns the rounded length. No token is protected.
    """
    k = check_count(k, "k")
    check_tokens(metric, "metric")
    if k <= 1:
        return do_nothing, do_nothing
    shape, device = metric.shape, metric.device

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t_rnd = (x.shape[1] // k) * k
        x = x[:, :t_rnd, :].reshape(x.shape[0], -1, k, x.shape[2])
        a = x[:, :, : k - 1, :].reshape(x.shape[0], -1, x.shape[-1])
        return a, x[:, :, k - 1, :]

    with torch.no_grad():
        a, b = split(_flatten(metric))
        r = a.shape[1]
        _, dst_idx = best_destinations(a, b)
        dst_idx = dst_idx[..., None]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        check_same_tokens(x, shape, device, "x")
        lead = x.shape[:-2]
        src, dst = split(_flatten(x))
        n, _, c = src.shape
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return dst.reshape(*lead, dst.shape[-2], c)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        check_merged_tokens(x, shape, shape[-2] // k, "x")
        lead = x.shape[:-2]
        dst = _flatten(x)
        n, _, c = dst.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c)).reshape(n, -1, k - 1, c)
        out = torch.cat([src, dst.reshape(n, -1, 1, c)], dim=-2).reshape(n, -1, c)
        return out.reshape(*lead, out.shape[-2], c)

    return merge, unmerge


def random_bipartite_soft_matching(
    metric: torch.Tensor, r: int, generator: torch.Generator | None = None
) -> tuple[MergeFn, MergeFn]:
    """ToMe's random variant: ``r`` random tokens merge into their best match among the rest.

    The merged sequence holds only the ``N - r`` destinations in random order; no token is protected.
    """
    r = check_count(r, "r")
    check_tokens(metric, "metric")
    shape, device = metric.shape, metric.device
    n_tokens = metric.shape[-2]
    if r <= 0:
        return do_nothing, do_nothing
    if r >= n_tokens:
        raise ValueError(f"r must be < the number of tokens ({n_tokens}), got {r}")

    with torch.no_grad():
        flat = _flatten(metric)
        batch = flat.shape[0]
        rand_idx = torch.rand(batch, n_tokens, 1, device=device, generator=generator).argsort(dim=1)
        a_idx, b_idx = rand_idx[:, :r, :], rand_idx[:, r:, :]

        def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            c = x.shape[-1]
            return (
                x.gather(dim=1, index=a_idx.expand(batch, r, c)),
                x.gather(dim=1, index=b_idx.expand(batch, n_tokens - r, c)),
            )

        _, dst_idx = best_destinations(*split(flat))
        dst_idx = dst_idx[..., None]

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        check_same_tokens(x, shape, device, "x")
        lead = x.shape[:-2]
        src, dst = split(_flatten(x))
        c = src.shape[-1]
        dst = dst.scatter_reduce(-2, dst_idx.expand(batch, r, c), src, reduce=mode)
        return dst.reshape(*lead, n_tokens - r, c)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        check_merged_tokens(x, shape, n_tokens - r, "x")
        lead = x.shape[:-2]
        dst = _flatten(x)
        c = dst.shape[-1]
        src = dst.gather(dim=-2, index=dst_idx.expand(batch, r, c))
        out = torch.zeros(batch, n_tokens, c, device=dst.device, dtype=dst.dtype)
        out.scatter_(dim=-2, index=b_idx.expand(batch, n_tokens - r, c), src=dst)
        out.scatter_(dim=-2, index=a_idx.expand(batch, r, c), src=src)
        return out.reshape(*lead, n_tokens, c)

    return merge, unmerge
