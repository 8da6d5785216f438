"""Triton kernels (imported lazily: importing ``merge_core`` never imports Triton).

Written for this package from the ToMe paper's description of bipartite soft matching; no ToMe code.
Block sizes are fixed heuristics (no autotuning), so a fresh GPU machine compiles each kernel once
per dtype and block configuration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import MAX_PLAN_ROWS

_SCORE_MODS = {None: 0, "shifted": 1, "guide": 2}

# Reductions go through ``tl.reduce`` with our own combine functions rather than ``tl.sum``/``tl.max``:
# those are ``@jit`` functions of Triton's standard library, decorated when Triton is first imported, so
# they stay compiled-only if torch imported Triton before ``TRITON_INTERPRET=1`` was set (CPU tests).


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _fmax(a, b):
    return tl.maximum(a, b)


@triton.jit
def _imin(a, b):
    return tl.minimum(a, b)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """Round an fp32 value to the input dtype and back (mimics one torch op in that dtype)."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _normalise(x, rmask, DTYPE: tl.constexpr):
    """Divide fp32 rows (BLOCK, BLOCK_C) by their L2 norm, rounding like ``m / m.norm()`` in ``DTYPE``."""
    norm = _round(tl.sqrt_rn(tl.reduce(x * x, 1, _add)), DTYPE)
    norm = tl.where(rmask, norm, 1.0)
    return tl.math.div_rn(x, norm[:, None]).to(DTYPE)


