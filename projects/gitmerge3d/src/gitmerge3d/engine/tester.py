"""Test-time fragment voting: per scene, every augmentation's GridSample fragments are forwarded and their
softmax probabilities summed into the scene's points; the argmax is scored with dataset-pooled metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .metrics import confusion, summarize


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def vote_scene(model: nn.Module, item: Mapping[str, Any], num_classes: int, device: torch.device) -> torch.Tensor:
    """(N, C) summed softmax over all fragments of all augmentations of one scene."""
    prob = torch.zeros(item["num_points"], num_classes, device=device)
    for frag in item["fragment_list"]:
        frag = to_device(frag, device)
        index = frag.pop("index")
        vote = frag.pop("vote", None)
        p = model(frag).float().softmax(-1)
        if vote is not None:
            index, p = index[vote], p[vote]
        prob.index_add_(0, index, p)
    return prob


def test_dataset(
    model: nn.Module,
    dataset,
    num_classes: int,
    device: torch.device,
    ignore_index: int = -1,
    on_scene: Callable[[str, np.ndarray, dict], None] | None = None,
) -> dict:
    """Vote every scene; returns the pooled summary (``summarize``) plus per-scene metrics under ``scenes``."""
    model.eval()
    total = torch.zeros(num_classes, num_classes, dtype=torch.long)
    scenes = {}
    for i in range(len(dataset)):
        item = dataset[i]
        pred = vote_scene(model, item, num_classes, device).argmax(-1).cpu()
        target = torch.as_tensor(item["segment"]).long()
        conf = confusion(pred, target, num_classes, ignore_index)
        total += conf
        s = summarize(conf.numpy())
        scenes[item["name"]] = {k: s[k] for k in ("mIoU", "mAcc", "allAcc")}
        if on_scene is not None:
            on_scene(item["name"], pred.numpy(), s)
    out = summarize(total.numpy())
    out["scenes"] = scenes
    out["confusion"] = total.tolist()
    return out
