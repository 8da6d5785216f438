"""Long-sequence kernels (issue 9 target 5) against the torch reference, on CPU under Triton's interpreter.

- the merge's sorted path (sources ordered by destination by counting, each destination block reads only its
  own slot range) and its scan path, against ``apply_plan`` (the torch reference of ``merge_wavg``), on random
  plans with duplicate and skewed destinations, protected pairs, r = Tb, sizes None or given;
- the large-Na plan (``_rank_large``: ranking by counting over tiles, unmerged rows by a chunked scan) against
  torch's stable descending sort, including tied scores, protected rows and destination splits.

GPU timing lives in ``packages/merge-bench/scripts/issue9_large_n.sh``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:  # torch may have imported triton already; newer triton reads the flag through ``knobs``
        import triton

        if os.environ["TRITON_INTERPRET"] == "1" and hasattr(triton, "knobs"):
            triton.knobs.runtime.interpret = True
    except Exception:  # pragma: no cover - no triton: the kernel tests skip below
        pass

import merge_core as mc  # noqa: E402
from merge_core import kernels  # noqa: E402
from merge_core.matching import apply_plan, best_destinations  # noqa: E402

try:
    from merge_core.kernels import _merge, _rank_large  # noqa: E402

    _TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    _TRITON_ERROR = f"triton kernels unavailable: {type(exc).__name__}: {exc}"

needs_interpreter = pytest.mark.skipif(
    _TRITON_ERROR is not None or os.environ.get("TRITON_INTERPRET") != "1",
    reason=_TRITON_ERROR or "CPU kernel tests need TRITON_INTERPRET=1 (set automatically when no CUDA)",
)
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _reference_merge(x, size, unm, src, dst, pa, pb):
    """ToMe's size-weighted merge in fp64 with torch ops (gather + scatter_reduce), independent of the kernels."""
    x64 = x.double()
    s64 = torch.ones_like(x64[..., :1]) if size is None else size.double()
    merged = apply_plan(torch.cat([x64 * s64, s64], dim=-1), unm, src, dst, pa, pb, "sum")
    return merged[..., :-1] / merged[..., -1:], merged[..., -1:]


def _random_plan(n: int, t: int, r: int, pa: int, pb: int, skew: str, gen: torch.Generator):
    """(unm, src, dst) like a matcher's: r distinct unprotected a-rows merge, unmerged rows in index order."""
    na, tb = (t + 1) // 2, t // 2
    unms, srcs, dsts = [], [], []
    for _ in range(n):
        order = pa + torch.randperm(na - pa, generator=gen)
        src = order[:r]
        unm = torch.cat([torch.arange(pa), order[r:].sort().values])
        if skew == "uniform":
            dst = torch.randint(pb, tb, (r,), generator=gen)
        elif skew == "one":  # every source onto one destination (a background token)
            dst = torch.full((r,), tb - 1)
        else:  # a few hot destinations plus a uniform tail
            hot = torch.randint(pb, tb, (3,), generator=gen)
            dst = torch.where(
                torch.rand(r, generator=gen) < 0.7,
                hot[torch.randint(0, 3, (r,), generator=gen)],
                torch.randint(pb, tb, (r,), generator=gen),
            )
        unms.append(unm)
        srcs.append(src)
        dsts.append(dst)
    return tuple(torch.stack(v)[..., None] for v in (unms, srcs, dsts))


def _check_merge(x, size, unm, src, dst, pa, pb, sorted_sources):
    out, out_s = _merge.merge_wavg_indices(x, size, unm, src, dst, pb, sorted_sources=sorted_sources)
    ref, ref_s = _reference_merge(x, size, unm, src, dst, pa, pb)
    assert out.shape == ref.shape and out.dtype == x.dtype and out_s.shape == ref_s.shape
    tol = TOL[x.dtype]
    torch.testing.assert_close(out_s.double(), ref_s.to(x.dtype).double(), atol=0, rtol=0)
    torch.testing.assert_close(out.double(), ref, atol=tol * 4, rtol=tol)


