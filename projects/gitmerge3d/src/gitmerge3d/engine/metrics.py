"""Semantic-segmentation metrics pooled over a whole dataset (Pointcept's mIoU / mAcc / allAcc).

Intersections and unions are summed over every scene first, then divided (not averaged per scene).
Classes with no ground truth and no prediction anywhere are left out of the means (Pointcept counts them
as IoU 0; that only matters on tiny data where a class never appears).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = -1) -> torch.Tensor:
    """(C, C) counts, rows = ground truth, columns = prediction; ``ignore_index`` targets are dropped."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def summarize(conf: np.ndarray | torch.Tensor) -> dict:
    """mIoU, mAcc, allAcc and per-class IoU/accuracy (NaN for classes absent from target and prediction)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    target = conf.sum(1)
    union = target + conf.sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(target > 0, tp / target, np.nan)
    return {
        "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "allAcc": float(tp.sum() / target.sum()) if target.sum() > 0 else float("nan"),
        "iou": iou.tolist(),
        "acc": acc.tolist(),
    }


def format_table(summary: dict, names: Sequence[str]) -> str:
    """Per-class IoU/accuracy table plus the headline numbers, as text."""
    lines = [f"{'class':<24} {'IoU':>8} {'Acc':>8}"]
    for name, iou, acc in zip(names, summary["iou"], summary["acc"], strict=True):
        lines.append(f"{name:<24} {iou:>8.4f} {acc:>8.4f}")
    lines.append(f"mIoU/mAcc/allAcc {summary['mIoU']:.4f}/{summary['mAcc']:.4f}/{summary['allAcc']:.4f}")
    return "\n".join(lines)
