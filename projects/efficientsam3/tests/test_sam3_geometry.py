import importlib.util
import os
import sys
import types

import pytest
import torch

from efficientsam3.model.sam3_geometry import GeometryEncoder, pack


def test_size_and_keys():
    with torch.device("meta"):
        g = GeometryEncoder()
    # notes 2.1: geometry_encoder 8.22M; by hand 3,479,552 outside the layers + 3 x 1,578,752
    assert sum(p.numel() for p in g.parameters()) == 8_215_808
    keys = set(g.state_dict())
    for k in ("label_embed.weight", "cls_embed.weight", "boxes_pool_project.weight", "boxes_pos_enc_project.weight",
              "points_pool_project.bias", "img_pre_norm.weight", "encode.2.cross_attn_image.in_proj_weight",
              "encode_norm.bias", "final_proj.weight", "norm.weight"):  # fmt: skip
        assert k in keys


def test_pack_by_hand():
    s1 = torch.tensor([[[1.0], [2.0], [0.0]], [[3.0], [0.0], [0.0]]])
    p1 = torch.tensor([[False, False, True], [False, True, True]])
    s2 = torch.tensor([[[7.0], [0.0]], [[8.0], [9.0]]])
    p2 = torch.tensor([[False, True], [False, False]])
    out, pad = pack(s1, p1, s2, p2)
    assert pad.tolist() == [[False, False, False, True, True], [False, False, False, True, True]]
    assert out[0, :3, 0].tolist() == [1, 2, 7] and out[1, :3, 0].tolist() == [3, 8, 9]


def test_padded_prompts_are_ignored():
    torch.manual_seed(0)
    g = GeometryEncoder(16, 32, 2, 2).eval()
    img, pos = torch.randn(1, 16, 6, 6), torch.randn(1, 16, 6, 6)
    pts, boxes = torch.rand(1, 3, 2), torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2]]])
    ppad, bpad = torch.tensor([[False, True, True]]), torch.tensor([[False, True]])
    x, pad = g(pts, ppad, boxes, bpad, img, pos)
    assert x.shape == (6, 1, 16) and pad.tolist() == [[False, False, False, True, True, True]]  # point, box, CLS
    pts2, boxes2 = pts.clone(), boxes.clone()
    pts2[0, 1:] = 0.9
    boxes2[0, 1] = torch.tensor([0.8, 0.8, 0.1, 0.1])
    x2, _ = g(pts2, ppad, boxes2, bpad, img, pos)
    torch.testing.assert_close(x2[:3], x[:3])


@pytest.mark.skipif(not os.environ.get("SAM3_SRC"), reason="set SAM3_SRC to an unpacked sam3 wheel (sam3/model/...)")
def test_equals_pypi_sam3_geometry_encoder(monkeypatch):
    root = os.path.join(os.environ["SAM3_SRC"], "sam3", "model") + os.sep
    pkg = types.ModuleType("_s3geo")
    pkg.__path__ = [root]
    sys.modules["_s3geo"] = pkg
    mods = {}
    for name in ("act_ckpt_utils", "model_misc", "box_ops", "encoder", "position_encoding", "geometry_encoders"):
        spec = importlib.util.spec_from_file_location(f"_s3geo.{name}", root + name + ".py")
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[f"_s3geo.{name}"] = mods[name]
        spec.loader.exec_module(mods[name])
    if not torch.cuda.is_available():  # SAM3 pins a 4-element scale tensor; pinning needs an accelerator
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    e, misc, geo = mods["encoder"], mods["model_misc"], mods["geometry_encoders"]
    d, ffn = 32, 64

    def mha():
        return misc.MultiheadAttentionWrapper(num_heads=4, dropout=0.1, embed_dim=d, batch_first=False)

    layer = e.TransformerEncoderLayer(
        activation="relu", d_model=d, dim_feedforward=ffn, dropout=0.1, pos_enc_at_attn=False, pre_norm=True,
        self_attention=mha(), pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
        cross_attention=mha(),
    )  # fmt: skip
    ref = geo.SequenceGeometryEncoder(
        pos_enc=mods["position_encoding"].PositionEmbeddingSine(num_pos_feats=d, normalize=True),
        encode_boxes_as_points=False, points_direct_project=True, points_pool=True, points_pos_enc=True,
        boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True, d_model=d, num_layers=2, layer=layer,
        use_act_ckpt=True, add_cls=True, add_post_encode_proj=True,
    ).eval()  # fmt: skip
    mine = GeometryEncoder(d, ffn, 4, 2).eval()
    assert sorted(ref.state_dict()) == sorted(mine.state_dict())
    mine.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    b, h, w = 2, 6, 5
    img, pos = torch.randn(b, d, h, w), torch.randn(b, d, h, w)
    pts = torch.rand(b, 3, 2)
    cxcy, wh = torch.rand(b, 2, 2) * 0.5 + 0.25, torch.rand(b, 2, 2) * 0.3 + 0.1
    boxes = torch.cat([cxcy, wh], -1)
    ppad = torch.tensor([[False, False, True], [False, False, False]])
    bpad = torch.tensor([[False, True], [False, False]])
    labels_p = torch.tensor([[1, 0, 1], [1, 1, 0]])
    labels_b = torch.tensor([[0, 1], [1, 1]])
    prompt = geo.Prompt(box_embeddings=boxes.transpose(0, 1), box_mask=bpad, point_embeddings=pts.transpose(0, 1),
                        point_mask=ppad, box_labels=labels_b.T, point_labels=labels_p.T)  # fmt: skip
    seq = img.flatten(2).permute(2, 0, 1)
    seq_pos = pos.flatten(2).permute(2, 0, 1)
    with torch.no_grad():
        want, want_pad = ref(prompt, [seq], [(h, w)], [seq_pos])
        got, got_pad = mine(pts, ppad, boxes, bpad, img, pos, labels_p, labels_b)
    assert torch.equal(got_pad, want_pad)
    valid = ~got_pad.T
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