@needs_interpreter
@pytest.mark.parametrize(
    "sorted_sources, skew, protected",
    [(True, "uniform", 0), (True, "one", 3), (True, "hot", 1), (True, "hot", 0), (False, "hot", 3)],
)
def test_merge_paths_match_reference(sorted_sources, skew, protected):
    gen = torch.Generator().manual_seed(7 + protected)
    n, t, c = 2, 301, 24  # Tb = 150: three destination blocks; odd T: one more a-token than b-tokens
    pa, pb = (protected + 1) // 2, protected // 2
    x = torch.randn(n, t, c, generator=gen)
    size = torch.randint(1, 6, (n, t, 1), generator=gen).float()
    for r, s in ((1, size), (37, None), (140, size)):
        unm, src, dst = _random_plan(n, t, r, pa, pb, skew, gen)
        _check_merge(x, s, unm, src, dst, pa, pb, sorted_sources)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_sorted_path_dtypes_and_r_equals_tb(dtype):
    gen = torch.Generator().manual_seed(3)
    n, t, c = 2, 130, 24  # Na = Tb = 65: r = Tb merges every a-row (no unmerged rows left)
    x = torch.randn(n, t, c, generator=gen).to(dtype)
    size = torch.randint(1, 4, (n, t, 1), generator=gen).to(dtype)
    for r in (65, 64):
        unm, src, dst = _random_plan(n, t, r, 0, 0, "hot", gen)
        for s in (None, size):
            _check_merge(x, s, unm, src, dst, 0, 0, True)


@needs_interpreter
def test_merge_sorted_path_hand_computed():
    """T = 6 tokens, C = 1: a-rows 0, 2, 4 (values 1, 3, 5), b-rows 1, 3, 5 (values 2, 4, 6); a-rows 0 and 2
    both merge into b-row 1 (token 3), a-row 2 (token 4) stays. Sizes 1, 2, 2, 1, 3, 1."""
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape(1, 6, 1)
    size = torch.tensor([1.0, 2.0, 2.0, 1.0, 3.0, 1.0]).reshape(1, 6, 1)
    unm = torch.tensor([[[2]]])
    src = torch.tensor([[[1], [0]]])
    dst = torch.tensor([[[1], [1]]])
    out, out_s = _merge.merge_wavg_indices(x, size, unm, src, dst, 0, sorted_sources=True)
    # [unmerged a-row 2 (token 4, value 5, size 3), b-rows 0, 1, 2]; b-row 1 = (4*1 + 1*1 + 3*2) / (1 + 1 + 2)
    assert out[0, :, 0].tolist() == [5.0, 2.0, 11.0 / 4.0, 6.0]
    assert out_s[0, :, 0].tolist() == [3.0, 2.0, 4.0, 1.0]


@needs_interpreter
def test_sources_by_dst_is_a_stable_counting_sort():
    gen = torch.Generator().manual_seed(5)
    n, r, tb = 2, 100, 150  # several pair chunks and key tiles
    src = torch.randint(0, 1000, (n, r), generator=gen)
    dst = torch.randint(0, tb, (n, r), generator=gen)
    ssrc, sdst, blk = _merge.sources_by_dst(src[..., None], dst[..., None], tb)
    order = torch.sort(dst, dim=-1, stable=True).indices
    assert torch.equal(sdst.long(), dst.gather(-1, order)) and torch.equal(ssrc.long(), src.gather(-1, order))
    bounds = torch.arange(0, blk.shape[-1]) * _merge.BLOCK_ROWS
    assert torch.equal(blk.long(), (dst[..., None] < bounds).sum(-2))


def test_sorted_path_rule():
    assert not _merge.use_sorted_sources(1025, 40) and not _merge.use_sorted_sources(197, 16)
    assert _merge.use_sorted_sources(4096, 1024) and _merge.use_sorted_sources(16384, 4096)


# ----------------------------------------------------------------------------------------------- large-Na plan
def _sort_plan(best, idx, r, sort_unm):
    """torch's plan from per-row (best, index): stable descending sort, first r rows merge."""
    edge = torch.sort(best, dim=-1, descending=True, stable=True).indices[..., None]
    unm, src = edge[..., r:, :], edge[..., :r, :]
    return (unm.sort(dim=-2).values if sort_unm else unm), src, idx[..., None].gather(-2, src)


def _split_plan(plan, na, r):
    return plan[:, : na - r, None], plan[:, na - r : na, None], plan[:, na:, None]


@needs_interpreter
@pytest.mark.parametrize(
    "sort_unm, score_dtype",
    [(True, torch.float32), (False, torch.float32), (True, torch.float16), (False, torch.bfloat16)],
)
def test_plan_from_partials_ties_signed_zero_and_splits(sort_unm, score_dtype):
    """Hand-made split partials: many exact ties (equal scores rank by row index), -0.0 == 0.0, -inf rows
    (protected), and a later split that only wins where strictly better (earlier split keeps ties)."""
    gen = torch.Generator().manual_seed(11)
    n, s_, na = 2, 3, 150
    pbest = torch.randint(-3, 4, (n, s_, na), generator=gen).float() / 4  # values in {-0.75, ..., 0.75}
    pbest[0, 0, ::7] = -0.0
    pbest[:, :, :5] = float("-inf")
    pbest[1, :, 140:] = float("-inf")
    pidx = torch.randint(0, 90, (n, s_, na), generator=gen, dtype=torch.int32)
    best, split = pbest.max(dim=1)  # first maximal split, as the kernels reduce
    idx = pidx.gather(1, split[:, None]).squeeze(1).long()
    for r in (1, 40, 149, 150):
        expected = _sort_plan(best, idx, r, sort_unm)
        got = _split_plan(_rank_large.plan_from_partials(pbest, pidx, r, sort_unm, score_dtype), na, r)
        for e, g, name in zip(expected, got, ("unm", "src", "dst"), strict=True):
            assert g.dtype == torch.int64 and torch.equal(g, e), (r, name)


