"""Apply a matching: size-weighted averages, source tracking (dense ToMe-style and O(N) integer maps)."""

from __future__ import annotations

import torch

from .matching import (  # noqa: F401  (re-exported: ToMe's ``tome.merge`` module holds the matchers too)
    MergeFn,
    bipartite_soft_matching,
    do_nothing,
    kth_bipartite_soft_matching,
    random_bipartite_soft_matching,
)


def merge_wavg(merge: MergeFn, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge, as ToMe: returns the merged ``x`` and the new ``size`` (..., N', 1)."""
    if size is not None:
        if size.dtype != x.dtype:
            raise ValueError(
                f"size must have x's dtype {x.dtype}, got {size.dtype} (cast it, or let size start as None)"
            )
        if size.shape != x.shape[:-1] + (1,):
            raise ValueError(
                f"size must have shape {tuple(x.shape[:-1]) + (1,)} for x {tuple(x.shape)}, got {tuple(size.shape)}"
            )
    plan = getattr(merge, "plan", None)
    if plan is not None:
        from . import kernels

        # one fused gather/scatter launch (CUDA, Triton); under torch.compile the opaque merge_core::merge_wavg op
        if kernels.use_fused_merge(x, size):
            return kernels.fused_merge_wavg(plan, x, size)
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    if torch.compiler.is_compiling():
        # traced torch path (CPU, training): one gather/scatter over [x * size, size] instead of two, so Inductor
        # emits half the merge kernels per layer (each layer has its own token count, hence its own kernels)
        merged = merge(torch.cat([x * size, size], dim=-1), mode="sum")
        x, size = merged[..., :-1], merged[..., -1:]
        return x / size, size
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """ToMe's dense source map (B, N', N0): row j marks the input patches merged into token j.

    O(N^2) memory, kept for ToMe compatibility; prefer ``merge_source_index`` for long sequences.
    """
    if source is None:
        n, t = x.shape[0], x.shape[-2]
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(n, t, t)
    return merge(source, mode="amax")


def merge_source_index(
    unmerge: MergeFn, merged: torch.Tensor, source_index: torch.Tensor | None = None
) -> torch.Tensor:
    """O(N) source map: ``source_index[b, p]`` is the current token holding input patch ``p``.

    ``merged`` is the merged tensor (only its shape and device are read). ``unmerge`` applied to
    the new token positions tells, for every token before this merge, where it went.
    """
    batch_shape, n_new = merged.shape[:-2], merged.shape[-2]
    positions = torch.arange(n_new, device=merged.device).expand(*batch_shape, n_new)
    old_to_new = unmerge(positions[..., None])[..., 0]
    if source_index is None:
        return old_to_new
    if source_index.shape[:-1] != old_to_new.shape[:-1]:
        raise ValueError(
            f"source_index must have batch shape {tuple(old_to_new.shape[:-1])}, got {tuple(source_index.shape)}"
        )
    return old_to_new.gather(-1, source_index)


def source_index_to_dense(source_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Convert an integer source map (B, N0) into ToMe's dense (B, N', N0) 0/1 form."""
    dense = torch.zeros(*source_index.shape[:-1], num_tokens, source_index.shape[-1], device=source_index.device)
    return dense.scatter_(-2, source_index.unsqueeze(-2), 1.0)


def unmerge_to_source(x: torch.Tensor, source_index: torch.Tensor) -> torch.Tensor:
    """Dense unmerge through a source map: every input patch gets its token's features (tomesd style)."""
    index = source_index[..., None].expand(*source_index.shape, x.shape[-1])
    return x.gather(-2, index)


def pool_by_source(
    values: torch.Tensor, source_index: torch.Tensor, num_tokens: int, reduce: str = "mean"
) -> torch.Tensor:
    """Reduce per-patch ``values`` (B, N0) onto the current tokens (B, N') with ``reduce`` (mean/amax/sum)."""
    if values.shape != source_index.shape:
        raise ValueError(
            f"values must match source_index's shape {tuple(source_index.shape)}, got {tuple(values.shape)}"
        )
    out = torch.zeros(*values.shape[:-1], num_tokens, device=values.device, dtype=values.dtype)
    return out.scatter_reduce(-1, source_index, values, reduce=reduce, include_self=False)
