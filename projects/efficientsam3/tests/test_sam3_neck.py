import importlib.util
import math
import os

import pytest
import torch

from efficientsam3.model.sam3_neck import SimpleFPN, SinePositionEncoding, load_neck, select_level
from run_kit import CheckpointError


def test_neck_size_and_sam3_key_names():
    with torch.device("meta"):
        neck = SimpleFPN()
    # research notes 2.1: backbone.vision_backbone.convs = 7.80M; by hand: 3,278,080 + 2,819,072 + 2 x 852,480
    assert sum(p.numel() for p in neck.convs.parameters()) == 7_802_112
    keys = set(neck.convs.state_dict())
    for k in ("0.dconv_2x2_0.weight", "0.dconv_2x2_1.bias", "0.conv_1x1.weight", "1.dconv_2x2.weight",
              "2.conv_1x1.weight", "3.conv_3x3.bias"):  # fmt: skip
        assert k in keys
    assert len(keys) == 8 + 6 + 4 + 4  # weight + bias of 4, 3, 2 and 2 convs


def test_neck_shapes_and_level_choice():
    neck = SimpleFPN(dim=32, d_model=8)
    feats, pos = neck(torch.randn(2, 32, 6, 6))
    assert [f.shape[-1] for f in feats] == [24, 12, 6, 3] and all(f.shape[1] == 8 for f in feats)
    assert [p.shape for p in pos] == [f.shape for f in feats]
    assert select_level(feats, 6) == 2 and select_level(feats, 3) == 3
    with pytest.raises(ValueError, match="MODEL.FEATURE_SIZE: no FPN level of size 5"):
        select_level(feats, 5)


def test_sine_encoding_by_hand():
    pos = SinePositionEncoding(4)(torch.zeros(1, 1, 1, 2))
    # F = 2 -> frequencies (1, 1); y = 1/1 * 2pi; x = (1/2, 2/2) * 2pi; channels [sin y, cos y, sin x, cos x]
    y, xs = 2 * math.pi, (math.pi, 2 * math.pi)
    want = torch.tensor([[[math.sin(y)] * 2], [[math.cos(y)] * 2], [[math.sin(x) for x in xs]],
                         [[math.cos(x) for x in xs]]])  # fmt: skip
    assert torch.allclose(pos[0], want, atol=1e-5)
    pos8 = SinePositionEncoding(8)(torch.zeros(1, 1, 1, 1))[0, :, 0, 0]
    # F = 4 -> frequencies 10000^(0, 0, 0.5, 0.5) = (1, 1, 100, 100) on y = 2 pi
    want8 = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100)]
    assert torch.allclose(pos8[:4], torch.tensor(want8), atol=1e-5)


def test_load_neck_from_sam3_checkpoint(tmp_path):
    neck = SimpleFPN(dim=16, d_model=8)
    sd = {
        "detector.backbone.vision_backbone.convs." + k: torch.full_like(v, 0.5)
        for k, v in neck.convs.state_dict().items()
    }
    sd["detector.backbone.vision_backbone.trunk.x"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "sam3.pt")
    load_neck(neck, str(tmp_path / "sam3.pt"))
    assert all(bool((v == 0.5).all()) for v in neck.convs.state_dict().values())
    sd["detector.backbone.vision_backbone.convs.2.conv_1x1.weight"] = torch.zeros(8, 3, 1, 1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="shape mismatch at '2.conv_1x1.weight'"):
        load_neck(neck, str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError, match="MODEL.SAM3_CHECKPOINT: file not found"):
        load_neck(neck, str(tmp_path / "none.pt"))


@pytest.mark.skipif(not os.environ.get("SAM3_SRC"), reason="set SAM3_SRC to an unpacked sam3 wheel (sam3/model/...)")
def test_equals_pypi_sam3_neck():
    """Against sam3 0.1.4's own Sam3DualViTDetNeck + PositionEmbeddingSine (modules loaded standalone)."""
    root = os.path.join(os.environ["SAM3_SRC"], "sam3", "model") + os.sep
    mods = {}
    for name in ("necks", "position_encoding"):
        spec = importlib.util.spec_from_file_location(f"_s3neck_{name}", root + name + ".py")
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])

    class Trunk(torch.nn.Module):
        channel_list = [64]

        def forward(self, x):
            return [x]

    pe = mods["position_encoding"].PositionEmbeddingSine(num_pos_feats=32, normalize=True, temperature=10000)
    ref = mods["necks"].Sam3DualViTDetNeck(Trunk(), pe, d_model=32, scale_factors=[4.0, 2.0, 1.0, 0.5]).eval()
    mine = SimpleFPN(dim=64, d_model=32).eval()
    ref_convs = ref.convs.state_dict()
    assert sorted(ref_convs) == sorted(mine.convs.state_dict())
    mine.convs.load_state_dict(ref_convs)
    x = torch.randn(2, 64, 10, 10)
    with torch.no_grad():
        want_f, want_p, _, _ = ref(x)
        got_f, got_p = mine(x)
    for a, b in zip(got_f + got_p, want_f + want_p, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
