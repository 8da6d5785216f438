"""CUDA checks (marker ``gpu``; skipped without a device): spconv-triton / spconv equals the pure-torch
sparse conv, and the merged Sonata-shaped model runs under fp16 autocast with SDPA."""

import pytest
import torch

from gitmerge3d import merging
from gitmerge3d.models import PointTransformerV3
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
        sc.set_backend("auto")
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
    assert state.layers and all(rec.kept[0] < rec.tokens for rec in state.layers)
