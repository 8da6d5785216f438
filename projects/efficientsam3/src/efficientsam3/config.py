"""Stage-1 configuration: a yacs tree with the reference's key names, YAML files with `BASE:` includes
and `--opts KEY VALUE` overrides. Unknown keys are one-line errors (yacs' own KeyError is multi-line
and names neither the file nor the flag)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import yaml
from yacs.config import CfgNode as CN


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming the source."""


_C = CN()
_C.BASE = [""]

_C.DATA = CN()
_C.DATA.BATCH_SIZE = 64
_C.DATA.DATA_PATH = "data/sa-1b"
_C.DATA.DATASET = "sa1b"
_C.DATA.SPLIT = "train"
_C.DATA.IMG_SIZE = 1008
# "sam3": square resize + mean/std 0.5 (what SAM3 inference uses, our default);
# "letterbox": long side to IMG_SIZE, ImageNet mean/std, zero pad bottom/right (the reference).
_C.DATA.PREPROCESS = "sam3"
_C.DATA.NUM_WORKERS = 8
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_SAMPLES = -1
# Horizontal flip driven by the record's int32 seed (bit 0), so student and stored teacher agree.
_C.DATA.AUG_FLIP = False

_C.MODEL = CN()
_C.MODEL.TYPE = "efficient_sam3"
_C.MODEL.NAME = "EfficientSAM3"
_C.MODEL.BACKBONE = "repvit_m1_1"
# Local timm ImageNet weights for the student backbone (the reference ignores this key; we load it).
_C.MODEL.PRETRAINED = ""
_C.MODEL.RESUME = ""

_C.TEACHER = CN()
# "sam3": the full SAM3 ViT trunk; "sam3_tiny": the same module at reduced size (tests);
# "standin": a tiny conv stand-in with the same interface (fast tests).
_C.TEACHER.TYPE = "sam3"
_C.TEACHER.CHECKPOINT = ""
_C.TEACHER.DTYPE = "bf16"
_C.TEACHER.MERGE_R = 0
_C.TEACHER.MERGE_GLOBAL_R = 0
# "attn": merge inside attention, unmerge before the projection (the design);
# "block": projection and MLP also run on the merged tokens (faster, see model/merged_teacher.py);
# "span": tokens stay merged per window across each run of windowed blocks (fastest).
_C.TEACHER.MERGE_MODE = "attn"
# span mode only: r per block of each windowed run, e.g. [288, 144] (merge 288 per window at the run's first
# block, 144 more at its second); the first entry is the window r. [] = one merge per run (MERGE_R).
_C.TEACHER.MERGE_SPAN_SCHEDULE = []

_C.DISTILL = CN()
_C.DISTILL.ENABLED = True
_C.DISTILL.ENCODER_ONLY = True
_C.DISTILL.EMBED_DIM = 1024
_C.DISTILL.EMBED_SIZE = 72
_C.DISTILL.PIXEL_WISE = 1.0
_C.DISTILL.COSINE = 1.0
_C.DISTILL.TEACHER_EMBED_PATH = "output/stage1_teacher/embeddings"
_C.DISTILL.SAVE_TEACHER_EMBED = False
# Train against a teacher run inside the loop instead of a store.
_C.DISTILL.ONLINE_TEACHER = False

_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 50
_C.TRAIN.WARMUP_EPOCHS = 5
_C.TRAIN.WEIGHT_DECAY = 0.01
_C.TRAIN.BASE_LR = 1e-3
_C.TRAIN.WARMUP_LR = 1e-6
_C.TRAIN.MIN_LR = 1e-5
_C.TRAIN.CLIP_GRAD = 5.0
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.SCALE_LR = True
_C.TRAIN.USE_SYNC_BN = False
_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)

_C.AMP_ENABLE = True
_C.AMP_DTYPE = "fp16"
_C.OUTPUT = "output/stage1"
_C.TAG = "default"
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 10
_C.SEED = 0

_CHOICES = {
    "DATA.PREPROCESS": ("sam3", "letterbox"),
    "TEACHER.TYPE": ("sam3", "sam3_tiny", "standin"),
    "TEACHER.DTYPE": ("fp32", "bf16", "fp16"),
    "TEACHER.MERGE_MODE": ("attn", "block", "span"),
    "AMP_DTYPE": ("fp16", "bf16"),
    "TRAIN.OPTIMIZER.NAME": ("adamw",),
}


