"""Fused Triton kernels against the torch reference path.

On a CPU-only machine the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set here before
the kernel module is first imported) on small shapes. Known interpreter limits, handled below: its bf16
``tl.dot`` is wrong (the kernels upcast bf16 to fp32 dots on CPU) and its fp32 -> bf16 cast truncates
instead of rounding, so bf16 is compared by score, not by exact index, on CPU. GPU tests are marked ``gpu``.
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
from merge_core.matching import best_destinations  # noqa: E402

try:
    from merge_core.kernels import _triton  # noqa: E402, F401

    _TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    _TRITON_ERROR = f"triton kernels unavailable: {type(exc).__name__}: {exc}"

CPU_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(_TRITON_ERROR is not None, reason=_TRITON_ERROR or "")
needs_interpreter = pytest.mark.skipif(
    _TRITON_ERROR is not None or not CPU_INTERPRET,
    reason=_TRITON_ERROR or "CPU kernel tests need TRITON_INTERPRET=1 (set automatically when no CUDA)",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or _TRITON_ERROR is not None, reason="needs CUDA + triton"
)


def _both(fn, *args, **kwargs):
    """Run ``fn`` on the torch path and the fused path."""
    with kernels.kernel_mode("never"):
        ref = fn(*args, **kwargs)
    with kernels.kernel_mode("always"):
        out = fn(*args, **kwargs)
    return ref, out


def _check_best(a, b, pa, pb, score_mod=None):
    (ref_s, ref_i), (out_s, out_i) = _both(best_destinations, a, b, pa, pb, score_mod)
    assert out_s.dtype == ref_s.dtype and out_i.dtype == torch.int64
    if a.dtype == torch.bfloat16 and not a.is_cuda:
        # interpreter rounds by truncation: the chosen destination must score (almost) the max
        torch.testing.assert_close(out_s.float(), ref_s.float(), atol=2e-2, rtol=0)
        return
    if a.dtype == torch.float32:
        torch.testing.assert_close(out_s, ref_s, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(out_s, ref_s)
    assert torch.equal(out_i, ref_i)


def test_dispatch_defaults_to_torch_on_cpu():
    a = torch.randn(2, 5, 8)
    assert kernels.get_mode() in kernels.MODES
    with kernels.kernel_mode("auto"):
        assert not kernels.use_fused_match(a, None)
        assert not kernels.use_fused_merge(a, None)
    with kernels.kernel_mode("never"):
        assert not kernels.use_fused_match(a, None)
    with pytest.raises(ValueError, match="mode must be one of"):
        kernels.set_mode("sometimes")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("protected", [(0, 0), (1, 0), (2, 3)])
def test_best_destinations_matches_torch(dtype, protected):
    torch.manual_seed(0)
    m = torch.randn(3, 37, 24).to(dtype)
    _check_best(m[:, ::2], m[:, 1::2], *protected)


@needs_interpreter
@pytest.mark.parametrize("mode", ["shifted", "guide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_best_destinations_penalty(mode, dtype):
    torch.manual_seed(1)
    m = torch.randn(2, 21, 16).to(dtype)
    pen = mc.TokenPairPenalty(torch.rand(2, 21), 0.7, mode)
    assert kernels.use_fused_match(m, pen) is False  # CPU tensors: auto mode keeps torch
    with kernels.kernel_mode("always"):
        assert kernels.use_fused_match(m, pen)
    _check_best(m[:, ::2], m[:, 1::2], 1, 0, pen)
    shared = mc.TokenPairPenalty(torch.rand(1, 21), 0.3, mode)  # phi broadcast over the batch
    _check_best(m[:, ::2], m[:, 1::2], 0, 0, shared)


@needs_interpreter
def test_best_destinations_long_sequence_path(monkeypatch):
    """Long sequences normalise in torch once and use bigger tiles; forced here on a small shape."""
    monkeypatch.setattr(_triton, "PRENORM_PAIRS", 1)
    torch.manual_seed(11)
    m = torch.randn(2, 75, 16)
    _check_best(m[:, ::2], m[:, 1::2], 1, 0)


@needs_interpreter
def test_best_destinations_penalty_bad_phi():
    m = torch.randn(2, 21, 16)
    pen = mc.TokenPairPenalty(torch.rand(2, 20), 0.5)
    with kernels.kernel_mode("always"), pytest.raises(ValueError, match="phi must have one score per token"):
        best_destinations(m[:, ::2], m[:, 1::2], 0, 0, pen)


@needs_interpreter
def test_tie_break_is_first_index_across_blocks():
    torch.manual_seed(2)
    a = torch.randn(1, 4, 16)
    b = torch.randn(1, 70, 16)  # 2 column blocks of 64
    b[0, 5] = a[0, 0] * 2.0  # same direction: cosine 1 at 5 and 66
    b[0, 66] = a[0, 0] * 3.0
    b[0, 40] = a[0, 1]
    b[0, 41] = a[0, 1]
    with kernels.kernel_mode("always"):
        _, idx = best_destinations(a, b)
    assert idx[0, 0].item() == 5 and idx[0, 1].item() == 40


def _torch_plan(a, b, pa, pb, r, sort_unm, score_mod=None):
    """The plan as the torch path builds it (best destination, stable descending sort, first r merge)."""
    with kernels.kernel_mode("never"):
        best, idx = best_destinations(a, b, pa, pb, score_mod)
    edge = torch.sort(best, dim=-1, descending=True, stable=True).indices[..., None]
    unm, src = edge[..., r:, :], edge[..., :r, :]
    return (unm.sort(dim=-2).values if sort_unm else unm), src, idx[..., None].gather(-2, src)


@needs_interpreter
@pytest.mark.parametrize("protected, splits", [(0, 1), (1, 3), (3, 2), (1, None)])
def test_match_plan_equals_sort_path(protected, splits):
    torch.manual_seed(9)
    m = torch.randn(2, 69, 16)
    pa, pb = (protected + 1) // 2, protected // 2
    r = 12
    expected = _torch_plan(m[:, ::2], m[:, 1::2], pa, pb, r, protected > 0)
    got = _triton.match_plan(m[:, ::2], m[:, 1::2], pa, pb, r, None, protected > 0, splits=splits)
    for e, g, name in zip(expected, got, ("unm", "src", "dst"), strict=True):
        assert g.dtype == torch.int64 and torch.equal(g, e), name


@needs_interpreter
def test_match_plan_ties_rank_by_position_and_first_destination():
    """Equal best scores rank by row index; equal destinations resolve to the first (torch's rules)."""
    a = torch.zeros(1, 6, 8)
    b = torch.zeros(1, 100, 8)
    a[0, :, 0] = 1.0  # every a row has cosine 1 with b rows 3 and 90 (in different splits), and 0 elsewhere
    b[0, :, 1] = 1.0
    b[0, 3] = torch.tensor([2.0] + [0.0] * 7)
    b[0, 90] = torch.tensor([5.0] + [0.0] * 7)
    a[0, 4, 2] = 1.0  # row 4 scores lower than the others
    unm, src, dst = _triton.match_plan(a, b, 0, 0, 3, None, False, splits=2)
    assert src[0, :, 0].tolist() == [0, 1, 2] and dst[0, :, 0].tolist() == [3, 3, 3]  # hand-derived
    assert unm[0, :, 0].tolist() == [3, 5, 4]  # score order: rows 3, 5 (cosine 1), then row 4
    protected = _triton.match_plan(a, b, 1, 0, 3, None, True, splits=2)
    assert protected[1][0, :, 0].tolist() == [1, 2, 3] and protected[0][0, :, 0].tolist() == [0, 4, 5]


@needs_interpreter
def test_match_plan_with_penalty_and_bad_input():
    torch.manual_seed(10)
    m = torch.randn(2, 41, 16)
    pen = mc.TokenPairPenalty(torch.rand(2, 41), 0.6, "guide")
    expected = _torch_plan(m[:, ::2], m[:, 1::2], 1, 0, 8, True, pen)
    got = _triton.match_plan(m[:, ::2], m[:, 1::2], 1, 0, 8, pen, True, splits=2)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    with pytest.raises(ValueError, match="match_plan needs 0 < r <= Na"):
        _triton.match_plan(m[:, ::2], m[:, 1::2], 1, 0, 0)


@needs_interpreter
@pytest.mark.parametrize(
    "dtype, flags",
    [
        (torch.float32, (False, False)),
        (torch.float32, (True, True)),
        (torch.float16, (True, False)),
        (torch.bfloat16, (True, True)),
    ],
)
def test_merge_wavg_fused_matches_torch(dtype, flags):
    torch.manual_seed(3)
    metric = torch.randn(2, 3, 37, 16)  # leading dims (B, T) are flattened
    x = torch.randn(2, 3, 37, 40).to(dtype)
    size = torch.randint(1, 6, (2, 3, 37, 1)).to(dtype)
    merge, _ = mc.bipartite_soft_matching(metric, 9, *flags)
    for s in (None, size):
        (ref_x, ref_s), (out_x, out_s) = _both(mc.merge_wavg, merge, x, s)
        assert out_x.shape == ref_x.shape == (2, 3, 28, 40) and out_x.dtype == dtype
        assert torch.equal(out_s, ref_s)
        tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(out_x.float(), ref_x.float(), atol=tol * 4, rtol=tol)


@needs_interpreter
def test_merge_wavg_fused_protected_prefix_and_r_cap():
    torch.manual_seed(4)
    metric = torch.randn(2, 20, 8)
    x = torch.randn(2, 20, 24)
    for protected in (3, 4, 5):
        merge, _ = mc.bipartite_soft_matching(metric, 100, protected=protected)  # r clamped
        (ref_x, ref_s), (out_x, out_s) = _both(mc.merge_wavg, merge, x)
        torch.testing.assert_close(out_x, ref_x)
        assert torch.equal(out_s, ref_s)
        assert torch.equal(out_x[:, :protected], x[:, :protected])


@needs_interpreter
def test_merge_wavg_fused_checks_shapes():
    merge, _ = mc.bipartite_soft_matching(torch.randn(2, 10, 8), 2)
    with kernels.kernel_mode("always"), pytest.raises(ValueError, match="x must have shape"):
        mc.merge_wavg(merge, torch.randn(2, 11, 8))


@needs_interpreter
def test_patched_vit_with_kernels_matches_torch_path():
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    ).eval()
    mc.patch.timm(model)
    model.r = 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = _both(model, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- GPU (real compiled kernels)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_best_destinations(dtype):
    torch.manual_seed(0)
    for shape, prot in (((64, 197, 64), (1, 0)), ((4, 1001, 96), (2, 1)), ((2, 300, 600), (0, 0))):
        m = torch.randn(*shape, device="cuda").to(dtype)
        (ref_s, ref_i), (out_s, out_i) = _both(best_destinations, m[:, ::2], m[:, 1::2], *prot)
        torch.testing.assert_close(out_s.float(), ref_s.float(), atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=0)
        agree = (out_i == ref_i).float().mean().item()
        assert agree > (0.995 if dtype == torch.float32 else 0.98), agree
        pen = mc.TokenPairPenalty(torch.rand(shape[0], shape[1], device="cuda"), 0.5)
        (ref_s, _), (out_s, _) = _both(best_destinations, m[:, ::2], m[:, 1::2], *prot, pen)
        torch.testing.assert_close(out_s.float(), ref_s.float(), atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=0)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_merge_wavg(dtype):
    torch.manual_seed(1)
    metric = torch.randn(32, 197, 64, device="cuda", dtype=dtype)
    x = torch.randn(32, 197, 384, device="cuda", dtype=dtype)
    size = torch.randint(1, 8, (32, 197, 1), device="cuda").to(dtype)
    merge, _ = mc.bipartite_soft_matching(metric, 16, class_token=True)
    (ref_x, ref_s), (out_x, out_s) = _both(mc.merge_wavg, merge, x, size)
    assert torch.equal(out_s, ref_s)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out_x.float(), ref_x.float(), atol=tol, rtol=tol)


