"""Loading Sonata / Pointcept checkpoints into this package's models, strictly.

Accepted files (all through ``torch.load(weights_only=True)`` via run_kit):
- standalone ``sonata.pth``: ``{"config": {...}, "state_dict": {embedding.*, enc.*, ...}}``;
- Pointcept pretraining: ``{"state_dict": {"module.student.backbone.*", "module.teacher.*", ...}}``;
- Pointcept fine-tunes: ``{"state_dict": {"module.backbone.*", "module.seg_head.*"}}`` (or without
  ``module.``), or a bare state dict.
A backbone initialised from a pretraining checkpoint may lack only the decoder (``dec.*``, new in
0b/0c) and may drop only ``embedding.mask_token``; every other difference is a one-line error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from run_kit import CheckpointError, load_checkpoint, load_state_dict_checked

from .point_transformer_v3m2 import PointTransformerV3

BACKBONE_PREFIXES = ("module.student.backbone.", "student.backbone.", "module.backbone.", "backbone.")
# config keys of sonata.pth that are PointTransformerV3 arguments
_PTV3_ARGS = set(PointTransformerV3.__init__.__code__.co_varnames[1 : PointTransformerV3.__init__.__code__.co_argcount])


def state_dict_of(obj: Mapping, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint (``state_dict``/``model`` wrappers or a bare dict)."""
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{source}: no tensors found (expected a state dict or {{'state_dict': ...}})")
    return sd


def backbone_state_dict(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Backbone keys with the first matching wrapper prefix removed (student before plain backbone)."""
    for prefix in BACKBONE_PREFIXES:
        picked = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if picked:
            return picked
    if any(k.startswith(("embedding.", "enc.")) for k in sd):
        return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    raise CheckpointError(
        f"{source}: no backbone keys (looked for {', '.join(BACKBONE_PREFIXES)} or bare 'embedding.'/'enc.' keys)"
    )


def load_backbone(model: PointTransformerV3, path: str | Path, allow_new_decoder: bool = True) -> None:
    """Load a backbone strictly; only a missing decoder (pretraining -> 0b/0c) and a mask token may differ."""
    source = str(path)
    sd = backbone_state_dict(state_dict_of(load_checkpoint(path), source), source)
    own = model.state_dict()
    if "embedding.mask_token" in sd and "embedding.mask_token" not in own:
        sd.pop("embedding.mask_token")
    if allow_new_decoder and not any(k.startswith("dec.") for k in sd):
        for k, v in own.items():
            if k.startswith("dec."):
                sd[k] = v
    load_state_dict_checked(model, sd, source, strict=True)


def load_segmentor(model: nn.Module, path: str | Path) -> None:
    """Load a whole segmentor (``backbone.*`` + ``seg_head.*``) strictly; Pointcept's ``module.`` is stripped."""
    source = str(path)
    sd = state_dict_of(load_checkpoint(path), source)
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    load_state_dict_checked(model, sd, source, strict=True)


def build_from_sonata(path: str | Path, **overrides) -> PointTransformerV3:
    """Build the backbone from ``sonata.pth``'s own ``config`` and load its weights strictly."""
    source = str(path)
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("config")
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{source}: no 'config' dict (expected a standalone sonata.pth)")
    unknown = sorted(set(cfg) - _PTV3_ARGS)
    if unknown:
        raise CheckpointError(f"{source}: config key '{unknown[0]}' is not a PointTransformerV3 argument")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    kwargs.update(overrides)
    model = PointTransformerV3(**kwargs)
    sd = backbone_state_dict(state_dict_of(ckpt, source), source)
    load_state_dict_checked(model, sd, source, strict=True)
    return model
