from pathlib import Path

import pytest
import torch

from efficientsam3.config import ConfigError
from efficientsam3.engine.geometry import frozen_compiled
from efficientsam3.finetune.config import load_ft_config
from efficientsam3.model.students import resolve_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "stage1_geometry_finetune" / "configs"
ZOO = {"rv": ("repvit_m0_9", "repvit_m1_1", "repvit_m2_3"), "tv": ("tiny_vit_5m", "tiny_vit_11m", "tiny_vit_21m"),
       "ev": ("efficientvit_b0", "efficientvit_b1", "efficientvit_b2")}  # fmt: skip


@pytest.mark.parametrize("family", sorted(ZOO))
def test_model_zoo_configs_and_recipe(family):
    for size, backbone in zip("sml", ZOO[family], strict=True):
        cfg = load_ft_config(str(CONFIGS / f"es_{family}_{size}.yaml"))
        assert cfg.MODEL.BACKBONE == backbone and resolve_backbone(backbone).zoo == f"es_{family}_{size}"
        assert cfg.OUTPUT == f"output_geometry_finetune/es_{family}_{size}"
        assert (cfg.MODEL.PRETRAINED != "") == (size == "m")
        t = cfg.TRAIN
        assert (t.EPOCHS, t.WARMUP_EPOCHS, t.BASE_LR, t.MIN_LR, t.WEIGHT_DECAY, t.CLIP_GRAD) == (
            30, 2, 5e-5, 1e-6, 0.01, 1.0)  # fmt: skip
        assert (t.ACCUMULATION_STEPS, t.SCALE_LR, cfg.DATA.BATCH_SIZE, cfg.AMP_DTYPE, cfg.SAVE_FREQ) == (
            8, False, 4, "fp16", 1)  # fmt: skip
        d = cfg.DISTILL
        assert (d.EMBEDDING_LOSS_WEIGHT, d.MASK_BCE_WEIGHT, d.MASK_DICE_WEIGHT, d.MAX_PROMPTS) == (0.0015, 1.0, 1.0, 16)
        assert cfg.MODEL.FEATURE_SIZE == 72


def test_edgesam_style_and_overrides():
    cfg = load_ft_config(str(CONFIGS / "base_geometry_finetune_edgesam_style.yaml"), ["MODEL.FEATURE_SIZE", "36"])
    assert (cfg.DISTILL.MAX_PROMPTS, cfg.DISTILL.PROMPT_MIX, cfg.DISTILL.DECODE_ITERS) == (1, True, 2)
    assert cfg.MODEL.FEATURE_SIZE == 36 and cfg.TRAIN.EPOCHS == 30


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"BASE: ['{CONFIGS / 'base_geometry_finetune.yaml'}']\nDISTILL:\n  MASK_BCE_WIEGHT: 2.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key DISTILL.MASK_BCE_WIEGHT") as e:
        load_ft_config(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--opts: unknown config key MODEL.SAM3_CKPT"):
        load_ft_config(None, ["MODEL.SAM3_CKPT", "x"])
    with pytest.raises(ConfigError, match="MODEL.FEATURE_SIZE: expected one of 72, 36"):
        load_ft_config(None, ["MODEL.FEATURE_SIZE", "48"])
    with pytest.raises(ConfigError, match="DISTILL.MAX_PROMPTS"):
        load_ft_config(None, ["DISTILL.MAX_PROMPTS", "0"])
    with pytest.raises(ConfigError, match="--cfg: config file not found"):
        load_ft_config(str(tmp_path / "none.yaml"))


def test_compile_frozen_key_and_default():
    """MODEL.COMPILE_FROZEN: auto (CUDA graphs on CUDA only; the default since the H200 round 5) / on / off /
    reduce-overhead; anything else is a one-line error."""
    assert load_ft_config(None).MODEL.COMPILE_FROZEN == "auto"
    assert frozen_compiled("auto", torch.device("cuda")) and not frozen_compiled("auto", torch.device("cpu"))
    assert frozen_compiled("on", torch.device("cpu")) and not frozen_compiled("off", torch.device("cuda"))
    with pytest.raises(ConfigError, match="MODEL.COMPILE_FROZEN: expected one of auto, on, off, reduce-overhead"):
        load_ft_config(None, ["MODEL.COMPILE_FROZEN", "yes"])
