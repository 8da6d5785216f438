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


# --------------------------------------------------------------------------------------------------
# GitMerge3D's official patch matcher (faithful mode)
# --------------------------------------------------------------------------------------------------

DST_OFFSETS = ("spread", "staggered", "random")


def official_head_offsets(num_heads: int, stride: int) -> list[int]:
    """GitMerge3D's ``no_rand`` destination offset per head: (max(stride // H, 1) * h) % stride."""
    step = max(stride // num_heads, 1)
    return [(step * h) % stride for h in range(num_heads)]


def kept_tokens(n: int, r: float | int, stride: int) -> int:
    """Tokens left in a patch of ``n`` by the official matcher: n - min(#sources, r), r = int(n*r) for floats."""
    merged = int(n * r) if isinstance(r, float) else int(r)
    n_bins = n // stride
    if n_bins == 0:
        return n
    return n - min(n - n_bins, max(merged, 0))


class PatchMatch:
    """One matching of G groups (patches x heads) of N tokens onto N' = #unmerged sources + #destinations.

    ``slot`` (G, N) is the output slot of every token: unmerged sources first (by descending best
    score, as the official ``cat([unm, dst])``), then destinations in bin order; a merged source
    shares its destination's slot. ``size`` (G, N') counts the tokens per slot.
    """

    def __init__(self, slot: torch.Tensor, num_out: int, lead: torch.Size):
        self.slot, self.num_out, self.lead = slot, num_out, lead
        g, n = slot.shape
        self.num_tokens = n
        self.size = torch.zeros(g, num_out, device=slot.device, dtype=torch.float32).scatter_add_(
            1, slot, torch.ones(g, n, device=slot.device, dtype=torch.float32)
        )

    def merge(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """(*lead, N, C) -> (*lead, N', C); ``mean`` is the plain mean including the destination."""
        if x.shape[:-1] != (*self.lead, self.num_tokens):
            raise ValueError(f"x must have shape (*{tuple(self.lead)}, {self.num_tokens}, C), got {tuple(x.shape)}")
        c = x.shape[-1]
        xf = x.reshape(-1, self.num_tokens, c)
        index = self.slot[..., None].expand(-1, -1, c)
        if mode in ("mean", "sum"):
            out = xf.new_zeros(xf.shape[0], self.num_out, c).scatter_add_(1, index, xf)
            if mode == "mean":
                out = out / self.size[..., None].to(out.dtype)
        elif mode in ("amax", "amin", "prod"):
            out = xf.new_zeros(xf.shape[0], self.num_out, c).scatter_reduce_(1, index, xf, mode, include_self=False)
        else:
            raise ValueError(f"mode must be 'mean', 'sum', 'amax', 'amin' or 'prod', got {mode!r}")
        return out.reshape(*self.lead, self.num_out, c)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(*lead, N', C) -> (*lead, N, C): every token takes its slot's value (sources copy their destination)."""
        c = y.shape[-1]
        yf = y.reshape(-1, self.num_out, c)
        out = yf.gather(1, self.slot[..., None].expand(-1, -1, c))
        return out.reshape(*self.lead, self.num_tokens, c)

    def sizes(self) -> torch.Tensor:
        return self.size.reshape(*self.lead, self.num_out)


def _patch_offsets(lead, n_bins, stride, dst_offset, generator, device) -> torch.Tensor:
    if isinstance(dst_offset, str):
        if dst_offset not in DST_OFFSETS:
            raise ValueError(f"dst_offset must be one of {DST_OFFSETS}, an int or a tensor, got {dst_offset!r}")
        if dst_offset == "random":
            return torch.randint(0, stride, (*lead, n_bins), device=device, generator=generator)
        if len(lead) == 0:
            raise ValueError(f"dst_offset={dst_offset!r} needs a head dim before the token dim")
        heads = lead[-1]
        if dst_offset == "spread":
            per_head = torch.tensor(official_head_offsets(heads, stride), device=device)
        else:
            per_head = torch.arange(heads, device=device) % stride
        return per_head[:, None].expand(*lead, n_bins)
    return _destination_offsets(lead, n_bins, stride, dst_offset, generator, device)


def patch_match(
    metric: torch.Tensor,
    r: int,
    stride: int,
    dst_offset: str | int | torch.Tensor = "spread",
    generator: torch.Generator | None = None,
    mean_head: bool = False,
) -> PatchMatch | None:
    """GitMerge3D's patch matcher on ``metric`` (..., N, C), batched over all leading dims.

    ``n_bins = N // stride`` destinations, one per bin of ``stride`` consecutive tokens at
    ``dst_offset`` ("spread" = the official ``no_rand`` head offsets, "random" = per bin, "staggered"
    = head % stride, or an int/tensor); the tail after ``n_bins*stride`` is all sources. Each source
    picks its most similar destination (cosine) anywhere in the group; the ``min(#sources, r)``
    best-scoring sources merge, the rest stay. ``mean_head`` averages the metric over the head dim
    (dim -3) first. Returns None when nothing merges (r <= 0 or N < stride).
    """
    check_tokens(metric, "metric", min_dim=2)
    check_count(stride, "stride")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int token count, got {type(r).__name__}")
    n, c = metric.shape[-2], metric.shape[-1]
    n_bins = n // stride
    r_eff = min(n - n_bins, r)
    if r_eff <= 0 or n_bins == 0:
        return None
    lead = metric.shape[:-2]
    device = metric.device
    with torch.no_grad():
        if mean_head:
            if metric.dim() < 3:
                raise ValueError("mean_head needs a head dim before the token dim")
            metric = metric.mean(dim=-3, keepdim=True).expand(metric.shape)
        offsets = _patch_offsets(lead, n_bins, stride, dst_offset, generator, device)
        dst_pos = torch.arange(n_bins, device=device) * stride + offsets  # (*lead, n_bins)
        is_dst = torch.zeros(*lead, n, dtype=torch.bool, device=device).scatter_(-1, dst_pos, True)
        n_src = n - n_bins
        src_pos = torch.sort(is_dst.to(torch.uint8), dim=-1, stable=True).indices[..., :n_src]
        flat = metric.reshape(-1, n, c)
        g = flat.shape[0]
        src_flat, dst_flat = src_pos.reshape(g, n_src), dst_pos.reshape(g, n_bins)
        # one gather into [sources | destinations]; a and b are views of it
        both = flat.gather(1, torch.cat([src_flat, dst_flat], 1)[..., None].expand(g, n, c))
        best, match = best_destinations(both[:, :n_src], both[:, n_src:])
        rank = torch.sort(best, dim=-1, descending=True, stable=True).indices  # sources by score
        n_unm = n_src - r_eff
        slot = torch.empty(g, n, dtype=torch.long, device=device)
        slot.scatter_(1, dst_flat, n_unm + torch.arange(n_bins, device=device).expand(g, n_bins))
        merged, unmerged = rank[:, :r_eff], rank[:, r_eff:]
        slot.scatter_(1, src_flat.gather(1, unmerged), torch.arange(n_unm, device=device).expand(g, n_unm))
        slot.scatter_(1, src_flat.gather(1, merged), n_unm + match.gather(1, merged))
    return PatchMatch(slot, n_unm + n_bins, lead)


def binned_patch_matching(
    metric: torch.Tensor,
    r: int,
    stride: int,
    dst_offset: str | int | torch.Tensor = "spread",
    generator: torch.Generator | None = None,
    mean_head: bool = False,
) -> tuple[MergeFn, MergeFn]:
    """ToMe-style (merge, unmerge) of :func:`patch_match`, the official GitMerge3D ``patch_based_matching``.

    ``merge(x, mode)`` returns ``cat([unmerged sources, destinations])`` exactly as the official code
    (mean = plain mean including the destination); ``unmerge`` copies each slot back to its tokens.
    """
    m = patch_match(metric, r, stride, dst_offset, generator, mean_head)
    if m is None:
        from .matching import do_nothing

        return do_nothing, do_nothing
    return m.merge, m.unmerge
