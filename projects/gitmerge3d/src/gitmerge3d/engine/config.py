"""Pointcept-style python configs: ``_base_`` inheritance, ``--options key=value`` overrides, validation.

A config file is plain python whose public top-level names are the settings. ``_base_`` (a path or a list
of paths, relative to the file) is loaded first; the child's dicts are merged into the base's key by key
(``_delete_=True`` in a child dict replaces instead). Validation turns the usual mistakes (bad merging
fields, unknown backbone arguments, missing sections) into one-line errors naming the key.
"""

from __future__ import annotations

import ast
import copy
import pprint
import runpy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..merging import parse_merge_config
from ..models.point_transformer_v3m2 import PointTransformerV3

_PTV3_ARGS = set(PointTransformerV3.__init__.__code__.co_varnames[1 : PointTransformerV3.__init__.__code__.co_argcount])
_BACKBONE_EXTRA = {"type", "additional_info"}
BACKBONE_TYPES = ("PT-v3m2",)
MODEL_TYPES = ("DefaultSegmentorV2",)
REQUIRED = ("model", "data", "epoch", "optimizer", "scheduler", "batch_size")
# every top-level setting the engine reads (data_root/dataset_type: the dataset files' helper variables)
TOP_LEVEL = (
    *REQUIRED,
    *("param_dicts", "finetuning_param_list", "mix_prob", "batch_size_val", "num_worker", "seed", "enable_amp"),
    *("amp_dtype", "clip_grad", "empty_cache", "evaluate", "eval_epoch", "find_unused_parameters", "weight"),
    *("resume", "save_path", "max_train_iters", "max_val_scenes", "data_root", "dataset_type"),
)
AMP_DTYPES = ("float16", "bfloat16")


class ConfigError(ValueError):
    """A config that cannot be loaded or does not validate (one line naming the key)."""


class Config(dict):
    """A dict with attribute access (``cfg.model.backbone``), recursively."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def pretty(self) -> str:
        """The config as python assignments, re-loadable with ``load_config``."""
        return "".join(f"{k} = {pprint.pformat(_plain(v), width=110, sort_dicts=False)}\n" for k, v in self.items())


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Config({k: _wrap(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def merge(base: dict, child: Mapping) -> dict:
    """Child over base; nested dicts merge key by key unless the child dict says ``_delete_=True``."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and not value.get("_delete_", False):
            out[key] = merge(dict(out[key]), value)
        elif isinstance(value, Mapping):
            out[key] = {k: v for k, v in value.items() if k != "_delete_"}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    if path in chain:
        raise ConfigError(f"config '{path}': _base_ cycle through {' -> '.join(p.name for p in chain)}")
    try:
        ns = runpy.run_path(str(path))
    except Exception as exc:  # a broken config file: report where, in one line
        raise ConfigError(f"config '{path}' failed to execute: {type(exc).__name__}: {exc}") from None
    bases = ns.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    out: dict = {}
    for b in bases:
        out = merge(out, _read((path.parent / b).resolve(), (*chain, path)))
    own = {k: v for k, v in ns.items() if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}
    return merge(out, own)


def parse_value(text: str) -> Any:
    """``--options`` value: a python literal when it parses as one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_options(cfg: dict, options: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (Pointcept's ``--options``); intermediate dicts must exist."""
    for opt in options:
        if "=" not in opt:
            raise ConfigError(f"--options entry {opt!r} must look like key=value (e.g. weight=model_best.pth)")
        key, text = opt.split("=", 1)
        parts = key.split(".")
        node = cfg
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node.get(p), Mapping):
                raise ConfigError(f"--options {key}: '{'.'.join(parts[: i + 1])}' is not a dict in this config")
            node = node[p]
        node[parts[-1]] = parse_value(text)
    return cfg


