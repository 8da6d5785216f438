"""Test-time fragment voting: per scene, every augmentation's GridSample fragments are forwarded and their
softmax probabilities summed into the scene's points; the argmax is scored with dataset-pooled metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from run_kit import seed_everything

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


def test_scenes(
    model: nn.Module,
    dataset,
    indices: Iterable[int],
    num_classes: int,
    device: torch.device,
    ignore_index: int = -1,
    on_scene: Callable[[str, np.ndarray, dict], None] | None = None,
    seed: int | None = None,
) -> list[dict]:
    """Vote the scenes ``indices`` of ``dataset``; per scene ``{"index", "name", "confusion"}`` (a (C, C) list),
    picklable so ranks can gather them. With ``seed``, the RNGs are reseeded per scene (``seed + index``): the
    model's order shuffling then gives the same predictions however the scenes are split over ranks."""
    model.eval()
    out = []
    for i in indices:
        if seed is not None:
            seed_everything(int(seed) + int(i))
        item = dataset[i]
        pred = vote_scene(model, item, num_classes, device).argmax(-1).cpu()
        target = torch.as_tensor(item["segment"]).long()
        conf = confusion(pred, target, num_classes, ignore_index)
        if on_scene is not None:
            on_scene(item["name"], pred.numpy(), summarize(conf.numpy()))
        out.append({"index": int(i), "name": item["name"], "confusion": conf.tolist()})
    return out


def pool_scenes(scenes: Sequence[dict], num_classes: int) -> dict:
    """Dataset-pooled summary (``summarize`` of the summed confusion) plus per-scene metrics under ``scenes``;
    a scene index seen twice is an error (each scene must count once)."""
    seen = [s["index"] for s in scenes]
    if len(set(seen)) != len(seen):
        dup = next(i for i in seen if seen.count(i) > 1)
        raise ValueError(f"scene index {dup} was tested more than once (ranks must split the scenes)")
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    per_scene = {}
    for s in sorted(scenes, key=lambda s: s["index"]):
        conf = np.asarray(s["confusion"], dtype=np.int64)
        total += conf
        m = summarize(conf)
        key = s["name"] if s["name"] not in per_scene else f"{s['name']}#{s['index']}"
        per_scene[key] = {k: m[k] for k in ("mIoU", "mAcc", "allAcc")}
    out = summarize(total)
    out["scenes"] = per_scene
    out["confusion"] = total.tolist()
    return out


def test_dataset(
    model: nn.Module,
    dataset,
    num_classes: int,
    device: torch.device,
    ignore_index: int = -1,
    on_scene: Callable[[str, np.ndarray, dict], None] | None = None,
    seed: int | None = None,
) -> dict:
    """Vote every scene in one process; returns the pooled summary (``pool_scenes``)."""
    scenes = test_scenes(model, dataset, range(len(dataset)), num_classes, device, ignore_index, on_scene, seed)
    return pool_scenes(scenes, num_classes)
