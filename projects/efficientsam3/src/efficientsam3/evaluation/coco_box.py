"""COCO val2017 box-prompt evaluation: every non-crowd instance is prompted with its ground-truth box,
the predicted mask is compared with the ground-truth mask, and the mean IoU over instances is reported
(with the per-image mean and the per-image latency). The model is anything that implements
`BoxPromptPredictor`: the filled-box baseline, or SAM3's interactive path (`predict_inst(box,
multimask_output=False)`, as the reference's eval_coco.py) on SAM3 itself, a stage-1 student or a
geometry-fine-tuned student. `--synthetic N` times the predictors on random images and boxes instead
(no COCO needed; random weights unless checkpoints are given): the GPU throughput command."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from run_kit import OneLineArgumentParser, write_json_atomic

from ..model.sam3_interactive import build_predictor

try:  # absent on the bare GPU image; needed only for real COCO annotations
    from pycocotools import mask as mask_utils
except ImportError:  # pragma: no cover
    mask_utils = None

PROG = "efficientsam3-eval-coco-box"


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
    if mask_utils is None:
        raise ValueError("--coco-ann: pycocotools is not installed (needed to decode COCO masks)")
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU; an empty union counts 0, as in the reference's eval_coco.py."""
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 0.0


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
    """Mean IoU over all non-crowd instances of the images that have any, plus latency per image
    (set_image + all its boxes, CUDA-synchronised)."""
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
        **_latency_stats(latency),
    }


def _latency_stats(latency: list[float]) -> dict:
    total = sum(latency)
    return {
        "latency_ms_mean": 1000 * statistics.fmean(latency),
        "latency_ms_median": 1000 * statistics.median(latency),
        "images_per_s": len(latency) / total if total > 0 else float("inf"),
    }


def synthetic_images(n: int, hw: tuple[int, int], boxes_per_image: int, seed: int = 0):
    """n random RGB images with random boxes (>= 8 px a side): a COCO-shaped workload without COCO."""
    rng = np.random.default_rng(seed)
    h, w = hw
    for _ in range(n):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x1, y1 = rng.uniform(0, w - 8, boxes_per_image), rng.uniform(0, h - 8, boxes_per_image)
        x2, y2 = rng.uniform(x1 + 8, w), rng.uniform(y1 + 8, h)
        yield img, np.stack([x1, y1, x2, y2], axis=1)


def time_predictor(predictor, n: int, hw: tuple[int, int], boxes_per_image: int, warmup: int = 2) -> dict:
    """Per-image latency of set_image (trunk + neck) and of the boxes (heads + upsampling), synchronised;
    the first `warmup` images are not counted."""
    enc, dec = [], []
    for i, (img, boxes) in enumerate(synthetic_images(n + warmup, hw, boxes_per_image)):
        _sync()
        t0 = time.perf_counter()
        predictor.set_image(img)
        _sync()
        t1 = time.perf_counter()
        masks = predictor.predict_boxes(boxes)
        _sync()
        t2 = time.perf_counter()
        if masks.shape != (len(boxes), *hw):
            raise ValueError(f"predictor: expected masks of shape {(len(boxes), *hw)}, got {tuple(masks.shape)}")
        if i >= warmup:
            enc.append(t1 - t0)
            dec.append(t2 - t1)
    total = [a + b for a, b in zip(enc, dec, strict=True)]
    return {
        "images": n,
        "boxes_per_image": boxes_per_image,
        "image_hw": list(hw),
        "set_image_ms_mean": 1000 * statistics.fmean(enc),
        "boxes_ms_mean": 1000 * statistics.fmean(dec),
        **_latency_stats(total),
    }


PREDICTORS = ("box", "sam3", "student", "finetuned")


def make_predictor(name: str, args, random_weights: bool = False):
    if name == "box":
        return BoxFillPredictor()
    return build_predictor(
        name,
        checkpoint=args.checkpoint,
        sam3_checkpoint=args.sam3_checkpoint,
        backbone=args.backbone,
        tiny=args.tiny,
        random_weights=random_weights,
        device=args.device,
        dtype=args.dtype,
        preprocess=args.preprocess,
        max_hole_area=args.max_hole_area,
    )


def _params(pred) -> dict:
    if not isinstance(pred, torch.nn.Module):
        return {}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"trunk_params_m": count(pred.trunk) / 1e6, "heads_params_m": count(pred.heads) / 1e6}