def test_score_key_orders_like_a_descending_stable_sort():
    """The integer image of ``_score_key`` (computed here with torch) orders floats like torch does, for the
    fp32 bits (int64 key) and the fp16 / bf16 bits (int32 key)."""
    vals = torch.tensor([float("-inf"), -3.5, -1e-3, -0.0, 0.0, 1e-3, 0.25, 7.0, float("inf")])
    for dtype, view, flip in ((torch.float32, torch.int32, 0x7FFFFFFF), (torch.float16, torch.int16, 0x7FFF)):
        v = vals.to(dtype)
        bits = v.view(view).long()
        ordered = torch.where(v == 0, 0, torch.where(bits >= 0, bits, bits ^ flip))
        assert torch.equal(ordered.argsort(stable=True), v.float().argsort(stable=True)), dtype
    v = vals.to(torch.bfloat16)
    bits = v.view(torch.int16).long()
    ordered = torch.where(v == 0, 0, torch.where(bits >= 0, bits, bits ^ 0x7FFF))
    assert torch.equal(ordered.argsort(stable=True), v.float().argsort(stable=True))


@needs_interpreter
@pytest.mark.parametrize(
    "protected, splits, sort_unm, dtype",
    [(0, 1, False, torch.float32), (1, 3, True, torch.float32), (3, None, True, torch.float16)],
)
def test_match_plan_large_equals_sort_path(protected, splits, sort_unm, dtype):
    gen = torch.Generator().manual_seed(12 + protected)
    m = torch.randint(-2, 3, (2, 181, 8), generator=gen).to(dtype)  # coarse values: many tied best scores
    a, b = m[:, ::2], m[:, 1::2]
    pa, pb = (protected + 1) // 2, protected // 2
    with kernels.kernel_mode("never"):
        best, idx = best_destinations(a, b, pa, pb)
    for r in (1, 45, 91 - pa):
        expected = _sort_plan(best, idx, r, sort_unm)
        got = _rank_large.match_plan_large(a, b, pa, pb, r, None, sort_unm, splits=splits)
        for e, g, name in zip(expected, got, ("unm", "src", "dst"), strict=True):
            assert torch.equal(g, e), (r, name)
    with pytest.raises(ValueError, match="match_plan needs 0 < r <= Na"):
        _rank_large.match_plan_large(a, b, pa, pb, 0)


