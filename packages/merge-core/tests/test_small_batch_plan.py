"""The small-batch matching plan (issue 9 target 2) against the torch reference path.

- ``_triton.match_plan_heads``: the metric ``keys.mean(1)`` averaged inside the kernels (fused into the matcher
  or as a prepass), then matcher + ranking; the unmerged list is placed by the ranking launch's last program.
- ``matching.bipartite_soft_matching_heads`` and the timm adapter's keys path.

Every plan is compared with ``bipartite_soft_matching(keys.mean(1))`` on the torch path (``kernel_mode("never")``).
CPU: the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before the first kernel import).
Keys are multiples of 1/8 in most tests: head sums are exact in fp32, so the metric is bit-identical on both
paths and the many exact score ties exercise the tie rules (first destination, stable descending rank).
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
from merge_core import kernels, matching  # noqa: E402
from merge_core.matching import bipartite_soft_matching, bipartite_soft_matching_heads  # noqa: E402

try:
    from merge_core.kernels import _triton  # noqa: E402

    _TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    _triton = None
    _TRITON_ERROR = f"triton kernels unavailable: {type(exc).__name__}: {exc}"

needs_interpreter = pytest.mark.skipif(
    _TRITON_ERROR is not None or os.environ.get("TRITON_INTERPRET") != "1",
    reason=_TRITON_ERROR or "CPU kernel tests need TRITON_INTERPRET=1 (set automatically when no CUDA)",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or _TRITON_ERROR is not None, reason="needs CUDA")


def _keys(batch: int, heads: int, n: int, d: int, seed: int, exact: bool = True) -> torch.Tensor:
    """(B, H, N, D) keys laid out like timm's qkv output (a strided view, as the adapter passes them)."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        qkv = torch.randint(-12, 13, (batch, n, 3, heads, d), generator=g).float() / 8
    else:
        qkv = torch.randn(batch, n, 3, heads, d, generator=g)
    return qkv.permute(2, 0, 3, 1, 4)[1]


def _reference_plan(keys: torch.Tensor, r: int, protected: int) -> tuple[torch.Tensor, ...]:
    """(unm, src, dst) of the torch path on the averaged keys."""
    with kernels.kernel_mode("never"):
        merge, _ = bipartite_soft_matching(keys.mean(1), r, protected=protected)
    return merge.plan.unm_idx, merge.plan.src_idx, merge.plan.dst_idx


def _split(plan: torch.Tensor, n: int, r: int) -> tuple[torch.Tensor, ...]:
    na = (n + 1) // 2
    return plan[:, : na - r, None], plan[:, na - r : na, None], plan[:, na:, None]


@pytest.fixture
def fused_unm():
    """Restore ``_triton.FUSED_UNM`` after a test flips it."""
    saved = _triton.FUSED_UNM
    yield
    _triton.FUSED_UNM = saved


@needs_interpreter
def test_head_mean_metric_equals_torch_mean():
    keys = _keys(2, 4, 13, 8, seed=1)
    assert torch.equal(_triton.head_mean_metric(keys), keys.mean(1))  # exact sums: bit-identical
    rand = _keys(2, 3, 13, 8, seed=2, exact=False)
    torch.testing.assert_close(_triton.head_mean_metric(rand), rand.mean(1), atol=1e-6, rtol=1e-6)
    normed = _triton.head_mean_metric(keys, normalise=True)
    m = keys.mean(1)
    torch.testing.assert_close(normed, m / m.norm(dim=-1, keepdim=True), atol=1e-6, rtol=1e-6)


@needs_interpreter
@pytest.mark.parametrize(
    "batch, heads, n, protected, r, head_mean, unm_fused",
    [
        (1, 4, 37, 1, 9, "fused", True),  # class token, odd N, batch 1
        (2, 4, 36, 0, 7, "prepass", True),  # no protected token: unmerged rows in rank order
        (3, 2, 29, 2, 5, "fused", False),  # distillation token, the three-launch variant
        (2, 4, 41, 3, 10, "prepass", False),  # CLS + registers
        (2, 8, 33, 1, 16, "auto", True),  # r at the cap (16 of 32 unprotected tokens)
    ],
)
@needs_interpreter
def test_match_plan_heads_equals_torch_path(batch, heads, n, protected, r, head_mean, unm_fused, fused_unm):
    _triton.FUSED_UNM = unm_fused
    keys = _keys(batch, heads, n, 16, seed=n + r)
    expected = _reference_plan(keys, r, protected)
    pa, pb = (protected + 1) // 2, protected // 2
    plan = _triton.match_plan_heads(keys, pa, pb, r, None, protected > 0, splits=2, head_mean=head_mean)
    for got, want, name in zip(_split(plan, n, r), expected, ("unm", "src", "dst"), strict=True):
        assert got.dtype == torch.int64 and torch.equal(got, want), name


