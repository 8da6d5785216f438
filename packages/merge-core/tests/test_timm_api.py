"""timm stays timm: every public timm entry point works on a patched model, exact at r=0, right at r>0."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import merge_core as mc

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def _model(name="vit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**TINY, **kwargs}).eval()


def _x(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _exact(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _exact(a[key], b[key])
    else:
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _exact(u, v)


def test_features_and_head_compose():
    model, x = _model(), _x()
    with torch.no_grad():
        ref_feats = model.forward_features(x)
        ref_logits = model.forward_head(ref_feats)
        mc.patch.timm(model)
        assert torch.equal(model.forward_features(x), ref_feats)
        assert torch.equal(model.forward_head(ref_feats), ref_logits)
        model.r = 3
        feats = model.forward_features(x)
        assert feats.shape == (2, 17 - 9, 32)
        assert torch.equal(model.forward_head(feats), model(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(norm=True, return_prefix_tokens=True),
        dict(output_fmt="NLC", indices=[0, 2]),
        dict(output_dict=True),
    ],
)
def test_forward_intermediates_exact_at_r0(kwargs):
    model, x = _model(reg_tokens=2), _x()
    with torch.no_grad():
        expected = model.forward_intermediates(x, **kwargs)
        mc.patch.timm(model)
        _exact(model.forward_intermediates(x, **kwargs), expected)


def test_forward_intermediates_unmerged_to_grid():
    """Merged intermediates come back on the 4x4 patch grid: each patch carries its group's token."""
    model, x = _model(), _x()
    mc.patch.timm(model, trace_source=True)  # dense ToMe source: an independent record of the groups
    model.r = 3
    last = []
    model.blocks[-1].register_forward_hook(lambda m, i, o: last.append(o))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
    assert [t.shape for t in inter] == [(2, 32, 4, 4)] * 3
    assert final.shape == (2, 8, 32)
    source = model._merge_info.source  # (B, N', N0)
    owner = source.argmax(dim=1)[:, 1:]  # token holding each patch
    merged = last[0]
    for b in range(2):
        expected = merged[b, owner[b]]  # (16, C)
        torch.testing.assert_close(inter[-1][b].flatten(1).T, expected)


def test_features_only_model():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(1, 2), **TINY).eval()
    x = _x()
    with torch.no_grad():
        expected = model(x)
        mc.patch.timm(model)
        _exact(model(x), expected)
        model.r = 3
        assert model.model.r == 3
        feats = model(x)
    assert [f.shape for f in feats] == [(2, 32, 4, 4)] * 2
    assert model._merge_info.tokens == [14, 11, 8][: len(model.model.blocks)]
    mc.patch.remove_patch(model)
    assert type(model).__name__ == "FeatureGetterNet" and not hasattr(model.model, "r")


@pytest.mark.parametrize("mask_kind", ["bool", "float", "causal"])
def test_attn_mask_exact_at_r0(mask_kind):
    model, x = _model(), _x()
    n = 17
    g = torch.Generator().manual_seed(3)
    bool_mask = torch.rand(2, 1, n, n, generator=g) > 0.3
    bool_mask |= torch.eye(n, dtype=torch.bool)
    kwargs = {
        "bool": dict(attn_mask=bool_mask),
        "float": dict(attn_mask=torch.randn(2, 1, n, n, generator=g)),
        "causal": dict(is_causal=True),
    }[mask_kind]
    with torch.no_grad():
        expected = model(x, **kwargs)
        mc.patch.timm(model)
        assert torch.equal(model(x, **kwargs), expected)
        model.r = 3
        merged = model(x, **kwargs)
    assert torch.isfinite(merged).all()
    if mask_kind != "causal":  # causal: the class token sees only itself, so the logits cannot change
        assert not torch.allclose(merged, expected)


def test_attn_mask_that_allows_everything_changes_nothing_at_r_gt_0():
    model, x = _model(), _x()
    mc.patch.timm(model)
    model.r = 3
    with torch.no_grad():
        plain = model(x)
        masked = model(x, attn_mask=torch.ones(17, 17, dtype=torch.bool))
        zero_bias = model(x, attn_mask=torch.zeros(2, 2, 17, 17))
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zero_bias, plain, rtol=1e-5, atol=1e-5)


def test_causal_mask_hides_later_tokens_at_r_gt_0():
    """With is_causal, the class token (first, never merged) sees only itself in every layer."""
    model, x = _model(depth=1), _x()
    mc.patch.timm(model)
    model.r = 3
    with torch.no_grad():
        a = model.forward_features(x, is_causal=True)[:, 0]
        x2 = x.clone()
        x2[..., 16:, :] = torch.randn_like(x2[..., 16:, :])  # change only later patches
        b = model.forward_features(x2, is_causal=True)[:, 0]
    torch.testing.assert_close(a, b)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("r", [0, 3])
def test_grad_checkpointing(r):
    model, x = _model(), _x()
    mc.patch.timm(model)
    model.r = r
    expected = _grads(model, x)
    model.set_grad_checkpointing(True)
    got = _grads(model, x)
    assert got.keys() == expected.keys()
    for name in expected:
        if r == 0:  # timm's own blocks, recomputed: bit-identical
            assert torch.equal(got[name], expected[name]), name
        else:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def _duplicated(feats, size, start):
    """Each merged token repeated ``size`` times: what the unmerged model would pool over."""
    return [feats[b, start:].repeat_interleave(size[b, start:, 0].long(), dim=0) for b in range(feats.shape[0])]


def test_map_pool_is_size_weighted():
    model, x = _model(global_pool="map"), _x()
    pool = model.attn_pool
    mc.patch.timm(model)
    model.r = 3
    with torch.no_grad():
        feats = model.forward_features(x)
        size = model._merge_info.size
        got = model.forward_head(feats, pre_logits=True)
        expected = torch.cat([pool(tokens[None]) for tokens in _duplicated(feats, size, 1)])
    torch.testing.assert_close(got, model.fc_norm(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_avg_pools_are_size_weighted(pool):
    model, x = _model(global_pool=pool, class_token=False, fc_norm=True), _x()
    mc.patch.timm(model)
    model.r = 3
    with torch.no_grad():
        feats = model.forward_features(x)
        got = model.forward_head(feats, pre_logits=True)
        dup = _duplicated(feats, model._merge_info.size, 0)
        avg = torch.stack([t.mean(0) for t in dup])
        expected = avg if pool == "avg" else 0.5 * (avg + torch.stack([t.amax(0) for t in dup]))
        pooled = model.pool(feats)  # timm's own pool() entry point is weighted too
    torch.testing.assert_close(got, model.fc_norm(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


def test_fused_attn_false_is_respected_with_prop_attn(monkeypatch):
    model, x = _model(), _x()
    for block in model.blocks:
        block.attn.fused_attn = False
    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    mc.patch.timm(model, prop_attn=True)
    model.r = 3
    with torch.no_grad():
        explicit = model(x)
        assert not calls
        for block in model.blocks:
            block.attn.fused_attn = True
        fused = model(x)
    assert calls
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_replays_the_same_random_matching():
    """A random matcher is not re-drawn when a checkpointed block is recomputed in the backward."""
    model, x = _model(), _x()
    generator = torch.Generator()

    def matcher(*, block, layer, x, attn_input, metric, r, info):
        return mc.random_bipartite_soft_matching(metric, r, generator=generator)

    mc.patch.timm(model, match_fn=matcher)
    model.r = 3
    generator.manual_seed(0)
    expected = _grads(model, x)
    model.set_grad_checkpointing(True)
    generator.manual_seed(0)
    got = _grads(model, x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
