"""Flash-style attention forward with a per-key additive bias: softmax(q k^T * scale + bias[key]) v.

Why: proportional attention adds log(size) per key. SDPA's flash kernels take no mask, a float mask drops to
slower kernels, and the log(size) channel pads the head dim 64 -> 72 (+47% in SDPA on an H200). This kernel
loads one bias value per key block instead, in the exp2 domain (``log2(size)`` directly, or ``bias * log2 e``),
so proportional attention costs about what plain flash attention costs.

- One program per (query block, batch x head); online softmax over key blocks, fp32 accumulation.
- q/k/v are read through their strides, as timm's ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``
  leaves them (only the head dim must be contiguous); no copies.
- The output is written as (B, N, H, D) and returned as a (B, H, N, D) view, so the caller's
  ``transpose(1, 2).reshape(B, N, C)`` is free.
- Bias per (batch, key) broadcast over heads (stride 0), or per (batch, head, key) (GitMerge3D's sizes).
  Tail keys beyond N get bias -inf, i.e. weight 0.
- Forward only: no autograd. ``merge_core.attention`` dispatches here for inference (see ``use_bias_kernel``);
  training keeps the exact differentiable paths.
- Block sizes: the first call of a shape class on CUDA times 8 configurations (BLOCK_M 64/128, BLOCK_N
  32/64, warps 4/8) and keeps the fastest for the process (``choose_config``; a bare machine compiles each once);
  ``MERGE_CORE_ATTN_TUNE=0`` uses ``heuristic_config``, ``MERGE_CORE_ATTN_CONFIG=BM,BN,warps,stages`` forces
  one. Inside CUDA-graph capture an untuned shape takes the heuristic (timing cannot run there).
"""

from __future__ import annotations

import functools
import math
import os
import time

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attn_bias_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    o_ptr,
    H,
    NQ,
    NK,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_bb,
    stride_bh,
    stride_bn,
    stride_ob,
    stride_oh,
    stride_on,
    BIAS_IS_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Rows ``BLOCK_M`` of one (batch, head); scores in the exp2 domain: s * scale * log2e + bias2[key]."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < NQ
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < HEAD_DIM  # all true unless the head dim is padded to a power of two (80, 96)
    if BLOCK_D == HEAD_DIM:  # masks constant along the head dim keep the loads vectorised
        qmask = rmask[:, None]
    else:
        qmask = rmask[:, None] & dmask[None, :]
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :], mask=qmask, other=0.0
    )
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    bias_base = bias_ptr + b * stride_bb + h * stride_bh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for n0 in range(0, NK, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < NK
        if BLOCK_D == HEAD_DIM:
            kvmask = cmask[:, None]
        else:
            kvmask = cmask[:, None] & dmask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=kvmask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :], mask=kvmask, other=0.0)
        if BIAS_IS_SIZE:  # log2(size); padded keys get -inf (weight 0)
            sizes = tl.load(bias_base + cols * stride_bn, mask=cmask, other=1.0).to(tl.float32)
            bias2 = tl.where(cmask, tl.log2(sizes), float("-inf"))
        elif HAS_BIAS:
            bias2 = (
                tl.load(bias_base + cols * stride_bn, mask=cmask, other=float("-inf")).to(tl.float32)
                * 1.4426950408889634
            )
        else:
            bias2 = tl.where(cmask, 0.0, float("-inf"))
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale + bias2[None, :]
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row whose keys so far all weigh 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dims[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=qmask,
    )


Config = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
_tuned: dict[tuple, Config] = {}


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _forced_config() -> Config | None:
    forced = os.environ.get("MERGE_CORE_ATTN_CONFIG")
    if not forced:
        return None
    parts = tuple(int(p) for p in forced.split(","))
    if len(parts) != 4:
        raise ValueError(f"MERGE_CORE_ATTN_CONFIG must be BM,BN,warps,stages, got {forced!r}")
    return parts  # type: ignore[return-value]


def heuristic_config(batch_heads: int, nq: int, head_dim: int, device: torch.device) -> Config:
    """128-row blocks when they still give every SM two programs, else 64; 64-key blocks up to head dim 64."""
    block_m = 128 if batch_heads * triton.cdiv(nq, 128) >= 2 * _sm_count(device) else 64
    block_n = 64 if head_dim <= 64 else 32
    warps = 8 if block_m == 128 and head_dim > 64 else 4
    return block_m, block_n, warps, 3 if head_dim <= 64 else 2


def candidate_configs(head_dim: int) -> tuple[Config, ...]:
    """The tiny tuning space: BLOCK_M 64/128 x BLOCK_N 32/64 x num_warps 4/8; 3 stages up to head dim 64, else 2.

    BLOCK_N 32 is there for merged ViT lengths (197 keys in 64-key blocks compute 256, in 32-key blocks 224).
    """
    stages = 3 if head_dim <= 64 else 2
    return tuple((m, n, w, stages) for m in (64, 128) for n in (32, 64) for w in (4, 8))