def _table(rows: list[dict], synthetic: bool) -> str:
    head = ["predictor", "img/s", "lat ms mean", "lat ms median"]
    head += ["set_image ms", "boxes ms", "trunk M"] if synthetic else ["mIoU", "instances"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["predictor"],
            f"{r['images_per_s']:.2f}",
            f"{r['latency_ms_mean']:.1f}",
            f"{r['latency_ms_median']:.1f}",
        ]
        if synthetic:
            cells += [f"{r['set_image_ms_mean']:.1f}", f"{r['boxes_ms_mean']:.1f}", f"{r.get('trunk_params_m', 0):.1f}"]
        else:
            cells += [f"{100 * r['miou']:.2f}", str(r["instances"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Console entry: expected failures are one line `prog: error: ...` and exit status 2."""
    try:
        return _main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--synthetic-hw: expected HxW such as 480x640, got {text!r}") from None
    if h < 16 or w < 16:
        raise ValueError(f"--synthetic-hw: expected at least 16x16, got {text!r}")
    return h, w


def _main(argv=None) -> dict:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--coco-ann", help="annotations/instances_val2017.json")
    p.add_argument("--coco-images", help="val2017/ image folder")
    p.add_argument("--predictor", nargs="+", choices=PREDICTORS, default=["box"],
                   help="box: filled-box baseline; sam3 / student / finetuned: SAM3's interactive path")  # fmt: skip
    p.add_argument("--sam3-checkpoint", default="", help="local sam3.pt (sam3; heads for a stage-1/FT checkpoint)")
    p.add_argument("--checkpoint", default="",
                   help="student / finetuned: converted checkpoint, or a stage-1 / FT training checkpoint")  # fmt: skip
    p.add_argument("--backbone", default=None, help="student backbone (default: the config's, else from shapes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="autocast dtype (default bf16 on CUDA as the reference, fp32 on CPU)")  # fmt: skip
    p.add_argument("--preprocess", choices=("sam3", "letterbox"), default="sam3",
                   help="sam3: square, mean/std 0.5 (the reference eval); letterbox: stage 1's option")  # fmt: skip
    p.add_argument("--max-hole-area", type=float, default=256.0, help="SAM3 predictor's hole filling (0: off)")
    p.add_argument("--max-images", type=int, default=-1, help="first N images with instances (-1: all)")
    p.add_argument("--synthetic", type=int, default=0,
                   help="time N random images instead (random weights unless checkpoints are given)")  # fmt: skip
    p.add_argument("--synthetic-hw", default="480x640", help="synthetic image size HxW")
    p.add_argument("--boxes-per-image", type=int, default=7, help="synthetic boxes per image (COCO val: ~7.3)")
    p.add_argument("--warmup", type=int, default=2, help="synthetic warm-up images (not timed)")
    p.add_argument("--tiny", action="store_true", help="the stand-in sizes (112 px, tiny trunk/heads): CPU tests")
    p.add_argument("--output", "--out", dest="output", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")
    if args.synthetic < 0 or args.warmup < 0 or args.boxes_per_image < 1:
        raise ValueError("--synthetic/--warmup: expected >= 0, --boxes-per-image >= 1")
    if not args.synthetic and not (args.coco_ann and args.coco_images):
        raise ValueError("--coco-ann/--coco-images: required unless --synthetic N")
    rows = []
    random_weights = bool(args.synthetic) and not (args.checkpoint or args.sam3_checkpoint)
    for name in args.predictor:
        pred = make_predictor(name, args, random_weights=random_weights)
        if args.synthetic:
            r = time_predictor(pred, args.synthetic, _hw(args.synthetic_hw), args.boxes_per_image, args.warmup)
        else:
            r = evaluate_box_prompts(args.coco_ann, args.coco_images, pred, args.max_images)
        rows.append({"predictor": name, **r, **_params(pred)})
        del pred
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device = args.device
    if str(device).startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.device(device))
    result = {
        "mode": "synthetic" if args.synthetic else "coco",
        "device": device,
        "dtype": args.dtype,
        "preprocess": args.preprocess,
        "max_hole_area": args.max_hole_area,
        "tiny": args.tiny,
        "random_weights": random_weights,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "results": rows,
    }
    if len(rows) == 1:
        result |= rows[0]
    if args.output:
        write_json_atomic(args.output, result)
    print(_table(rows, bool(args.synthetic)))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
