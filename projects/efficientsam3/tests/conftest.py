"""Fixtures: SA-1B-format folders built from scikit-image photos with pycocotools-encoded masks
(no SA-1B data may be redistributed), and tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def _photo(name: str, scale: int = 4) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    return np.ascontiguousarray(img[::scale, ::scale])


def make_sa1b(root: Path, split: str = "train", n: int = 4, scale: int = 4) -> list[str]:
    """n photos as sa_<i>.jpg with two rectangle masks each (RLE, XYWH bbox, point_coords)."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n):
        img = _photo(PHOTOS[i % len(PHOTOS)], scale)
        h, w = img.shape[:2]
        key = f"sa_{1000 + i}"
        Image.fromarray(img).save(root / "images" / split / f"{key}.jpg", quality=95)
        anns = []
        for j, (y0, x0, y1, x1) in enumerate(((2, 3, h // 2, w // 3), (h // 3, w // 2, h - 2, w - 4))):
            m = np.zeros((h, w), np.uint8)
            m[y0:y1, x0:x1] = 1
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            anns.append(
                {
                    "id": j,
                    "segmentation": rle,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(m.sum()),
                    "point_coords": [[(x0 + x1) / 2, (y0 + y1) / 2]],
                    "predicted_iou": 0.9,
                    "stability_score": 0.95,
                    "crop_box": [0, 0, w, h],
                }
            )
        meta = {"image": {"image_id": i, "width": w, "height": h, "file_name": f"{key}.jpg"}, "annotations": anns}
        (root / "annotations" / split / f"{key}.json").write_text(json.dumps(meta))
        keys.append(key)
    return keys


@pytest.fixture
def sa1b(tmp_path: Path) -> Path:
    root = tmp_path / "sa-1b"
    make_sa1b(root, "train", 4)
    return root


TINY_CFG = """
DATA:
  IMG_SIZE: 64
  BATCH_SIZE: 2
  NUM_WORKERS: 0
MODEL:
  BACKBONE: efficientvit_b0
TEACHER:
  TYPE: standin
DISTILL:
  EMBED_DIM: 16
  EMBED_SIZE: 8
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
AMP_ENABLE: False
PRINT_FREQ: 1
"""


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_CFG)
    return p


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
