"""Proportional attention that keeps FlashAttention: the log(size) channel built inside the qkv projection.

``attention.channel_attention`` appends one channel to q (1/scale) and k (log size) so that
``scale * q'.k' = scale * q.k + log s`` and SDPA's flash kernel still applies; but it builds q', k', v' with
``cat``/``pad``, i.e. three extra copies of q, k and v per layer. Here the qkv weight is zero-padded from
(3, H, D, C) to (3, H, D + 8, C) (bias: 1/scale on q's first extra channel) so the projection writes the
padded q', k', v' directly; only log(size) is then written into k's extra channel (B x H x N values).
Cost: +8/D of the qkv GEMM and a head dim of D + 8 in the attention kernel; no copies. Exact (same
maths as the ``reference`` backend) and differentiable (the padding is applied to the weight each call).

For inference (no autograd recording) on CUDA fp16/bf16 both give way to the key-bias flash kernel
(``kernels.attn_bias``): the unpadded qkv projection feeds it q/k/v as strided views and log(size) is
taken inside the kernel, so neither the padded head dim nor any copy is paid. ``use_bias_kernel`` is that
dispatch rule, shared by ``attention.proportional_attention`` and ``patch_attention``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

PAD = 8
ATTN_KERNEL_MODES = ("never", "always")
# Default off: on an H200 (torch 2.11, triton 3.6, 2026-12-02, results/merge-bench-prop-attn-NVIDIA-H200.*) the
# key-bias kernel ran at 0.41-0.77x of SDPA without a mask where the padded-qkv channel path ran at 0.70-0.87x,
# at every ViT-B/ViT-L@512 shape measured; the channel path stays the default until the kernel beats it.
DEFAULT_ATTN_KERNEL_MODE = "never"
# head dims the bias kernel compiles for (kernels.attn_bias.SUPPORTED_HEAD_DIMS, kept here so that the
# dispatch rule never imports Triton)
KERNEL_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
_attn_mode_stack: list[str] = []


def attn_kernel_mode_now() -> str:
    """``always`` (the bias kernel where ``use_bias_kernel`` allows) or ``never`` (the default;
    ``MERGE_CORE_ATTN_KERNEL`` or ``attn_kernel_mode`` change it)."""
    if _attn_mode_stack:
        return _attn_mode_stack[-1]
    mode = os.environ.get("MERGE_CORE_ATTN_KERNEL", DEFAULT_ATTN_KERNEL_MODE)
    if mode not in ATTN_KERNEL_MODES:
        raise ValueError(f"MERGE_CORE_ATTN_KERNEL must be one of {ATTN_KERNEL_MODES}, got {mode!r}")
    return mode


@contextlib.contextmanager
def attn_kernel_mode(mode: str) -> Iterator[None]:
    """Turn the key-bias kernel on (``"always"``) or off (``"never"``) inside the block, e.g. for A/B timing.

    ``merge_core.kernels.kernel_mode`` still decides devices: ``auto`` runs it on CUDA only, ``always`` on CPU
    too (under ``TRITON_INTERPRET=1``: how the CPU tests exercise it), ``never`` nowhere.
    """
    if mode not in ATTN_KERNEL_MODES:
        raise ValueError(f"mode must be one of {ATTN_KERNEL_MODES}, got {mode!r}")
    _attn_mode_stack.append(mode)
    try:
        yield
    finally:
        _attn_mode_stack.pop()


def use_bias_kernel(tensors: Sequence[torch.Tensor | None], head_dim: int, dropout_p: float = 0.0) -> bool:
    """Whether attention with a per-key bias over ``tensors`` (q first; k, v, the bias, weights) should run the
    Triton forward kernel.

    Inference only (the kernel has no backward: with autograd recording, the exact differentiable paths
    run), no dropout, fp16/bf16 (fp32 too when kernels are forced with ``kernel_mode("always")``), a head
    dim in ``KERNEL_HEAD_DIMS``, all tensors on one device, not under ``torch.compile`` tracing.
    """
    from . import _device_ok, get_mode

    q = tensors[0]
    if q is None or dropout_p or attn_kernel_mode_now() == "never" or not _device_ok(q):
        return False
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if get_mode() == "always" else ())
    present = [t for t in tensors if t is not None]
    if q.dtype not in dtypes or head_dim not in KERNEL_HEAD_DIMS or any(t.device != q.device for t in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def qkv_channel_supported(attn, dropout_p: float = 0.0) -> bool:
    """The trick needs plain q/k (no q/k-norm over the head dim), no dropout, and a flash-sized head."""
    return (
        isinstance(attn.q_norm, torch.nn.Identity)
        and isinstance(attn.k_norm, torch.nn.Identity)
        and dropout_p == 0.0
        and attn.head_dim % 8 == 0
        and attn.head_dim + PAD <= 256
        and attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    )


def qkv_channel_attention(
    attn, x: torch.Tensor, size: torch.Tensor, *, kernel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proportional attention of a timm ``Attention`` on ``x`` (B, N, C) with token ``size`` (B, N[, 1]).

    With ``kernel`` (default) inference takes the key-bias kernel where ``use_bias_kernel`` allows; otherwise,
    and always with autograd recording, the padded-channel projection + SDPA.
    Returns (attention output (B, H, N, D) before the head merge, k (B, H, N, D) for the merge metric).
    """
    b, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    if size.dim() == 3:
        size = size[..., 0]
    if kernel and use_bias_kernel((x, attn.qkv.weight, attn.qkv.bias, size), d):
        from .attn_bias import bias_attention

        q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        return bias_attention(q, k, v, size=size, scale=attn.scale), k
    weight, bias = _padded_qkv(attn, x)
    qkv = F.linear(x, weight, bias).view(b, n, 3, h, d + PAD).permute(2, 0, 3, 1, 4)
    qkv[1, :, :, :, d] = size.log().to(qkv.dtype)[:, None, :]
    q, k, v = qkv.unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    return out[..., :d], k[..., :d]


def _pad_qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, d, c = attn.num_heads, attn.head_dim, x.shape[-1]
    weight = F.pad(attn.qkv.weight.view(3, h, d, c), (0, 0, 0, PAD)).view(-1, c)
    extra = x.new_zeros(3, h, d + PAD)
    extra[0, :, d] = 1.0 / attn.scale
    bias = extra if attn.qkv.bias is None else F.pad(attn.qkv.bias.view(3, h, d), (0, PAD)) + extra
    return weight, bias.view(-1)


def _padded_qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (weight, bias); cached on the module for inference (saves ~8 small ops per layer per call).

    The cache key holds the parameters' storage, version counters (bumped by in-place updates such as
    ``load_state_dict`` or an optimizer step), dtype and scale, so a changed weight is never served stale.
    With autograd on, or under ``torch.compile``, the padding is recomputed (differentiable, traceable).
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _pad_qkv(attn, x)
    w, bias = attn.qkv.weight, attn.qkv.bias
    key = (w.data_ptr(), w._version, w.dtype, w.device, attn.scale)
    if bias is not None:
        key += (bias.data_ptr(), bias._version, bias.dtype)
    cached = attn.__dict__.get("_merge_core_qkv_pad")
    if cached is None or cached[0] != key:
        cached = (key, *_pad_qkv(attn, x))
        attn.__dict__["_merge_core_qkv_pad"] = cached
    return cached[1], cached[2]
