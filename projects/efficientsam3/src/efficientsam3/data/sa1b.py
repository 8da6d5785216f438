"""SA-1B in the layout `images/{split}/<stem>.jpg` + `annotations/{split}/<stem>.json` (COCO RLE masks,
XYWH boxes, point_coords). Unreadable or missing files are counted skips, never a crash mid-epoch:
__getitem__ returns None and `collate` drops it and counts it."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from ..store import EmbeddingStore
from .transforms import preprocess


def augmentation_seed(key: str, epoch: int = 0) -> int:
    """Deterministic int32 seed per (key, epoch); stored with the teacher record."""
    return zlib.crc32(f"{key}:{epoch}".encode()) & 0x7FFFFFFF


def load_annotations(path: str | Path) -> list[dict]:
    """The annotation list of one SA-1B json; one-line error for a malformed file."""
    try:
        data = json.loads(Path(path).read_text())
        anns = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an SA-1B annotation file ({type(e).__name__}: {e})") from None
    return anns


def decode_mask(ann: dict) -> np.ndarray:
    """(h, w) uint8 mask from a compressed-RLE (or polygon / uncompressed RLE) segmentation."""
    seg = ann["segmentation"]
    if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
        return mask_utils.decode(seg)
    h, w = seg["size"] if isinstance(seg, dict) else (ann["height"], ann["width"])
    rles = mask_utils.frPyObjects(seg, h, w)
    return mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)


def load_image(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class SA1BDataset(Dataset):
    """Images of one split; with a store, only keys that have a teacher record (the rest are counted as
    `no_embedding` skips, or an error with strict=True)."""

    def __init__(
        self,
        root: str,
        split: str = "train",
        img_size: int = 1008,
        preprocess_mode: str = "sam3",
        store: EmbeddingStore | None = None,
        num_samples: int = -1,
        aug_flip: bool = False,
        with_annotations: bool = False,
        strict: bool = False,
        keys: list[str] | None = None,
        target_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.root = Path(root)
        image_dir = self.root / "images" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"DATA.DATA_PATH: {image_dir} not found (expected images/{split}/*.jpg)")
        self.image_dir = image_dir
        self.ann_dir = self.root / "annotations" / split
        self.img_size, self.mode, self.store = img_size, preprocess_mode, store
        self.aug_flip, self.with_annotations = aug_flip, with_annotations
        self.target_dtype = target_dtype  # float16: workers ship half the bytes, the trainer casts on the GPU
        self.epoch = 0
        self.skips: dict[str, int] = {"no_embedding": 0, "no_annotation": 0}
        stems = sorted(p.stem for p in image_dir.glob("*.jpg")) if keys is None else list(keys)
        kept = []
        for stem in stems:
            if store is not None and stem not in store:
                if strict:
                    store.get(stem)  # raises the one-line MissingEmbeddingError
                self.skips["no_embedding"] += 1
                continue
            if with_annotations and not (self.ann_dir / f"{stem}.json").exists():
                if strict:
                    raise FileNotFoundError(f"annotation {self.ann_dir / (stem + '.json')} not found")
                self.skips["no_annotation"] += 1
                continue
            kept.append(stem)
        if num_samples > 0:
            kept = kept[:num_samples]
        if not kept:
            raise ValueError(f"DATA.DATA_PATH: no usable images in {image_dir} ({self.skips})")
        self.keys = kept

    def __len__(self) -> int:
        return len(self.keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict | None:
        key = self.keys[i]
        item: dict = {"key": key}
        try:
            if self.store is not None:
                seed, target = self.store.get(key, self.target_dtype)
                item["target"] = target
            else:
                seed = augmentation_seed(key, self.epoch) if self.aug_flip else 0
            image = load_image(self.image_dir / f"{key}.jpg")
            if self.with_annotations:
                item["annotations"] = load_annotations(self.ann_dir / f"{key}.json")
        except (OSError, ValueError, KeyError):
            return None
        item["seed"] = seed
        item["orig_hw"] = tuple(image.shape[1:])
        item["image"], hw = preprocess(image, self.img_size, self.mode, flip=self.aug_flip and bool(seed & 1))
        item["hw"] = torch.tensor(hw)
        return item


def collate(items: list[dict | None]) -> dict:
    """Stack tensors, keep lists for the rest, count the dropped (None) items as `skipped`."""
    good = [it for it in items if it is not None]
    out: dict = {"skipped": len(items) - len(good), "key": [it["key"] for it in good]}
    if not good:
        return out
    out["image"] = torch.stack([it["image"] for it in good])
    out["hw"] = torch.stack([it["hw"] for it in good])
    out["seed"] = torch.tensor([it["seed"] for it in good], dtype=torch.int64)
    if "target" in good[0]:
        out["target"] = torch.stack([it["target"] for it in good])
    if "annotations" in good[0]:
        out["annotations"] = [it["annotations"] for it in good]
    out["orig_hw"] = [it["orig_hw"] for it in good]
    return out
