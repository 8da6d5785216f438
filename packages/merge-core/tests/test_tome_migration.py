"""``import merge_core as tome``: ToMe's module layout and call forms work, and bad input gets one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import merge_core as tome


def _vit(**kwargs):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**cfg, **kwargs}).eval()


@pytest.mark.parametrize("r", [8, np.int64(8), 8.0, np.float32(8.0), torch.tensor(8), [8, 8, 8], (8, 0.0)])
def test_parse_r_accepts_what_tome_accepts(r):
    assert tome.utils.parse_r(3, r) == [8, 8, 8]
    assert tome.utils.parse_r(3, (np.int64(8), np.float64(-0.5))) == [12, 8, 4]
    assert tome.utils.parse_r(3, [np.int64(2), torch.tensor(1)]) == [2, 1, 0]


@pytest.mark.parametrize(
    "r,error,message",
    [
        ((8, "a"), TypeError, r"r's inflect \(second item of \(r, inflect\)\) must be a number, got 'a'"),
        (2.5, TypeError, "r must be a non-negative int"),
        (torch.tensor([8]), TypeError, "r must be a non-negative int"),
        ("8", TypeError, "r must be a non-negative int"),
        (True, TypeError, "r must be a non-negative int"),
    ],
)
def test_parse_r_rejects_with_the_argument_named(r, error, message):
    with pytest.raises(error, match=message):
        tome.utils.parse_r(3, r)


def test_tome_layout():
    assert callable(tome.patch.timm) and callable(tome.patch.mae) and callable(tome.patch.swag)
    for name in ("bipartite_soft_matching", "kth_bipartite_soft_matching", "random_bipartite_soft_matching"):
        assert callable(getattr(tome.merge, name))
    for name in ("merge_wavg", "merge_source", "do_nothing"):
        assert callable(getattr(tome.merge, name))
    assert callable(tome.vis.make_visualization) and callable(tome.utils.benchmark)


def test_tome_visualization_flow_reads_tome_info():
    """ToMe's notebook: patch with trace_source=True, run, draw model._tome_info["source"]."""
    model = _vit()
    tome.patch.timm(model, trace_source=True)
    model.r = 4
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        model(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
    source = model._tome_info["source"]
    assert source.shape == (1, 17 - 12, 17)
    assert torch.equal(source.sum(-1, keepdim=True), model._tome_info["size"])
    vis = tome.vis.make_visualization(img, source, patch_size=8, class_token=True)
    assert len(np.unique(np.asarray(vis).reshape(-1, 3), axis=0)) <= 5  # 4 patch groups + border white


def test_mae_patch_defaults_and_pooling():
    model = _vit(global_pool="avg", fc_norm=True)
    tome.patch.mae(model)
    assert model._tome_info["prop_attn"] is False
    model.r = 4
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
        size = model._tome_info["size"]
        # ToMe's MAE pooling: sum over patch tokens of x * size, divided by the number of patches
        expected = model.head(model.fc_norm((feats * size)[:, 1:].sum(1) / 16))
        torch.testing.assert_close(model.forward_head(feats), expected)


def test_benchmark_returns_throughput_on_cpu():
    model = _vit()
    tome.patch.timm(model)
    model.r = 4
    ips = tome.utils.benchmark(model, device="cpu", input_size=(3, 32, 32), batch_size=2, runs=4, throw_out=0.5)
    assert ips > 0
    with pytest.raises(ValueError, match=r"throw_out must be in \[0, 1\)"):
        tome.utils.benchmark(model, device="cpu", throw_out=1.0)


def test_bad_inputs_get_one_line_errors():
    metric, x = torch.randn(2, 11, 4), torch.randn(2, 11, 3)
    merge, unmerge = tome.merge.bipartite_soft_matching(metric, 3)
    with pytest.raises(
        ValueError, match=r"x must have shape \(2, 8\) \+ \(C,\) \(the merged tokens\), got \(2, 11, 3\)"
    ):
        unmerge(x)
    merge_k, unmerge_k = tome.merge.kth_bipartite_soft_matching(metric, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(2, 3\)"):
        unmerge_k(x)
    merge_rand, unmerge_rand = tome.merge.random_bipartite_soft_matching(metric, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(2, 8\)"):
        unmerge_rand(x[:, :5])
    with pytest.raises(ValueError, match="size must have x's dtype torch.bfloat16, got torch.float32"):
        tome.merge.merge_wavg(merge, x.bfloat16(), torch.ones(2, 11, 1))
    with pytest.raises(ValueError, match=r"size must have shape \(2, 11, 1\)"):
        tome.merge.merge_wavg(merge, x, torch.ones(2, 11))
    model = _vit()
    with pytest.raises(ValueError, match="trace_source must be True, False or 'index', got 1"):
        tome.patch.timm(model, trace_source=1)
    with pytest.raises(TypeError, match="prop_attn must be True or False, got str 'yes'"):
        tome.patch.timm(model, prop_attn="yes")
    with pytest.raises(TypeError, match="match_fn must be callable"):
        tome.patch.timm(model, match_fn=3)
    tome.patch.timm(model)
    model.r = (8, "a")
    with pytest.raises(TypeError, match="r's inflect"):
        model(torch.randn(1, 3, 32, 32))