def default_config() -> CN:
    """A fresh copy of the defaults."""
    return _C.clone()


def _merge_file(cfg: CN, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"--cfg: config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--cfg: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    for base in data.get("BASE", [""]) or [""]:
        if base:
            _merge_file(cfg, os.path.join(os.path.dirname(path), base))
    _check_keys(cfg, data, path, prefix="")
    try:
        cfg.merge_from_other_cfg(CN(data))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None


def _check_keys(cfg: CN, data: dict, source: str, prefix: str) -> None:
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in cfg:
            raise ConfigError(f"{source}: unknown config key {full}")
        if isinstance(value, dict):
            if not isinstance(cfg[key], CN):
                raise ConfigError(f"{source}: config key {full} is a value, not a section")
            _check_keys(cfg[key], value, source, prefix=f"{full}.")


def _merge_opts(cfg: CN, opts: Sequence[str]) -> None:
    if len(opts) % 2:
        raise ConfigError(f"--opts: expected KEY VALUE pairs, got an odd number of items ({len(opts)})")
    for key, value in zip(opts[0::2], opts[1::2], strict=True):
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], CN):
                raise ConfigError(f"--opts: unknown config key {key}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"--opts: unknown config key {key}")
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"--opts {key}: {' '.join(str(e).split())}") from None


def _set(cfg: CN, key: str, value) -> None:
    """Set one dotted key from a typed CLI flag, cast to the default's type."""
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[part]
    old = node[parts[-1]]
    try:
        node[parts[-1]] = type(old)(value) if old is not None and not isinstance(old, bool) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a {type(old).__name__}, got {value!r}") from None


def validate(cfg: CN, choices: dict | None = None) -> None:
    """Check choices (stage-1's plus `choices`) and a few ranges once, with one-line errors."""
    for key, allowed in {**_CHOICES, **(choices or {})}.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, allowed))}, got {node!r}")
    for key, value in (("DATA.IMG_SIZE", cfg.DATA.IMG_SIZE), ("DISTILL.EMBED_SIZE", cfg.DISTILL.EMBED_SIZE)):
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive integer, got {value}")
    sched = cfg.TEACHER.MERGE_SPAN_SCHEDULE
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in sched):
        raise ConfigError(f"TEACHER.MERGE_SPAN_SCHEDULE: expected a list of ints >= 0, got {list(sched)!r}")
    if any(sched) and cfg.TEACHER.MERGE_MODE != "span":
        raise ConfigError(f"TEACHER.MERGE_SPAN_SCHEDULE: needs TEACHER.MERGE_MODE span, got {cfg.TEACHER.MERGE_MODE!r}")
    if cfg.TRAIN.ACCUMULATION_STEPS < 1:
        raise ConfigError(f"TRAIN.ACCUMULATION_STEPS: expected >= 1, got {cfg.TRAIN.ACCUMULATION_STEPS}")


def load_config(
    cfg_file: str | None = None,
    opts: Sequence[str] = (),
    overrides: dict | None = None,
    defaults: CN | None = None,
    choices: dict | None = None,
) -> CN:
    """Defaults (stage-1's unless given) <- cfg_file (with BASE includes) <- --opts <- explicit CLI overrides."""
    cfg = (defaults if defaults is not None else _C).clone()
    if cfg_file:
        _merge_file(cfg, cfg_file)
    _merge_opts(cfg, list(opts))
    for key, value in (overrides or {}).items():
        _set(cfg, key, value)
    validate(cfg, choices)
    cfg.freeze()
    return cfg


def to_dict(cfg: CN) -> dict:
    """Plain nested dict (for config.json and checkpoints)."""
    out = {}
    for key, value in cfg.items():
        out[key] = to_dict(value) if isinstance(value, CN) else (list(value) if isinstance(value, tuple) else value)
    return out


def from_dict(data: dict, defaults: CN | None = None, choices: dict | None = None) -> CN:
    """Inverse of to_dict, checked against the defaults (stage-1's unless given)."""
    cfg = (defaults if defaults is not None else _C).clone()
    _check_keys(cfg, data, "saved config", prefix="")
    cfg.merge_from_other_cfg(CN(data))
    validate(cfg, choices)
    return cfg


def flatten(data: dict, prefix: str = "") -> dict:
    """{"DATA": {"BATCH_SIZE": 64}} -> {"DATA.BATCH_SIZE": 64}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out
