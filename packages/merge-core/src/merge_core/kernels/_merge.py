"""The fused size-weighted merge (``merge_wavg``) for a bipartite matching plan (Triton, imported lazily).

Kept apart from the matcher (``_triton``) so that matching and merging kernels can evolve separately.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_same_tokens
from ._triton import _add, _pow2


@triton.jit
def _merge_wavg_kernel(
    x_ptr,
    s_ptr,
    unm_ptr,
    src_ptr,
    dst_ptr,
    out_ptr,
    out_s_ptr,
    C,
    U,
    Tb,
    R,
    PB,
    n_unm_blocks,
    stride_xb,
    stride_xt,
    stride_sb,
    stride_st,
    stride_ub,
    stride_ut,
    stride_srcb,
    stride_srct,
    stride_dstb,
    stride_dstt,
    stride_ob,
    stride_ot,
    stride_osb,
    HAS_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program: BLOCK_ROWS output tokens x BLOCK_C channels of one batch row.

    Output order (ToMe's): [protected pairs interleaved, unmerged a-tokens, destinations]. With
    ``PB`` protected destinations, unmerged slot k goes to 2k (k < PB) or PB + k; destination d goes
    to 2d + 1 (d < PB) or U + d.
    """
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    bid = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    pid_c = tl.program_id(2)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < C
    x_base = x_ptr + bid * stride_xb
    if pid < n_unm_blocks:
        k = (pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        kmask = k < U
        utok = 2 * tl.load(unm_ptr + bid * stride_ub + k * stride_ut, mask=kmask, other=0)
        uvals = tl.load(x_base + utok[:, None] * stride_xt + ch[None, :], mask=kmask[:, None] & cmask[None, :])
        upos = tl.where(k < PB, 2 * k, PB + k)
        tl.store(
            out_ptr + bid * stride_ob + upos[:, None] * stride_ot + ch[None, :],
            uvals,
            mask=kmask[:, None] & cmask[None, :],
        )
        if pid_c == 0:
            if HAS_SIZE:
                sz = tl.load(s_ptr + bid * stride_sb + utok * stride_st, mask=kmask, other=1.0)
            else:
                sz = tl.full([BLOCK_ROWS], 1.0, tl.float32)
            tl.store(out_s_ptr + bid * stride_osb + upos, sz.to(DTYPE), mask=kmask)
    else:
        d = (pid - n_unm_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        dmask = d < Tb
        dtok = 2 * d.to(tl.int64) + 1
        if HAS_SIZE:
            s_own = tl.load(s_ptr + bid * stride_sb + dtok * stride_st, mask=dmask, other=1.0).to(tl.float32)
        else:
            s_own = tl.full([BLOCK_ROWS], 1.0, tl.float32)
        xmask = dmask[:, None] & cmask[None, :]
        acc = tl.load(x_base + dtok[:, None] * stride_xt + ch[None, :], mask=xmask, other=0.0).to(tl.float32)
        acc = acc * s_own[:, None]
        s_acc = s_own
        for r0 in range(0, R, BLOCK_R):
            j = r0 + tl.arange(0, BLOCK_R)
            jmask = j < R
            dst = tl.load(dst_ptr + bid * stride_dstb + j * stride_dstt, mask=jmask, other=-1)
            sdtok = 2 * tl.load(src_ptr + bid * stride_srcb + j * stride_srct, mask=jmask, other=0)
            if HAS_SIZE:
                s_src = tl.load(s_ptr + bid * stride_sb + sdtok * stride_st, mask=jmask, other=0.0).to(tl.float32)
            else:
                s_src = tl.where(jmask, 1.0, 0.0)
            xs = tl.load(
                x_base + sdtok[:, None] * stride_xt + ch[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0
            )
            xs = xs.to(tl.float32) * s_src[:, None]
            hit = d[:, None] == dst[None, :]
            s_acc += tl.reduce(tl.where(hit, s_src[None, :], 0.0), 1, _add)
            onehot = tl.where(hit, 1.0, 0.0)
            if SPLIT:  # two 16-bit matmuls carry ~2x the mantissa: the sum stays fp32-accurate
                hi = xs.to(DTYPE)
                lo = (xs - hi.to(tl.float32)).to(DTYPE)
                acc += tl.dot(onehot.to(DTYPE), hi)
                acc += tl.dot(onehot.to(DTYPE), lo)
            else:  # fp32, or bf16 under the CPU interpreter (its bf16 dot is broken)
                acc += tl.dot(onehot, xs, input_precision="ieee")
        dpos = tl.where(d < PB, 2 * d + 1, U + d)
        out = acc / s_acc[:, None]
        tl.store(out_ptr + bid * stride_ob + dpos[:, None] * stride_ot + ch[None, :], out.to(DTYPE), mask=xmask)
        if pid_c == 0:
            tl.store(out_s_ptr + bid * stride_osb + dpos, s_acc.to(DTYPE), mask=dmask)


def merge_wavg(plan, x: torch.Tensor, size: torch.Tensor | None):
    """Fused ``merge_wavg`` for a bipartite matching plan: returns (merged x, merged size)."""
    check_same_tokens(x, plan.shape, plan.device, "x")
    lead, (t, c) = x.shape[:-2], x.shape[-2:]
    x3 = x.reshape(-1, t, c)
    s3 = None if size is None else size.reshape(-1, t, 1)
    out, out_size = merge_wavg_indices(x3, s3, plan.unm_idx, plan.src_idx, plan.dst_idx, plan.protected_b)
    return out.reshape(*lead, t - plan.r, c), out_size.reshape(*lead, t - plan.r, 1)


def merge_wavg_indices(x3, size3, unm, src, dst, protected_b: int):
    """The merge kernel on (n, T, C) ``x3`` and (n, T, 1) ``size3`` (or None) with (n, U/r, 1) index lists:
    (merged x (n, T - r, C), merged size (n, T - r, 1)), both contiguous."""
    n, t, c = x3.shape
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    r = src.shape[-2]
    u, tb = unm.shape[-2], t // 2
    out = torch.empty(n, t - r, c, device=x3.device, dtype=x3.dtype)
    out_size = torch.empty(n, t - r, device=x3.device, dtype=x3.dtype)
    s2 = out_size if size3 is None else size3.reshape(n, t)
    block_c = min(128, _pow2(c))
    block_rows = 64
    n_unm_blocks = triton.cdiv(u, block_rows)
    grid = (n, n_unm_blocks + triton.cdiv(tb, block_rows), triton.cdiv(c, block_c))
    _merge_wavg_kernel[grid](
        x3,
        s2,
        unm,
        src,
        dst,
        out,
        out_size,
        c,
        u,
        tb,
        r,
        protected_b,
        n_unm_blocks,
        x3.stride(0),
        x3.stride(1),
        s2.stride(0),
        s2.stride(1),
        unm.stride(0),
        unm.stride(1),
        src.stride(0),
        src.stride(1),
        dst.stride(0),
        dst.stride(1),
        out.stride(0),
        out.stride(1),
        out_size.stride(0),
        HAS_SIZE=size3 is not None,
        SPLIT=x3.dtype == torch.float16 or (x3.dtype == torch.bfloat16 and x3.is_cuda),
        BLOCK_ROWS=block_rows,
        BLOCK_R=16 if r <= 16 else 32,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out, out_size[..., None]
