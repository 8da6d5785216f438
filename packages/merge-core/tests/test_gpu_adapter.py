"""CUDA checks of the adapter and attention backends (run on the GPU machine; skipped in CI)."""

import pytest
import timm
import torch

import merge_core as mc

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _requested_r_runs(monkeypatch):
    """These tests check merging itself: the never-slower policy must not swap in r = 0 at small batches."""
    monkeypatch.setenv("MERGE_CORE_POLICY", "force")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patched_vit_on_cuda(dtype):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).cuda().to(dtype).eval()
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        mc.patch.timm(model, prop_attn=False)
        model.r = 0
        torch.testing.assert_close(model(x), expected)
        model.r = 16
        merged = model(x)
    assert merged.shape == expected.shape and torch.isfinite(merged).all()
    assert model._merge_info["size"].shape[1] == mc.tokens_per_layer(197, [16] * 12)[-1]


@pytest.mark.parametrize("backend", ["sdpa", "flex", "channel"])
def test_attention_backends_on_cuda(backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 6, 101, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    size = torch.randint(1, 6, (4, 101, 1), device="cuda", generator=g).half()
    expected = mc.proportional_attention(q.float(), k.float(), v.float(), size.float(), backend="reference")
    out = mc.proportional_attention(q, k, v, size, backend=backend)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_matching_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    metric, x = torch.randn(16, 197, 64, generator=g), torch.randn(16, 197, 32, generator=g)
    merge_cpu, _ = mc.bipartite_soft_matching(metric, 16, class_token=True)
    merge_gpu, _ = mc.bipartite_soft_matching(metric.cuda(), 16, class_token=True)
    cpu, size_cpu = mc.merge_wavg(merge_cpu, x)
    gpu, size_gpu = mc.merge_wavg(merge_gpu, x.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(size_gpu.cpu(), size_cpu)


def _cuda_cases():
    import torchvision
    import transformers

    from merge_core.testing.conformance import AdapterCase

    def seeded(fn):
        def build():
            torch.manual_seed(0)
            return fn().cuda().eval()

        return build

    images = lambda: torch.randn(4, 3, 224, 224, device="cuda")  # noqa: E731
    hf = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536)
    return [
        AdapterCase(
            name="timm_vit_s",
            build=seeded(lambda: timm.create_model("vit_small_patch16_224", depth=4)),
            inputs=images,
            patch=mc.patch.timm,
            num_tokens=197,
            r=16,
            compile_backend="inductor",
            atol=1e-3,
        ),
        AdapterCase(
            name="torchvision_vit",
            build=seeded(lambda: torchvision.models.VisionTransformer(224, 16, 4, 6, 384, 1536)),
            inputs=images,
            patch=mc.patch.swag,
            num_tokens=197,
            r=16,
            compile_backend="inductor",
            atol=1e-3,
        ),
        AdapterCase(
            name="hf_vit",
            build=seeded(lambda: transformers.ViTModel(transformers.ViTConfig(**hf))),
            inputs=lambda: {"pixel_values": images()},
            patch=mc.patch.hf,
            num_tokens=197,
            r=16,
            compile_backend="inductor",
            atol=1e-3,
        ),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_conformance_on_cuda(index):
    """The conformance checks on CUDA (kernel dispatch, qkv-channel prop-attn) with Inductor compilation."""
    from merge_core.testing import conformance as conf

    case = _cuda_cases()[index]
    conf.check_r0_exact(case)
    conf.check_token_counts(case)
    conf.check_remove_patch(case)
    conf.check_backward(case)
    for dtype in (torch.float16, torch.bfloat16):
        conf.check_dtype(case, dtype)
    conf.check_compile(case)


def test_timm_api_on_cuda():
    """Masks, intermediates and checkpointing with merging on CUDA (the bias and source map live on the GPU)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", depth=4).cuda().eval()
    mc.patch.timm(model)
    model.r = 16
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model(x, is_causal=True)).all()
        assert torch.isfinite(model(x, attn_mask=torch.ones(197, 197, dtype=torch.bool, device="cuda"))).all()
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape for f in feats] == [(2, 384, 14, 14)] * 4
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
