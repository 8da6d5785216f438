"""Show merged groups over an image (like ToMe's ``make_visualization``) and write it as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _patch_groups(source: torch.Tensor, num_prefix_tokens: int) -> np.ndarray:
    """Group id per input token from a dense (N', N0) source or an integer (N0,) source index."""
    dense = source.dtype.is_floating_point
    if source.dim() == (3 if dense else 2):
        source = source[0]
    if source.dim() != (2 if dense else 1):
        raise ValueError(f"source must be (N', N0) dense or (N0,) integer for one image, got {tuple(source.shape)}")
    groups = source.argmax(dim=0) if dense else source
    return groups[num_prefix_tokens:].cpu().numpy()


def make_visualization(
    img: Image.Image | np.ndarray,
    source: torch.Tensor,
    patch_size: int = 16,
    class_token: bool = True,
    *,
    num_prefix_tokens: int | None = None,
    path: str | Path | None = None,
) -> Image.Image:
    """Paint each merged group with its mean colour and outline group borders.

    ``source``: ToMe's dense map (1, N', N0) / (N', N0) or merge-core's integer index (1, N0) / (N0,).
    ``num_prefix_tokens`` overrides ``class_token`` (e.g. 5 for CLS + 4 registers). Writes ``path`` if given.
    """
    prefix = int(class_token) if num_prefix_tokens is None else num_prefix_tokens
    array = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"img must be an RGB image (H, W, 3), got shape {array.shape}")
    if array.max() > 1.0:
        array = array / 255.0
    groups = _patch_groups(source, prefix)
    h, w = array.shape[0] // patch_size, array.shape[1] // patch_size
    if groups.size != h * w:
        raise ValueError(f"source covers {groups.size} patches but the image has {h}x{w} patches of {patch_size}")
    array = array[: h * patch_size, : w * patch_size]
    pixel_groups = np.repeat(np.repeat(groups.reshape(h, w), patch_size, 0), patch_size, 1)
    flat_groups = pixel_groups.reshape(-1)
    count = np.bincount(flat_groups, minlength=flat_groups.max() + 1).astype(np.float32)
    colour = (
        np.stack(
            [np.bincount(flat_groups, weights=array[..., ch].reshape(-1), minlength=count.size) for ch in range(3)], -1
        )
        / np.maximum(count, 1)[:, None]
    )
    out = colour[pixel_groups]
    border = np.zeros(pixel_groups.shape, dtype=bool)
    border[:, 1:] |= pixel_groups[:, 1:] != pixel_groups[:, :-1]
    border[1:, :] |= pixel_groups[1:, :] != pixel_groups[:-1, :]
    out[border] = 1.0
    image = Image.fromarray((out * 255).round().astype(np.uint8))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return image
