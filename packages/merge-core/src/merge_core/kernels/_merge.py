"""The fused size-weighted merge (``merge_wavg``) for a bipartite matching plan (Triton, imported lazily).

Kept apart from the matcher (``_triton``) so that matching and merging kernels can evolve separately.

Two ways to find a destination's sources (same output kernel, picked by ``use_sorted_sources``):

- scan (small ``r``, one launch): every block of ``BLOCK_ROWS`` destinations reads all ``r`` (src, dst) pairs
  and adds the ones that hit it with a one-hot ``tl.dot``; O(Tb / BLOCK_ROWS * r) row loads, which is nothing
  at ViT sizes (r = 16..40) and dominates at long sequences (N = 16384, r = 4096: 5.4 ms at C = 768).
- sorted (large ``r``, two launches): ``_sources_by_dst_kernel`` first orders the pairs by (dst, position) by
  counting (slot of pair j = #{k: (dst_k, k) < (dst_j, j)}: no sort, no atomics, deterministic) and writes where
  each destination block's sources start; the merge then reads only its own contiguous slot range, so every
  source row is loaded once and the work is O(T * C) + O(r^2) integer compares for the ordering.

Sources of one destination are summed in a fixed order (by plan position), so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import check_same_tokens
from ._triton import _add, _pow2

BLOCK_ROWS = 64  # destinations (and unmerged rows) per merge program


@triton.jit
def _merge_wavg_kernel(
    x_ptr,
    s_ptr,
    unm_ptr,
    src_ptr,
    dst_ptr,
    blk_ptr,
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
    stride_blk,
    stride_ob,
    stride_ot,
    stride_osb,
    HAS_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    SORTED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program: BLOCK_ROWS output tokens x BLOCK_C channels of one batch row.

    Output order (ToMe's): [protected pairs interleaved, unmerged a-tokens, destinations]. With
    ``PB`` protected destinations, unmerged slot k goes to 2k (k < PB) or PB + k; destination d goes
    to 2d + 1 (d < PB) or U + d. SORTED: (src, dst) are ordered by destination and destination block k reads
    only slots ``blk[k]:blk[k + 1]``; otherwise every block scans all R pairs.
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
        if SORTED:
            blk = bid * stride_blk + pid - n_unm_blocks
            j_lo = tl.load(blk_ptr + blk)
            j_hi = tl.load(blk_ptr + blk + 1)
        else:
            j_lo = 0
            j_hi = R
        for r0 in range(j_lo, j_hi, BLOCK_R):
            j = r0 + tl.arange(0, BLOCK_R)
            jmask = j < j_hi
            dst = tl.load(dst_ptr + bid * stride_dstb + j * stride_dstt, mask=jmask, other=-1)
            sdtok = 2 * tl.load(src_ptr + bid * stride_srcb + j * stride_srct, mask=jmask, other=0).to(tl.int64)
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


@triton.jit
def _sources_by_dst_kernel(
    src_ptr,
    dst_ptr,
    ssrc_ptr,
    sdst_ptr,
    blk_ptr,
    R,
    n_blocks,
    n_pair_chunks,
    stride_srcb,
    stride_srct,
    stride_dstb,
    stride_dstt,
    stride_sb,
    stride_blk,
    BLOCK_ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    KEY64: tl.constexpr,
):
    """Order the plan's (src, dst) pairs by destination, without a sort; one batch row per ``program_id(0)``.

    Programs (axis 1) < n_pair_chunks: CHUNK pairs each; pair j goes to slot #{k: key_k < key_j} with the unique key
    dst * R + j (a stable counting sort: equal destinations keep plan order). The others: CHUNK block bounds
    each, blk[m] = #{k: dst_k < m * BLOCK_ROWS} = first slot of destination block m (m = 0..n_blocks).
    Counts accumulate in a (CHUNK, BLOCK_K) tile and are reduced once at the end.
    """
    KEY: tl.constexpr = tl.int64 if KEY64 else tl.int32
    bid = tl.program_id(0).to(tl.int64)  # batch rows on axis 0 (up to 2**31 - 1 of them)
    pid = tl.program_id(1)
    dst_base = dst_ptr + bid * stride_dstb
    # no divergent branches: both roles compute the same tensors, masks pick the role
    j = pid * CHUNK + tl.arange(0, CHUNK)  # >= R in bound programs (pid >= n_pair_chunks)
    jmask = j < R
    m = (pid - n_pair_chunks) * CHUNK + tl.arange(0, CHUNK)  # < 0 in pair programs
    mmask = (m >= 0) & (m <= n_blocks)
    dj = tl.load(dst_base + j * stride_dstt, mask=jmask, other=0).to(KEY)
    # a block bound's key is that of the first possible pair of the block's first destination
    mine = tl.where(m < 0, dj * R + j, (m * BLOCK_ROWS).to(KEY) * R)
    pad = (n_blocks + 1) * BLOCK_ROWS  # padding pairs sort after every key (a destination past the last block)
    cnt = tl.full([CHUNK, BLOCK_K], 0, tl.int32)
    for k0 in range(0, R, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        dk = tl.load(dst_base + k * stride_dstt, mask=k < R, other=0).to(KEY)
        key = tl.where(k < R, dk, pad) * R + k
        cnt += (key[None, :] < mine[:, None]).to(tl.int32)
    slot = tl.reduce(cnt, 1, _add)
    sj = tl.load(src_ptr + bid * stride_srcb + j * stride_srct, mask=jmask, other=0)
    tl.store(ssrc_ptr + bid * stride_sb + slot, sj.to(tl.int32), mask=jmask)
    tl.store(sdst_ptr + bid * stride_sb + slot, dj.to(tl.int32), mask=jmask)
    tl.store(blk_ptr + bid * stride_blk + m, slot, mask=mmask)


SORTED_MIN_WORK = 2  # sorted path once the scan would load the sources more than 2x the token count


def use_sorted_sources(t: int, r: int) -> bool:
    """Whether to order sources by destination first: when the scan path's repeated source loads
    (r per destination block) outweigh the extra launch, i.e. r * ceil(Tb / BLOCK_ROWS) > 2 * T.
    ViT rows (N = 197..1025, r = 16..40) stay on the one-launch scan; N = 4096, r = 1024 sorts."""
    return r * triton.cdiv(t // 2, BLOCK_ROWS) > SORTED_MIN_WORK * t


def sources_by_dst(src: torch.Tensor, dst: torch.Tensor, tb: int):
    """(src, dst, block starts) with the (n, r, 1) pairs ordered by destination (stable): two (n, r) int32
    lists and (n, ceil(tb / BLOCK_ROWS) + 1) int32 slot offsets, from one launch."""
    n, r = src.shape[0], src.shape[-2]
    n_blocks = triton.cdiv(tb, BLOCK_ROWS)
    buf = torch.empty(n, 2 * r + n_blocks + 1, device=src.device, dtype=torch.int32)  # one allocation
    ssrc, sdst, blk = buf[:, :r], buf[:, r : 2 * r], buf[:, 2 * r :]
    # CPU (the interpreter's tl.reduce is a Python loop per element): small tiles keep the tests fast
    chunk, block_k = (64, 128) if src.is_cuda else (16, 16)
    n_pair_chunks = triton.cdiv(r, chunk)
    grid = (n, n_pair_chunks + triton.cdiv(n_blocks + 1, chunk))
    _sources_by_dst_kernel[grid](
        src,
        dst,
        ssrc,
        sdst,
        blk,
        r,
        n_blocks,
        n_pair_chunks,
        src.stride(0),
        src.stride(1),
        dst.stride(0),
        dst.stride(1),
        buf.stride(0),
        buf.stride(0),
        BLOCK_ROWS=BLOCK_ROWS,
        CHUNK=chunk,
        BLOCK_K=block_k,
        KEY64=(triton.cdiv(tb, BLOCK_ROWS) + 2) * BLOCK_ROWS * r >= 2**31,
        num_warps=4,
    )
    return ssrc, sdst, blk


def merge_wavg(plan, x: torch.Tensor, size: torch.Tensor | None):
    """Fused ``merge_wavg`` for a bipartite matching plan: returns (merged x, merged size)."""
    check_same_tokens(x, plan.shape, plan.device, "x")
    lead, (t, c) = x.shape[:-2], x.shape[-2:]
    x3 = x.reshape(-1, t, c)
    s3 = None if size is None else size.reshape(-1, t, 1)
    out, out_size = merge_wavg_indices(x3, s3, plan.unm_idx, plan.src_idx, plan.dst_idx, plan.protected_b)
    return out.reshape(*lead, t - plan.r, c), out_size.reshape(*lead, t - plan.r, 1)


# The scan path runs r <= SCAN_ONE_STEP sources in one loop step (a next-power-of-two block) instead of 32 per
# step: fewer dependent iterations per destination block at batch 1 (r = 40: one step instead of two). 0 = off;
# module-level so benchmarks can A/B it (merge_bench.small_batch's "onestep" variant).
SCAN_ONE_STEP = 0


def merge_wavg_indices(
    x3, size3, unm, src, dst, protected_b: int, sorted_sources: bool | None = None, block_r: int | None = None
):
    """The merge kernel on (n, T, C) ``x3`` and (n, T, 1) ``size3`` (or None) with (n, U/r, 1) index lists:
    (merged x (n, T - r, C), merged size (n, T - r, 1)), both contiguous. ``sorted_sources`` forces the
    sorted (True) or scan (False) path; None picks by ``use_sorted_sources``. ``block_r`` (benchmarks):
    sources per loop step instead of the default (16 for r <= 16, else 32)."""
    n, t, c = x3.shape
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    r = src.shape[-2]
    u, tb = unm.shape[-2], t // 2
    out = torch.empty(n, t - r, c, device=x3.device, dtype=x3.dtype)
    out_size = torch.empty(n, t - r, device=x3.device, dtype=x3.dtype)
    s2 = out_size if size3 is None else size3.reshape(n, t)
    if sorted_sources is None:
        sorted_sources = use_sorted_sources(t, r)
    if sorted_sources and r > 0 and n > 0:
        src, dst, blk = sources_by_dst(src, dst, tb)
        src, dst = src[..., None], dst[..., None]
    else:
        sorted_sources, blk = False, out_size
    if block_r is None:
        block_r = 16 if r <= 16 and not sorted_sources else 32
        if not sorted_sources and 16 < r <= SCAN_ONE_STEP:
            block_r = _pow2(r)
    elif block_r < 16 or block_r & (block_r - 1):
        raise ValueError(f"block_r must be a power of two >= 16, got {block_r}")
    block_c = min(128, _pow2(c))
    n_unm_blocks = triton.cdiv(u, BLOCK_ROWS)
    grid = (n, n_unm_blocks + triton.cdiv(tb, BLOCK_ROWS), triton.cdiv(c, block_c))
    _merge_wavg_kernel[grid](
        x3,
        s2,
        unm,
        src,
        dst,
        blk,
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
        blk.stride(0),
        out.stride(0),
        out.stride(1),
        out_size.stride(0),
        HAS_SIZE=size3 is not None,
        SPLIT=x3.dtype == torch.float16 or (x3.dtype == torch.bfloat16 and x3.is_cuda),
        SORTED=sorted_sources,
        BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out, out_size[..., None]
