"""LFGM heatmaps, training curves and the confusion matrix (matplotlib, Agg backend; PNG files)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _ensure_dir(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize``: (B, 3, H, W) -> values in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device)[None, :, None, None]
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device)[None, :, None, None]
    return (images * std_t + mean_t).clamp(0, 1)


def jet_overlay(image: np.ndarray, score: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Blend a JET-coloured score map (h, w) in [0, 1], upsampled to the image, over ``image`` (H, W, 3)."""
    h, w = image.shape[:2]
    up = F.interpolate(torch.as_tensor(score, dtype=torch.float32)[None, None], size=(h, w), mode="bilinear")
    colour = matplotlib.colormaps["jet"](up[0, 0].clamp(0, 1).numpy())[..., :3]
    return np.clip((1 - weight) * image + weight * colour, 0, 1)


def plot_lfgm_heatmaps(
    images: torch.Tensor,
    scores: torch.Tensor,
    path: str,
    titles: Sequence[str] | None = None,
    dpi: int = 110,
) -> str:
    """Three rows as in the guide: originals, raw LFGM score maps (red = high frequency), JET overlays.

    ``images`` (B, 3, H, W) in [0, 1]; ``scores`` (B, h, w) in [0, 1].
    """
    images = images.detach().float().cpu()
    scores = scores.detach().float().cpu()
    n = images.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(2.6 * n, 8.0), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        axes[0, i].imshow(img)
        axes[0, i].set_title(titles[i] if titles else f"image {i}", fontsize=9)
        axes[1, i].imshow(scores[i].numpy(), cmap="jet", vmin=0, vmax=1, interpolation="nearest")
        axes[2, i].imshow(jet_overlay(img, scores[i].numpy()))
        for row in range(3):
            axes[row, i].axis("off")
    axes[1, 0].set_title("LFGM score (red = high freq.)", fontsize=9, loc="left")
    axes[2, 0].set_title("JET overlay", fontsize=9, loc="left")
    fig.tight_layout()
    _ensure_dir(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def training_curves_figure(history: Sequence[dict]):
    """Loss (train/val) and accuracy (train top-1, val top-1/top-5) per epoch, whole-epoch x ticks."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("Loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_top1"] for h in history], "o-", label="train top-1")
    ax_acc.plot(epochs, [h["val_top1"] for h in history], "o-", label="val top-1")
    ax_acc.plot(epochs, [h["val_top5"] for h in history], "o--", label="val top-5")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("Accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.tight_layout()
    return fig


def plot_training_curves(history: Sequence[dict], path: str) -> str:
    """``training_curves_figure`` saved as a PNG (11 x 4 inches at 110 dpi)."""
    fig = training_curves_figure(history)
    _ensure_dir(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion_matrix(
    matrix: np.ndarray, path: str, class_names: Sequence[str] | None = None, normalize: bool = True
) -> str:
    """Row-normalised (per true class) confusion matrix as an image; ticks named when <= 20 classes."""
    matrix = np.asarray(matrix, dtype=np.float64)
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    n = matrix.shape[0]
    size = max(6.0, min(16.0, 0.12 * n + 4))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(shown, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({'row-normalised' if normalize else 'counts'}, {n} classes)")
    if class_names is not None and n <= 20:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    fig.tight_layout()
    _ensure_dir(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