@needs_interpreter
def test_long_sequences_dispatch_to_tiled_plan(monkeypatch):
    """Past MAX_PLAN_ROWS, bipartite_soft_matching + merge_wavg take the tiled plan and give the torch path's
    result (penalty, protected prefix, sizes)."""
    monkeypatch.setattr(kernels, "MAX_PLAN_ROWS", 16)
    called = []
    real = _rank_large.match_plan_large
    monkeypatch.setattr(_rank_large, "match_plan_large", lambda *a, **k: called.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(13)
    metric = torch.randn(2, 75, 8, generator=gen)
    x = torch.randn(2, 75, 16, generator=gen)
    size = torch.randint(1, 4, (2, 75, 1), generator=gen).float()
    pen = mc.TokenPairPenalty(torch.rand(2, 75, generator=gen), 0.5, "guide")

    def run():
        merge, _ = mc.bipartite_soft_matching(metric, 20, class_token=True, score_mod=pen)
        return mc.merge_wavg(merge, x, size)

    with kernels.kernel_mode("never"):
        ref_x, ref_s = run()
    with kernels.kernel_mode("always"):
        assert kernels.use_fused_plan(metric, pen)
        out_x, out_s = run()
    assert called and torch.equal(out_s, ref_s)
    torch.testing.assert_close(out_x, ref_x)


@needs_interpreter
def test_merge_block_r_option():
    """``block_r`` (a benchmark knob: one loop step of 64 sources) gives the same merge; bad values fail."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(1, 101, 16, generator=gen)
    unm, src, dst = _random_plan(1, 101, 40, 1, 0, "hot", gen)
    out, out_s = _merge.merge_wavg_indices(x, None, unm, src, dst, 0, sorted_sources=False, block_r=64)
    ref, ref_s = _reference_merge(x, None, unm, src, dst, 1, 0)
    torch.testing.assert_close(out.double(), ref, atol=4e-6, rtol=1e-6)
    assert torch.equal(out_s.double(), ref_s)
    with pytest.raises(ValueError, match="block_r must be a power of two"):
        _merge.merge_wavg_indices(x, None, unm, src, dst, 0, block_r=24)


@needs_interpreter
def test_scan_one_step_knob(monkeypatch):
    """``SCAN_ONE_STEP``: r = 40 runs one 64-source step (the same merge as the fp64 reference); r above it does not."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, 121, 16, generator=gen)
    size = torch.randint(1, 4, (2, 121, 1), generator=gen).float()
    monkeypatch.setattr(_merge, "SCAN_ONE_STEP", 64)
    for r in (40, 60):
        _check_merge(x, size, *_random_plan(2, 121, r, 1, 0, "hot", gen), 1, 0, False)
    launched = []
    real = _merge._merge_wavg_kernel
    monkeypatch.setattr(
        _merge,
        "_merge_wavg_kernel",
        type(
            "K", (), {"__getitem__": lambda self, g: lambda *a, **k: (launched.append(k["BLOCK_R"]), real[g](*a, **k))}
        )(),
    )
    _merge.merge_wavg_indices(x, size, *_random_plan(2, 121, 40, 1, 0, "hot", gen), 0, sorted_sources=False)
    monkeypatch.setattr(_merge, "SCAN_ONE_STEP", 0)
    _merge.merge_wavg_indices(x, size, *_random_plan(2, 121, 40, 1, 0, "hot", gen), 0, sorted_sources=False)
    assert launched == [64, 32]


# ------------------------------------------------------------------------------------------------------ GPU
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or _TRITON_ERROR is not None, reason="needs CUDA")


@gpu
@needs_cuda
def test_gpu_plan_from_partials_exact():
    """Compiled ranking kernels on tied, split partials: exactly torch's stable descending sort."""
    gen = torch.Generator().manual_seed(21)
    n, s_, na = 3, 3, 5003
    pbest = (torch.randint(-40, 41, (n, s_, na), generator=gen).float() / 64).cuda()
    pbest[:, :, :3] = float("-inf")
    pidx = torch.randint(0, 4000, (n, s_, na), generator=gen, dtype=torch.int32).cuda()
    best, split = pbest.max(dim=1)
    idx = pidx.gather(1, split[:, None]).squeeze(1).long()
    for r, sort_unm in ((1, True), (1700, True), (1700, False), (na, True)):
        expected = _sort_plan(best, idx, r, sort_unm)
        got = _split_plan(_rank_large.plan_from_partials(pbest, pidx, r, sort_unm), na, r)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), (r, sort_unm)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(2, 8193, 64, 2048, 96), (8, 16384, 64, 4096, 768)])
def test_gpu_long_sequence_plan_merge_and_graph(shape):
    b, n, c, r, xc = shape
    torch.manual_seed(5)
    m = torch.randn(b, n, c, device="cuda", dtype=torch.float16)
    x = torch.randn(b, n, xc, device="cuda", dtype=torch.float16)
    size = torch.randint(1, 4, (b, n, 1), device="cuda").half()
    with torch.inference_mode():
        with kernels.kernel_mode("never"):
            ref_plan = mc.bipartite_soft_matching(m, r, True)[0].plan
        with kernels.kernel_mode("always"):
            plan = mc.bipartite_soft_matching(m, r, True)[0].plan
        agree = (plan.src_idx == ref_plan.src_idx).float().mean().item()  # fp16 last-bit near-ties
        assert agree > 0.97, agree
        assert torch.equal(plan.unm_idx.sort(dim=1).values, plan.unm_idx)
        idx = (ref_plan.unm_idx, ref_plan.src_idx, ref_plan.dst_idx)
        ref, ref_s = _reference_merge(x, size, *idx, 1, 0)
        for sorted_sources in (True, False):
            out, out_s = _merge.merge_wavg_indices(x, size, *idx, 0, sorted_sources=sorted_sources)
            torch.testing.assert_close(out.double(), ref, atol=8e-3, rtol=2e-3)
            assert torch.equal(out_s.double(), ref_s.half().double())

        def step():
            with kernels.kernel_mode("always"):
                return mc.merge_wavg(mc.bipartite_soft_matching(m, r, True)[0], x, size)

        eager = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])  # deterministic