@triton.jit
def _normalised_rows(ptr, rows, rmask, ch, cmask, stride_n, DTYPE: tl.constexpr):
    """Load rows (BLOCK, BLOCK_C) and divide them by their L2 norm, rounding like ``m / m.norm()``."""
    x = tl.load(ptr + rows[:, None] * stride_n + ch[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    return _normalise(x.to(tl.float32), rmask, DTYPE)


@triton.jit
def _head_mean_rows(ptr, rows, rmask, ch, cmask, stride_n, stride_h, factor, DTYPE: tl.constexpr, HEADS: tl.constexpr):
    """Rows (BLOCK, BLOCK_C) of the mean over ``HEADS`` heads, as fp32 values rounded like ``k.mean(1)`` on CUDA.

    torch's CUDA mean accumulates in fp32 and multiplies by ``1 / H`` once (``factor``), then rounds to the
    dtype. The head loop is unrolled so every head's load is in flight at once (the loads, not the adds, are
    the latency here).
    """
    offs = rows[:, None] * stride_n + ch[None, :]
    mask = rmask[:, None] & cmask[None, :]
    acc = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for h in tl.static_range(1, HEADS):
        acc += tl.load(ptr + h * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    return _round(acc * factor, DTYPE)


@triton.jit
def _rows(
    ptr,
    rows,
    rmask,
    ch,
    cmask,
    stride_n,
    stride_h,
    factor,
    DTYPE: tl.constexpr,
    PRENORM: tl.constexpr,
    HEADS: tl.constexpr,
):
    """Rows as the matcher needs them: already normalised (PRENORM), normalised here, or (HEADS > 0) averaged
    over the heads of a (H, N, D) key tensor and normalised here."""
    if HEADS > 0:
        m = _head_mean_rows(ptr, rows, rmask, ch, cmask, stride_n, stride_h, factor, DTYPE, HEADS)
        return _normalise(m, rmask, DTYPE)
    if PRENORM:
        x = tl.load(ptr + rows[:, None] * stride_n + ch[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        return x.to(DTYPE)
    return _normalised_rows(ptr, rows, rmask, ch, cmask, stride_n, DTYPE)


@triton.jit
def _best_dst_kernel(
    a_ptr,
    b_ptr,
    phi_ptr,
    best_ptr,
    idx_ptr,
    Na,
    Nb,
    C,
    stride_ab,
    stride_an,
    stride_bb,
    stride_bn,
    stride_phib,
    protected_a,
    protected_b,
    alpha,
    split_cols,
    stride_ob,
    stride_os,
    stride_ah,
    stride_bh,
    head_factor,
    counter_ptr,
    stride_cnt,
    SCORE_MOD: tl.constexpr,
    DOT_F32: tl.constexpr,
    PRENORM: tl.constexpr,
    HEADS: tl.constexpr,
    ZERO_COUNTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows ``BLOCK_M`` of ``a`` x destination split ``program_id(1)`` (``split_cols`` columns) x batch row.

    Splitting the destinations gives small batches enough programs to fill the GPU; each split writes its
    own (best, index) partial at ``[batch, split, row]`` (one split: the final answer). ``HEADS > 0``: ``a``
    and ``b`` are (B, H, n, D) keys and the metric is their head mean, computed here (no separate reduce
    launch). ``ZERO_COUNTER``: program (0, 0, b) zeroes the ranking kernel's ticket counter of batch row b
    (the next launch on the stream reads it; no memset launch).
    """
    DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    bid = tl.program_id(2).to(tl.int64)
    if ZERO_COUNTER:
        if (pid_m == 0) & (split == 0):
            tl.store(counter_ptr + bid * stride_cnt, 0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Na
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    a_base = a_ptr + bid * stride_ab
    a_n = _rows(a_base, rows, rmask, ch, cmask, stride_an, stride_ah, head_factor, DTYPE, PRENORM, HEADS)
    if SCORE_MOD != 0:
        phi_a = _round(tl.load(phi_ptr + bid * stride_phib + 2 * rows, mask=rmask, other=0.0).to(tl.float32), DTYPE)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_M], 0, tl.int32)
    col_start = split * split_cols
    col_end = tl.minimum(col_start + split_cols, Nb)
    for n0 in range(col_start, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        nmask = cols < col_end
        b_base = b_ptr + bid * stride_bb
        b_n = _rows(b_base, cols, nmask, ch, cmask, stride_bn, stride_bh, head_factor, DTYPE, PRENORM, HEADS)
        if DOT_F32:  # fp32 inputs, or bf16 under the CPU interpreter (its bf16 dot is broken)
            s = tl.dot(a_n.to(tl.float32), tl.trans(b_n.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(a_n, tl.trans(b_n))
        s = _round(s, DTYPE)  # torch's matmul returns scores in the input dtype
        if SCORE_MOD != 0:
            phi_b = tl.load(phi_ptr + bid * stride_phib + 2 * cols + 1, mask=nmask, other=0.0).to(tl.float32)
            phi_max = tl.maximum(phi_a[:, None], _round(phi_b, DTYPE)[None, :])
            keep = _round(1.0 - _round(alpha * phi_max, DTYPE), DTYPE)
            if SCORE_MOD == 1:  # "shifted": (cos + 1) / 2 first
                s = _round(_round(s + 1.0, DTYPE) * 0.5, DTYPE)
            s = _round(s * keep, DTYPE)
        blocked = (rows[:, None] < protected_a) | (cols[None, :] < protected_b) | (cols[None, :] >= col_end)
        s = tl.where(blocked, float("-inf"), s)
        m = tl.reduce(s, 1, _fmax)
        arg = tl.reduce(tl.where(s == m[:, None], cols[None, :], 2147483647), 1, _imin)
        better = m > best  # strict: an earlier block keeps ties (first index wins)
        best = tl.where(better, m, best)
        best_idx = tl.where(better, arg, best_idx)
    out = bid * stride_ob + split * stride_os + rows
    tl.store(best_ptr + out, best.to(best_ptr.dtype.element_ty), mask=rmask)
    tl.store(idx_ptr + out, best_idx.to(idx_ptr.dtype.element_ty), mask=rmask)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _check_pair(a, b):
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"a, b must be (B, Na, C) and (B, Nb, C), got {tuple(a.shape)} and {tuple(b.shape)}")
    if b.dtype != a.dtype or b.device != a.device:
        raise ValueError(f"a, b must share dtype and device, got {a.dtype}/{a.device} and {b.dtype}/{b.device}")
    return (a if a.stride(-1) == 1 else a.contiguous()), (b if b.stride(-1) == 1 else b.contiguous())


def _penalty_args(score_mod, batch: int, na: int, nb: int, a: torch.Tensor):
    """(phi, batch stride of phi, alpha, mode) for the kernel; phi is ``a`` (unused) without a penalty."""
    if score_mod is None:
        return a, 0, 0.0, 0
    phi = score_mod.phi.reshape(-1, score_mod.phi.shape[-1])
    if phi.shape[-1] != na + nb or (na - nb) not in (0, 1):
        raise ValueError(f"phi must have one score per token (N={na + nb}), got shape {tuple(score_mod.phi.shape)}")
    if phi.shape[0] not in (1, batch):
        raise ValueError(f"phi must have batch 1 or {batch}, got shape {tuple(score_mod.phi.shape)}")
    if phi.stride(-1) != 1:
        phi = phi.contiguous()
    return phi, (phi.stride(0) if phi.shape[0] == batch else 0), float(score_mod.alpha), _SCORE_MODS[score_mod.mode]


_SM_COUNT: dict[torch.device, int] = {}


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of the device (4 under the CPU interpreter, so CPU tests exercise the splits)."""
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _match_grid(batch: int, na: int, nb: int, c: int, device: torch.device, splits: int | None, heads: bool = False):
    """Block sizes and destination splits: at least ~2 programs per multiprocessor when the shape allows.
    ``heads``: the matcher averages key heads itself (H tiles in flight per row block): 32-row tiles."""
    block_c = _pow2(c)
    block = 64 if block_c <= 128 and not heads else 32
    target = 2 * _sm_count(device)
    block_m = min(block, _pow2(na))
    if prenormalise(batch, na, nb) and block_c <= 128:
        block_m = 128  # long sequences: bigger row tiles, each destination tile is loaded by fewer programs
    if block_m > 32 and triton.cdiv(na, block_m) * batch < target:
        block_m = 32  # small batches: more, smaller row blocks
    block_n = min(block, _pow2(nb))
    row_blocks = triton.cdiv(na, block_m)
    col_blocks = triton.cdiv(nb, block_n)
    if splits is None:
        splits = max(1, min(col_blocks, triton.cdiv(target, row_blocks * batch)))
    split_cols = triton.cdiv(col_blocks, max(1, min(splits, col_blocks))) * block_n
    return block_m, block_n, block_c, row_blocks, triton.cdiv(nb, split_cols), split_cols


PRENORM_PAIRS = 1 << 24


def prenormalise(batch: int, na: int, nb: int) -> bool:
    """Long sequences: normalise a and b once in torch (two ops) instead of per tile in every program."""
    return batch * na * nb >= PRENORM_PAIRS


def _launch_match(
    a,
    b,
    protected_a,
    protected_b,
    score_mod,
    best,
    idx,
    block_m,
    block_n,
    block_c,
    grid,
    split_cols,
    *,
    heads: tuple[int, int, int, float] | None = None,
    counter: torch.Tensor | None = None,
    prenorm: bool | None = None,
):
    """Launch the matcher. ``a``/``b``: (B, n, C) metric rows, or with ``heads = (stride_ah, stride_bh, H,
    1 / H)`` (B, n, D) views of head 0 of (B, H, n, D) keys, averaged in the kernel. ``counter``: a (B,) int32
    view the kernel zeroes for the ranking launch. ``prenorm``: None = decide by size (the torch
    normalisation); True = rows are already normalised (``_metric_kernel``'s output)."""
    batch, na, c = a.shape
    nb = b.shape[1]
    if prenorm is None:
        prenorm = heads is None and prenormalise(batch, na, nb)
        if prenorm:  # the torch reference's own normalisation, so rounding matches it exactly
            a = a / a.norm(dim=-1, keepdim=True)
            b = b / b.norm(dim=-1, keepdim=True)
    phi, stride_phib, alpha, mode = _penalty_args(score_mod, batch, na, nb, a)
    stride_ah, stride_bh, n_heads, factor = heads if heads is not None else (0, 0, 0, 1.0)
    _best_dst_kernel[grid](
        a,
        b,
        phi,
        best,
        idx,
        na,
        nb,
        c,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        stride_phib,
        protected_a,
        protected_b,
        alpha,
        split_cols,
        best.stride(0),
        best.stride(1) if best.dim() == 3 else 0,
        stride_ah,
        stride_bh,
        factor,
        best if counter is None else counter,
        0 if counter is None else counter.stride(0),
        SCORE_MOD=mode,
        DOT_F32=a.dtype == torch.float32 or (a.dtype == torch.bfloat16 and not a.is_cuda),
        PRENORM=prenorm,
        HEADS=n_heads,
        ZERO_COUNTER=counter is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        num_warps=8 if block_m >= 128 or n_heads > 0 else 4,
    )


def best_destinations(a, b, protected_a: int = 0, protected_b: int = 0, score_mod=None):
    """Fused cosine matching: (best_score, best_index) for (B, Na, C) ``a`` against (B, Nb, C) ``b``."""
    a, b = _check_pair(a, b)
    batch, na, c = a.shape
    nb = b.shape[1]
    best = torch.empty(batch, na, device=a.device, dtype=a.dtype)
    idx = torch.empty(batch, na, device=a.device, dtype=torch.int64)
    if batch == 0 or na == 0:
        return best, idx
    if nb == 0:
        return best.fill_(float("-inf")), idx.zero_()
    _penalty_args(score_mod, batch, na, nb, a)  # validate before launching
    block_m, block_n, block_c, row_blocks, _, split_cols = _match_grid(batch, na, nb, c, a.device, splits=1)
    grid = (row_blocks, 1, batch)
    _launch_match(a, b, protected_a, protected_b, score_mod, best, idx, block_m, block_n, block_c, grid, split_cols)
    return best, idx


@triton.jit
def _reduced_best(pbest_ptr, pidx_ptr, rows, rmask, S, stride_ps):
    """Best (score, destination) per row over the destination splits; the earlier split keeps ties."""
    best = tl.load(pbest_ptr + rows, mask=rmask, other=float("-inf"))
    best_idx = tl.load(pidx_ptr + rows, mask=rmask, other=0)
    for s in range(1, S):
        v = tl.load(pbest_ptr + s * stride_ps + rows, mask=rmask, other=float("-inf"))
        vi = tl.load(pidx_ptr + s * stride_ps + rows, mask=rmask, other=0)
        better = v > best
        best = tl.where(better, v, best)
        best_idx = tl.where(better, vi, best_idx)
    return best, best_idx


@triton.jit
def _rank_kernel(
    pbest_ptr,
    pidx_ptr,
    rank_ptr,
    unm_ptr,
    src_ptr,
    dst_ptr,
    counter_ptr,
    Na,
    S,
    R,
    stride_pb,
    stride_ps,
    stride_plan,
    stride_cnt,
    SORT_UNM: tl.constexpr,
    FUSED_UNM: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """CHUNK rows of one batch row: rank by score among all Na rows (stable, descending) and write the plan.

    rank(i) = #{j: s_j > s_i} + #{j < i: s_j == s_i}, i.e. torch's stable descending sort. Rows of rank < R
    merge: src[rank] = i, dst[rank] = their best destination. Without SORT_UNM the others go to unm[rank - R]
    (rank order); with it they go in index order: by ``_unm_kernel`` (a third launch) from the ranks stored
    here, or with ``FUSED_UNM`` by the last program of the batch row to finish (ticket counter, zeroed by the
    matcher launch before this one): it reads every rank and places row i at i - #{merged rows before i}
    (one prefix scan over Na values).
    """
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    pb = pbest_ptr + bid * stride_pb
    pi = pidx_ptr + bid * stride_pb
    rows = tl.arange(0, BLOCK)
    rmask = rows < Na
    best, _ = _reduced_best(pb, pi, rows, rmask, S, stride_ps)
    i = pid * CHUNK + tl.arange(0, CHUNK)
    imask = i < Na
    si, di = _reduced_best(pb, pi, i, imask, S, stride_ps)
    ahead = (best[None, :] > si[:, None]) | ((best[None, :] == si[:, None]) & (rows[None, :] < i[:, None]))
    rank = tl.reduce((ahead & rmask[None, :]).to(tl.int32), 1, _add)
    is_src = (rank < R) & imask
    plan = bid * stride_plan
    tl.store(src_ptr + plan + rank, i.to(tl.int64), mask=is_src)
    tl.store(dst_ptr + plan + rank, di.to(tl.int64), mask=is_src)
    if SORT_UNM:
        tl.store(rank_ptr + bid * stride_pb + i, rank, mask=imask)
        if FUSED_UNM:
            tl.debug_barrier()  # every thread's rank stores precede the release below
            ticket = tl.atomic_add(counter_ptr + bid * stride_cnt, 1, sem="acq_rel")
            if ticket == tl.num_programs(0) - 1:  # the last program of this batch row: all ranks are written
                all_rank = tl.load(rank_ptr + bid * stride_pb + rows, mask=rmask, other=0, volatile=True)
                merged = ((all_rank < R) & rmask).to(tl.int32)
                before = tl.associative_scan(merged, 0, _add) - merged
                tl.store(unm_ptr + plan + rows - before, rows.to(tl.int64), mask=rmask & (all_rank >= R))
    else:
        tl.store(unm_ptr + plan + rank - R, i.to(tl.int64), mask=imask & (rank >= R))


@triton.jit
def _unm_kernel(
    rank_ptr, src_ptr, unm_ptr, Na, R, stride_rank, stride_plan, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Unmerged rows in index order: row i (rank >= R) goes to slot i - #{merged rows before i}."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    i = pid * CHUNK + tl.arange(0, CHUNK)
    imask = i < Na
    rank = tl.load(rank_ptr + bid * stride_rank + i, mask=imask, other=0)
    before = tl.full([CHUNK], 0, tl.int32)  # tl.zeros is a @jit helper: compiled-only under the CPU tests
    for k0 in range(0, R, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        src = tl.load(src_ptr + bid * stride_plan + k, mask=k < R, other=2147483647)
        before += tl.reduce((src[None, :] < i[:, None]).to(tl.int32), 1, _add)
    tl.store(unm_ptr + bid * stride_plan + i - before, i.to(tl.int64), mask=imask & (rank >= R))


def match_plan(a, b, protected_a: int, protected_b: int, r: int, score_mod=None, sort_unm: bool = True, splits=None):
    """Bipartite matching without a sort: (unm_idx, src_idx, dst_idx), each (B, n, 1) int64, as the torch path
    computes them (best destination per ``a`` row, stable descending sort, first ``r`` rows merge).

    Launch 1: the matcher over rows x destination splits x batch (fills the GPU at batch 1); launch 2: ranks
    by counting, over row chunks x batch; launch 3 (protected prefix only): unmerged rows in index order.
    No host sync. Needs Na <= 2048 (each rank program holds all Na scores).
    """
    plan = match_plan_buffer(a, b, protected_a, protected_b, r, score_mod, sort_unm, splits)
    na = a.shape[1]
    return plan[:, : na - r, None], plan[:, na - r : na, None], plan[:, na:, None]


FUSED_UNM = True  # rank + unmerged list in one launch (ticket counter); False: the third ``_unm_kernel`` launch
HEAD_MODES = ("auto", "fused", "prepass")
# ``match_plan_heads``' default head-mean placement (module-level so benchmarks can A/B it). "prepass": on an H200
# (2026-12-03 10:15 UTC, results/merge-bench-small-batch-NVIDIA-H200.*) it was the fastest plan at every shape measured
# (B=1 N=1025 H=16: 14.7 us vs fused 29.2; B=8 N=197: 10.2-10.5 vs 11.6-12.3) and end to end in all six graphed rows.
HEAD_MEAN = "prepass"
FUSE_MAX_REUSE = 8  # "auto" fuses the head mean while (row blocks + splits) x the key bytes stays this small


def match_plan_buffer(a, b, protected_a: int, protected_b: int, r: int, score_mod=None, sort_unm=True, splits=None):
    """``match_plan``'s three index lists in one (B, Na + r) int64 tensor laid out ``[unm | src | dst]``
    (one allocation; the ``merge_core::match_plan`` op returns it whole)."""
    a, b = _check_pair(a, b)
    batch, na, c = a.shape
    nb = b.shape[1]
    if not 0 < r <= na or nb == 0 or na > MAX_PLAN_ROWS:
        raise ValueError(f"match_plan needs 0 < r <= Na <= {MAX_PLAN_ROWS} and Nb > 0, got r={r}, Na={na}, Nb={nb}")
    _penalty_args(score_mod, batch, na, nb, a)
    grid = _match_grid(batch, na, nb, c, a.device, splits)
    return _plan_launches(a, b, protected_a, protected_b, r, score_mod, sort_unm, grid)


def _plan_launches(a, b, protected_a, protected_b, r, score_mod, sort_unm, grid, *, heads=None, prenorm=None):
    """The plan's launches: matcher (zeroes the ticket counter), ranking (+ unmerged list with ``FUSED_UNM``),
    and ``_unm_kernel`` only without ``FUSED_UNM``. No host sync, no memset."""
    batch, na, _ = a.shape
    block_m, block_n, block_c, row_blocks, n_splits, split_cols = grid
    fused_unm = bool(sort_unm and FUSED_UNM)
    rows = 2 * n_splits + 1 + int(fused_unm)  # partial bests, partial indices, ranks, [ticket counter]
    scratch = torch.empty(batch, rows, na, device=a.device, dtype=torch.int32)  # one allocation
    pbest = scratch[:, :n_splits].view(torch.float32)
    pidx, rank = scratch[:, n_splits : 2 * n_splits], scratch[:, 2 * n_splits]
    counter = scratch[:, 2 * n_splits + 1, 0] if fused_unm else None
    _launch_match(
        a,
        b,
        protected_a,
        protected_b,
        score_mod,
        pbest,
        pidx,
        block_m,
        block_n,
        block_c,
        (row_blocks, n_splits, batch),
        split_cols,
        heads=heads,
        counter=counter,
        prenorm=prenorm,
    )
    plan = torch.empty(batch, na + r, device=a.device, dtype=torch.int64)  # [unm | src | dst], one allocation
    unm, src, dst = plan[:, : na - r, None], plan[:, na - r : na, None], plan[:, na:, None]
    block = _pow2(na)
    chunk = max(4, min(64, 8192 // block))
    _rank_kernel[(triton.cdiv(na, chunk), batch)](
        pbest,
        pidx,
        rank,
        unm,
        src,
        dst,
        rank if counter is None else counter,
        na,
        n_splits,
        r,
        scratch.stride(0),
        pbest.stride(1),
        plan.stride(0),
        0 if counter is None else counter.stride(0),
        SORT_UNM=sort_unm,
        FUSED_UNM=fused_unm,
        BLOCK=block,
        CHUNK=chunk,
        num_warps=4,
    )
    if sort_unm and not fused_unm:
        _unm_kernel[(triton.cdiv(na, 64), batch)](
            rank, src, unm, na, r, rank.stride(0), plan.stride(0), CHUNK=64, BLOCK_K=64
        )
    return plan


@triton.jit
def _metric_kernel(
    k_ptr,
    out_ptr,
    N,
    C,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_ob,
    stride_on,
    factor,
    HEADS: tl.constexpr,
    NORMALISE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``BLOCK`` tokens of one batch row: the head mean of (H, N, D) keys (``k.mean(1)``'s rounding), optionally
    normalised as the matcher would (then the matcher runs with ``PRENORM``)."""
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    ch = tl.arange(0, BLOCK_C)
    cmask = ch < C
    m = _head_mean_rows(k_ptr + bid * stride_kb, rows, rmask, ch, cmask, stride_kn, stride_kh, factor, DTYPE, HEADS)
    if NORMALISE:
        y = _normalise(m, rmask, DTYPE)
    else:
        y = m.to(DTYPE)
    out = out_ptr + bid * stride_ob + rows[:, None] * stride_on + ch[None, :]
    tl.store(out, y, mask=rmask[:, None] & cmask[None, :])


def _check_keys(keys: torch.Tensor) -> torch.Tensor:
    if keys.dim() != 4 or keys.shape[1] == 0 or keys.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"keys must be a float (B, H, N, D) tensor with H > 0, got {keys.dtype} {tuple(keys.shape)}")
    return keys if keys.stride(-1) == 1 else keys.contiguous()


def head_mean_metric(keys: torch.Tensor, normalise: bool = False) -> torch.Tensor:
    """(B, N, D) mean over the heads of (B, H, N, D) ``keys`` in one launch (rounded like CUDA's ``k.mean(1)``);
    with ``normalise`` each row is also divided by its norm as the matcher does (``m / m.norm()``)."""
    keys = _check_keys(keys)
    batch, h, n, d = keys.shape
    out = torch.empty(batch, n, d, device=keys.device, dtype=keys.dtype)
    if batch == 0 or n == 0:
        return out
    block = 16
    _metric_kernel[(triton.cdiv(n, block), batch)](
        keys,
        out,
        n,
        d,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        out.stride(0),
        out.stride(1),
        1.0 / h,
        HEADS=h,
        NORMALISE=normalise,
        BLOCK=block,
        BLOCK_C=_pow2(d),
        num_warps=4,
    )
    return out


def match_plan_heads(
    keys: torch.Tensor,
    protected_a: int,
    protected_b: int,
    r: int,
    score_mod=None,
    sort_unm: bool = True,
    splits: int | None = None,
    head_mean: str | None = None,
) -> torch.Tensor:
    """``match_plan_buffer`` of the metric ``keys.mean(1)`` (even tokens onto odd ones), from (B, H, N, D) keys.

    Why: the metric of a timm block is the mean key over heads; as a torch reduce it is a launch of its own
    (4.5 us per ViT-L layer at batch 1 on an H200). ``head_mean="fused"``: the matcher reads every head of its
    rows and averages them itself (two launches for the whole plan, but each row tile is read (row blocks +
    splits) times over H heads); ``"prepass"``: ``_metric_kernel`` writes the normalised mean rows once and the
    matcher reads them pre-normalised (three launches, the least memory traffic); ``"auto"`` (``HEAD_MEAN``):
    fused while (row blocks + splits) <= ``FUSE_MAX_REUSE``. Same plan as ``match_plan_buffer(m[:, ::2],
    m[:, 1::2], ...)`` with ``m = keys.mean(1)``.
    """
    keys = _check_keys(keys)
    batch, h, n, d = keys.shape
    na, nb = (n + 1) // 2, n // 2
    if not 0 < r <= na or nb == 0 or na > MAX_PLAN_ROWS:
        raise ValueError(f"match_plan needs 0 < r <= Na <= {MAX_PLAN_ROWS} and Nb > 0, got r={r}, Na={na}, Nb={nb}")
    mode = HEAD_MEAN if head_mean is None else head_mean
    if mode not in HEAD_MODES:
        raise ValueError(f"head_mean must be one of {HEAD_MODES}, got {mode!r}")
    _penalty_args(score_mod, batch, na, nb, keys[:, 0])
    grid = _match_grid(batch, na, nb, d, keys.device, splits, heads=True)
    fuse = mode == "fused" or (mode == "auto" and grid[3] + grid[4] <= FUSE_MAX_REUSE)
    # fp32 keys: H tiles of 32-bit rows in flight overflow shared memory on an H200 (278 KiB needed at D=64, H=16)
    fuse = fuse and keys.dtype in (torch.float16, torch.bfloat16)
    if not fuse or prenormalise(batch, na, nb):
        metric = head_mean_metric(keys, normalise=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        grid = _match_grid(batch, na, nb, d, keys.device, splits)
        return _plan_launches(a, b, protected_a, protected_b, r, score_mod, sort_unm, grid, prenorm=True)
    a, b = keys[:, 0, ::2], keys[:, 0, 1::2]
    heads = (keys.stride(1), keys.stride(1), h, 1.0 / h)
    return _plan_launches(a, b, protected_a, protected_b, r, score_mod, sort_unm, grid, heads=heads, prenorm=False)
