"""GitMerge3D's ``no_rand`` merged patch attention (inference) as ONE Triton launch.

Why: the eager merged attend (match, sort, scatter-mean, SDPA, gather) is ~10 small kernels, and on an H200 it
costs more GPU time (0.14-0.28 ms at Sonata's stage 0) than the flash attention on all 1024 tokens it replaces,
so merging made Sonata slower. Here one program per (patch, head) does the whole thing:

1. match: cosine of ``v`` rows against the destinations (positions ``j * stride + offset[h]``, ``j < N // stride``;
   the tail after ``n_bins * stride`` is all sources), rounded to the input dtype like the torch matcher; best
   destination per source, ties to the lowest destination index (``torch.max``);
2. select: the ``u = n_src - min(n_src, r)`` lowest-scoring sources stay (``u`` rounds of argmin; among equal
   scores the later token stays, as the official stable descending sort merges the earlier one); ``u <= U_MAX``;
3. merge: plain slot means of q, k, v (destination included) by a one-hot ``tl.dot`` (tokens x slots, fp32
   accumulation; deterministic, no atomics); sizes = group counts;
4. attend: flash-style softmax(q k^T * scale [+ log(size_key)]) v over the ``N' = n_bins + u`` slots, fp32 softmax;
5. unmerge: every token gathers its slot's output, written to a (P, N, H, D) buffer (returned as the (P, H, N, D)
   view, so the caller's transpose + reshape is a view).

Where all N' slots fit one ``BLOCK_S`` block (Sonata at r >= 0.8: N' = 103 of 1024), steps 1 and 3 share one
pass over the tokens (the sums start from the best match, and each unmerged pick moves its token out of its
destination's sums), step 4 runs in registers and step 5 selects by a one-hot dot: two passes over the tokens.
Otherwise merged q/k/v, sizes and slot outputs are staged in a small per-program global scratch (L2 resident).
Scores and slots always are; ``tl.debug_barrier()`` separates the phases that write and read the scratch.
Slot order: destinations first (bin order), then the unmerged sources by descending score: the order of
``gitmerge3d``'s ``spread_slots`` (merge-core's ``PatchMatch`` lists the unmerged sources first; attention does
not depend on the order). Forward only; the torch oracle is
``merge_core.patch_merge_reference.merged_patch_attention_reference``.

Split variant (issue 11 v2; where N' <= 128). One program walks its group's N tokens serially (~100 us on an H200
for N = 1024 whatever the group count), and at Sonata's deeper levels only 24-60 groups run on 132 SMs. The split
variant spreads each group over S programs (grid (G, S), S a power of 2 filling ~2 waves, ``split_count``) in two
launches: ``_pma_split_match`` matches its token chunk (score + pass-1 slot per token) and writes the chunk's slot
sums of q | k | v | count into its own partial (every source in its destination: the unmerged ones are not known
yet; no atomics, deterministic); ``_pma_split_attend`` (same grid) has every program redo the group-wide tiny steps
(the u picks over all N scores with the same tie rule, read-only: round i takes the least (score, -token) after
round i-1's; the S partials summed in chunk order; the picks moved to their own slots; the N' x N' attention) and
unmerge only its own chunk. The per-shape tuner times both variants (config ``(BLOCK_T, BLOCK_S, warps, S)``, S = 0
the one-program kernel); ``MERGE_CORE_PMA_VARIANT=single|split`` (or ``variant=``) restricts it.

Host cost: q, k, v are equally strided slices of one qkv, so one stride set is passed (else all three are made
contiguous); workspace offsets and the output strides are derived in the kernels; one workspace allocation (slot
map and scores included) besides the output; plain-int shape arithmetic in the wrapper.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..binned import official_head_offsets

U_MAX = 16  # most unmerged sources the kernel selects (u rounds of argmin); more -> the wrapper returns None
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64)
MAX_TOKENS = 4096
PROP_ATTN = ("off", "key")
LOG2E = 1.4426950408889634

Config = tuple[int, int, int, int]  # (BLOCK_T tokens, BLOCK_S slots, num_warps, S: 0 one program, else split)


# Reductions combine with Triton's own ``tl.standard`` functions through ``tl.reduce``: the interpreter maps those
# to numpy (any other combine function runs element by element in Python, minutes on a 1024-token patch).
@triton.jit
def _own_add(a, b):
    return a + b


@triton.jit
def _own_max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _own_min(a, b):
    return tl.minimum(a, b)


# (own combine functions only where a Triton version lacks these private names)
_add = getattr(tl.standard, "_sum_combine", _own_add)
_fmax = _imax = getattr(tl.standard, "_elementwise_max", _own_max)
_fmin = _imin = getattr(tl.standard, "_elementwise_min", _own_min)


@triton.jit
def _unit_rows(x, DTYPE: tl.constexpr):
    """fp32 rows / their L2 norm, rounded like torch's ``m / m.norm()`` in the input dtype."""
    norm = tl.sqrt_rn(tl.reduce(x * x, 1, _add)).to(DTYPE).to(tl.float32)
    return tl.math.div_rn(x, norm[:, None]).to(DTYPE)


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    """a @ b with fp32 accumulation (fp32 inputs: IEEE fp32 products, no TF32)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _best_in_block(xn, yn, bins, n_bins, DOT_F32: tl.constexpr, DTYPE: tl.constexpr):
    """Best destination of every row of ``xn`` among the destination rows ``yn`` (bin ids ``bins``): (score, bin),
    scores rounded to the input dtype as the torch matcher's, ties to the lowest bin (``torch.max``)."""
    s = _dot(xn, tl.trans(yn), DOT_F32).to(DTYPE).to(tl.float32)
    s = tl.where((bins < n_bins)[None, :], s, float("-inf"))
    best = tl.reduce(s, 1, _fmax)
    arg = tl.reduce(tl.where(s == best[:, None], bins[None, :], 2147483647), 1, _imin)
    return best, arg


