"""Pointcept folder datasets (ScanNet / ScanNet200 / S3DIS) and the batch collate with offsets.

``<data_root>/<split>/<scene>/{coord,color,normal}.npy`` plus the dataset's label file. In test mode an
item is the scene's ``fragment_list``: for each test augmentation, every GridSample test-mode fragment.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .transform import Compose, build_transform


class DefaultDataset(Dataset):
    SEGMENT_FILE = "segment.npy"
    NEED = ("coord.npy", "color.npy", "normal.npy")

    def __init__(
        self,
        split: str | Sequence[str] = "train",
        data_root: str = "data/scannet",
        transform: Sequence[Mapping] | None = None,
        test_mode: bool = False,
        test_cfg: Mapping | None = None,
        loop: int = 1,
        max_scenes: int | None = None,
    ):
        self.root = Path(data_root)
        self.splits = [split] if isinstance(split, str) else list(split)
        self.transform = Compose(transform)
        self.test_mode, self.loop = test_mode, max(1, int(loop)) if not test_mode else 1
        self.scenes = self._scenes()
        if max_scenes is not None:
            self.scenes = self.scenes[: int(max_scenes)]
        if test_mode:
            if not test_cfg:
                raise ValueError("data.test.test_cfg is required when test_mode=True")
            self.voxelize = build_transform(test_cfg["voxelize"])
            if test_cfg.get("crop"):
                raise ValueError("data.test.test_cfg.crop is not supported (None in every shipped config)")
            self.post = Compose(test_cfg.get("post_transform"))
            self.augs = [Compose(a) for a in test_cfg.get("aug_transform") or [[]]]
            self.vote = test_cfg.get("vote", "once")
            if self.vote not in ("once", "all"):
                raise ValueError(f"data.test.test_cfg.vote must be 'once' or 'all', got {self.vote!r}")

    def _scenes(self) -> list[Path]:
        hint = f"put Pointcept scene folders at {self.root}/<split>/<scene>/{{coord,color,normal}}.npy (see README)"
        if not self.root.is_dir():
            raise FileNotFoundError(f"data_root '{self.root}' not found: {hint}")
        scenes: list[Path] = []
        for split in self.splits:
            folder = self.root / split
            if not folder.is_dir():
                raise FileNotFoundError(f"split folder '{folder}' not found: {hint}")
            scenes += sorted(p for p in folder.iterdir() if p.is_dir())
        if not scenes:
            raise FileNotFoundError(f"no scene folders under {self.root} for split {self.splits}: {hint}")
        return scenes

    def get_data(self, idx: int) -> dict[str, Any]:
        folder = self.scenes[idx % len(self.scenes)]
        missing = [f for f in self.NEED if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"scene '{folder}' lacks {missing[0]} (convert it with gitmerge3d-convert)")
        data: dict[str, Any] = {f[:-4]: np.load(folder / f) for f in self.NEED}
        data["coord"] = data["coord"].astype(np.float32)
        data["color"] = data["color"].astype(np.float32)
        data["normal"] = data["normal"].astype(np.float32)
        n = len(data["coord"])
        seg = folder / self.SEGMENT_FILE
        data["segment"] = np.load(seg).reshape(-1).astype(np.int64) if seg.is_file() else np.full(n, -1, np.int64)
        inst = folder / "instance.npy"
        data["instance"] = np.load(inst).reshape(-1).astype(np.int64) if inst.is_file() else np.full(n, -1, np.int64)
        data["name"] = folder.name
        return data

    def __len__(self) -> int:
        return len(self.scenes) * self.loop

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if self.test_mode:
            return self.prepare_test_data(idx)
        data = self.get_data(idx)
        name = data.pop("name")
        out = self.transform(data)
        out["name"] = name
        return out

    def prepare_test_data(self, idx: int) -> dict[str, Any]:
        data = self.get_data(idx)
        name = data.pop("name")
        data = self.transform(data)
        segment = data.pop("segment")
        data.pop("instance", None)
        fragments = []
        for aug in self.augs:
            for part in self.voxelize(aug(copy.deepcopy(data))):
                vote = torch.from_numpy(part.pop("vote")) if self.vote == "once" else None
                frag = self.post(part)
                if vote is not None:
                    frag["vote"] = vote
                fragments.append(frag)
        return {"segment": segment, "name": name, "fragment_list": fragments, "num_points": len(segment)}


class ScanNetDataset(DefaultDataset):
    SEGMENT_FILE = "segment20.npy"


class ScanNet200Dataset(DefaultDataset):
    SEGMENT_FILE = "segment200.npy"


class S3DISDataset(DefaultDataset):
    SEGMENT_FILE = "segment.npy"


DATASETS = {c.__name__: c for c in (DefaultDataset, ScanNetDataset, ScanNet200Dataset, S3DISDataset)}


def build_dataset(cfg: Mapping[str, Any], **overrides: Any) -> DefaultDataset:
    kwargs = {**dict(cfg), **overrides}
    name = kwargs.pop("type", None)
    if name not in DATASETS:
        raise ValueError(f"data type {name!r} is not one of {', '.join(DATASETS)}")
    return DATASETS[name](**kwargs)


def collate_fn(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate samples point-wise; ``offset`` becomes the running end index of each sample."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if key == "offset":
            out[key] = torch.cumsum(torch.cat(vals), 0)
        elif isinstance(vals[0], torch.Tensor):
            out[key] = torch.cat(vals, 0)
        else:
            out[key] = vals
    return out
