"""The adapter kit itself: state view, pooling, mask merging, undo log, and that the suite can fail."""

from __future__ import annotations

import pytest
import timm
import torch

import merge_core as mc
from merge_core.adapter import MergeState, merge_attn_bias, weighted_mean
from merge_core.testing import conformance as conf


def test_state_reads_like_tome_info():
    state = MergeState(protected=2)
    state.begin(3, (2, 0.0))
    assert state["r"] == [2, 2, 2] and state["protected"] == 2 and state.get("source") is None
    state["custom"] = 5  # projects may stash their own keys
    assert state["custom"] == 5 and "custom" in state and "size" in state
    with pytest.raises(KeyError, match="merge state has no key 'nope'"):
        state["nope"]


def test_weighted_mean_by_hand():
    x = torch.tensor([[[9.0], [1.0], [4.0]]])
    size = torch.tensor([[[1.0], [3.0], [1.0]]])
    # skip the class token: (1*3 + 4*1) / 4 = 1.75
    assert weighted_mean(x, size, start=1).item() == pytest.approx(1.75)
    assert weighted_mean(x, None, start=1).item() == pytest.approx(2.5)


def test_mask_merge_is_most_permissive_member():
    # 4 tokens, token 0 merged into token 1 (metric makes them identical); r = 1, no protection
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    merge, _ = mc.bipartite_soft_matching(metric, 1)
    inf = float("-inf")
    bias = torch.tensor([[0.0, inf, inf, inf], [inf, inf, 0.0, inf], [0.0, 0.0, 0.0, 0.0], [inf, inf, inf, 0.0]])
    merged = merge_attn_bias(merge, bias[None, None])
    # order after merge: [unmerged 2, dst 1 (= {0, 1}), dst 3]
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, inf], [inf, inf, 0.0]])
    assert torch.equal(merged[0, 0], expected)


def _tiny():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _case(**kwargs):
    base = dict(name="t", build=lambda: _tiny().eval(), inputs=lambda: torch.randn(1, 3, 32, 32), num_tokens=17)
    return conf.AdapterCase(**{**base, "patch": mc.patch.timm, **kwargs})


def test_suite_catches_broken_adapters():
    def changes_output(model):
        mc.patch.timm(model)
        model.head.bias.data += 1e-3

    def leaves_attribute(model):
        mc.patch.timm(model)
        model.blocks[0].__dict__["_leftover"] = 1

    with pytest.raises(AssertionError, match="differs from unpatched at r=0"):
        conf.check_r0_exact(_case(patch=changes_output))
    with pytest.raises(AssertionError, match="remove_patch left modules changed"):
        conf.check_remove_patch(_case(patch=leaves_attribute))
    with pytest.raises(AssertionError, match="tokens per layer"):
        conf.check_token_counts(_case(num_tokens=19))
    conf.check_token_counts(_case())  # and the honest adapter passes


def test_remove_patch_deletes_caches_and_restores():
    model = _tiny()
    cls, block_cls, attn_cls = type(model), type(model.blocks[0]), type(model.blocks[0].attn)
    keys = list(model.state_dict())
    mc.patch.timm(model)
    assert list(model.state_dict()) == keys  # checkpoints load into patched models unchanged
    model.blocks[0].attn.__dict__["_merge_core_qkv_pad"] = ("cache",)
    assert model._tome_info is model._merge_info
    mc.patch.remove_patch(model)
    assert type(model) is cls and type(model.blocks[0]) is block_cls and type(model.blocks[0].attn) is attn_cls
    assert "_merge_core_qkv_pad" not in model.blocks[0].attn.__dict__
    assert not hasattr(model, "r") and not hasattr(model.blocks[0], "_merge_info")
    with pytest.raises(ValueError, match="is not patched by merge_core"):
        mc.patch.remove_patch(model)


def test_merge_tokens_per_frame_and_custom_matcher():
    """STOP-style per-frame merging: (B*T, N, C) tokens merge within each frame; a MatchFn gets the documented args."""
    state = MergeState(protected=2)  # class token + one prompt token per frame
    state.begin(2, [3, 0])
    frames = torch.randn(2 * 4, 11, 8, generator=torch.Generator().manual_seed(0))
    out = state.merge_tokens(0, frames, frames)
    out = state.merge_tokens(1, out, None)
    assert out.shape == (8, 8, 8) and state.tokens == [8, 8]
    assert state.size.shape == (8, 8, 1) and torch.all(state.size.sum(1) == 11)
    torch.testing.assert_close(out[:, :2], frames[:, :2])  # protected tokens untouched, first

    seen = {}

    def matcher(*, block, layer, x, attn_input, metric, r, info):
        seen.update(layer=layer, r=r, info=info, block=block)
        return mc.random_pruning(metric, r, protected=info.protected)

    state = MergeState(protected=1, match_fn=matcher)
    assert isinstance(matcher, mc.adapter.MatchFn)
    state.begin(1, 4)
    out = state.merge_tokens(0, frames, frames, block="blk")
    assert out.shape == (8, 7, 8) and seen == dict(layer=0, r=4, info=state, block="blk")
