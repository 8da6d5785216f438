"""Binned matching for serialized tokens (GitMerge3D on point-cloud patches).

Tokens of a patch are cut into bins of ``stride`` consecutive tokens; one token per bin is a
destination and every other token merges into its most similar destination anywhere in the patch.
That keeps ``ceil(N / stride)`` tokens (GitMerge3D's stride = ceil(1 / (1 - r)) for merge ratio r).
Leading dims are free (patches x heads), so each head can use its own destinations.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_count, check_same_tokens, check_tokens
from .matching import MergeFn, best_destinations


def _destination_offsets(
    lead: torch.Size, n_bins: int, stride: int, dst_offset, generator: torch.Generator | None, device
) -> torch.Tensor:
    """Offset of the destination inside each bin, shaped (*lead, n_bins)."""
    if isinstance(dst_offset, str):
        if dst_offset == "staggered":
            if len(lead) == 0:
                raise ValueError("dst_offset='staggered' needs a head dim before the token dim")
            heads = torch.arange(lead[-1], device=device) % stride
            return heads[:, None].expand(*lead, n_bins)
        if dst_offset == "random":
            return torch.randint(0, stride, (*lead, n_bins), device=device, generator=generator)
        raise ValueError(f"dst_offset must be 'staggered', 'random', an int or a tensor, got {dst_offset!r}")
    if isinstance(dst_offset, int) and not isinstance(dst_offset, bool):
        if not 0 <= dst_offset < stride:
            raise ValueError(f"dst_offset must be in [0, stride={stride}), got {dst_offset}")
        return torch.full((*lead, n_bins), dst_offset, device=device, dtype=torch.long)
    if isinstance(dst_offset, torch.Tensor):
        return (dst_offset.to(device=device, dtype=torch.long) % stride)[..., None].expand(*lead, n_bins)
    raise TypeError(f"dst_offset must be 'staggered', 'random', an int or a tensor, got {type(dst_offset).__name__}")


def binned_soft_matching(
    metric: torch.Tensor,
    stride: int,
    dst_offset: str | int | torch.Tensor = "staggered",
    generator: torch.Generator | None = None,
) -> tuple[MergeFn, MergeFn]:
    """Match every non-destination token to its most similar bin destination.

    ``metric`` (..., N, C). ``dst_offset``: ``"staggered"`` (destination offset = head index mod
    stride, head = the dim just before N), ``"random"`` (per bin, from ``generator``), an int, or a
    tensor of per-group offsets broadcastable to the leading dims. A short last bin clamps its
    offset to its own last token. ``merge(x, mode)`` returns (..., ceil(N/stride), C); use
    ``merge_wavg`` for size-weighted means; ``unmerge`` copies each destination back to its sources.
    """
    check_tokens(metric, "metric", min_dim=2)
    check_count(stride, "stride")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    n = metric.shape[-2]
    n_bins = math.ceil(n / stride)
    if stride == 1 or n_bins == n:
        from .matching import do_nothing

        return do_nothing, do_nothing
    shape, device = metric.shape, metric.device
    lead = metric.shape[:-2]
    n_src = n - n_bins

    with torch.no_grad():
        offsets = _destination_offsets(lead, n_bins, stride, dst_offset, generator, device)
        starts = torch.arange(n_bins, device=device) * stride
        dst_pos = torch.minimum(starts + offsets, torch.tensor(n - 1, device=device))
        is_dst = torch.zeros(*lead, n, dtype=torch.bool, device=device).scatter_(-1, dst_pos, True)
        src_pos = torch.sort(is_dst.to(torch.uint8), dim=-1, stable=True).indices[..., :n_src]
        flat = metric.reshape(-1, n, metric.shape[-1])
        g, c = flat.shape[0], flat.shape[-1]
        src_flat, dst_flat = src_pos.reshape(g, n_src), dst_pos.reshape(g, n_bins)
        a = flat.gather(1, src_flat[..., None].expand(g, n_src, c))
        b = flat.gather(1, dst_flat[..., None].expand(g, n_bins, c))
        _, match = best_destinations(a, b)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        check_same_tokens(x, shape, device, "x")
        xc = x.shape[-1]
        xf = x.reshape(g, n, xc)
        src = xf.gather(1, src_flat[..., None].expand(g, n_src, xc))
        dst = xf.gather(1, dst_flat[..., None].expand(g, n_bins, xc))
        dst = dst.scatter_reduce(1, match[..., None].expand(g, n_src, xc), src, reduce=mode)
        return dst.reshape(*lead, n_bins, xc)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        xc = x.shape[-1]
        xf = x.reshape(g, n_bins, xc)
        out = torch.empty(g, n, xc, device=x.device, dtype=x.dtype)
        out.scatter_(1, dst_flat[..., None].expand(g, n_bins, xc), xf)
        out.scatter_(1, src_flat[..., None].expand(g, n_src, xc), xf.gather(1, match[..., None].expand(g, n_src, xc)))
        return out.reshape(*lead, n, xc)

    return merge, unmerge
