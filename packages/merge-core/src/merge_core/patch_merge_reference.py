"""Plain-torch oracle of the fused merged patch attention (``kernels.patch_merge_attn``).

Built from merge-core's own pieces, independently of the kernel: ``binned.patch_match`` (the official ``no_rand``
matcher on v), ``PatchMatch.merge`` (plain means of q, k, v in fp32, rounded to the input dtype as a merged tensor
in that dtype would be), an explicit fp32 softmax attention (+ log(size) per key for ``prop_attn="key"``) and
``PatchMatch.unmerge``.
"""

from __future__ import annotations

import torch

from .binned import PatchMatch, patch_match


def merged_patch_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: int,
    stride: int,
    offsets: str | torch.Tensor = "spread",
    prop_attn: str = "off",
    scale: float | None = None,
) -> tuple[torch.Tensor, PatchMatch] | None:
    """(P, H, N, D) q, k, v -> ((P, H, N, D) output in q's dtype, the matching); None when nothing merges.

    ``offsets``: "spread" (official ``no_rand`` head offsets) or an (H,) tensor of per-head destination offsets.
    """
    if prop_attn not in ("off", "key"):
        raise ValueError(f"prop_attn must be 'off' or 'key', got {prop_attn!r}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must be equal (P, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    m = patch_match(v, r, stride, offsets)
    if m is None:
        return None
    d = q.shape[-1]
    merged = m.merge(torch.cat([q, k, v], -1).float()).to(q.dtype).float()
    qm, km, vm = merged[..., :d], merged[..., d : 2 * d], merged[..., 2 * d :]
    scale = d**-0.5 if scale is None else scale
    logits = qm @ km.transpose(-1, -2) * scale
    if prop_attn == "key":
        logits = logits + m.sizes().log()[..., None, :]
    out = torch.softmax(logits, -1) @ vm
    return m.unmerge(out).to(q.dtype), m