@triton.jit(do_not_specialize=["n_bins", "stride_bin", "n_unm"])
def _patch_merge_attn_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    off_ptr,
    o_ptr,
    ws_ptr,
    wsi_ptr,
    H,
    N,
    n_bins,
    stride_bin,
    n_unm,
    qk_scale,
    s_p,
    s_h,
    s_n,
    PROP_KEY: tl.constexpr,
    DOT_F32: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    D: tl.constexpr,
):
    """One (patch, head). ``SINGLE`` (all N' slots in one BLOCK_S block, Sonata's usual case): the merge sums
    are accumulated during the matching pass and the attention runs in registers (two passes over the tokens,
    no merged scratch); otherwise the general path stages merged q/k/v, sizes and outputs in ``ws``."""
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    g = tl.program_id(0)
    p = (g // H).to(tl.int64)
    h = g % H
    off = tl.load(off_ptr + h)
    qb = q_ptr + p * s_p + h * s_h
    kb = k_ptr + p * s_p + h * s_h
    vb = v_ptr + p * s_p + h * s_h
    so_n = H * D  # out is a fresh (P, N, H, D) tensor
    ob = o_ptr + p * N * so_n + h * D
    # workspace per group (fp32 units): scores [n_pad], slots [n_pad] (int32 view); general path: merged q, k, v
    # [slot_pad, D] each, sizes [slot_pad], slot outputs [slot_pad, D]
    n_pad = (N + 15) // 16 * 16
    slot_pad = (n_bins + n_unm + 15) // 16 * 16
    ws_q = 2 * n_pad
    ws_k = ws_q + slot_pad * D
    ws_v = ws_k + slot_pad * D
    ws_size = ws_v + slot_pad * D
    ws_out = ws_size + slot_pad
    if SINGLE:
        ws_g = 2 * n_pad
    else:
        ws_g = ws_out + slot_pad * D
    ws = ws_ptr + g.to(tl.int64) * ws_g
    sl = wsi_ptr + g.to(tl.int64) * ws_g + n_pad
    dims = tl.arange(0, D)
    t_ar = tl.arange(0, BLOCK_T)
    s_ar = tl.arange(0, BLOCK_S)
    n_dst_tok = n_bins * stride_bin
    n_slots = n_bins + n_unm

    if SINGLE:  # every destination in one block: normalise them once; merge sums ride along the matching
        pos = s_ar * stride_bin + off
        dst_rows = tl.load(vb + pos[:, None] * s_n + dims[None, :], mask=(s_ar < n_bins)[:, None], other=1.0)
        yn1 = _unit_rows(dst_rows.to(tl.float32), DTYPE)
        acc_q = tl.full([BLOCK_S, D], 0, tl.float32)
        acc_k = tl.full([BLOCK_S, D], 0, tl.float32)
        acc_v = tl.full([BLOCK_S, D], 0, tl.float32)
        cnt = tl.full([BLOCK_S], 0, tl.float32)

    # 1. match every token's v to its best destination (destinations keep their own bin slot); track the
    #    lowest-scoring source (ties: the later token) for the first unmerged pick
    low = tl.full([], float("inf"), tl.float32)
    low_at = tl.full([], -1, tl.int32)
    for t0 in range(0, N, BLOCK_T):
        rows = t0 + t_ar
        rmask = rows < N
        vx = tl.load(vb + rows[:, None] * s_n + dims[None, :], mask=rmask[:, None], other=1.0)
        xn = _unit_rows(vx.to(tl.float32), DTYPE)
        if SINGLE:
            best, arg = _best_in_block(xn, yn1, s_ar, n_bins, DOT_F32, DTYPE)
        else:
            best = tl.full([BLOCK_T], float("-inf"), tl.float32)
            arg = tl.full([BLOCK_T], 0, tl.int32)
            for b0 in range(0, n_bins, BLOCK_S):
                bins = b0 + s_ar
                pos = bins * stride_bin + off
                y = tl.load(vb + pos[:, None] * s_n + dims[None, :], mask=(bins < n_bins)[:, None], other=1.0)
                blk, blk_arg = _best_in_block(xn, _unit_rows(y.to(tl.float32), DTYPE), bins, n_bins, DOT_F32, DTYPE)
                better = blk > best  # strict: an equal later block keeps the lower index
                arg = tl.where(better, blk_arg, arg)
                best = tl.where(better, blk, best)
        is_dst = (rows < n_dst_tok) & (rows % stride_bin == off)
        slot = tl.where(is_dst, rows // stride_bin, arg)
        score = tl.where(is_dst | ~rmask, float("inf"), best)  # +inf: never unmerged
        tl.store(sl + rows, slot, mask=rmask)
        tl.store(ws + rows, score, mask=rmask)
        blk_low = tl.reduce(score, 0, _fmin)
        blk_at = tl.reduce(tl.where((score == blk_low) & rmask & ~is_dst, rows, -1), 0, _imax)
        take = blk_low <= low  # later blocks hold later tokens: an equal score moves the pick forward
        low_at = tl.where(take, blk_at, low_at)
        low = tl.where(take, blk_low, low)
        if SINGLE:
            hit = (s_ar[:, None] == slot[None, :]) & rmask[None, :]
            cnt += tl.reduce(hit.to(tl.float32), 1, _add)
            qx = tl.load(qb + rows[:, None] * s_n + dims[None, :], mask=rmask[:, None], other=0.0)
            kx = tl.load(kb + rows[:, None] * s_n + dims[None, :], mask=rmask[:, None], other=0.0)
            onehot = hit.to(DTYPE)
            acc_q += _dot(onehot, qx, DOT_F32)
            acc_k += _dot(onehot, kx, DOT_F32)
            acc_v += _dot(onehot, vx, DOT_F32)
    tl.debug_barrier()

    # 2. the u lowest-scoring sources keep a slot of their own (ties: the later token stays); round 0 takes
    #    the pass-1 pick, later rounds rescan the scores
    for i in range(0, n_unm):
        if i > 0:
            low = tl.full([], float("inf"), tl.float32)
            low_at = tl.full([], -1, tl.int32)
            for t0 in range(0, N, BLOCK_T):
                rows = t0 + t_ar
                sc = tl.load(ws + rows, mask=rows < N, other=float("inf"))
                blk_low = tl.reduce(sc, 0, _fmin)
                blk_at = tl.reduce(tl.where((sc == blk_low) & (rows < N), rows, -1), 0, _imax)
                take = blk_low <= low
                low_at = tl.where(take, blk_at, low_at)
                low = tl.where(take, blk_low, low)
        own = n_bins + n_unm - 1 - i
        if SINGLE:  # move the token's q/k/v from its destination's sums to its own slot
            was = tl.load(sl + low_at)
            move = (s_ar == own).to(tl.float32) - (s_ar == was).to(tl.float32)
            acc_q += move[:, None] * tl.load(qb + low_at * s_n + dims).to(tl.float32)[None, :]
            acc_k += move[:, None] * tl.load(kb + low_at * s_n + dims).to(tl.float32)[None, :]
            acc_v += move[:, None] * tl.load(vb + low_at * s_n + dims).to(tl.float32)[None, :]
            cnt += move
        tl.debug_barrier()  # every thread has read the old slot before it is overwritten
        tl.store(sl + low_at, own)
        tl.store(ws + low_at, float("inf"))
        tl.debug_barrier()

    if SINGLE:
        # 3-4. slot means and attention over them, in registers
        inv = 1.0 / tl.maximum(cnt, 1.0)
        qm = (acc_q * inv[:, None]).to(DTYPE)
        km = (acc_k * inv[:, None]).to(DTYPE)
        vm = (acc_v * inv[:, None]).to(DTYPE)
        s = _dot(qm, tl.trans(km), DOT_F32) * qk_scale
        if PROP_KEY:
            s = s + tl.log2(tl.maximum(cnt, 1.0))[None, :]
        s = tl.where((s_ar < n_slots)[None, :], s, float("-inf"))
        pr = tl.exp2(s - tl.reduce(s, 1, _fmax)[:, None])
        o = _dot(pr.to(DTYPE), vm, DOT_F32) / tl.reduce(pr, 1, _add)[:, None]
        o = o.to(DTYPE)
        # 5. unmerge: a one-hot dot selects each token's slot output exactly
        for t0 in range(0, N, BLOCK_T):
            rows = t0 + t_ar
            rmask = rows < N
            tok_slot = tl.load(sl + rows, mask=rmask, other=-1)
            pick = (tok_slot[:, None] == s_ar[None, :]).to(DTYPE)
            tok_out = _dot(pick, o, DOT_F32)
            tl.store(ob + rows[:, None] * so_n + dims[None, :], tok_out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])
    else:
        # 3. slot means of q, k, v (one-hot dots over token blocks) and group sizes
        for s0 in range(0, n_slots, BLOCK_S):
            slots = s0 + s_ar
            acc_q = tl.full([BLOCK_S, D], 0, tl.float32)
            acc_k = tl.full([BLOCK_S, D], 0, tl.float32)
            acc_v = tl.full([BLOCK_S, D], 0, tl.float32)
            cnt = tl.full([BLOCK_S], 0, tl.float32)
            for t0 in range(0, N, BLOCK_T):
                rows = t0 + t_ar
                rmask = rows < N
                tok_slot = tl.load(sl + rows, mask=rmask, other=-1)
                hit = slots[:, None] == tok_slot[None, :]
                cnt += tl.reduce(hit.to(tl.float32), 1, _add)
                onehot = hit.to(DTYPE)
                qx = tl.load(qb + rows[:, None] * s_n + dims[None, :], mask=rmask[:, None], other=0.0)
                kx = tl.load(kb + rows[:, None] * s_n + dims[None, :], mask=rmask[:, None], other=0.0)
                vx = tl.load(vb + rows[:, None] * s_n + dims[None, :], mask=rmask[:, None], other=0.0)
                acc_q += _dot(onehot, qx, DOT_F32)
                acc_k += _dot(onehot, kx, DOT_F32)
                acc_v += _dot(onehot, vx, DOT_F32)
            smask = slots < n_slots
            inv = 1.0 / tl.maximum(cnt, 1.0)
            at = slots[:, None] * D + dims[None, :]
            tl.store(ws + ws_q + at, acc_q * inv[:, None], mask=smask[:, None])
            tl.store(ws + ws_k + at, acc_k * inv[:, None], mask=smask[:, None])
            tl.store(ws + ws_v + at, acc_v * inv[:, None], mask=smask[:, None])
            tl.store(ws + ws_size + slots, cnt, mask=smask)
        tl.debug_barrier()

        # 4. attention over the merged slots (online softmax in the exp2 domain, fp32)
        for m0 in range(0, n_slots, BLOCK_S):
            qrows = m0 + s_ar
            qmask = qrows < n_slots
            qm = tl.load(ws + ws_q + qrows[:, None] * D + dims[None, :], mask=qmask[:, None], other=0.0).to(DTYPE)
            m_i = tl.full([BLOCK_S], float("-inf"), tl.float32)
            l_i = tl.full([BLOCK_S], 0, tl.float32)
            acc = tl.full([BLOCK_S, D], 0, tl.float32)
            for n0 in range(0, n_slots, BLOCK_S):
                cols = n0 + s_ar
                cmask = cols < n_slots
                km = tl.load(ws + ws_k + cols[:, None] * D + dims[None, :], mask=cmask[:, None], other=0.0).to(DTYPE)
                vm = tl.load(ws + ws_v + cols[:, None] * D + dims[None, :], mask=cmask[:, None], other=0.0).to(DTYPE)
                s = _dot(qm, tl.trans(km), DOT_F32) * qk_scale
                if PROP_KEY:
                    s = s + tl.log2(tl.load(ws + ws_size + cols, mask=cmask, other=1.0))[None, :]
                s = tl.where(cmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.reduce(s, 1, _fmax))
                pr = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.reduce(pr, 1, _add)
                acc = acc * alpha[:, None] + _dot(pr.to(DTYPE), vm, DOT_F32)
                m_i = m_new
            tl.store(ws + ws_out + qrows[:, None] * D + dims[None, :], acc / l_i[:, None], mask=qmask[:, None])
        tl.debug_barrier()

        # 5. unmerge: every token takes its slot's output
        for t0 in range(0, N, BLOCK_T):
            rows = t0 + t_ar
            rmask = rows < N
            tok_slot = tl.load(sl + rows, mask=rmask, other=0)
            y = tl.load(ws + ws_out + tok_slot[:, None] * D + dims[None, :], mask=rmask[:, None], other=0.0)
            tl.store(ob + rows[:, None] * so_n + dims[None, :], y.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _split_layout(N, S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr):
    """Split-variant workspace per group (fp32 units): scores [n_pad], pass-1 slots [n_pad] and final slots
    [n_pad] (int32 views), then S partial sums of q|k|v [BLOCK_S, D] each and counts [BLOCK_S]; and each
    program's token chunk (a multiple of BLOCK_T)."""
    n_pad = (N + 15) // 16 * 16
    ws_g = 3 * n_pad + S * (3 * D + 1) * BLOCK_S
    chunk = ((N + S - 1) // S + BLOCK_T - 1) // BLOCK_T * BLOCK_T
    return n_pad, ws_g, chunk


@triton.jit(do_not_specialize=["n_bins", "stride_bin", "n_unm"])
def _pma_split_match(
    q_ptr,
    k_ptr,
    v_ptr,
    off_ptr,
    ws_ptr,
    wsi_ptr,
    H,
    N,
    n_bins,
    stride_bin,
    n_unm,
    s_p,
    s_h,
    s_n,
    DOT_F32: tl.constexpr,
    S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    D: tl.constexpr,
):
    """Split pass 1, program (group, chunk): match the chunk's tokens on v (best score + slot per token) and
    write the chunk's slot sums of q, k, v and counts, every source summed into its destination (the unmerged
    ones are not known yet; pass 2 moves them)."""
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    g = tl.program_id(0)
    c = tl.program_id(1)
    p = (g // H).to(tl.int64)
    h = g % H
    off = tl.load(off_ptr + h)
    qb = q_ptr + p * s_p + h * s_h
    kb = k_ptr + p * s_p + h * s_h
    vb = v_ptr + p * s_p + h * s_h
    n_pad, ws_g, chunk = _split_layout(N, S, BLOCK_T, BLOCK_S, D)
    ws = ws_ptr + g.to(tl.int64) * ws_g
    sl = wsi_ptr + g.to(tl.int64) * ws_g + n_pad
    dims = tl.arange(0, D)
    t_ar = tl.arange(0, BLOCK_T)
    s_ar = tl.arange(0, BLOCK_S)
    n_dst_tok = n_bins * stride_bin
    pos = s_ar * stride_bin + off
    dst_rows = tl.load(vb + pos[:, None] * s_n + dims[None, :], mask=(s_ar < n_bins)[:, None], other=1.0)
    yn1 = _unit_rows(dst_rows.to(tl.float32), DTYPE)
    acc_q = tl.full([BLOCK_S, D], 0, tl.float32)
    acc_k = tl.full([BLOCK_S, D], 0, tl.float32)
    acc_v = tl.full([BLOCK_S, D], 0, tl.float32)
    cnt = tl.full([BLOCK_S], 0, tl.float32)
    t_lo = c * chunk
    t_hi = tl.minimum(t_lo + chunk, N)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        rows = t0 + t_ar
        rmask = rows < t_hi
        vx = tl.load(vb + rows[:, None] * s_n + dims[None, :], mask=rmask[:, None], other=1.0)
        xn = _unit_rows(vx.to(tl.float32), DTYPE)
        best, arg = _best_in_block(xn, yn1, s_ar, n_bins, DOT_F32, DTYPE)
        is_dst = (rows < n_dst_tok) & (rows % stride_bin == off)
        slot = tl.where(is_dst, rows // stride_bin, arg)
        tl.store(sl + rows, slot, mask=rmask)
        tl.store(ws + rows, tl.where(is_dst, float("inf"), best), mask=rmask)  # +inf: never unmerged
        hit = (s_ar[:, None] == slot[None, :]) & rmask[None, :]
        cnt += tl.reduce(hit.to(tl.float32), 1, _add)
        qx = tl.load(qb + rows[:, None] * s_n + dims[None, :], mask=rmask[:, None], other=0.0)
        kx = tl.load(kb + rows[:, None] * s_n + dims[None, :], mask=rmask[:, None], other=0.0)
        onehot = hit.to(DTYPE)
        acc_q += _dot(onehot, qx, DOT_F32)
        acc_k += _dot(onehot, kx, DOT_F32)
        acc_v += _dot(onehot, vx, DOT_F32)
    part = ws + 3 * n_pad + c * ((3 * D + 1) * BLOCK_S)
    at = s_ar[:, None] * D + dims[None, :]
    smask = s_ar < n_bins + n_unm  # rows past N' are never read
    tl.store(part + at, acc_q, mask=smask[:, None])
    tl.store(part + BLOCK_S * D + at, acc_k, mask=smask[:, None])
    tl.store(part + 2 * BLOCK_S * D + at, acc_v, mask=smask[:, None])
    tl.store(part + 3 * BLOCK_S * D + s_ar, cnt, mask=smask)


@triton.jit(do_not_specialize=["n_bins", "n_unm"])
def _pma_split_attend(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    ws_ptr,
    wsi_ptr,
    H,
    N,
    n_bins,
    n_unm,
    qk_scale,
    s_p,
    s_h,
    s_n,
    PROP_KEY: tl.constexpr,
    DOT_F32: tl.constexpr,
    RETURN_SLOTS: tl.constexpr,
    S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    D: tl.constexpr,
    U_PAD: tl.constexpr,
):
    """Split pass 2, program (group, chunk): every program of a group redoes the group-wide steps (the u
    unmerged picks over all N scores, the sum of the S partials, the N' x N' attention, all tiny) and
    unmerges only its own chunk, so no program waits on another."""
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    g = tl.program_id(0)
    c = tl.program_id(1)
    p = (g // H).to(tl.int64)
    h = g % H
    qb = q_ptr + p * s_p + h * s_h
    kb = k_ptr + p * s_p + h * s_h
    vb = v_ptr + p * s_p + h * s_h
    so_n = H * D
    ob = o_ptr + p * N * so_n + h * D
    n_pad, ws_g, chunk = _split_layout(N, S, BLOCK_T, BLOCK_S, D)
    ws = ws_ptr + g.to(tl.int64) * ws_g
    sl = wsi_ptr + g.to(tl.int64) * ws_g + n_pad
    dims = tl.arange(0, D)
    t_ar = tl.arange(0, BLOCK_T)
    s_ar = tl.arange(0, BLOCK_S)
    u_ar = tl.arange(0, U_PAD)
    n_slots = n_bins + n_unm

    # the S partial slot sums, in chunk order (deterministic)
    at = s_ar[:, None] * D + dims[None, :]
    acc_q = tl.full([BLOCK_S, D], 0, tl.float32)
    acc_k = tl.full([BLOCK_S, D], 0, tl.float32)
    acc_v = tl.full([BLOCK_S, D], 0, tl.float32)
    cnt = tl.full([BLOCK_S], 0, tl.float32)
    smask = s_ar < n_slots  # pass 1 stores only the slot rows that exist (fewer L2 bytes per program)
    for c2 in range(0, S):
        part = ws + 3 * n_pad + c2 * ((3 * D + 1) * BLOCK_S)
        acc_q += tl.load(part + at, mask=smask[:, None], other=0.0)
        acc_k += tl.load(part + BLOCK_S * D + at, mask=smask[:, None], other=0.0)
        acc_v += tl.load(part + 2 * BLOCK_S * D + at, mask=smask[:, None], other=0.0)
        cnt += tl.load(part + 3 * BLOCK_S * D + s_ar, mask=smask, other=0.0)

    # the u lowest-scoring sources, in (score ascending, token descending) order: among equal scores the later
    # token stays first; round i takes the least (score, -token) after round i-1's, scores stay read-only
    prev_s = tl.full([], float("-inf"), tl.float32)
    prev_i = tl.full([], 2147483647, tl.int32)
    pick_at = tl.full([U_PAD], -1, tl.int32)
    for i in range(0, n_unm):
        low = tl.full([], float("inf"), tl.float32)
        low_at = tl.full([], -1, tl.int32)
        for t0 in range(0, N, BLOCK_T):
            rows = t0 + t_ar
            sc = tl.load(ws + rows, mask=rows < N, other=float("inf"))
            ok = ((sc > prev_s) | ((sc == prev_s) & (rows < prev_i))) & (rows < N)
            sc = tl.where(ok, sc, float("inf"))
            blk_low = tl.reduce(sc, 0, _fmin)
            blk_at = tl.reduce(tl.where((sc == blk_low) & ok, rows, -1), 0, _imax)
            take = (blk_low < low) | ((blk_low == low) & (blk_at >= 0))
            low_at = tl.where(take, blk_at, low_at)
            low = tl.where(take, blk_low, low)
        prev_s = low
        prev_i = low_at
        pick_at = tl.where(u_ar == i, low_at, pick_at)
        # move the token's q/k/v from its destination's sums to its own slot
        own = n_slots - 1 - i
        was = tl.load(sl + low_at)
        move = (s_ar == own).to(tl.float32) - (s_ar == was).to(tl.float32)
        acc_q += move[:, None] * tl.load(qb + low_at * s_n + dims).to(tl.float32)[None, :]
        acc_k += move[:, None] * tl.load(kb + low_at * s_n + dims).to(tl.float32)[None, :]
        acc_v += move[:, None] * tl.load(vb + low_at * s_n + dims).to(tl.float32)[None, :]
        cnt += move

    # slot means and attention over them, in registers (the SINGLE path's)
    inv = 1.0 / tl.maximum(cnt, 1.0)
    qm = (acc_q * inv[:, None]).to(DTYPE)
    km = (acc_k * inv[:, None]).to(DTYPE)
    vm = (acc_v * inv[:, None]).to(DTYPE)
    s = _dot(qm, tl.trans(km), DOT_F32) * qk_scale
    if PROP_KEY:
        s = s + tl.log2(tl.maximum(cnt, 1.0))[None, :]
    s = tl.where((s_ar < n_slots)[None, :], s, float("-inf"))
    pr = tl.exp2(s - tl.reduce(s, 1, _fmax)[:, None])
    o = _dot(pr.to(DTYPE), vm, DOT_F32) / tl.reduce(pr, 1, _add)[:, None]
    o = o.to(DTYPE)

    # unmerge this program's chunk: pass-1 slots, the picked sources moved to their own slots
    own_of = n_slots - 1 - u_ar
    t_lo = c * chunk
    t_hi = tl.minimum(t_lo + chunk, N)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        rows = t0 + t_ar
        rmask = rows < t_hi
        tok_slot = tl.load(sl + rows, mask=rmask, other=-1)
        moved = tl.reduce(tl.where(rows[:, None] == pick_at[None, :], own_of[None, :], -1), 1, _imax)
        tok_slot = tl.where(moved >= 0, moved, tok_slot)
        if RETURN_SLOTS:
            tl.store(sl + n_pad + rows, tok_slot, mask=rmask)
        pick = (tok_slot[:, None] == s_ar[None, :]).to(DTYPE)
        tok_out = _dot(pick, o, DOT_F32)
        tl.store(ob + rows[:, None] * so_n + dims[None, :], tok_out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


def _pow2(x: int) -> int:
    """Next power of 2 (plain Python: ``triton.next_power_of_2`` costs microseconds per host call)."""
    return 1 << max(0, x - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_OFFSETS: dict[tuple, torch.Tensor] = {}
_tuned: dict[tuple, Config] = {}
_SM_COUNT: dict[int, int] = {}
VARIANTS = ("auto", "single", "split")


def unmerged_count(n: int, r: int, stride: int) -> int | None:
    """Sources that stay unmerged (``u``) for a patch of ``n`` tokens, or None when nothing merges."""
    n_bins = n // stride
    r_eff = min(n - n_bins, r)
    if n_bins == 0 or r_eff <= 0:
        return None
    return n - n_bins - r_eff


def supported(q: torch.Tensor, r: int, stride: int, prop_attn: str = "off") -> bool:
    """Whether ``patch_merge_attention`` runs for these inputs (else it returns None: use the torch path)."""
    if q.dim() != 4 or q.dtype not in KERNEL_DTYPES or q.shape[-1] not in HEAD_DIMS or prop_attn not in PROP_ATTN:
        return False
    u = unmerged_count(q.shape[2], r, stride)
    return u is not None and u <= U_MAX and q.shape[2] <= MAX_TOKENS


def head_offsets(heads: int, stride: int, device: torch.device) -> torch.Tensor:
    """The official ``no_rand`` offsets as a cached int32 device tensor."""
    key = (heads, stride, device)
    hit = _OFFSETS.get(key)
    if hit is None:
        hit = _OFFSETS[key] = torch.tensor(official_head_offsets(heads, stride), dtype=torch.int32, device=device)
    return hit


def heuristic_config(n: int, n_slots: int, device: torch.device | None = None) -> Config:
    """The one-program variant: 64-token blocks; slot blocks cover N' up to 128 in one block (Sonata stage 0 at
    r=0.9: N' = 103). On a CPU (the interpreter, whose cost is per block op) tokens go in blocks of up to 256."""
    block_s = max(16, min(128, _pow2(n_slots)))
    cap = 64 if device is None or device.type == "cuda" else 256
    block_t = max(16, min(cap, _pow2(n)))
    return block_t, block_s, 4 if block_s <= 64 else 8, 0


def split_count(groups: int, n: int, block_t: int, sms: int = 132) -> int:
    """Programs per group for the split variant: a power of 2 so that groups x S covers ~2 waves of ``sms``
    SMs, at most one token block per program and at most 16 (every program re-sums the S partials)."""
    want = _pow2(max(1, -(-2 * sms // max(groups, 1))))
    return max(1, min(want, _pow2(_cdiv(n, block_t)), 16))


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (cached; 132, an H100/H200, elsewhere): sizes the split variant's S."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def candidate_configs(
    n: int, n_slots: int, groups: int = 1, sms: int = 132, variant: str = "auto"
) -> tuple[Config, ...]:
    """Tiny tuning space (each fresh GPU machine compiles every entry once). One-program variant (S = 0): the
    heuristic, 128-token blocks, 64-slot blocks with 4 warps (the H200's picks on Sonata's shapes; 32-token
    blocks never won). Split variant where all N' slots fit one 128 block: 64-token blocks with S chosen by
    ``split_count`` and with S / 2 (each pass-2 program reads all S partial sums: fewer, longer programs
    read less), 4 warps for the matching pass (pass 2 takes 8 with 128-slot blocks: its 128 x 128 attention
    scores would spill on 4)."""
    bt, bs, w, _ = heuristic_config(n, n_slots)
    single = [(bt, bs, w, 0), (min(128, bt * 2), bs, 8, 0), (bt, max(16, min(bs, 64)), 4, 0)]
    split = []
    if n_slots <= 128:
        sp = split_count(groups, n, bt, sms)  # S = 1 would only add a launch to the one-program kernel
        split = [(bt, bs, 4, x) for x in (sp, sp // 2) if x >= 2]
    alts = {"auto": single + split, "single": single, "split": split}[variant]
    return tuple(dict.fromkeys(c for c in alts if c[1] >= n_slots or c[3] == 0))


def _variant(variant: str | None) -> str:
    """``variant`` or ``MERGE_CORE_PMA_VARIANT``: ``auto`` (tuning picks), ``single`` or ``split`` (forced)."""
    mode = variant or os.environ.get("MERGE_CORE_PMA_VARIANT", "auto")
    if mode not in VARIANTS:
        raise ValueError(f"variant / MERGE_CORE_PMA_VARIANT must be auto, single or split, got {mode!r}")
    return mode


def _forced_config() -> Config | None:
    forced = os.environ.get("MERGE_CORE_PMA_CONFIG")
    if not forced:
        return None
    parts = tuple(int(x) for x in forced.split(","))
    if len(parts) not in (3, 4):
        raise ValueError(f"MERGE_CORE_PMA_CONFIG must be BLOCK_T,BLOCK_S,warps[,S], got {forced!r}")
    return parts if len(parts) == 4 else (*parts, 0)  # type: ignore[return-value]


def _tuning_on(device: torch.device) -> bool:
    """``MERGE_CORE_PMA_TUNE``: ``auto`` (default) times the candidates once per shape class on CUDA, ``0`` never."""
    mode = os.environ.get("MERGE_CORE_PMA_TUNE", "auto")
    if mode not in ("auto", "0"):
        raise ValueError(f"MERGE_CORE_PMA_TUNE must be auto or 0, got {mode!r}")
    return mode == "auto" and device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def _time_ms(launch, config: Config) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    launch(config)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def tuned_configs() -> dict[str, Config]:
    """The configurations tuning kept so far, by shape-class key (for benchmark reports)."""
    return {str(key): cfg for key, cfg in _tuned.items()}


def _choose(key: tuple, n: int, n_slots: int, groups: int, device: torch.device, variant: str, launch) -> Config:
    """Times the candidates once per shape-class ``key`` (CUDA, tuning on); else the heuristic (the
    one-program kernel, or the first split candidate where ``variant`` is "split")."""
    if not _tuning_on(device):
        cands = candidate_configs(n, n_slots, groups, sm_count(device), variant) if variant == "split" else ()
        if cands:
            return cands[0]
        return heuristic_config(n, n_slots, device)
    best, best_ms = None, math.inf
    for config in candidate_configs(n, n_slots, groups, sm_count(device), variant):
        try:
            launch(config)  # compiles
        except Exception:  # e.g. out of registers / shared memory for this block shape
            continue
        ms = min(_time_ms(launch, config) for _ in range(3))
        if ms < best_ms:
            best, best_ms = config, ms
    _tuned[key] = best or heuristic_config(n, n_slots, device)
    return _tuned[key]


def _ws_elems(n: int, n_slots: int, d: int, config: Config, single: bool) -> int:
    """fp32 workspace elements per group, as the kernels lay it out (``_patch_merge_attn_fwd`` /
    ``_split_layout``)."""
    n_pad = -(-n // 16) * 16
    if config[3] > 0:
        return 3 * n_pad + config[3] * (3 * d + 1) * config[1]
    slot_pad = -(-n_slots // 16) * 16
    return 2 * n_pad if single else 2 * n_pad + slot_pad * (4 * d + 1)


def patch_merge_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: int,
    stride: int,
    *,
    offsets: torch.Tensor | None = None,
    prop_attn: str = "off",
    scale: float | None = None,
    return_slots: bool = False,
    config: Config | tuple[int, int, int] | None = None,
    force_general: bool = False,
    variant: str | None = None,
):
    """Merged attention of (P, H, N, D) q, k, v in one launch: returns (out, N') or None where unsupported.

    ``r``: tokens merged away per patch (``min(#sources, r)`` merge); ``stride``: the bin length; ``offsets``: (H,)
    destination offset per head (default the official ``no_rand`` ones; values taken mod ``stride``);
    ``prop_attn``: "off" or "key" (log(size) per key). ``out`` is (P, H, N, D), a view of a (P, N, H, D) tensor.
    ``return_slots`` adds the (P*H, N) int64 slot map (destinations first, then unmerged sources by score).
    ``config``: (BLOCK_T, BLOCK_S, num_warps[, S]) instead of the tuned one, S > 0 the split variant (two
    launches, S programs per group; needs N' <= BLOCK_S); ``variant``: "auto" (default, or
    ``MERGE_CORE_PMA_VARIANT``), "single" or "split" restricts the tuned candidates; ``force_general``: the
    staged one-program path even where all slots fit one block (tests).
    None: nothing merges, more than ``U_MAX`` sources stay, or a head dim / dtype / N the kernel does not take.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must be equal (P, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"r must be an int token count, got {r!r}")
    if prop_attn not in ("off", "key", "faithful"):
        raise ValueError(f"prop_attn must be 'off', 'key' or 'faithful', got {prop_attn!r}")
    mode = _variant(variant)
    if not supported(q, r, stride, prop_attn):
        return None
    p, h, n, d = q.shape
    n_bins = n // stride
    n_unm = unmerged_count(n, r, stride)
    n_slots = n_bins + n_unm
    device = q.device
    if offsets is None:
        offsets = head_offsets(h, stride, device)
    else:
        if offsets.shape != (h,):
            raise ValueError(f"offsets must have shape ({h},), got {tuple(offsets.shape)}")
        offsets = (offsets.to(device=device, dtype=torch.int64) % stride).to(torch.int32)
    st = q.stride()
    if st[3] != 1 or k.stride() != st or v.stride() != st:  # one stride set for all three (qkv slices share it)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        st = q.stride()
    scale = d**-0.5 if scale is None else float(scale)
    out = torch.empty(p, n, h, d, device=device, dtype=q.dtype)
    g = p * h
    if g == 0:
        res = (out.permute(0, 2, 1, 3), n_slots)
        return (*res, torch.empty(0, n, dtype=torch.int64, device=device)) if return_slots else res
    dot_f32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)
    prop_key = prop_attn == "key"
    qk_scale = scale * LOG2E

    def launch(cfg: Config, ws: torch.Tensor | None = None, slots: bool = False) -> torch.Tensor:
        block_t, block_s, warps, n_split = cfg
        single = n_slots <= block_s and not force_general
        if ws is None:
            ws = torch.empty(g, _ws_elems(n, n_slots, d, cfg, single), device=device, dtype=torch.float32)
        wsi = ws.view(torch.int32)
        if n_split > 0:
            if n_slots > block_s:
                raise ValueError(f"config {cfg}: the split variant needs N' = {n_slots} <= BLOCK_S")
            _pma_split_match[(g, n_split)](
                q, k, v, offsets, ws, wsi, h, n, n_bins, stride, n_unm, st[0], st[1], st[2],
                DOT_F32=dot_f32, S=n_split, BLOCK_T=block_t, BLOCK_S=block_s, D=d, num_warps=warps,
            )  # fmt: skip
            _pma_split_attend[(g, n_split)](
                q, k, v, out, ws, wsi, h, n, n_bins, n_unm, qk_scale, st[0], st[1], st[2],
                PROP_KEY=prop_key, DOT_F32=dot_f32, RETURN_SLOTS=slots, S=n_split, BLOCK_T=block_t,
                BLOCK_S=block_s, D=d, U_PAD=U_MAX, num_warps=max(warps, 8 if block_s >= 128 else 4),
            )  # fmt: skip
        else:
            _patch_merge_attn_fwd[(g,)](
                q, k, v, offsets, out, ws, wsi, h, n, n_bins, stride, n_unm, qk_scale, st[0], st[1], st[2],
                PROP_KEY=prop_key, DOT_F32=dot_f32, SINGLE=single, BLOCK_T=block_t, BLOCK_S=block_s, D=d,
                num_warps=warps,
            )  # fmt: skip
        return ws

    config = config or _forced_config()
    if config is None:
        key = (device, q.dtype, d, _pow2(n), _cdiv(n_slots, 64), prop_key,
               _pow2(g), mode)  # fmt: skip
        config = _tuned.get(key) or _choose(key, n, n_slots, g, device, mode, launch)
    elif len(config) == 3:
        config = (*config, 0)
    ws = launch(config, slots=return_slots)  # type: ignore[arg-type]
    res = (out.permute(0, 2, 1, 3), n_slots)
    if not return_slots:
        return res
    n_pad = -(-n // 16) * 16
    at = 2 * n_pad if config[3] > 0 else n_pad
    return (*res, ws.view(torch.int32)[:, at : at + n].long())