@gpu
@needs_cuda
def test_gpu_long_sequence_never_allocates_score_matrix():
    b, n, c, r = 8, 16384, 64, 4096
    metric = torch.randn(b, n, c, device="cuda", dtype=torch.float16)
    x = torch.randn(b, n, c, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with kernels.kernel_mode("auto"):
        merge, _ = mc.bipartite_soft_matching(metric, r)
        out, size = mc.merge_wavg(merge, x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    score_bytes = b * (n // 2) * (n // 2) * 2
    assert out.shape == (b, n - r, c) and size.float().sum().item() == b * n  # fp16 sum would overflow
    assert extra < score_bytes / 8, (extra, score_bytes)


@gpu
@needs_cuda
def test_gpu_patched_vit_fast_path_matches_torch_path():
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    model = timm.create_model("vit_small_patch16_224").cuda().half().eval()
    mc.patch.timm(model)
    model.r = 16
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref, out = _both(model, x)
    torch.testing.assert_close(out.float(), ref.float(), atol=5e-2, rtol=5e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1025, 64, 40), (1, 197, 64, 16), (256, 197, 64, 16), (8, 4097, 64, 1024)])
def test_gpu_match_plan_equals_sort_path(shape):
    """Small batches split the destinations; large N (Na > 2048) keeps the fused matcher + torch sort."""
    b, n, c, r = shape
    torch.manual_seed(3)
    m = torch.randn(b, n, c, device="cuda", dtype=torch.float16)
    ref = _torch_plan(m[:, ::2], m[:, 1::2], 1, 0, r, True)
    if (n + 1) // 2 <= _triton.MAX_PLAN_ROWS:
        got = _triton.match_plan(m[:, ::2], m[:, 1::2], 1, 0, r, None, True)
        agree = (got[1] == ref[1]).float().mean().item()  # fp16 last-bit near-ties may reorder a few sources
        assert agree > 0.97, agree
        assert torch.equal(got[0].sort(dim=1).values, got[0]) and got[0].shape == ref[0].shape
    x = torch.randn(b, n, 96, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        (ref_x, ref_s), (out_x, out_s) = _both(lambda: mc.merge_wavg(mc.bipartite_soft_matching(m, r, True)[0], x))
    assert out_x.shape == ref_x.shape and torch.equal(out_s.sum(1), ref_s.sum(1))


@gpu
@needs_cuda
def test_gpu_cuda_graph_helper_matches_eager():
    timm = pytest.importorskip("timm")
    from merge_core.kernels.graph import cuda_graph

    torch.manual_seed(4)
    model = timm.create_model("vit_small_patch16_224").cuda().half().eval()
    mc.patch.timm(model, prop_attn=False)
    model.r = 16
    model.merge_policy = "force"
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        eager = model(x)
    fast = cuda_graph(model, x)
    assert fast.merged
    torch.testing.assert_close(fast(x).float(), eager.float(), atol=2e-2, rtol=2e-2)
    y = torch.randn_like(x)
    with torch.inference_mode():
        torch.testing.assert_close(fast(y).float(), model(y).float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- log(size) channel inside the qkv projection


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_qkv_channel_attention_equals_reference(qkv_bias):
    timm = pytest.importorskip("timm")
    from merge_core.kernels.prop_attn import qkv_channel_attention, qkv_channel_supported

    torch.manual_seed(6)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, qkv_bias=qkv_bias
    )
    attn = model.blocks[0].attn
    assert qkv_channel_supported(attn) and not qkv_channel_supported(attn, dropout_p=0.1)
    x = torch.randn(3, 11, 64, requires_grad=True)
    size = torch.randint(1, 5, (3, 11, 1)).float()
    out, k = qkv_channel_attention(attn, x, size)
    q_ref, k_ref, v_ref = attn.qkv(x).reshape(3, 11, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)
    ref = mc.proportional_attention(q_ref, k_ref, v_ref, size, scale=attn.scale, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref)
    (out.sum() + k.sum()).backward()  # differentiable through the padded weight
    assert attn.qkv.weight.grad is not None and x.grad is not None


def test_patched_vit_channel_backend_matches_reference():
    timm = pytest.importorskip("timm")
    torch.manual_seed(7)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for backend in ("reference", "channel"):
        mc.patch.timm(model, attn_backend=backend)
        model.r = 3
        with torch.no_grad(), kernels.kernel_mode("never"):
            outs[backend] = model(x)
    torch.testing.assert_close(outs["channel"], outs["reference"], atol=1e-5, rtol=1e-5)


def test_qkv_channel_cache_follows_weight_updates():
    timm = pytest.importorskip("timm")
    from merge_core.kernels.prop_attn import qkv_channel_attention

    torch.manual_seed(8)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2)
    attn = model.blocks[0].attn
    x, size = torch.randn(2, 5, 64), torch.randint(1, 4, (2, 5)).float()

    def reference():
        q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)
        return mc.proportional_attention(q, k, v, size, scale=attn.scale, backend="reference")

    with torch.no_grad():
        first, _ = qkv_channel_attention(attn, x, size)
        assert "_merge_core_qkv_pad" in attn.__dict__  # cached in inference
        torch.testing.assert_close(first, reference(), atol=1e-5, rtol=1e-5)
        attn.qkv.weight.mul_(0.5)  # in-place update: the cache must not be served stale
        attn.qkv.bias.add_(0.1)
        second, _ = qkv_channel_attention(attn, x, size)
        torch.testing.assert_close(second, reference(), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(first, second)


def test_training_merge_takes_differentiable_path():
    """The fused merge has no backward: with autograd recording, merge_wavg must use the torch path."""
    metric = torch.randn(2, 20, 8)
    x = torch.randn(2, 20, 16, requires_grad=True)
    merge, _ = mc.bipartite_soft_matching(metric, 5)
    with kernels.kernel_mode("always"):
        assert not kernels.use_fused_merge(x, None)
        with torch.no_grad():
            assert kernels.use_fused_merge(x, None) == kernels.triton_available()
        out, _ = mc.merge_wavg(merge, x)
    out.sum().backward()
    assert x.grad is not None and torch.all(x.grad != 0)
