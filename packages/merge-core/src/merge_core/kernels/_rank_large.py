"""Sort-free bipartite matching plan for long sequences (Na > ``MAX_PLAN_ROWS``), Triton, imported lazily.

``_triton.match_plan_buffer`` ranks rows with one program holding all Na scores, which caps it at 2048 rows.
Here the ranking is tiled over the other rows instead, so any length works and nothing is Na x Nb:

- launch 1: the fused matcher (``_triton._launch_match``), partial (best, index) per destination split;
- launch 2: ``_rank_tiled_kernel``: every row's rank among all Na rows by counting, as torch's stable
  descending sort orders them: rank(i) = #{j: key_j > key_i} with the unique integer key
  ``(order-preserving bits of score) * 2**32 + (2**32 - 1 - i)`` (higher score first, then lower index), so
  each pair costs one int64 compare (fp16/bf16 scores, Na < 65536: 16 + 16 bits, one int32 compare); rows
  of rank < r write src/dst; each chunk also writes its count of unmerged rows;
- launch 3 (``sort_unm``): unmerged rows in index order: chunk c starts at the sum of the counts of chunks
  before it, and places its rows by a prefix scan (O(Na) work, no O(Na * r) search).

O(Na^2) integer compares per batch row (Na = 8192: 67M, a few tens of microseconds on an H200), no score
matrix, no host sync, static shapes (CUDA-graph safe). Same output as ``plan_from_scores`` bit for bit
(scores are compared as the matcher rounded them; -0.0 counts as 0.0, as in torch's comparisons).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import _add, _check_pair, _launch_match, _match_grid, _penalty_args

CHUNK = 64  # rows ranked per program
BLOCK_J = 128  # rows compared per tile
SCAN_BLOCK = 1024  # rows placed per unmerged-row program
# CPU tiles (the interpreter's tl.reduce is a Python loop per element): (CHUNK, BLOCK_J, SCAN_BLOCK)
CPU_TILES = (16, 16, 64)


@triton.jit
def _split_best(pbest_ptr, pidx_ptr, rows, rmask, S, stride_ps):
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
def _score_key(score, rows, KEY16: tl.constexpr):
    """Unique integer key, larger = earlier in torch's stable descending sort: order-preserving integer image of
    the score in the high bits, the inverted row index in the low bits. KEY16 = 0: int64 key of the fp32 score;
    1 / 2: the score is an fp16 / bf16 value (the matcher rounds to the input dtype), its 16 bits and a 16-bit
    index make an int32 key (Na < 65536): one 32-bit compare per pair instead of a 64-bit one."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 == 0.0 for torch: one key
    if KEY16 == 0:
        bits = score.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: flip magnitude bits
        key = ordered.to(tl.int64) * 4294967296 + (4294967295 - rows.to(tl.int64))
    else:
        if KEY16 == 1:
            bits = score.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)  # exact: an fp16 value
        else:
            bits = score.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)  # exact: a bf16 value
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFF)
        key = ordered * 65536 + (65535 - rows)
    return key


