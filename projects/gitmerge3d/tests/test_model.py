"""PT-v3m2 structure, checkpoint formats and strict loading, linear-probe up-casting."""

import pytest
import torch

from gitmerge3d.models import (
    DefaultSegmentorV2,
    PointTransformerV3,
    build_from_sonata,
    load_backbone,
    load_segmentor,
    sonata_config,
)
from gitmerge3d.models.presets import reduced_config as tiny_config
from run_kit import CheckpointError


def test_sonata_key_layout_and_size():
    # meta device: the real 108M-parameter encoder without allocating it
    with torch.device("meta"):
        enc = PointTransformerV3(**sonata_config("pretrain"))
        full = PointTransformerV3(**sonata_config("0c"))
    sd = enc.state_dict()
    assert len(sd) == 453 and round(sum(p.numel() for p in enc.parameters()) / 1e6, 2) == 108.46
    assert sd["enc.enc0.block0.cpe.0.weight"].shape == (48, 3, 3, 3, 48)
    assert sd["enc.enc3.block11.attn.qkv.weight"].shape == (3 * 384, 384)
    assert sd["embedding.mask_token"].shape == (1, 48)
    for key in ("embedding.stem.linear.weight", "embedding.stem.norm.bias", "enc.enc1.down.norm.0.weight"):
        assert key in sd
    fsd = full.state_dict()
    assert round(sum(p.numel() for p in full.parameters()) / 1e6, 2) == 124.79
    for key in ("dec.dec3.up.proj.0.weight", "dec.dec3.up.proj_skip.1.bias", "dec.dec0.block1.mlp.0.fc2.weight"):
        assert key in fsd
    assert fsd["dec.dec3.up.proj.0.weight"].shape == (384, 512)


def test_bad_config_values():
    with pytest.raises(ValueError, match="order entries must be in"):
        PointTransformerV3(**tiny_config(order=("z", "peano")))
    with pytest.raises(ValueError, match="enc_channels must have 5 entries"):
        PointTransformerV3(**tiny_config(enc_channels=(16, 16)))
    with pytest.raises(ValueError, match="variant must be"):
        sonata_config("0d")


def test_forward_backward_two_samples(make_points):
    torch.manual_seed(0)
    model = PointTransformerV3(**tiny_config())
    out = model(make_points(1200, samples=2))
    assert out["feat"].shape == (1200, 16)
    out["feat"].square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_linear_probe_upcast_channels(make_points):
    torch.manual_seed(0)
    backbone = PointTransformerV3(**tiny_config("0a"))
    seg = DefaultSegmentorV2(20, 16 + 16 + 32 + 32 + 32, backbone)
    logits = seg(make_points(900))
    assert logits.shape == (900, 20)
    bad = DefaultSegmentorV2(20, 64, PointTransformerV3(**tiny_config("0a")))
    with pytest.raises(ValueError, match="backbone_out_channels=64"):
        bad(make_points(900))


def test_checkpoint_formats_load_strictly(tmp_path):
    torch.manual_seed(0)
    src = PointTransformerV3(**tiny_config("pretrain"))
    sd = src.state_dict()
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in tiny_config("pretrain").items()}
    torch.save({"config": cfg, "state_dict": sd}, tmp_path / "sonata.pth")
    model = build_from_sonata(tmp_path / "sonata.pth")
    assert torch.equal(model.state_dict()["enc.enc2.block0.attn.qkv.weight"], sd["enc.enc2.block0.attn.qkv.weight"])

    # Pointcept pretraining checkpoint -> 0c backbone: decoder is new, mask token dropped
    pre = {f"module.student.backbone.{k}": v for k, v in sd.items()}
    pre["module.teacher.backbone.embedding.stem.linear.weight"] = torch.zeros(1)
    torch.save({"epoch": 3, "state_dict": pre}, tmp_path / "pretrain.pth")
    ft = PointTransformerV3(**tiny_config("0c"))
    load_backbone(ft, tmp_path / "pretrain.pth")
    assert torch.equal(ft.state_dict()["enc.enc4.block0.mlp.0.fc1.weight"], sd["enc.enc4.block0.mlp.0.fc1.weight"])

    # a whole fine-tuned segmentor with DDP's module. prefix
    seg = DefaultSegmentorV2(20, 16, PointTransformerV3(**tiny_config("0c")))
    torch.save({"state_dict": {f"module.{k}": v for k, v in seg.state_dict().items()}}, tmp_path / "best.pth")
    seg2 = DefaultSegmentorV2(20, 16, PointTransformerV3(**tiny_config("0c")))
    load_segmentor(seg2, tmp_path / "best.pth")
    assert torch.equal(seg2.seg_head.weight, seg.seg_head.weight)


def test_wrong_checkpoints_fail_in_one_line(tmp_path):
    sd = PointTransformerV3(**tiny_config("pretrain")).state_dict()
    broken = dict(sd)
    broken.pop("enc.enc1.block0.attn.proj.bias")
    torch.save({"state_dict": broken}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="missing key 'enc.enc1.block0.attn.proj.bias'") as e:
        load_backbone(PointTransformerV3(**tiny_config("0a")), tmp_path / "a.pth")
    assert "\n" not in str(e.value)
    wide = PointTransformerV3(**tiny_config("pretrain", enc_channels=(16, 16, 32, 32, 64))).state_dict()
    torch.save(wide, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_backbone(PointTransformerV3(**tiny_config("pretrain")), tmp_path / "b.pth")
    extra = dict(sd, **{"enc.enc0.block0.attn.rpe.rpe_table": torch.zeros(3)})
    torch.save(extra, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_backbone(PointTransformerV3(**tiny_config("pretrain")), tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(PointTransformerV3(**tiny_config("pretrain")), tmp_path / "missing.pth")
    torch.save({"state_dict": {"foo.weight": torch.zeros(1)}}, tmp_path / "d.pth")
    with pytest.raises(CheckpointError, match="no backbone keys"):
        load_backbone(PointTransformerV3(**tiny_config("pretrain")), tmp_path / "d.pth")


def test_patch_padding_by_hand():
    from gitmerge3d.models.point_transformer_v3m2 import patch_padding

    # two samples of 5 and 4 points, K = 2: the first pads to 6 by repeating slot 3 (one patch earlier)
    pad, unpad = patch_padding(torch.tensor([5, 9]), 2)
    assert pad.tolist() == [0, 1, 2, 3, 4, 3, 5, 6, 7, 8]
    assert unpad.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
