"""CIFAR-100 DataLoaders from torchvision's on-disk format (32x32 upscaled to IMAGE_SIZE).

Expected layout (what ``torchvision.datasets.CIFAR100(download=True)`` leaves, or the extracted
``cifar-100-python.tar.gz``)::

    <data_root>/cifar-100-python/train   pickle: {b"data": uint8 (50000, 3072), b"fine_labels": [...], ...}
    <data_root>/cifar-100-python/test    pickle: same keys, 10000 rows
    <data_root>/cifar-100-python/meta    pickle: {b"fine_label_names": [...], b"coarse_label_names": [...]}

Rows are 1024 red, then 1024 green, then 1024 blue values of a row-major 32x32 image. The pickles are
read here directly (keys may be bytes or str). ``write_cifar100`` writes the same format (tests use it).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms

FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")


class DatasetError(ValueError):
    """CIFAR-100 files are missing or unreadable; the message is one line saying which file and what to do."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """CIFAR-100 is not where the config says (message is one line, with where to put it)."""


def find_cifar_dir(data_root: str) -> str:
    """The cifar-100-python folder under data_root (or data_root itself if it is that folder)."""
    for candidate in (os.path.join(data_root, FOLDER), data_root):
        if all(os.path.isfile(os.path.join(candidate, name)) for name in FILES):
            return candidate
    where = os.path.abspath(os.path.join(data_root, FOLDER))
    raise DatasetNotFoundError(
        f"CIFAR-100 not found: put the extracted {FOLDER}/ folder (train, test, meta from cifar-100-python.tar.gz) "
        f"at {where}, or pass --data_root DIR (the folder that contains {FOLDER}/), or --download when online"
    )


def download_cifar100(data_root: str) -> str:
    """Fetch and extract CIFAR-100 with torchvision (needs internet); returns the folder."""
    try:
        return find_cifar_dir(data_root)
    except DatasetNotFoundError:
        pass
    from torchvision.datasets import CIFAR100 as TorchvisionCIFAR100

    try:
        TorchvisionCIFAR100(data_root, train=True, download=True)
    except Exception as exc:  # offline, checksum, disk
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = os.path.abspath(os.path.join(data_root, FOLDER))
        raise DatasetNotFoundError(
            f"--download failed ({first[:200]}); put the extracted {FOLDER}/ at {where}"
        ) from None
    return find_cifar_dir(data_root)


def _get(d: dict, key: str, path: str = "CIFAR-100 pickle"):
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise DatasetError(f"CIFAR-100 file '{path}' has no '{key}' entry; is it the official cifar-100-python format?")


def _load_pickle(path: str) -> dict:
    """One CIFAR pickle; a truncated or foreign file is a one-line ``DatasetError`` (not a 30-line traceback)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... from a damaged file
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DatasetError(
            f"CIFAR-100 file '{path}' is corrupt or truncated ({reason}); "
            f"re-extract {FOLDER}/ from cifar-100-python.tar.gz"
        ) from None
    if not isinstance(entry, dict):
        raise DatasetError(f"CIFAR-100 file '{path}' holds a {type(entry).__name__}, expected the official dict")
    return entry


def _text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def load_split(data_root: str, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, 32, 32, 3), fine labels int64 (N,), class names) of one split."""
    folder = find_cifar_dir(data_root)
    path = os.path.join(folder, "train" if train else "test")
    entry = _load_pickle(path)
    raw = np.asarray(_get(entry, "data", path), dtype=np.uint8)
    if raw.size % 3072:
        raise DatasetError(f"CIFAR-100 file '{path}': 'data' has {raw.size} values, not a multiple of 3 x 32 x 32")
    data = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(_get(entry, "fine_labels", path), dtype=np.int64)
    meta = os.path.join(folder, "meta")
    classes = _text(_get(_load_pickle(meta), "fine_label_names", meta))
    if len(labels) != len(data):
        raise DatasetError(f"CIFAR-100 file '{path}': {len(data)} images but {len(labels)} labels")
    return np.ascontiguousarray(data), labels, classes


class CIFAR100(Dataset):
    """CIFAR-100 fine labels from the pickles; ``transform`` gets a PIL image."""

    def __init__(self, data_root: str, train: bool, transform=None) -> None:
        self.data, self.targets, self.classes = load_split(data_root, train)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def build_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool):
    """Train: random crop (pad 4) + flip at 32x32, then bicubic upscale; eval: upscale only."""
    upscale = transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC)
    tail = [upscale, transforms.ToTensor(), transforms.Normalize(mean, std)]
    if train:
        return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *tail])
    return transforms.Compose(tail)


def usable_workers(requested: int) -> int:
    """``requested`` capped at the CPU cores this process may run on (more only adds contention and a warning)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(requested, cores))


def build_loaders(
    cfg, mean: Sequence[float], std: Sequence[float], distributed: bool = False, train: bool = True
) -> tuple[DataLoader | None, DataLoader, list[str]]:
    """(train loader or None, val loader, class names). Under DDP both use DistributedSampler."""
    if getattr(cfg, "download", False):
        if not distributed or torch.distributed.get_rank() == 0:
            download_cifar100(cfg.data_root)
        if distributed:
            torch.distributed.barrier()
    val_set = CIFAR100(cfg.data_root, train=False, transform=build_transforms(cfg.image_size, mean, std, False))
    pin = torch.cuda.is_available()
    workers = usable_workers(int(cfg.num_workers))
    val_sampler = DistributedSampler(val_set, shuffle=False) if distributed else None
    val_loader = DataLoader(
        val_set,
        batch_size=cfg.batch_size,
        shuffle=False,
        sampler=val_sampler,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )
    train_loader = None
    if train:
        train_set = CIFAR100(cfg.data_root, train=True, transform=build_transforms(cfg.image_size, mean, std, True))
        train_sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed) if distributed else None
        train_loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            shuffle=train_sampler is None,
            sampler=train_sampler,
            num_workers=workers,
            pin_memory=pin,
            drop_last=len(train_set) > cfg.batch_size,
            persistent_workers=workers > 0,
        )
    return train_loader, val_loader, val_set.classes


def write_cifar100(
    data_root: str,
    train: tuple[np.ndarray, Sequence[int]],
    test: tuple[np.ndarray, Sequence[int]],
    classes: Sequence[str] | None = None,
) -> str:
    """Write images (N, 32, 32, 3) uint8 + fine labels in the official pickle format; returns the folder.

    Keys and names are str, as the official (Python 2) pickles read with ``encoding="latin1"``.
    """
    folder = os.path.join(data_root, FOLDER)
    os.makedirs(folder, exist_ok=True)
    classes = list(classes) if classes is not None else [f"class_{i:02d}" for i in range(100)]
    for name, (images, labels) in (("train", train), ("test", test)):
        images = np.asarray(images, dtype=np.uint8)
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
        entry = {
            "filenames": [f"{name}_{i}.png" for i in range(len(images))],
            "batch_label": f"{name} batch",
            "fine_labels": [int(v) for v in labels],
            "coarse_labels": [int(v) // 5 for v in labels],
            "data": rows,
        }
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    meta = {
        "fine_label_names": classes,
        "coarse_label_names": [f"super_{i}" for i in range(20)],
    }
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump(meta, f)
    return folder
