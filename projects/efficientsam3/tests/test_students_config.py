from pathlib import Path

import pytest
import timm
import torch

from efficientsam3.config import ConfigError, load_config
from efficientsam3.model.students import STUDENTS, build_student, resolve_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "stage1" / "configs"

# timm features_only state-dict entries (research notes section 3) + 8 head entries.
EXPECTED_KEYS = {
    "repvit_m0_9": 699,
    "repvit_m1_1": 645,
    "repvit_m2_3": 1455,
    "tiny_vit_5m_224": 292,
    "tiny_vit_11m_224": 292,
    "tiny_vit_21m_224": 292,
    "efficientvit_b0": 186,
    "efficientvit_b1": 261,
    "efficientvit_b2": 354,
}


@pytest.mark.parametrize("name", list(STUDENTS))
def test_student_key_counts(name):
    with torch.device("meta"):
        m = build_student(name)
    sd = m.state_dict()
    assert len(sd) == EXPECTED_KEYS[name] + 8
    assert sum(k.startswith("head.") for k in sd) == 8
    assert sd["head.0.weight"].shape == (1024, STUDENTS[name].channels, 1, 1)


def test_repvit_m1_1_is_653():
    with torch.device("meta"):
        assert len(build_student("repvit_m1_1").state_dict()) == 653


def test_student_forward_shape_and_grid():
    m = build_student("efficientvit_b0", embed_dim=8, embed_size=9).eval()
    y = m(torch.randn(1, 3, 96, 96))
    assert y.shape == (1, 8, 9, 9)
    # 1008 / 32 = 31.5 is ceiled: the stride-32 map is 32x32 (research notes)
    assert m.backbone(torch.randn(1, 3, 1008 // 4, 1008 // 4))[-1].shape[-1] == 8


def test_local_imagenet_weights(tmp_path):
    full = timm.create_model("efficientvit_b0")
    path = tmp_path / "in1k.pth"
    torch.save(full.state_dict(), path)
    m = build_student("efficientvit_b0", 8, 4, pretrained=str(path))
    assert torch.equal(
        m.backbone.state_dict()["stem_in_conv.conv.weight"], full.state_dict()["stem.in_conv.conv.weight"]
    )
    with pytest.raises(FileNotFoundError, match="MODEL.PRETRAINED"):
        build_student("efficientvit_b0", pretrained=str(tmp_path / "nope.pth"))


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) >= 12
    backbones = {load_config(str(f)).MODEL.BACKBONE for f in files if f.name.startswith("es_")}
    assert backbones == set(STUDENTS)


def test_aliases_and_unknown_backbone():
    assert resolve_backbone("tiny_vit_5m").timm_name == "tiny_vit_5m_224"
    assert resolve_backbone("es_rv_m").timm_name == "repvit_m1_1"
    with pytest.raises(ValueError, match="MODEL.BACKBONE: unknown student"):
        resolve_backbone("resnet50")


def test_config_files_opts_and_errors(tmp_path):
    cfg = load_config(str(CONFIGS / "es_rv_m.yaml"), ["DATA.BATCH_SIZE", "8"])
    assert cfg.DATA.BATCH_SIZE == 8 and cfg.DISTILL.EMBED_SIZE == 72 and cfg.MODEL.BACKBONE == "repvit_m1_1"
    assert cfg.TRAIN.EPOCHS == 50 and cfg.TRAIN.WARMUP_EPOCHS == 5 and cfg.TRAIN.CLIP_GRAD == 5.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  BACKBONEZ: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert str(e.value) == f"{bad}: unknown config key MODEL.BACKBONEZ" and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--opts: unknown config key TRAIN.EPOCHZ"):
        load_config(None, ["TRAIN.EPOCHZ", "3"])
    with pytest.raises(ConfigError, match="--opts: expected KEY VALUE pairs"):
        load_config(None, ["TRAIN.EPOCHS"])
    with pytest.raises(ConfigError, match="DATA.PREPROCESS: expected one of sam3, letterbox"):
        load_config(None, ["DATA.PREPROCESS", "crop"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_base_include(tmp_path):
    (tmp_path / "base.yaml").write_text("TRAIN:\n  EPOCHS: 7\nDATA:\n  BATCH_SIZE: 3\n")
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\nDATA:\n  BATCH_SIZE: 5\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.TRAIN.EPOCHS == 7 and cfg.DATA.BATCH_SIZE == 5
