"""Config -> model, weights, optimizer (``param_dicts``), OneCycleLR, losses, freezing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from run_kit import CheckpointError, load_checkpoint

from .. import merging
from ..models import DefaultSegmentorV2, PointTransformerV3, load_backbone, load_segmentor
from ..models.checkpoint import state_dict_of


def build_model(model_cfg: Mapping[str, Any]) -> DefaultSegmentorV2:
    """The segmentor with merging patched in when ``backbone.additional_info`` asks for it."""
    bb = {k: v for k, v in model_cfg["backbone"].items() if k not in ("type", "additional_info")}
    bb = {k: tuple(v) if isinstance(v, list) else v for k, v in bb.items()}
    backbone = PointTransformerV3(**bb)
    model = DefaultSegmentorV2(
        model_cfg["num_classes"], model_cfg["backbone_out_channels"], backbone, model_cfg.get("freeze_backbone", False)
    )
    info = merging.parse_merge_config(model_cfg["backbone"].get("additional_info"))
    if info is not None:
        merging.patch(model, info)
    return model


def load_weight(model: DefaultSegmentorV2, path: str | Path) -> str:
    """Load ``-w``: a whole segmentor (fine-tune, has ``seg_head``) or a backbone (Sonata pretraining)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weight file '{p}' not found")
    sd = state_dict_of(load_checkpoint(p), str(p))
    if any("seg_head." in k for k in sd):
        load_segmentor(model, p)
        return "segmentor"
    load_backbone(model.backbone, p)
    return "backbone"


def apply_finetuning_filter(model: nn.Module, keys: Sequence[str] | None) -> list[str]:
    """Freeze every parameter whose name contains none of ``keys`` (Pointcept's ``filter_grads``)."""
    if not keys:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad = p.requires_grad and any(k in name for k in keys)
        if p.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"finetuning_param_list {list(keys)} matches no trainable parameter")
    return trainable


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any], param_dicts: Sequence[Mapping] | None):
    """Group 0: parameters matching no ``param_dicts`` keyword (base lr); then one group per keyword."""
    groups: list[dict[str, Any]] = [{"params": [], "lr": cfg["lr"]}]
    for pd in param_dicts or []:
        groups.append({"params": [], "lr": pd["lr"]})
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hit = next((i for i, pd in enumerate(param_dicts or []) if pd["keyword"] in name), None)
        groups[0 if hit is None else hit + 1]["params"].append(p)
    kwargs = {k: v for k, v in cfg.items() if k not in ("type", "lr")}
    if cfg["type"] == "AdamW":
        return torch.optim.AdamW(groups, lr=cfg["lr"], **kwargs)
    return torch.optim.SGD(groups, lr=cfg["lr"], **kwargs)


def build_scheduler(optimizer, cfg: Mapping[str, Any], total_steps: int):
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    if isinstance(kwargs.get("max_lr"), (list, tuple)):
        kwargs["max_lr"] = list(kwargs["max_lr"])
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, total_steps=max(1, total_steps), **kwargs)


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Lovasz-softmax (Berman et al. 2018), mean over the classes present in ``target``."""
    keep = target != ignore_index
    prob, target = logits[keep].float().softmax(-1), target[keep]
    losses = []
    for c in target.unique():
        fg = (target == c).float()
        err = (fg - prob[:, c]).abs()
        err, order = err.sort(descending=True)
        fg = fg[order]
        gts = fg.sum()
        inter = gts - fg.cumsum(0)
        union = gts + (1 - fg).cumsum(0)
        jac = 1 - inter / union
        jac = torch.cat([jac[:1], jac[1:] - jac[:-1]])
        losses.append(torch.dot(err, jac))
    return torch.stack(losses).mean() if losses else logits.sum() * 0


class Criteria:
    """Weighted sum of the configured losses (CrossEntropyLoss, LovaszLoss)."""

    def __init__(self, cfgs: Sequence[Mapping[str, Any]]):
        self.cfgs = [dict(c) for c in cfgs]

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.sum() * 0
        for c in self.cfgs:
            ign = c.get("ignore_index", -1)
            if c["type"] == "CrossEntropyLoss":
                if (target != ign).any():
                    total = total + c.get("loss_weight", 1.0) * F.cross_entropy(
                        logits.float(), target, ignore_index=ign
                    )
            else:
                total = total + c.get("loss_weight", 1.0) * lovasz_softmax(logits, target, ign)
        return total
