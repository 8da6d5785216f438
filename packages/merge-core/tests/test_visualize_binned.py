import numpy as np
import pytest
import timm
import torch
from PIL import Image

import merge_core as mc


def test_visualization_writes_png_with_group_colours(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=3).eval()
    mc.patch.timm(model, trace_source="index")
    model.r = 40
    rng = np.random.default_rng(0)
    img = (rng.random((224, 224, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        model(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
    out = mc.make_visualization(img, model._merge_info["source_index"], path=tmp_path / "vis.png")
    assert (tmp_path / "vis.png").exists()
    loaded = np.asarray(Image.open(tmp_path / "vis.png"))
    assert loaded.shape == (224, 224, 3) and np.array_equal(loaded, np.asarray(out))
    # merged groups are flat-coloured: far fewer distinct colours than a random image
    assert len(np.unique(loaded.reshape(-1, 3), axis=0)) <= 197 - 3 * 40 + 1


def test_visualization_dense_and_index_agree():
    index = torch.tensor([[0, 1, 1, 2, 3]])
    dense = mc.source_index_to_dense(index, 4)
    img = np.random.default_rng(1).random((32, 32, 3))
    a = np.asarray(mc.make_visualization(img, index, patch_size=16))
    b = np.asarray(mc.make_visualization(img, dense, patch_size=16))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="source covers 4 patches but the image has 3x3"):
        mc.make_visualization(np.zeros((48, 48, 3)), index, patch_size=16)


@pytest.mark.parametrize("n,stride", [(20, 5), (23, 5), (1024, 10), (12, 3)])
def test_binned_counts_and_destinations(n, stride):
    metric = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(0))
    merge, unmerge = mc.binned_soft_matching(metric, stride, dst_offset="staggered")
    x = torch.randn(2, 3, n, 4)
    merged, size = mc.merge_wavg(merge, x)
    bins = -(-n // stride)
    assert merged.shape == (2, 3, bins, 4)
    assert torch.all(size.sum(-2) == n)
    # destination of bin j for head h sits at min(j*stride + h % stride, n-1); lone destinations keep their value
    for h in range(3):
        pos = torch.clamp(torch.arange(bins) * stride + h % stride, max=n - 1)
        lone = size[0, h, :, 0] == 1
        torch.testing.assert_close(merged[0, h, lone], x[0, h, pos][lone])
    restored = unmerge(merged)
    assert restored.shape == x.shape


def test_binned_sources_pick_most_similar_destination():
    # two clusters; destinations at offsets 0 of bins of 2: tokens 0 (cluster A) and 2 (cluster B)
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.1]]])
    merge, unmerge = mc.binned_soft_matching(metric, 2, dst_offset=0)
    x = torch.tensor([[[1.0], [10.0], [20.0], [3.0]]])
    out = merge(x, mode="mean")
    torch.testing.assert_close(out, torch.tensor([[[2.0], [15.0]]]))
    torch.testing.assert_close(unmerge(out), torch.tensor([[[2.0], [15.0], [15.0], [2.0]]]))


def test_binned_random_offsets_reproducible_and_errors():
    metric = torch.randn(4, 30, 8)
    outs = [mc.binned_soft_matching(metric, 3, "random", torch.Generator().manual_seed(5))[0](metric) for _ in range(2)]
    torch.testing.assert_close(outs[0], outs[1])
    with pytest.raises(ValueError, match="dst_offset must be in"):
        mc.binned_soft_matching(metric, 3, dst_offset=3)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        mc.binned_soft_matching(metric, 0)
