"""Attention over merged serialized patches with GitMerge3D's proportional-attention modes.

``size`` is per (patch, head, slot), since every head merges with its own destinations.

- ``"off"``: plain softmax attention (SDPA: FlashAttention-class kernels apply).
- ``"faithful"``: the official ``attn + size.log()`` with size shaped (..., N', 1), i.e. a bias per
  *query row*. Softmax cancels a per-row constant, so this equals ``"off"`` up to rounding; it is
  computed explicitly (no flash kernel) for bit-level comparisons with the official code.
- ``"key"``: ToMe's proportional attention, log(size) added per *key*, carried as one extra q/k channel
  (q' = [q, 1/scale], k' = [k, log s], padded to a multiple of 8) so flash kernels still run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROP_ATTN = ("off", "faithful", "key")


def patch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor | None = None,
    prop_attn: str = "off",
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale [+ bias]) v over (..., N', D) with the bias of ``prop_attn``."""
    if prop_attn not in PROP_ATTN:
        raise ValueError(f"prop_attn must be one of {PROP_ATTN}, got {prop_attn!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if prop_attn == "off" or size is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if size.shape != k.shape[:-1]:
        raise ValueError(f"size must have the keys' shape {tuple(k.shape[:-1])}, got {tuple(size.shape)}")
    if prop_attn == "faithful" and q.shape[-2] != k.shape[-2]:
        raise ValueError("prop_attn='faithful' adds the size per query row, so it needs as many queries as keys")
    log_size = size.log().to(q.dtype)
    if prop_attn == "faithful":
        mask = log_size[..., :, None].expand(*q.shape[:-1], k.shape[-2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    head_dim = q.shape[-1]
    pad = 8 - head_dim % 8 if head_dim % 8 else 8
    extra_q = q.new_zeros(*q.shape[:-1], pad)
    extra_q[..., 0] = 1.0 / scale
    extra_k = k.new_zeros(*k.shape[:-1], pad)
    extra_k[..., 0] = log_size
    out = F.scaled_dot_product_attention(
        torch.cat([q, extra_q], -1), torch.cat([k, extra_k], -1), F.pad(v, (0, pad)), dropout_p=dropout_p, scale=scale
    )
    return out[..., :head_dim]