@triton.jit
def _rank_tiled_kernel(
    pbest_ptr,
    pidx_ptr,
    rank_ptr,
    count_ptr,
    unm_ptr,
    src_ptr,
    dst_ptr,
    Na,
    S,
    R,
    stride_pb,
    stride_ps,
    stride_cb,  # row stride of the rank and count buffers
    stride_plan,
    SORT_UNM: tl.constexpr,
    KEY16: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """CHUNK rows of one batch row: rank among all Na rows (tiles of BLOCK_J), then write the plan.

    Padding rows past Na load -inf with an index >= Na, so their key is below every real row's: no mask in
    the compare. Counts accumulate in a (CHUNK, BLOCK_J) tile, reduced once at the end.
    """
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    pb = pbest_ptr + bid * stride_pb
    pi = pidx_ptr + bid * stride_pb
    i = pid * CHUNK + tl.arange(0, CHUNK)
    imask = i < Na
    si, di = _split_best(pb, pi, i, imask, S, stride_ps)
    ki = _score_key(si, i, KEY16)
    ahead = tl.full([CHUNK, BLOCK_J], 0, tl.int32)
    for j0 in range(0, Na, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        sj, _ = _split_best(pb, pi, j, j < Na, S, stride_ps)
        ahead += (_score_key(sj, j, KEY16)[None, :] > ki[:, None]).to(tl.int32)
    rank = tl.reduce(ahead, 1, _add)
    is_src = (rank < R) & imask
    plan = bid * stride_plan
    tl.store(src_ptr + plan + rank, i.to(tl.int64), mask=is_src)
    tl.store(dst_ptr + plan + rank, di.to(tl.int64), mask=is_src)
    if SORT_UNM:
        tl.store(rank_ptr + bid * stride_cb + i, rank, mask=imask)
        tl.store(count_ptr + bid * stride_cb + pid, tl.reduce(((rank >= R) & imask).to(tl.int32), 0, _add))
    else:
        tl.store(unm_ptr + plan + rank - R, i.to(tl.int64), mask=imask & (rank >= R))


@triton.jit
def _unm_scan_kernel(
    rank_ptr,
    count_ptr,
    unm_ptr,
    Na,
    R,
    stride_rank,
    stride_cb,  # row stride of the rank and count buffers
    stride_plan,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
):
    """BLOCK rows (BLOCK / CHUNK rank chunks) of one batch row: unmerged rows in index order.

    Start = unmerged rows of the rank chunks before this block (``count``, written by the rank kernel);
    within the block an exclusive prefix scan over the unmerged flags gives each row its slot.
    """
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    first = pid * (BLOCK // CHUNK)  # rank chunks before this block (<= n_chunks)
    before = tl.full([BLOCK_CHUNKS], 0, tl.int32)
    for c0 in range(0, first, BLOCK_CHUNKS):
        c = c0 + tl.arange(0, BLOCK_CHUNKS)
        before += tl.load(count_ptr + bid * stride_cb + c, mask=c < first, other=0)
    start = tl.reduce(before, 0, _add)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    imask = i < Na
    rank = tl.load(rank_ptr + bid * stride_rank + i, mask=imask, other=0)
    keep = ((rank >= R) & imask).to(tl.int32)
    slot = start + tl.associative_scan(keep, 0, _add) - keep
    tl.store(unm_ptr + bid * stride_plan + slot, i.to(tl.int64), mask=keep != 0)


def match_plan_large_buffer(
    a, b, protected_a: int, protected_b: int, r: int, score_mod=None, sort_unm=True, splits=None
):
    """The plan of ``_triton.match_plan_buffer`` for any Na: one (B, Na + r) int64 tensor ``[unm | src | dst]``
    (the torch path's unm_idx, src_idx, dst_idx), from three launches (two without ``sort_unm``)."""
    a, b = _check_pair(a, b)
    batch, na, c = a.shape
    nb = b.shape[1]
    if not 0 < r <= na or nb == 0 or na >= 2**31:
        raise ValueError(f"match_plan needs 0 < r <= Na < 2**31 and Nb > 0, got r={r}, Na={na}, Nb={nb}")
    _penalty_args(score_mod, batch, na, nb, a)
    block_m, block_n, block_c, row_blocks, n_splits, split_cols = _match_grid(batch, na, nb, c, a.device, splits)
    scratch = torch.empty(batch, 2 * n_splits, na, device=a.device, dtype=torch.int32)  # split partials
    pbest, pidx = scratch[:, :n_splits].view(torch.float32), scratch[:, n_splits:]
    grid = (row_blocks, n_splits, batch)
    _launch_match(a, b, protected_a, protected_b, score_mod, pbest, pidx, block_m, block_n, block_c, grid, split_cols)
    return plan_from_partials(pbest, pidx, r, sort_unm, a.dtype)


_KEY16 = {torch.float16: 1, torch.bfloat16: 2}


def plan_from_partials(
    pbest: torch.Tensor, pidx: torch.Tensor, r: int, sort_unm: bool = True, score_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[unm | src | dst]`` (B, Na + r) int64 from (B, S, Na) fp32 split bests and int32 destinations, as
    ``matching.plan_from_scores`` orders them for the reduced (best, index) (earlier split wins ties).
    ``score_dtype`` fp16 / bf16: every score is a value of that dtype (int32 keys while Na + 128 <= 65536)."""
    batch, n_splits, na = pbest.shape
    if pbest.dtype != torch.float32 or pidx.dtype != torch.int32 or pidx.shape != pbest.shape:
        raise ValueError(f"pbest, pidx must be (B, S, Na) float32 and int32, got {pbest.dtype}, {pidx.dtype}")
    if pbest.stride(-1) != 1 or pidx.stride(-1) != 1 or pbest.stride()[:2] != pidx.stride()[:2]:
        raise ValueError("pbest, pidx must share strides with contiguous rows")
    if not 0 < r <= na:
        raise ValueError(f"r must be in 1..Na={na}, got {r}")
    chunk, block_j, scan_block = (CHUNK, BLOCK_J, SCAN_BLOCK) if pbest.is_cuda else CPU_TILES
    key16 = _KEY16.get(score_dtype, 0) if na + max(block_j, BLOCK_J) <= 65536 else 0
    n_chunks = triton.cdiv(na, chunk)
    ranks = torch.empty(batch, na + n_chunks, device=pbest.device, dtype=torch.int32)  # ranks, unmerged counts
    rank, counts = ranks[:, :na], ranks[:, na:]
    plan = torch.empty(batch, na + r, device=pbest.device, dtype=torch.int64)
    unm, src, dst = plan[:, : na - r], plan[:, na - r : na], plan[:, na:]
    _rank_tiled_kernel[(n_chunks, batch)](
        pbest,
        pidx,
        rank,
        counts,
        unm,
        src,
        dst,
        na,
        n_splits,
        r,
        pbest.stride(0),
        pbest.stride(1),
        ranks.stride(0),
        plan.stride(0),
        SORT_UNM=sort_unm,
        KEY16=key16,
        CHUNK=chunk,
        BLOCK_J=block_j,
        num_warps=4,
    )
    if sort_unm:
        _unm_scan_kernel[(triton.cdiv(na, scan_block), batch)](
            rank,
            counts,
            unm,
            na,
            r,
            ranks.stride(0),
            ranks.stride(0),
            plan.stride(0),
            CHUNK=chunk,
            BLOCK=scan_block,
            BLOCK_CHUNKS=256 if pbest.is_cuda else 4,
            num_warps=4,
        )
    return plan


def match_plan_large(a, b, protected_a: int, protected_b: int, r: int, score_mod=None, sort_unm=True, splits=None):
    """(unm_idx, src_idx, dst_idx), each (B, n, 1) int64, for any Na (see ``match_plan_large_buffer``)."""
    plan = match_plan_large_buffer(a, b, protected_a, protected_b, r, score_mod, sort_unm, splits)
    na = a.shape[1]
    return plan[:, : na - r, None], plan[:, na - r : na, None], plan[:, na:, None]