def _tuning_on(device: torch.device) -> bool:
    """``MERGE_CORE_ATTN_TUNE``: ``auto`` (default) tunes on CUDA, ``1`` also elsewhere, ``0`` never."""
    mode = os.environ.get("MERGE_CORE_ATTN_TUNE", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"MERGE_CORE_ATTN_TUNE must be auto, 0 or 1, got {mode!r}")
    if mode == "0" or (mode == "auto" and device.type != "cuda"):
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _time_once(launch, config: Config, device: torch.device) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        launch(config)
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch(config)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def choose_config(key: tuple, head_dim: int, device: torch.device, launch, fallback: Config) -> Config:
    """The fastest of ``candidate_configs`` for ``key``, timed once per process (compile + best of 3 runs),
    or ``fallback`` where tuning is off (``MERGE_CORE_ATTN_TUNE=0``, CPU, inside CUDA-graph capture)."""
    if key in _tuned:
        return _tuned[key]
    if not _tuning_on(device):
        return fallback
    best, best_ms = fallback, float("inf")
    for config in candidate_configs(head_dim):
        try:
            launch(config)  # compiles
        except Exception:  # e.g. out of shared memory for this block shape: skip it
            continue
        ms = min(_time_once(launch, config, device) for _ in range(3))
        if ms < best_ms:
            best, best_ms = config, ms
    _tuned[key] = best
    return best


def tune_key(q: torch.Tensor, nk: int, is_size: bool, has_bias: bool) -> tuple:
    """Shape class the tuned config is kept for: device, dtype, head dim, key blocks of 64, and query blocks
    of 64 x batch x heads rounded up to a power of two."""
    b, h, nq, d = q.shape
    work = triton.next_power_of_2(b * h * triton.cdiv(nq, 64))
    return (q.device, q.dtype, d, triton.cdiv(nk, 64), work, is_size, has_bias)


def tuned_config(key: tuple) -> Config | None:
    """The configuration ``choose_config`` kept for ``key`` (None: not tuned yet)."""
    return _tuned.get(key)


def _bias_view(t: torch.Tensor, b: int, h: int, nk: int, name: str) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, stride_b, stride_h, stride_n) of a (B, N), (B, N, 1), (B, 1, N) or (B, H, N) per-key tensor."""
    if t.dim() == 3 and t.shape == (b, nk, 1):
        t = t[..., 0]
    if t.dim() == 2 and t.shape == (b, nk):
        return t, t.stride(0), 0, t.stride(1)
    if t.dim() == 3 and t.shape[0] == b and t.shape[1] in (1, h) and t.shape[2] == nk:
        return t, t.stride(0), t.stride(1) if t.shape[1] == h else 0, t.stride(2)
    raise ValueError(
        f"{name} must be (B, N), (B, N, 1), (B, 1, N) or (B, H, N) with B={b} H={h} N={nk}, got {tuple(t.shape)}"
    )


def bias_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    size: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + key bias) v over (B, H, N, D) q and (B, H, Nk, D) k, v (forward only).

    Give ``size`` (the bias is log(size), computed in the kernel) or ``bias`` (added as is), or neither.
    Returns (B, H, N, D), a view of a (B, N, H, D) tensor.
    """
    if size is not None and bias is not None:
        raise ValueError("give size or bias, not both")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q, k, v must be (B, H, N, D) with equal B, H, D, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype in {KERNEL_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    per_key = size if size is not None else bias
    if per_key is None:
        per_key, sb, sh, sn = q.new_empty(1), 0, 0, 0
    else:
        per_key, sb, sh, sn = _bias_view(per_key, b, h, nk, "size" if size is not None else "bias")
    out = torch.empty(b, nq, h, d, device=q.device, dtype=q.dtype)

    def launch(config: Config) -> None:
        _launch(q, k, v, per_key, out, (sb, sh, sn), scale, size is not None, bias is not None, config)

    config = config or _forced_config()
    if config is None:
        key = tune_key(q, nk, size is not None, bias is not None)
        config = choose_config(key, d, q.device, launch, heuristic_config(b * h, nq, d, q.device))
    launch(config)
    return out.transpose(1, 2)


def _launch(q, k, v, per_key, out, bias_strides, scale: float, is_size: bool, has_bias: bool, config: Config) -> None:
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    sb, sh, sn = bias_strides
    block_m, block_n, warps, stages = config
    grid = (triton.cdiv(nq, block_m), b * h)
    _attn_bias_fwd[grid](
        q,
        k,
        v,
        per_key,
        out,
        h,
        nq,
        nk,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        sb,
        sh,
        sn,
        out.stride(0),
        out.stride(2),
        out.stride(1),
        BIAS_IS_SIZE=is_size,
        HAS_BIAS=has_bias,
        DOT_F32=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d),
        HEAD_DIM=d,
        num_warps=warps,
        num_stages=stages,
    )
