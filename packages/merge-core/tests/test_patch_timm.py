import pytest
import timm
import torch
import torch.nn.functional as F
from reference_tome import reference_groups  # noqa: I001

import merge_core as mc

MODELS = {
    "vit_small": dict(model_name="vit_small_patch16_224"),
    "deit_distilled": dict(model_name="deit_tiny_distilled_patch16_224"),
    "registers": dict(model_name="vit_small_patch16_224", reg_tokens=4),
    "layerscale_qknorm": dict(model_name="vit_small_patch16_224", init_values=0.5, qk_norm=True),
    "avg_pool": dict(model_name="vit_small_patch16_224", global_pool="avg", class_token=False, fc_norm=True),
}


def _model(name: str, depth: int = 4):
    torch.manual_seed(0)
    return timm.create_model(pretrained=False, depth=depth, img_size=112, **MODELS[name]).eval()


def _images(batch=2, seed=1):
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("prop_attn", [True, False])
def test_r0_equals_unpatched(name, prop_attn):
    model, x = _model(name), _images()
    with torch.no_grad():
        expected = model(x)
        mc.patch.timm(model, prop_attn=prop_attn)
        model.r = 0
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_merging_keeps_prefix_and_sizes(name):
    model, x = _model(name), _images()
    mc.patch.timm(model, trace_source=True)
    model.r = 5
    with torch.no_grad():
        out = model(x)
    info = model._merge_info
    prefix = model.num_prefix_tokens
    assert torch.isfinite(out).all()
    n = model.patch_embed.num_patches + prefix
    assert info["size"].shape == (2, n - 4 * 5, 1)
    assert torch.all(info["size"][:, :prefix] == 1)
    assert torch.all(info["size"].sum(1) == n)
    torch.testing.assert_close(info["source"].sum(-1, keepdim=True), info["size"])


def _oracle_forward(model, x, r):
    """ToMe on timm's modules, merging by the loop-based oracle (no merge-core op involved)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = torch.ones(x.shape[0], x.shape[1], 1)
    for blk in model.blocks:
        attn = blk.attn
        y = blk.norm1(x)
        b, n, c = y.shape
        q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + blk.ls1(attn.proj(attn.norm(y)))
        groups = reference_groups(k.mean(1), r, model.num_prefix_tokens)
        x = torch.stack(
            [torch.stack([(x[i, g] * size[i, g]).sum(0) / size[i, g].sum() for g in gs]) for i, gs in enumerate(groups)]
        )
        size = torch.stack([torch.stack([size[i, g].sum(0) for g in gs]) for i, gs in enumerate(groups)])
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x)), size


@pytest.mark.parametrize("name", ["layerscale_qknorm", "registers"])
def test_merged_forward_equals_oracle_tome(name):
    model, x = _model(name), _images()
    with torch.no_grad():
        expected, expected_size = _oracle_forward(model, x, 12)
        mc.patch.timm(model, prop_attn=True, attn_backend="reference")
        model.r = 12
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model._merge_info.size, expected_size)


def test_avg_pool_is_size_weighted():
    model, x = _model("avg_pool"), _images()
    mc.patch.timm(model)
    model.r = 20
    with torch.no_grad():
        feats = model.forward_features(x)
        size = model._merge_info["size"]
        pooled = (feats * size).sum(1) / size.sum(1)
        expected = model.head(model.fc_norm(pooled))
        torch.testing.assert_close(model.forward_head(feats), expected)
        assert not torch.allclose(expected, model.head(model.fc_norm(feats.mean(1))))


def test_source_index_matches_dense_source():
    model, x = _model("vit_small"), _images()
    mc.patch.timm(model, trace_source=True)
    model.r = [8, 16, 4]
    with torch.no_grad():
        model(x)
    dense = model._merge_info["source"]
    mc.patch.timm(model, trace_source="index")
    model.r = [8, 16, 4]
    with torch.no_grad():
        model(x)
    index = model._merge_info["source_index"]
    torch.testing.assert_close(mc.source_index_to_dense(index, dense.shape[1]), dense)


def test_prop_attn_off_keeps_sdpa(monkeypatch):
    model, x = _model("vit_small"), _images()
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    mc.patch.timm(model, prop_attn=False)
    model.r = 8
    with torch.no_grad():
        model(x)
    assert len(calls) == 4 and all(mask is None for mask in calls)


def test_remove_patch_restores_model():
    model, x = _model("deit_distilled"), _images()
    cls = type(model)
    with torch.no_grad():
        expected = model(x)
    mc.patch.timm(model)
    model.r = 8
    mc.patch.remove_patch(model)
    assert type(model) is cls and not hasattr(model, "r")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_bad_inputs():
    with pytest.raises(TypeError, match="model must be a timm VisionTransformer"):
        mc.patch.timm(torch.nn.Linear(2, 2))
    model = _model("vit_small")
    mc.patch.timm(model)
    model.r = [1] * 5
    with pytest.raises(ValueError, match="r schedule has 5 entries but the model has 4 layers"):
        model(_images(batch=1))
    model.r = -1
    with pytest.raises(ValueError, match="r must be >= 0"):
        model(_images(batch=1))
    with pytest.raises(ValueError, match="trace_source must be"):
        mc.patch.timm(model, trace_source="dense")
