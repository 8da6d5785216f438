"""COCO val2017 box-prompt evaluation: every non-crowd instance is prompted with its ground-truth box,
the predicted mask is compared with the ground-truth mask, and the mean IoU over instances is reported
(with the per-image mean and the per-image latency). The model is anything that implements
`BoxPromptPredictor`, so SAM3, a stage-1 student and a fine-tuned one are scored by the same loop."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from run_kit import OneLineArgumentParser, write_json_atomic

from ..engine.common import run_cli


class BoxPromptPredictor(Protocol):
    def set_image(self, image: np.ndarray) -> None:
        """Encode one RGB uint8 (H, W, 3) image."""

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(N, 4) float boxes in image pixels -> (N, H, W) bool masks, one per box."""


class BoxFillPredictor:
    """The filled prompt box as the mask: the lower bound any box-prompted segmenter should beat."""

    def set_image(self, image: np.ndarray) -> None:
        self.hw = image.shape[:2]

    def predict_boxes(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        out = np.zeros((len(boxes_xyxy), *self.hw), dtype=bool)
        for m, (x1, y1, x2, y2) in zip(out, np.rint(boxes_xyxy).astype(int), strict=True):
            m[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)] = True
        return out


def gt_mask(ann: dict, h: int, w: int) -> np.ndarray:
    """(h, w) bool mask from a polygon, uncompressed or compressed RLE segmentation."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def load_coco(ann_file: str | Path) -> tuple[list[dict], dict[int, list[dict]]]:
    """(images, non-crowd annotations by image id); one-line error for a bad file."""
    try:
        data = json.loads(Path(ann_file).read_text())
        images = data["images"]
        anns: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            if not a.get("iscrowd", 0):
                anns.setdefault(a["image_id"], []).append(a)
    except FileNotFoundError:
        raise FileNotFoundError(f"--coco-ann: file not found: {ann_file}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--coco-ann: {ann_file} is not a COCO instances file ({type(e).__name__}: {e})") from None
    return images, anns


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def evaluate_box_prompts(
    ann_file: str | Path, image_dir: str | Path, predictor: BoxPromptPredictor, max_images: int = -1
) -> dict:
    """Mean IoU over all non-crowd instances of the images that have any, plus latency per image."""
    images, anns = load_coco(ann_file)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"--coco-images: folder not found: {image_dir}")
    images = [im for im in sorted(images, key=lambda im: im["id"]) if im["id"] in anns]
    if max_images > 0:
        images = images[:max_images]
    ious: list[float] = []
    per_image: list[float] = []
    latency: list[float] = []
    for info in images:
        path = image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"--coco-images: {path} not found")
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        h, w = rgb.shape[:2]
        group = anns[info["id"]]
        xywh = np.array([a["bbox"] for a in group], dtype=np.float64)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        _sync()
        t0 = time.perf_counter()
        predictor.set_image(rgb)
        masks = predictor.predict_boxes(boxes)
        _sync()
        latency.append(time.perf_counter() - t0)
        if masks.shape != (len(group), h, w):
            raise ValueError(f"predictor: expected masks of shape {(len(group), h, w)}, got {tuple(masks.shape)}")
        img_ious = [mask_iou(np.asarray(m, dtype=bool), gt_mask(a, h, w)) for m, a in zip(masks, group, strict=True)]
        ious.extend(img_ious)
        per_image.append(float(np.mean(img_ious)))
    if not ious:
        raise ValueError(f"--coco-ann: no non-crowd instances in {ann_file}")
    return {
        "images": len(images),
        "instances": len(ious),
        "miou": float(np.mean(ious)),
        "miou_per_image": float(np.mean(per_image)),
        "latency_ms_mean": 1000 * statistics.fmean(latency),
        "latency_ms_median": 1000 * statistics.median(latency),
        "images_per_s": len(latency) / sum(latency) if sum(latency) > 0 else float("inf"),
    }


PREDICTORS = {"box": BoxFillPredictor}


def main(argv=None) -> dict:
    return run_cli("efficientsam3-eval-coco-box", _main, argv)


def _main(argv=None) -> dict:
    p = OneLineArgumentParser(prog="efficientsam3-eval-coco-box", description=__doc__.splitlines()[0])
    p.add_argument("--coco-ann", required=True, help="annotations/instances_val2017.json")
    p.add_argument("--coco-images", required=True, help="val2017/ image folder")
    p.add_argument("--predictor", choices=sorted(PREDICTORS), default="box", help="box: filled-box baseline")
    p.add_argument("--max-images", type=int, default=-1, help="first N images with instances (-1: all)")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    r = evaluate_box_prompts(args.coco_ann, args.coco_images, PREDICTORS[args.predictor](), args.max_images)
    r["predictor"] = args.predictor
    if args.output:
        write_json_atomic(args.output, r)
    print(json.dumps(r, indent=1))
    return r