def validate(cfg: Mapping) -> None:
    """One-line ``ConfigError`` for the first problem found."""
    for key in REQUIRED:
        if key not in cfg:
            raise ConfigError(f"config lacks '{key}'")
    unknown = sorted(set(cfg) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"config key '{unknown[0]}' is not supported here (see README: Training and testing)")
    _validate_runtime(cfg)
    model = cfg["model"]
    if model.get("type") not in MODEL_TYPES:
        raise ConfigError(f"model.type must be one of {MODEL_TYPES}, got {model.get('type')!r}")
    backbone = model.get("backbone")
    if not isinstance(backbone, Mapping):
        raise ConfigError("model.backbone must be a dict")
    if backbone.get("type") not in BACKBONE_TYPES:
        raise ConfigError(f"model.backbone.type must be one of {BACKBONE_TYPES}, got {backbone.get('type')!r}")
    unknown = sorted(set(backbone) - _PTV3_ARGS - _BACKBONE_EXTRA)
    if unknown:
        raise ConfigError(f"model.backbone.{unknown[0]} is not a PT-v3m2 argument")
    try:
        merge_cfg = parse_merge_config(backbone.get("additional_info"))
    except ValueError as exc:
        raise ConfigError(f"model.backbone.additional_info: {exc}") from None
    if merge_cfg is not None and backbone.get("enable_flash", True):
        raise ConfigError("model.backbone.enable_flash must be False when additional_info.tome is set")
    for key in ("num_classes", "backbone_out_channels"):
        if not isinstance(model.get(key), int) or model[key] < 1:
            raise ConfigError(f"model.{key} must be a positive int, got {model.get(key)!r}")
    for i, c in enumerate(model.get("criteria", [])):
        if c.get("type") not in ("CrossEntropyLoss", "LovaszLoss"):
            raise ConfigError(f"model.criteria[{i}].type must be CrossEntropyLoss or LovaszLoss, got {c.get('type')!r}")
    data = cfg["data"]
    for split in ("train", "val", "test"):
        if split not in data:
            raise ConfigError(f"data.{split} is missing")
    if data.get("num_classes") != model["num_classes"]:
        raise ConfigError(f"data.num_classes ({data.get('num_classes')}) != model.num_classes ({model['num_classes']})")
    if len(data.get("names", [])) != data["num_classes"]:
        raise ConfigError(f"data.names must list {data['num_classes']} class names, got {len(data.get('names', []))}")
    sched = cfg["scheduler"]
    if sched.get("type") != "OneCycleLR":
        raise ConfigError(f"scheduler.type must be 'OneCycleLR', got {sched.get('type')!r}")
    lrs = sched.get("max_lr")
    groups = 1 + len(cfg.get("param_dicts") or [])
    if isinstance(lrs, (list, tuple)) and len(lrs) != groups:
        raise ConfigError(f"scheduler.max_lr has {len(lrs)} values for {groups} param groups (1 + len(param_dicts))")
    if cfg["optimizer"].get("type") not in ("AdamW", "SGD"):
        raise ConfigError(f"optimizer.type must be 'AdamW' or 'SGD', got {cfg['optimizer'].get('type')!r}")
    fpl = cfg.get("finetuning_param_list")
    if fpl is not None and (not isinstance(fpl, (list, tuple)) or not all(isinstance(k, str) for k in fpl)):
        raise ConfigError(f"finetuning_param_list must be a list of name fragments, got {fpl!r}")
    if not isinstance(cfg["batch_size"], int) or cfg["batch_size"] < 1:
        raise ConfigError(f"batch_size must be a positive int, got {cfg['batch_size']!r}")


def _validate_runtime(cfg: Mapping) -> None:
    mix = cfg.get("mix_prob", 0.0)
    if not isinstance(mix, (int, float)) or isinstance(mix, bool) or not 0 <= mix <= 1:
        raise ConfigError(f"mix_prob must be a number in [0, 1], got {mix!r}")
    if cfg.get("amp_dtype", "float16") not in AMP_DTYPES:
        raise ConfigError(f"amp_dtype must be one of {AMP_DTYPES}, got {cfg.get('amp_dtype')!r}")
    ev, ep = cfg.get("eval_epoch"), cfg["epoch"]
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ConfigError(f"epoch must be a positive int, got {ep!r}")
    if ev is not None and (not isinstance(ev, int) or isinstance(ev, bool) or ev < 1 or ep % ev):
        raise ConfigError(f"eval_epoch must be None or a positive divisor of epoch ({ep}), got {ev!r}")
    if not isinstance(cfg.get("empty_cache", False), bool):
        raise ConfigError(f"empty_cache must be True or False, got {cfg.get('empty_cache')!r}")


def load_config(path: str | Path, options: Sequence[str] = ()) -> Config:
    """Read, merge the ``_base_`` chain, apply ``--options``, validate."""
    cfg = _read(Path(path).resolve())
    cfg = apply_options(cfg, options)
    validate(cfg)
    return _wrap(cfg)
