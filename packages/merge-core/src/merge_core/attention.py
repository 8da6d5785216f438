"""Proportional attention: softmax(q k^T * scale + log(size) on the key axis) v.

Backends, all exact (they agree in tests and with attention over duplicated keys):

- ``reference``: explicit softmax in the input dtype (ToMe's formulation).
- ``sdpa``: ``F.scaled_dot_product_attention`` with a float mask (B, 1, 1, N); memory-efficient
  kernels accept it, FlashAttention does not.
- ``flex``: FlexAttention with a key-bias ``score_mod`` (compiled on CUDA; eager elsewhere).
- ``channel``: one extra head channel carries log(size): q' = [q, 1/scale], k' = [k, log s], so
  scale * q'.k' = scale * q.k + log s, padded to a multiple of 8 so FlashAttention still runs.
- ``auto``: for inference on CUDA fp16/bf16 the key-bias flash kernel (``kernels.attn_bias``: one bias load
  per key block, no padding, no mask); otherwise the backend measured fastest for the input's device, dtype
  and shape (``choose_backend``). With autograd recording ``auto`` never takes the kernel (no backward).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .kernels.prop_attn import use_bias_kernel

BACKENDS = ("auto", "reference", "sdpa", "flex", "channel")


def _size_2d(size: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``size`` as (B, N); accepts (B, N) or (B, N, 1)."""
    if size.dim() == q.dim() - 1 and size.shape[-1] == 1:
        size = size[..., 0]
    if size.shape != (q.shape[0], q.shape[-2]):
        raise ValueError(
            f"size must have shape (B, N) or (B, N, 1) with B={q.shape[0]}, N={q.shape[-2]}, got {tuple(size.shape)}"
        )
    return size


def _key_bias(size: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """log(size) as (B, N) in q's dtype."""
    return _size_2d(size, q).log().to(q.dtype)


def reference_attention(q, k, v, bias: torch.Tensor, scale: float) -> torch.Tensor:
    attn = (q * scale) @ k.transpose(-2, -1) + bias[:, None, None, :]
    return attn.softmax(dim=-1) @ v


def sdpa_attention(q, k, v, bias: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    mask = bias[:, None, None, :].expand(q.shape[0], 1, q.shape[-2], k.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def channel_attention(q, k, v, bias: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    head_dim = q.shape[-1]
    pad = 8
    extra_q = q.new_zeros(*q.shape[:-1], pad)
    extra_q[..., 0] = 1.0 / scale
    extra_k = k.new_zeros(*k.shape[:-1], pad)
    extra_k[..., 0] = bias[:, None, :]
    q2 = torch.cat([q, extra_q], dim=-1)
    k2 = torch.cat([k, extra_k], dim=-1)
    v2 = F.pad(v, (0, pad))
    out = F.scaled_dot_product_attention(q2, k2, v2, dropout_p=dropout_p, scale=scale)
    return out[..., :head_dim]


def _flex_bias(q, k, v, bias: torch.Tensor, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, kv_idx]

    return flex_attention(q, k, v, score_mod=score_mod, scale=scale)


@functools.cache
def _compiled_flex():
    # the closure is created inside the compiled region: passing a fresh score_mod into a compiled
    # flex_attention re-guards on the function object, recompiles every call and falls back to eager
    return torch.compile(_flex_bias)


def flex_attention_bias(q, k, v, bias: torch.Tensor, scale: float) -> torch.Tensor:
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else _flex_bias
    return fn(q, k, v, bias, scale)


# Tokens from which the log(size)-channel backend beats SDPA's float mask on CUDA (fp16/bf16): the channel's
# q/k/v copies cost O(N D) while the mask's slower attention kernel costs O(N^2 D). H100, 2026-11-22: the mask
# won at N = 99 and 197 (0.63 vs 0.80 ms at 256x12x197x64); docs/gpu-results.md has the N = 1025 rows.
CHANNEL_MIN_TOKENS = 512


def choose_backend(q: torch.Tensor, dropout_p: float = 0.0) -> str:
    """The backend measured fastest for ``q``'s device, dtype and shape (docs/gpu-results.md).

    - CUDA, fp16/bf16, no dropout, head dim a multiple of 8 with room for 8 more channels in a flash kernel,
      and at least ``CHANNEL_MIN_TOKENS`` tokens: ``channel`` (FlashAttention on D + 8).
    - Everything else (CPU, fp32, dropout, short sequences): ``sdpa`` with a float key mask.
    ``flex`` is never picked: it was 10-30x slower than both in every measurement here.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    head_dim, tokens = q.shape[-1], q.shape[-2]
    flash_dtype = q.dtype in (torch.float16, torch.bfloat16)
    channel_fits = head_dim % 8 == 0 and head_dim + 8 <= 256
    if q.is_cuda and flash_dtype and dropout_p == 0.0 and channel_fits and tokens >= CHANNEL_MIN_TOKENS:
        return "channel"
    return "sdpa"


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over (B, H, N, D) with ``log(size)`` added to every key's logit.

    ``size=None`` means every token has size 1 (plain SDPA).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 4 or k.shape != q.shape[:-1] + (k.shape[-1],) or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q, k must be (B, H, N, D) with equal shapes, got {tuple(q.shape)} and {tuple(k.shape)}")
    for name, tensor in (("k", k), ("v", v), ("size", size)):
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if size is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if backend == "auto" and use_bias_kernel((q, k, v, size), q.shape[-1], dropout_p):
        from .kernels.attn_bias import bias_attention

        return bias_attention(q, k, v, size=_size_2d(size, q), scale=scale)
    bias = _key_bias(size, q)
    if backend == "auto":
        backend = choose_backend(q, dropout_p)
    if backend == "reference":
        return reference_attention(q, k, v, bias, scale)
    if backend == "flex":
        if dropout_p:
            raise ValueError("dropout_p must be 0 with backend='flex'")
        return flex_attention_bias(q, k, v, bias, scale)
    if backend == "channel":
        return channel_attention(q, k, v, bias, scale, dropout_p)
    return sdpa_attention(q, k, v, bias, scale, dropout_p)
