import importlib.util
import math
import os
import sys
import types

import pytest
import torch

from efficientsam3.model.sam3_decoder import TransformerDecoder, sine_embed_boxes


def test_size_and_keys():
    with torch.device("meta"):
        dec = TransformerDecoder()
    # notes 2.1: transformer.decoder 11.58M; by hand 6 x 1,842,432 + 520,501
    assert sum(p.numel() for p in dec.parameters()) == 11_575_093
    keys = set(dec.state_dict())
    for k in ("layers.0.ca_text.in_proj_weight", "layers.5.catext_norm.bias", "layers.1.cross_attn.out_proj.weight",
              "query_embed.weight", "reference_points.weight", "boxRPB_embed_x.layers.1.bias",
              "presence_token.weight", "presence_token_head.layers.2.weight", "ref_point_head.layers.1.weight",
              "bbox_embed.layers.2.bias", "norm.weight"):  # fmt: skip
        assert k in keys


def test_sine_embed_by_hand():
    e = sine_embed_boxes(torch.tensor([[0.25, 0.5, 0.125, 1.0]]), 4)[0]
    # half = 2 -> frequencies (1, 1); order y, x, w, h; channels (sin, cos) each
    want = [math.sin(math.pi), math.cos(math.pi), math.sin(math.pi / 2), math.cos(math.pi / 2),
            math.sin(math.pi / 4), math.cos(math.pi / 4), math.sin(2 * math.pi), math.cos(2 * math.pi)]  # fmt: skip
    assert torch.allclose(e, torch.tensor(want), atol=1e-6)


def test_shapes_and_prompt_padding():
    torch.manual_seed(0)
    dec = TransformerDecoder(16, 32, 2, 2, 5).eval()
    mem, pos, prompt = torch.randn(12, 2, 16), torch.randn(12, 2, 16), torch.randn(3, 2, 16)
    pad = torch.tensor([[False, True, True], [False, False, True]])
    out = dec(mem, pos, (3, 4), prompt, pad)
    assert out["hs"].shape == (2, 2, 5, 16) and out["ref_boxes"].shape == (2, 2, 5, 4)
    assert out["presence_logits"].shape == (2, 2) and ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
    prompt2 = prompt.clone()
    prompt2[2] = 50.0
    torch.testing.assert_close(dec(mem, pos, (3, 4), prompt2, pad)["hs"], out["hs"])


@pytest.mark.skipif(not os.environ.get("SAM3_SRC"), reason="set SAM3_SRC to an unpacked sam3 wheel (sam3/model/...)")
def test_equals_pypi_sam3_decoder(monkeypatch):
    root = os.path.join(os.environ["SAM3_SRC"], "sam3", "model") + os.sep
    pkg = types.ModuleType("_s3dec")
    pkg.__path__ = [root]
    monkeypatch.setitem(sys.modules, "_s3dec", pkg)
    # decoder.py imports RoPEAttention from sam3.sam.transformer (unused by TransformerDecoder): a bare module
    for name in ("sam3", "sam3.sam"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    rope = types.ModuleType("sam3.sam.transformer")
    rope.RoPEAttention = None
    monkeypatch.setitem(sys.modules, "sam3.sam.transformer", rope)
    mods = {}
    for name in ("act_ckpt_utils", "model_misc", "box_ops", "decoder"):
        spec = importlib.util.spec_from_file_location(f"_s3dec.{name}", root + name + ".py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"_s3dec.{name}"] = mods[name]
        spec.loader.exec_module(mods[name])
    dm, misc = mods["decoder"], mods["model_misc"]
    d, ffn, heads, nq = 32, 64, 4, 7
    layer = dm.TransformerDecoderLayer(
        activation="relu", d_model=d, dim_feedforward=ffn, dropout=0.1,
        cross_attention=misc.MultiheadAttentionWrapper(num_heads=heads, dropout=0.1, embed_dim=d),
        n_heads=heads, use_text_cross_attention=True,
    )  # fmt: skip
    ref = dm.TransformerDecoder(
        layer=layer, num_layers=3, num_queries=nq, return_intermediate=True, box_refine=True, num_o2m_queries=0,
        dac=True, boxRPB="log", d_model=d, frozen=False, interaction_layer=None, dac_use_selfatt_ln=True,
        use_act_checkpoint=True, presence_token=True,
    ).eval()  # fmt: skip
    mine = TransformerDecoder(d, ffn, heads, 3, nq).eval()
    assert sorted(ref.state_dict()) == sorted(mine.state_dict())
    torch.manual_seed(3)
    sd = {k: v + 0.05 * torch.randn_like(v) for k, v in ref.state_dict().items()}  # bbox_embed starts at zero
    ref.load_state_dict(sd)
    mine.load_state_dict(sd)
    b, h, w = 2, 3, 4
    mem, pos, prompt = torch.randn(h * w, b, d), torch.randn(h * w, b, d), torch.randn(5, b, d)
    pad = torch.tensor([[False, False, True, True, True], [False] * 5])
    tgt = ref.query_embed.weight[:, None].repeat(1, b, 1)
    with torch.no_grad():
        hs, ref_boxes, presence, _ = ref(
            tgt=tgt, memory=mem, pos=pos, reference_boxes=None, level_start_index=torch.tensor([0]),
            spatial_shapes=torch.tensor([[h, w]]), valid_ratios=torch.ones(b, 1, 2), memory_text=prompt,
            text_attention_mask=pad, apply_dac=False,
        )  # fmt: skip
        got = mine(mem, pos, (h, w), prompt, pad)
    torch.testing.assert_close(got["hs"], hs.transpose(1, 2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["ref_boxes"], ref_boxes.transpose(1, 2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["presence_logits"], presence[:, 0], atol=1e-5, rtol=1e-4)


def test_box_bias_by_hand():
    """Row 0 (presence token) zero; row 1 + q at pixel (i, j), head k: MLP_y(log-scaled y distances of i/h to the
    box's top/bottom)[k] + MLP_x(... of j/w to left/right)[k]; SAM3's log scale sign(8t) log2(|8t| + 1) / 3."""
    torch.manual_seed(0)
    dec = TransformerDecoder(16, 32, 2, 1, 3).eval()
    boxes = torch.rand(3, 2, 4) * 0.5 + 0.2  # (Q, B, 4) cxcywh
    h, w = 3, 4
    bias = dec.box_bias(boxes, h, w)
    assert bias.shape == (2 * 2, 4, h * w) and bias.is_contiguous()
    scale = lambda t: torch.sign(8 * t) * torch.log2((8 * t).abs() + 1) / 3  # noqa: E731
    for b in range(2):
        for q in range(3):
            cx, cy, bw, bh = boxes[q, b].tolist()
            for i in range(h):
                for j in range(w):
                    dy = torch.tensor([i / h - (cy - bh / 2), i / h - (cy + bh / 2)])
                    dx = torch.tensor([j / w - (cx - bw / 2), j / w - (cx + bw / 2)])
                    want = dec.boxRPB_embed_y(scale(dy)) + dec.boxRPB_embed_x(scale(dx))  # (heads,)
                    for k in range(2):
                        assert bias[b * 2 + k, 0, i * w + j] == 0
                        torch.testing.assert_close(bias[b * 2 + k, 1 + q, i * w + j], want[k], atol=1e-5, rtol=1e-5)
