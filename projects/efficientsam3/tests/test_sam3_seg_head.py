import importlib.util
import os
import sys
import types

import pytest
import torch

from efficientsam3.model.sam3_seg_head import SegmentationHead


def test_size_and_keys():
    with torch.device("meta"):
        head = SegmentationHead()
    # notes 2.1: segmentation_head 2.30M; by hand 3 x (590,080 + 512) + 263,168 + 512 + 257 + 65,792 + 3 x 65,792
    assert sum(p.numel() for p in head.parameters()) == 2_298_881
    keys = set(head.state_dict())
    for k in ("pixel_decoder.conv_layers.2.weight", "pixel_decoder.norms.0.bias", "cross_attend_prompt.in_proj_weight",
              "cross_attend_prompt.out_proj.weight", "cross_attn_norm.weight", "semantic_seg_head.bias",
              "instance_seg_head.weight", "mask_predictor.mask_embed.layers.2.bias"):  # fmt: skip
        assert k in keys


def test_shapes_and_prompt_padding_is_ignored():
    """Masks at the finest level, one per query; a padded prompt token has no effect."""
    torch.manual_seed(0)
    head = SegmentationHead(dim=8, stages=2, heads=2).eval()
    feats = [torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)]
    memory, prompt = torch.randn(4, 1, 8), torch.randn(3, 1, 8)
    queries = torch.randn(1, 5, 8)
    out = head(feats, queries, memory, prompt, torch.tensor([[False, False, True]]))
    assert out["pred_masks"].shape == (1, 5, 8, 8) and out["semantic_seg"].shape == (1, 1, 8, 8)
    # a padded prompt token must not change anything
    prompt2 = prompt.clone()
    prompt2[2] += 100
    out2 = head(feats, queries, memory, prompt2, torch.tensor([[False, False, True]]))
    torch.testing.assert_close(out["pred_masks"], out2["pred_masks"])


@pytest.mark.skipif(not os.environ.get("SAM3_SRC"), reason="set SAM3_SRC to an unpacked sam3 wheel (sam3/model/...)")
def test_equals_pypi_sam3_seg_head():
    root = os.path.join(os.environ["SAM3_SRC"], "sam3", "model") + os.sep
    pkg = types.ModuleType("_s3sh")
    pkg.__path__ = [root]
    sys.modules["_s3sh"] = pkg
    mods = {}
    for name in ("model_misc", "maskformer_segmentation"):
        spec = importlib.util.spec_from_file_location(f"_s3sh.{name}", root + name + ".py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"_s3sh.{name}"] = mods[name]
        spec.loader.exec_module(mods[name])
    ms, misc = mods["maskformer_segmentation"], mods["model_misc"]
    ref = ms.UniversalSegmentationHead(
        hidden_dim=16, upsampling_stages=3, aux_masks=False, presence_head=False, dot_product_scorer=None,
        act_ckpt=False, cross_attend_prompt=misc.MultiheadAttentionWrapper(num_heads=8, dropout=0, embed_dim=16),
        pixel_decoder=ms.PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=16),
    ).eval()  # fmt: skip
    mine = SegmentationHead(16, 3, 8).eval()
    assert sorted(ref.state_dict()) == sorted(mine.state_dict())
    mine.load_state_dict(ref.state_dict())
    b = 2
    feats = [torch.randn(b, 16, s, s) for s in (16, 8, 4, 2)]
    memory, prompt = torch.randn(4, b, 16), torch.randn(3, b, 16)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    hs = torch.randn(6, b, 5, 16)
    with torch.no_grad():
        want = ref(feats, hs, torch.arange(b), encoder_hidden_states=memory, prompt=prompt, prompt_mask=pad)
        got = mine(feats, hs[-1], memory, prompt, pad)
    torch.testing.assert_close(got["pred_masks"], want["pred_masks"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["semantic_seg"], want["semantic_seg"], atol=1e-5, rtol=1e-5)


def test_folded_instance_head_equals_conv_then_dot():
    """Masks = <mask_embed(q), instance_seg_head(pixels)> (SAM3's order: a 1x1 conv over the whole map, then the
    dot product) equal the folded form, for all queries and for one query per image."""
    torch.manual_seed(0)
    head = SegmentationHead(dim=8, stages=2, heads=2).eval()
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    memory, prompt, queries = torch.randn(4, 2, 8), torch.randn(3, 2, 8), torch.randn(2, 5, 8)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    out = head(feats, queries, memory, prompt, pad)
    mem = memory + head.cross_attend_prompt(head.cross_attn_norm(memory), prompt, prompt, key_padding_mask=pad)[0]
    pixels = head.pixel_decoder([*feats[:-1], mem.permute(1, 2, 0).reshape(2, 8, 2, 2)])
    inst = torch.nn.functional.conv2d(pixels, head.instance_seg_head.weight, head.instance_seg_head.bias)
    emb = head.mask_predictor.mask_embed(queries)
    want = (emb[:, :, :, None, None] * inst[:, None]).sum(2)  # (B, Q, H, W)
    torch.testing.assert_close(out["pred_masks"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["semantic_seg"], head.semantic_seg_head(pixels))
    one = head(feats, queries, memory, prompt, pad, torch.tensor([3, 1]), semantic=False)
    assert set(one) == {"pred_masks"}
    torch.testing.assert_close(one["pred_masks"][:, 0], want[[0, 1], [3, 1]], atol=1e-5, rtol=1e-5)