@needs_interpreter
def test_match_plan_buffer_fused_unm_equals_torch_path(fused_unm):
    """The rank + unmerged list in one launch, on the plain metric path (every split count)."""
    m = _keys(2, 1, 45, 16, seed=3, exact=False)[:, 0]
    r = 11
    with kernels.kernel_mode("never"):
        merge, _ = bipartite_soft_matching(m, r, protected=1)
    for splits in (1, 3):
        for flag in (True, False):
            _triton.FUSED_UNM = flag
            plan = _triton.match_plan_buffer(m[:, ::2], m[:, 1::2], 1, 0, r, None, True, splits=splits)
            unm, src, dst = _split(plan, 45, r)
            assert torch.equal(unm, merge.plan.unm_idx) and torch.equal(src, merge.plan.src_idx)
            assert torch.equal(dst, merge.plan.dst_idx)


@needs_interpreter
def test_ties_rank_by_position_with_fused_unmerged_list(fused_unm):
    """All-equal keys: every score ties, so rows merge in index order onto destination 0 (hand-derived)."""
    _triton.FUSED_UNM = True
    keys = torch.ones(1, 2, 12, 4)
    plan = _triton.match_plan_heads(keys, 1, 0, 3, None, True, splits=2, head_mean="fused")
    unm, src, dst = _split(plan, 12, 3)
    assert src[0, :, 0].tolist() == [1, 2, 3] and dst[0, :, 0].tolist() == [0, 0, 0]
    assert unm[0, :, 0].tolist() == [0, 4, 5]  # the protected row first, then index order


@needs_interpreter
def test_bipartite_soft_matching_heads_merges_like_the_mean_path():
    keys = _keys(2, 4, 25, 8, seed=4)
    x = torch.randn(2, 25, 6)
    size = torch.rand(2, 25, 1) + 0.5
    with kernels.kernel_mode("never"):
        merge, unmerge = bipartite_soft_matching(keys.mean(1), 6, protected=1)
        ref_x, ref_size = mc.merge_wavg(merge, x, size)
        ref_un = unmerge(ref_x)
    with kernels.kernel_mode("always"):
        assert matching.use_fused_heads(keys)
        merge, unmerge = bipartite_soft_matching_heads(keys, 6, protected=1)
        out_x, out_size = mc.merge_wavg(merge, x, size)
        out_un = unmerge(out_x)
    torch.testing.assert_close(out_x, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_size, ref_size, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_un, ref_un, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_bipartite_soft_matching_heads_falls_back_and_checks_input():
    keys = _keys(1, 2, 9, 4, seed=5)
    with kernels.kernel_mode("never"):
        assert not matching.use_fused_heads(keys)
        merge, _ = bipartite_soft_matching_heads(keys, 2, protected=1)
        ref, _ = bipartite_soft_matching(keys.mean(1), 2, protected=1)
        assert all(torch.equal(a, b) for a, b in zip(merge.plan[:3], ref.plan[:3], strict=True))
    with kernels.kernel_mode("always"):
        merge, unmerge = bipartite_soft_matching_heads(keys, 0, protected=1)
        assert merge is matching.do_nothing and unmerge is matching.do_nothing
    with pytest.raises(ValueError, match="keys must be"):
        bipartite_soft_matching_heads(keys[0], 2)
    with pytest.raises(ValueError, match="head_mean must be one of"):
        _triton.match_plan_heads(keys, 1, 0, 2, head_mean="sometimes")
    with pytest.raises(ValueError, match="keys must be a float"):
        _triton.match_plan_heads(keys[0], 1, 0, 2)


def _tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(7)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    ).eval()


