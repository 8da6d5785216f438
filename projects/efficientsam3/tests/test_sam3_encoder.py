import importlib.util
import os
import sys
import types

import pytest
import torch

from efficientsam3.model.sam3_encoder import TransformerEncoder


def test_size_and_keys():
    with torch.device("meta"):
        enc = TransformerEncoder()
    # notes 2.1: transformer.encoder 9.47M; by hand 6 x (2 x 263,168 + 526,336 + 524,544 + 3 x 512)
    assert sum(p.numel() for p in enc.parameters()) == 9_472_512
    keys = set(enc.state_dict())
    assert len(keys) == 6 * 18
    for k in ("layers.0.self_attn.in_proj_weight", "layers.5.cross_attn_image.out_proj.bias", "layers.3.linear1.weight",
              "layers.2.norm3.bias"):  # fmt: skip
        assert k in keys


def test_padded_prompt_tokens_are_ignored():
    torch.manual_seed(0)
    enc = TransformerEncoder(16, 32, 2, 2).eval()
    src, pos, prompt = torch.randn(2, 16, 3, 3), torch.randn(2, 16, 3, 3), torch.randn(4, 2, 16)
    pad = torch.tensor([[False, False, True, True], [False, False, False, True]])
    mem, p = enc(src, pos, prompt, pad)
    assert mem.shape == (9, 2, 16) and torch.equal(p[:, 0], pos[0].flatten(1).T)
    prompt2 = prompt.clone()
    prompt2[3] = 1e3
    torch.testing.assert_close(enc(src, pos, prompt2, pad)[0], mem)


@pytest.mark.skipif(not os.environ.get("SAM3_SRC"), reason="set SAM3_SRC to an unpacked sam3 wheel (sam3/model/...)")
def test_equals_pypi_sam3_encoder():
    root = os.path.join(os.environ["SAM3_SRC"], "sam3", "model") + os.sep
    pkg = types.ModuleType("_s3enc")
    pkg.__path__ = [root]
    sys.modules["_s3enc"] = pkg
    mods = {}
    for name in ("act_ckpt_utils", "model_misc", "encoder"):
        spec = importlib.util.spec_from_file_location(f"_s3enc.{name}", root + name + ".py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"_s3enc.{name}"] = mods[name]
        spec.loader.exec_module(mods[name])
    e, misc = mods["encoder"], mods["model_misc"]
    d, ffn = 32, 64

    def mha():
        return misc.MultiheadAttentionWrapper(num_heads=4, dropout=0.1, embed_dim=d, batch_first=True)

    layer = e.TransformerEncoderLayer(
        activation="relu", d_model=d, dim_feedforward=ffn, dropout=0.1, pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
        self_attention=mha(), cross_attention=mha(),
    )  # fmt: skip
    ref = e.TransformerEncoderFusion(
        layer=layer, num_layers=3, d_model=d, num_feature_levels=1, frozen=False, use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False, pool_text_with_mask=True,
    ).eval()  # fmt: skip
    mine = TransformerEncoder(d, ffn, 4, 3).eval()
    assert sorted(ref.state_dict()) == sorted(mine.state_dict())
    mine.load_state_dict(ref.state_dict())
    b, h, w = 2, 3, 4
    src, pos, prompt = torch.randn(b, d, h, w), torch.randn(b, d, h, w), torch.randn(5, b, d)
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    seq = [src.flatten(2).permute(2, 0, 1)]
    seq_pos = [pos.flatten(2).permute(2, 0, 1)]
    with torch.no_grad():
        want = ref(seq, prompt, src_pos=seq_pos, prompt_key_padding_mask=pad, feat_sizes=[(h, w)])
        mem, p = mine(src, pos, prompt, pad)
    torch.testing.assert_close(mem, want["memory"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p, want["pos_embed"], atol=1e-6, rtol=1e-6)
