"""Per-frame merging on STOP / DGL / CLIP4Clip and the cross-frame mode."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from stop_tome.clip_model import ResidualAttentionBlock
from stop_tome.merging import (
    apply_tome_patch,
    expected_tokens,
    merge_state,
    remove_tome_patch,
    save_merge_visualization,
)
from stop_tome.model import CLIP4Clip, task_config

T = 4  # frames
PATCHES = 16  # tiny model: 64 px / 16 px patches, 3 layers -> r <= 5


def _model(clip_sd, mode: str, **kw) -> CLIP4Clip:
    return CLIP4Clip.from_pretrained(clip_sd, task_config(temporal_prompt=mode, max_frames=T, **kw)).eval()


@pytest.fixture(scope="module")
def video():
    torch.manual_seed(1)
    return torch.randn(2, T, 3, 64, 64)


@pytest.mark.parametrize("mode", ["group2-2", "DGL", "none"])
def test_r0_identical_and_remove_restores(clip_sd, video, mode):
    model = _model(clip_sd, mode)
    with torch.no_grad():
        ref = model.get_video_features(video)
        apply_tome_patch(model, r=0, trace_source=True)
        assert type(model.clip.visual.transformer.resblocks[0]).__name__ == "MergeResidualAttentionBlock"
        assert torch.equal(model.get_video_features(video), ref)
        apply_tome_patch(model, r=2)
        assert not torch.equal(model.get_video_features(video), ref)
        remove_tome_patch(model)
        assert type(model.clip.visual.transformer.resblocks[0]) is ResidualAttentionBlock
        assert not hasattr(model.clip.visual, "_merge_info") and not hasattr(model, "r")
        assert torch.equal(model.get_video_features(video), ref)


@pytest.mark.parametrize(
    "mode,prefix,r",
    [("group2-2", 5, 2), ("group2-2", 5, 5), ("DGL", 5, 1), ("DGL", 5, 3), ("DGL", 5, 4), ("none", 1, 2)]
    + [("none", 1, 5)],
)
def test_tokens_per_frame_per_layer(clip_sd, video, mode, prefix, r):
    """Every frame loses r tokens per layer (fewer only where half of the remaining patches is less than r);
    the CLS + local prompts stay first in every frame and the global prompts stay in front."""
    model = _model(clip_sd, mode, tome_r=r, tome_trace_source=True)
    with torch.no_grad():
        tokens, groups = model.visual_tokens(video)
    st = merge_state(model)
    n0 = prefix + PATCHES
    hand = []
    n = n0
    for _ in range(3):  # hand count: min(r, half of the unprotected tokens)
        n -= min(r, (n - prefix) // 2)
        hand.append(n)
    assert st.tokens == hand == expected_tokens(n0, prefix, [r] * 3)
    if r <= 2:
        assert hand == [n0 - r, n0 - 2 * r, n0 - 3 * r]
    g = 4 if mode != "none" else 0
    assert groups == T and tokens.shape[1] == g + T * hand[-1]
    src = st.source_index.view(2, T, n0)
    assert torch.equal(src[..., :prefix], torch.arange(prefix).expand(2, T, prefix))  # protected kept in place
    assert (src[..., prefix:] >= prefix).all()  # patches never merge into the prefix
    size = st.size.view(2, T, -1)
    assert torch.allclose(size[..., :prefix], torch.ones(2, T, prefix))
    assert torch.allclose(size.sum(2), torch.full((2, T), float(n0)))  # sizes account for every token


def test_r_limit_error(clip_sd):
    with pytest.raises(ValueError, match=r"exceeds the 16 patches per frame.*use tome_r <= 5"):
        _model(clip_sd, "group2-2", tome_r=6)
    with pytest.raises(ValueError, match="tome_r <= 5"):
        apply_tome_patch(_model(clip_sd, "none"), r=6)


def _dup_attention(q, k, v, sizes):
    """Softmax attention where key j appears sizes[j] times (the definition proportional attention must match)."""
    idx = torch.repeat_interleave(torch.arange(k.shape[0]), sizes)
    w = (q @ k[idx].t() / q.shape[-1] ** 0.5).softmax(-1)
    return w @ v[idx]


def test_prop_attn_bias_equals_duplicated_keys():
    torch.manual_seed(0)
    blk = ResidualAttentionBlock(8, 1)
    g, groups, per = 2, 2, 3
    q, k, v = (torch.randn(1, g + groups * per, 1, 8) for _ in range(3))
    size = torch.tensor([[1, 1, 2, 1, 3, 4, 1, 2]])  # globals (size 1) then two frames of three tokens
    out = blk.visual_attention(q, k, v, g, groups, key_bias=size.float().log())
    q2, k2, v2, s = q[0, :, 0], k[0, :, 0], v[0, :, 0], size[0]
    ref_g = _dup_attention(q2[:g], k2, v2, s)  # globals see every token
    refs = [ref_g]
    for f in range(groups):
        keys = list(range(g)) + list(range(g + f * per, g + (f + 1) * per))
        refs.append(_dup_attention(q2[g + f * per : g + (f + 1) * per], k2[keys], v2[keys], s[keys]))
    torch.testing.assert_close(out[0], torch.cat(refs), atol=1e-5, rtol=1e-5)


def test_prop_attn_switch_changes_output(clip_sd, video):
    a, b = _model(clip_sd, "DGL", tome_r=2), _model(clip_sd, "DGL", tome_r=2, tome_prop_attn=False)
    with torch.no_grad():
        assert not torch.allclose(a.get_video_features(video), b.get_video_features(video))


def test_cross_frame_mode(clip_sd, video, tmp_path):
    model = _model(clip_sd, "none", tome_r=1, tome_trace_source=True, tome_cross_layers="1", tome_cross_frames="2")
    with torch.no_grad():
        feats = model.get_video_features(video)
        tokens, groups = model.visual_tokens(video)
    st = merge_state(model)
    # layer 0: 17 -> 16 per frame; layer 1 joins 2 frames (32 tokens, 2 CLS) and merges int(0.3 * 30) = 9 -> 23;
    # layer 2 merges r=1 -> 22 per clip
    assert st.tokens == [16, 23, 22] and groups == 2 and tokens.shape[1] == 2 * 22
    assert torch.isfinite(feats).all() and feats.shape == (2, 32)
    src = st.source_index.view(2, 2, 34)
    assert torch.equal(src[..., :2], torch.arange(2).expand(2, 2, 2))
    assert len(torch.unique(src[0, 0, 2:])) == 22 - 2
    cls = model.frame_cls(tokens, groups)
    assert cls.shape == (2, T, 32)
    img = save_merge_visualization(model, video, tmp_path / "cross.png")
    assert img.size == (2 * 64, 2 * 64)  # two clips side by side, each two frames stacked
    with pytest.raises(ValueError, match="needs --temporal_prompt none"):
        _model(clip_sd, "DGL", tome_r=1, tome_cross_layers="1", tome_cross_frames="2")


def test_trace_source_picture(clip_sd, video, tmp_path):
    model = _model(clip_sd, "group2-2", tome_r=3, tome_trace_source=True)
    with torch.no_grad():
        model.get_video_features(video)
    save_merge_visualization(model, video, tmp_path / "v.png", index=1)
    img = Image.open(tmp_path / "v.png")
    assert img.size == (T * 64, 64)
    st = merge_state(model)
    assert len(torch.unique(st.source_index.view(2, T, -1)[1, 0, 5:])) == PATCHES - 3 * 3  # 7 groups, 16 patches


def test_backward_and_low_precision(clip_sd, video):
    model = _model(clip_sd, "group2-2", tome_r=2).train()
    ids = torch.randint(1, 400, (2, 8))
    ids[:, -1] = 49407
    model(ids, video)["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model = _model(clip_sd, "DGL", tome_r=2).to(torch.bfloat16)
    with torch.no_grad():
        out = model.get_video_features(video.to(torch.bfloat16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("cross", [False, True])
def test_dense_and_index_source_maps_agree(clip_sd, video, cross):
    """ToMe's dense source (trace_source=True) and the integer map describe the same groups, joins included."""
    kw = {"cross_layers": [1], "cross_frames": [2]} if cross else {}
    maps = []
    for trace in (True, "index"):
        model = _model(clip_sd, "none")
        apply_tome_patch(model, r=2, trace_source=trace, **kw)
        with torch.no_grad():
            model.get_video_features(video)
        st = merge_state(model)
        maps.append(st.source.argmax(dim=-2) if trace is True else st.source_index)
        if trace is True:
            assert torch.equal(st.source.sum(-2), torch.ones_like(st.source.sum(-2)))  # one row per original token
    assert torch.equal(maps[0], maps[1])
