"""Attention over merged serialized patches with GitMerge3D's proportional-attention modes.

``size`` is per (patch, head, slot), since every head merges with its own destinations.

- ``"off"``: plain softmax attention (SDPA: FlashAttention-class kernels apply).
- ``"faithful"``: the official ``attn + size.log()`` with size shaped (..., N', 1), i.e. a bias per
  *query row*. Softmax cancels a per-row constant, so this equals ``"off"`` up to rounding; it is
  computed explicitly (no flash kernel) for bit-level comparisons with the official code.
- ``"key"``: ToMe's proportional attention, log(size) added per *key*. Inference on CUDA fp16/bf16 runs the
  key-bias flash kernel (``kernels.attn_bias``, per-head sizes as a (B, H, N) bias); otherwise (training,
  CPU, fp32, dropout) one extra q/k channel (q' = [q, 1/scale], k' = [k, log s], padded to a multiple of 8)
  so SDPA's flash kernels still run and gradients flow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels.prop_attn import use_bias_kernel

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
    if q.dim() >= 3 and use_bias_kernel((q, k, v, size), q.shape[-1], dropout_p):
        return _kernel_key_attention(q, k, v, size, scale)
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


def _kernel_key_attention(q, k, v, size: torch.Tensor, scale: float) -> torch.Tensor:
    """(..., N', D) inputs as (B, H, N', D) views for the key-bias kernel; sizes per (B, H, key)."""
    from .kernels.attn_bias import bias_attention

    lead, d = q.shape[:-2], q.shape[-1]
    if q.dim() == 3:
        q4, k4, v4, s3 = q[:, None], k[:, None], v[:, None], size[:, None]
    else:
        q4, k4, v4 = (t.reshape(-1, t.shape[-3], t.shape[-2], d) for t in (q, k, v))
        s3 = size.reshape(-1, size.shape[-2], size.shape[-1])
    out = bias_attention(q4, k4, v4, size=s3, scale=scale)
    return out[:, 0] if q.dim() == 3 else out.reshape(*lead, q.shape[-2], d)
