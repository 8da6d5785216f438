"""CUDA checks (marker ``gpu``; skipped without a device): spconv-triton / spconv equals the pure-torch
sparse conv, and the merged Sonata-shaped model runs under fp16 autocast with SDPA."""

import pytest
import torch

from gitmerge3d import merging
from gitmerge3d.models import PointTransformerV3, spconv_tune
from gitmerge3d.models import sparse_conv as sc
from gitmerge3d.models.presets import reduced_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_spconv_backend_equals_torch_backend():
    if sc.spconv_api() is None:
        pytest.skip("neither spconv-triton nor spconv is installed")
    g = torch.Generator().manual_seed(0)
    cells = torch.randperm(2 * 32**3, generator=g)[:3000]
    idx = torch.stack([cells // 32**3, (cells // 32**2) % 32, (cells // 32) % 32, cells % 32], 1).int().cuda()
    feats = torch.randn(3000, 32, generator=g).cuda()
    conv = sc.SubMConv3d(32, 48, 3, indice_key="g").cuda()
    sc.set_backend("torch")
    ref = conv(sc.SparseTensor(feats, idx, [32, 32, 32], 2)).features
    sc.set_backend("spconv")
    try:
        got = conv(sc.SparseTensor(feats, idx, [32, 32, 32], 2)).features
    finally:
        sc.set_backend(sc.DEFAULT_BACKEND)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["patch", "weighted_patch"])
def test_merged_model_fp16_autocast(make_points, mode):
    torch.manual_seed(0)
    model = PointTransformerV3(**reduced_config("0c", patch=256)).cuda().eval()
    pts = {k: v.cuda() for k, v in make_points(20000, extent=6.0).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        ref = model(pts)["feat"]
        state = merging.patch(model, {"tome": mode, "r": 0.9})
        out = model(pts)["feat"]
    assert out.shape == ref.shape and torch.isfinite(out).all()
    layers = state.extra["layers"]
    assert layers and all(rec.kept[0] < rec.tokens for rec in layers)


@pytest.mark.parametrize("tune", ["fixed", "narrow"])
def test_spconv_triton_narrowed_autotune_equals_torch_fp16(tune):
    """Sonata-width submanifold convs under fp16 autocast (the benchmark's path) with the narrowed autotune:
    equal to the pure-torch conv within fp16 rounding, and every tuned choice is one the mode allows."""
    api = sc.spconv_api()
    if api is None or "triton" not in api.__name__:
        pytest.skip("spconv-triton is not installed")
    from spconv_triton.pytorch._impl import gemm

    g = torch.Generator().manual_seed(1)
    cells = torch.randperm(48**3, generator=g)[:20000]
    idx = torch.stack([torch.zeros_like(cells), cells // 48**2, (cells // 48) % 48, cells % 48], 1).int().cuda()
    before = spconv_tune.get_tune_mode()
    spconv_tune.set_tune_mode(tune)
    try:
        for width in (48, 192):
            x = sc.SparseTensor(torch.randn(20000, width, generator=g).cuda(), idx, [48, 48, 48], 1)
            conv = sc.SubMConv3d(width, width, 3, indice_key=f"w{width}").cuda()
            sc.set_backend("torch")
            ref = conv(x).features
            sc.set_backend("spconv")
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                got = conv(sc.SparseTensor(x.features, idx, [48, 48, 48], 1)).features
            scale = ref.abs().max().item()
            torch.testing.assert_close(got.float(), ref, atol=2e-3 * scale, rtol=2e-2)
            allowed = spconv_tune.select_configs(
                gemm._gather_gemm_kernel.configs, spconv_tune.RULES[0], {"N_dim": width, "R_dim": width}, tune
            )
            tuned = [c for k, c in gemm._gather_gemm_kernel.cache.items() if k[1:3] == (width, width)]
            assert tuned and all(c in allowed for c in tuned)
    finally:
        sc.set_backend(sc.DEFAULT_BACKEND)
        spconv_tune.set_tune_mode(before)
