"""Every shipped config loads and validates; bad keys and overrides give one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gitmerge3d.engine.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sonata"
GUIDE_CONFIGS = [
    "gitmerge3d-patch-0a-scannet-lin",
    "gitmerge3d-patch-0b-scannet-dec",
    "gitmerge3d-patch-0c-scannet-ft",
    *(
        f"gitmerge3d-{t}-0c-scannet-ft-finetune-100epochs-r{r}"
        for t in ("patch", "wpatch")
        for r in ("0.7-s3", "0.8-s5", "0.9-s10", "0.95-s20")
    ),
    *(f"gitmerge3d-{t}-r{r}-s3dis-lin" for t in ("patch", "wpatch") for r in ("70", "80")),
    "gitmerge3d-patch-r80-scannet200-lin",
    "gitmerge3d-wpatch-r80-scannet200-lin",
]


def test_the_guides_17_configs_are_all_there():
    assert len(GUIDE_CONFIGS) == 17
    shipped = {p.stem for p in CONFIGS.glob("gitmerge3d-*.py")}
    assert shipped == set(GUIDE_CONFIGS)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_config_loads_and_validates(path):
    cfg = load_config(path)
    assert len(cfg.data.names) == cfg.model.num_classes
    assert len(cfg.data.test.test_cfg.aug_transform) == 13


def test_guide_values_reach_the_config():
    # values from the guide's configuration reference / the official files, written out by hand
    c = load_config(CONFIGS / "gitmerge3d-patch-0c-scannet-ft-finetune-100epochs-r0.8-s5.py")
    info = c.model.backbone.additional_info
    assert (info.tome, info.r, info.stride, info.no_rand) == ("patch", 0.8, 5, True)
    assert c.epoch == 100 and c.finetuning_param_list == ["attn.qkv", "attn.proj", "attn.new_layers"]
    assert c.scheduler.max_lr == [0.0, 0.0001] and c.scheduler.pct_start == 0.05  # pct_start from the base
    assert c.model.backbone.enable_flash is False and c.model.backbone.enc_depths == (3, 3, 3, 12, 3)
    w = load_config(CONFIGS / "gitmerge3d-wpatch-r70-s3dis-lin.py")
    assert w.model.backbone.additional_info.tome == "weighted_patch" and w.model.num_classes == 13
    assert w.model.backbone.enc_mode is True and w.model.backbone_out_channels == 1232
    assert w.data.val.split == "Area_5" and w.data.train.data_root == "data/s3dis"
    s = load_config(CONFIGS / "gitmerge3d-patch-r80-scannet200-lin.py")
    assert s.data.train.type == "ScanNet200Dataset" and s.data.names[:3] == ["wall", "chair", "floor"]


def test_options_override_and_parse_literals():
    c = load_config(
        CONFIGS / "gitmerge3d-patch-0a-scannet-lin.py",
        ["weight=exp/a b.pth", "model.backbone.additional_info.r=0.8", "batch_size=2"],
    )
    assert c.weight == "exp/a b.pth" and c.model.backbone.additional_info.r == 0.8 and c.batch_size == 2


@pytest.mark.parametrize(
    "option, needle",
    [
        ("model.backbone.additional_info.tome=bogus", "'tome' must be one of ('patch', 'weighted_patch')"),
        ("model.backbone.additional_info.r=1.5", "'r' must be a float in [0, 1)"),
        ("model.backbone.additional_info.stride=0", "'stride' must be a positive int"),
        ("model.backbone.additional_info.no_rand=1", "'no_rand' must be a bool"),
        ("model.backbone.additional_info.prop_attn=on", "'prop_attn' must be one of"),
        ("model.backbone.additional_info.foo=1", "unknown key 'foo'"),
        ("model.backbone.enable_flash=True", "model.backbone.enable_flash must be False"),
        ("model.backbone.depth=3", "model.backbone.depth is not a PT-v3m2 argument"),
        ("model.nope.x=1", "'model.nope' is not a dict"),
        ("batch_size", "must look like key=value"),
    ],
)
def test_bad_fields_are_one_line_errors(option, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / "gitmerge3d-patch-0c-scannet-ft.py", [option])
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_missing_config_file_is_one_line():
    with pytest.raises(ConfigError, match="config file .* not found"):
        load_config(CONFIGS / "nope.py")


@pytest.mark.parametrize("script", sorted((CONFIGS.parents[1]).glob("*_scripts/*.sh")), ids=lambda p: p.name)
def test_quick_start_scripts_name_shipped_configs(script):
    text = script.read_text()
    cfg = text.split("-c ", 1)[1].split()[0]
    assert (CONFIGS / f"{cfg}.py").is_file()
    assert "sh scripts/train.sh" in text
