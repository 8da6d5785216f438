"""Pointcept folder datasets (ScanNet / ScanNet200 / S3DIS) and the batch collate with offsets.

``<data_root>/<split>/<scene>/{coord,color,normal}.npy`` plus the dataset's label file. In test mode an
item is the scene's ``fragment_list``: for each test augmentation, every GridSample test-mode fragment.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .transform import Compose, GridSample, SphereCrop, build_transform

TEST_CFG_KEYS = ("voxelize", "crop", "post_transform", "aug_transform", "vote")


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
        if any(isinstance(t, SphereCrop) and t.mode == "all" for t in self.transform.transforms):
            raise ValueError("SphereCrop mode='all' returns several crops: use it as data.test.test_cfg.crop only")
        self.test_mode, self.loop = test_mode, max(1, int(loop)) if not test_mode else 1
        self.scenes = self._scenes()
        if max_scenes is not None:
            self.scenes = self.scenes[: int(max_scenes)]
        if test_mode:
            self._init_test(test_cfg)

    def _init_test(self, test_cfg: Mapping | None) -> None:
        if not test_cfg:
            raise ValueError("data.test.test_cfg is required when test_mode=True")
        unknown = sorted(set(test_cfg) - set(TEST_CFG_KEYS))
        if unknown:
            supported = ", ".join(TEST_CFG_KEYS)
            raise ValueError(f"data.test.test_cfg.{unknown[0]} is not supported (supported: {supported})")
        self.voxelize = build_transform(test_cfg["voxelize"]) if test_cfg.get("voxelize") else None
        if self.voxelize is not None and not (isinstance(self.voxelize, GridSample) and self.voxelize.mode == "test"):
            raise ValueError("data.test.test_cfg.voxelize must be a GridSample with mode='test' (or None)")
        self.crop = build_transform(test_cfg["crop"]) if test_cfg.get("crop") else None
        if self.crop is not None and not (isinstance(self.crop, SphereCrop) and self.crop.mode == "all"):
            raise ValueError(
                "data.test.test_cfg.crop must be a SphereCrop with mode='all' (or None): "
                "other crops leave points without a prediction"
            )
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
            view = aug(copy.deepcopy(data))
            if self.voxelize is not None:
                parts = self.voxelize(view)
            else:  # every point once: Pointcept's voxelize=None
                n = len(view["coord"])
                parts = [{**view, "index": np.arange(n), "vote": np.ones(n, dtype=bool)}]
            for part in parts:
                for piece in self.crop(part) if self.crop is not None else [part]:
                    vote = torch.from_numpy(piece.pop("vote"))
                    frag = self.post(piece)
                    if self.vote == "once":
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
    unknown = sorted(set(kwargs) - set(DATASET_ARGS))
    if unknown:
        supported = ", ".join(DATASET_ARGS)
        raise ValueError(f"dataset argument {unknown[0]!r} ({name}) is not supported (supported: {supported})")
    return DATASETS[name](**kwargs)


DATASET_ARGS = tuple(inspect.signature(DefaultDataset.__init__).parameters)[1:]


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


def point_collate_fn(batch: Sequence[Mapping[str, Any]], mix_prob: float = 0.0) -> dict[str, Any]:
    """``collate_fn``, then Mix3D with probability ``mix_prob`` (Pointcept's training collate): samples 2k and
    2k+1 become one scene by dropping the offset between them, so their points overlay in one sample (an odd
    last sample stays alone). Instance ids of the second scene of a pair are shifted past the first's."""
    out = collate_fn(batch)
    if mix_prob <= 0 or np.random.rand() >= mix_prob:
        return out
    offset = out["offset"]
    if "instance" in out:
        inst = out["instance"]
        bounds = [0, *offset.tolist()]
        for i in range(1, len(offset), 2):
            first = inst[bounds[i - 1] : bounds[i]]
            second = inst[bounds[i] : bounds[i + 1]]
            shift = max(int(first.max()) + 1, 0) if len(first) else 0
            second[second != -1] += shift
    for key in [k for k in out if "offset" in k]:
        out[key] = torch.cat([out[key][1:-1:2], out[key][-1:]])
    return out
