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

Config = tuple[int, int, int]  # (BLOCK_T tokens, BLOCK_S slots, num_warps)


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


@triton.jit
def _patch_merge_attn_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    off_ptr,
    o_ptr,
    ws_ptr,
    slot_ptr,
    H,
    N,
    n_bins,
    stride_bin,
    n_unm,
    qk_scale,
    sq_p,
    sq_h,
    sq_n,
    sk_p,
    sk_h,
    sk_n,
    sv_p,
    sv_h,
    sv_n,
    so_p,
    so_h,
    so_n,
    ws_g,
    ws_q,
    ws_k,
    ws_v,
    ws_size,
    ws_out,
    slot_g,
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
    qb = q_ptr + p * sq_p + h * sq_h
    kb = k_ptr + p * sk_p + h * sk_h
    vb = v_ptr + p * sv_p + h * sv_h
    ob = o_ptr + p * so_p + h * so_h
    ws = ws_ptr + g.to(tl.int64) * ws_g
    sl = slot_ptr + g.to(tl.int64) * slot_g
    dims = tl.arange(0, D)
    t_ar = tl.arange(0, BLOCK_T)
    s_ar = tl.arange(0, BLOCK_S)
    n_dst_tok = n_bins * stride_bin
    n_slots = n_bins + n_unm

    if SINGLE:  # every destination in one block: normalise them once; merge sums ride along the matching
        pos = s_ar * stride_bin + off
        dst_rows = tl.load(vb + pos[:, None] * sv_n + dims[None, :], mask=(s_ar < n_bins)[:, None], other=1.0)
        yn1 = _unit_rows(dst_rows.to(tl.float32), DTYPE)
        acc_q = tl.zeros([BLOCK_S, D], tl.float32)
        acc_k = tl.zeros([BLOCK_S, D], tl.float32)
        acc_v = tl.zeros([BLOCK_S, D], tl.float32)
        cnt = tl.zeros([BLOCK_S], tl.float32)

    # 1. match every token's v to its best destination (destinations keep their own bin slot); track the
    #    lowest-scoring source (ties: the later token) for the first unmerged pick
    low = tl.full([], float("inf"), tl.float32)
    low_at = tl.full([], -1, tl.int32)
    for t0 in range(0, N, BLOCK_T):
        rows = t0 + t_ar
        rmask = rows < N
        vx = tl.load(vb + rows[:, None] * sv_n + dims[None, :], mask=rmask[:, None], other=1.0)
        xn = _unit_rows(vx.to(tl.float32), DTYPE)
        if SINGLE:
            best, arg = _best_in_block(xn, yn1, s_ar, n_bins, DOT_F32, DTYPE)
        else:
            best = tl.full([BLOCK_T], float("-inf"), tl.float32)
            arg = tl.zeros([BLOCK_T], tl.int32)
            for b0 in range(0, n_bins, BLOCK_S):
                bins = b0 + s_ar
                pos = bins * stride_bin + off
                y = tl.load(vb + pos[:, None] * sv_n + dims[None, :], mask=(bins < n_bins)[:, None], other=1.0)
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
            qx = tl.load(qb + rows[:, None] * sq_n + dims[None, :], mask=rmask[:, None], other=0.0)
            kx = tl.load(kb + rows[:, None] * sk_n + dims[None, :], mask=rmask[:, None], other=0.0)
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
            acc_q += move[:, None] * tl.load(qb + low_at * sq_n + dims).to(tl.float32)[None, :]
            acc_k += move[:, None] * tl.load(kb + low_at * sk_n + dims).to(tl.float32)[None, :]
            acc_v += move[:, None] * tl.load(vb + low_at * sv_n + dims).to(tl.float32)[None, :]
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
            acc_q = tl.zeros([BLOCK_S, D], tl.float32)
            acc_k = tl.zeros([BLOCK_S, D], tl.float32)
            acc_v = tl.zeros([BLOCK_S, D], tl.float32)
            cnt = tl.zeros([BLOCK_S], tl.float32)
            for t0 in range(0, N, BLOCK_T):
                rows = t0 + t_ar
                rmask = rows < N
                tok_slot = tl.load(sl + rows, mask=rmask, other=-1)
                hit = slots[:, None] == tok_slot[None, :]
                cnt += tl.reduce(hit.to(tl.float32), 1, _add)
                onehot = hit.to(DTYPE)
                qx = tl.load(qb + rows[:, None] * sq_n + dims[None, :], mask=rmask[:, None], other=0.0)
                kx = tl.load(kb + rows[:, None] * sk_n + dims[None, :], mask=rmask[:, None], other=0.0)
                vx = tl.load(vb + rows[:, None] * sv_n + dims[None, :], mask=rmask[:, None], other=0.0)
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
            l_i = tl.zeros([BLOCK_S], tl.float32)
            acc = tl.zeros([BLOCK_S, D], tl.float32)
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


_OFFSETS: dict[tuple, torch.Tensor] = {}
_tuned: dict[tuple, Config] = {}


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
    key = (heads, stride, torch.device(device))
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.tensor(official_head_offsets(heads, stride), dtype=torch.int32, device=device)
    return _OFFSETS[key]