@needs_interpreter
@pytest.mark.parametrize("prop_attn", [False, True])
def test_patched_timm_keys_path_equals_mean_path(prop_attn, monkeypatch):
    """The timm adapter's new path (keys into the fused plan) against the old one (``k.mean(1)`` then the plan)
    and against the torch reference, all with kernels forced on CPU."""
    model = _tiny_vit()
    mc.patch.timm(model, prop_attn=prop_attn)
    model.r = 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with kernels.kernel_mode("never"):
            ref = model(x)
        with kernels.kernel_mode("always"):
            new = model(x)
            tokens = list(model._merge_info.tokens)
            monkeypatch.setattr(matching, "use_fused_heads", lambda keys, score_mod=None: False)
            old = model(x)
    assert tokens == [14, 11] and model._merge_info.tokens == tokens
    torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_patched_timm_custom_matcher_still_gets_the_mean_key():
    model = _tiny_vit()
    seen = []

    def match_fn(*, block, layer, x, attn_input, metric, r, info):
        seen.append(tuple(metric.shape))
        return bipartite_soft_matching(metric, r, protected=info.protected)

    mc.patch.timm(model, match_fn=match_fn)
    model.r = 2
    with torch.no_grad(), kernels.kernel_mode("always"):
        model(torch.randn(1, 3, 32, 32))
    assert seen == [(1, 17, 16), (1, 15, 16)]  # (B, N, head_dim): averaged over the two heads


# ---------------------------------------------------------------- GPU (compiled kernels; ``pytest -m gpu``)


def _gpu_keys(batch: int, heads: int, n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(batch, n, 3, heads, d, device="cuda", dtype=dtype, generator=g)
    return qkv.permute(2, 0, 3, 1, 4)[1]


def _old_plan(keys: torch.Tensor, r: int) -> torch.Tensor:
    """The previous kernel path: torch's mean, matcher, ranking, ``_unm_kernel``."""
    saved = _triton.FUSED_UNM
    _triton.FUSED_UNM = False
    try:
        m = keys.mean(1)
        return _triton.match_plan_buffer(m[:, ::2], m[:, 1::2], 1, 0, r, None, True)
    finally:
        _triton.FUSED_UNM = saved


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(1, 16, 1025, 64, 40), (8, 12, 197, 64, 16)])
@pytest.mark.parametrize("head_mean", ["fused", "prepass"])
def test_gpu_match_plan_heads(shape, head_mean, fused_unm):
    """fp32: equal to the torch path; fp16: equal to the old kernel path wherever the head means agree."""
    batch, heads, n, d, r = shape
    for flag in (True, False):
        _triton.FUSED_UNM = flag
        keys = _gpu_keys(batch, heads, n, d, torch.float32, seed=n)
        plan = _triton.match_plan_heads(keys, 1, 0, r, None, True, head_mean=head_mean)
        expected = torch.cat([t[..., 0] for t in _reference_plan(keys, r, 1)], dim=-1)
        assert torch.equal(plan, expected)
        keys = _gpu_keys(batch, heads, n, d, torch.float16, seed=n + 1)
        if torch.equal(_triton.head_mean_metric(keys), keys.mean(1)):
            plan = _triton.match_plan_heads(keys, 1, 0, r, None, True, head_mean=head_mean)
            assert torch.equal(plan, _old_plan(keys, r))


@gpu
@needs_cuda
def test_gpu_plan_replays_in_cuda_graph():
    """The ticket counter is zeroed by every replay's matcher: replays with new keys give fresh, correct plans."""
    keys = _gpu_keys(1, 16, 1025, 64, torch.float32, seed=1)
    static = keys.clone()
    _triton.match_plan_heads(static, 1, 0, 40, None, True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = _triton.match_plan_heads(static, 1, 0, 40, None, True)
    for seed in (2, 3, 4):
        static.copy_(_gpu_keys(1, 16, 1025, 64, torch.float32, seed=seed))
        graph.replay()
        expected = torch.cat([t[..., 0] for t in _reference_plan(static, 40, 1)], dim=-1)
        assert torch.equal(plan, expected)


@gpu
@needs_cuda
@pytest.mark.parametrize("prop_attn", [False, True])
def test_gpu_patched_timm_keys_path_equals_mean_path(prop_attn, monkeypatch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224").cuda().half().eval()
    mc.patch.timm(model, prop_attn=prop_attn)
    model.r = 16
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        new = model(x)
        monkeypatch.setattr(matching, "use_fused_heads", lambda keys, score_mod=None: False)
        old = model(x)
    torch.testing.assert_close(new.float(), old.float(), atol=2e-2, rtol=0)