def heuristic_config(n: int, n_slots: int, device: torch.device | None = None) -> Config:
    """64-token blocks; slot blocks cover N' up to 128 in one block (Sonata stage 0 at r=0.9: N' = 103). On a
    CPU (the interpreter, whose cost is per block op) tokens go in blocks of up to 256."""
    block_s = max(16, min(128, triton.next_power_of_2(n_slots)))
    cap = 64 if device is None or device.type == "cuda" else 256
    block_t = max(16, min(cap, triton.next_power_of_2(n)))
    return block_t, block_s, 4 if block_s <= 64 else 8


def candidate_configs(n: int, n_slots: int) -> tuple[Config, ...]:
    """Tiny tuning space (each fresh GPU machine compiles every entry once): the heuristic, 32/128-token
    blocks, and 64-slot blocks with 4 warps."""
    base = heuristic_config(n, n_slots)
    bt, bs, w = base
    alts = [base, (max(16, bt // 2), bs, w), (min(128, bt * 2), bs, 8), (bt, max(16, min(bs, 64)), 4)]
    return tuple(dict.fromkeys(alts))


def _forced_config() -> Config | None:
    forced = os.environ.get("MERGE_CORE_PMA_CONFIG")
    if not forced:
        return None
    parts = tuple(int(x) for x in forced.split(","))
    if len(parts) != 3:
        raise ValueError(f"MERGE_CORE_PMA_CONFIG must be BLOCK_T,BLOCK_S,warps, got {forced!r}")
    return parts  # type: ignore[return-value]


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


def _choose(key: tuple, n: int, n_slots: int, device: torch.device, launch) -> Config:
    if key in _tuned:
        return _tuned[key]
    fallback = heuristic_config(n, n_slots, device)
    if not _tuning_on(device):
        return fallback
    best, best_ms = fallback, math.inf
    for config in candidate_configs(n, n_slots):
        try:
            launch(config)  # compiles
        except Exception:  # e.g. out of registers / shared memory for this block shape
            continue
        ms = min(_time_ms(launch, config) for _ in range(3))
        if ms < best_ms:
            best, best_ms = config, ms
    _tuned[key] = best
    return best


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
    config: Config | None = None,
    force_general: bool = False,
):
    """Merged attention of (P, H, N, D) q, k, v in one launch: returns (out, N') or None where unsupported.

    ``r``: tokens merged away per patch (``min(#sources, r)`` merge); ``stride``: the bin length; ``offsets``: (H,)
    destination offset per head (default the official ``no_rand`` ones; values taken mod ``stride``);
    ``prop_attn``: "off" or "key" (log(size) per key). ``out`` is (P, H, N, D), a view of a (P, N, H, D) tensor.
    ``return_slots`` adds the (P*H, N) int64 slot map (destinations first, then unmerged sources by score).
    ``config``: (BLOCK_T, BLOCK_S, num_warps) instead of the tuned one; ``force_general``: the staged path even
    where all slots fit one block (tests).
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
    if not supported(q, r, stride, prop_attn):
        return None
    p, h, n, d = q.shape
    n_bins = n // stride
    n_unm = unmerged_count(n, r, stride)
    n_slots = n_bins + n_unm
    if offsets is None:
        offsets = head_offsets(h, stride, q.device)
    else:
        if offsets.shape != (h,):
            raise ValueError(f"offsets must have shape ({h},), got {tuple(offsets.shape)}")
        offsets = (offsets.to(device=q.device, dtype=torch.int64) % stride).to(torch.int32)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = d**-0.5 if scale is None else float(scale)
    out = torch.empty(p, n, h, d, device=q.device, dtype=q.dtype)
    g = p * h
    if g == 0:
        res = (out.permute(0, 2, 1, 3), n_slots)
        return (*res, torch.empty(0, n, dtype=torch.int64, device=q.device)) if return_slots else res
    slot_pad = triton.cdiv(n_slots, 16) * 16
    n_pad = triton.cdiv(n, 16) * 16
    ws_q = n_pad
    ws_k, ws_v = ws_q + slot_pad * d, ws_q + 2 * slot_pad * d
    ws_size = ws_q + 3 * slot_pad * d
    ws_out = ws_size + slot_pad
    ws = torch.empty(g, ws_out + slot_pad * d, device=q.device, dtype=torch.float32)
    slots = torch.empty(g, n, device=q.device, dtype=torch.int32)
    dot_f32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)

    def launch(cfg: Config) -> None:
        block_t, block_s, warps = cfg
        _patch_merge_attn_fwd[(g,)](
            q, k, v, offsets, out, ws, slots,
            h, n, n_bins, stride, n_unm, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(2), out.stride(1),
            ws.stride(0), ws_q, ws_k, ws_v, ws_size, ws_out, slots.stride(0),
            PROP_KEY=prop_attn == "key",
            DOT_F32=dot_f32,
            SINGLE=n_slots <= block_s and not force_general,
            BLOCK_T=block_t,
            BLOCK_S=block_s,
            D=d,
            num_warps=warps,
        )  # fmt: skip

    config = config or _forced_config()
    if config is None:
        key = (q.device, q.dtype, d, triton.next_power_of_2(n), triton.cdiv(n_slots, 64), prop_attn == "key",
               triton.next_power_of_2(g))  # fmt: skip
        config = _choose(key, n, n_slots, q.device, launch)
    launch(config)
    res = (out.permute(0, 2, 1, 3), n_slots)
    return (*res, slots.long()) if return_slots else res
