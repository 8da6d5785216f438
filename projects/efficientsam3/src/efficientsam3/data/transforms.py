"""Preprocessing shared by teacher export and student training (both must see identical pixels).

- "sam3" (default): square resize to IMG_SIZE, (x/255 - 0.5)/0.5, as SAM3 inference does.
- "letterbox" (the reference): long side to IMG_SIZE, ImageNet mean/std in 0-255 units, zero padding
  at the bottom/right; the unpadded (h, w) is returned so losses can ignore the padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def preprocess(
    image: torch.Tensor, img_size: int, mode: str, flip: bool = False
) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 (3, H, W) -> float32 (3, img_size, img_size) and the valid (h, w) inside it."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected (3, H, W), got {tuple(image.shape)}")
    h, w = image.shape[1:]
    x = image.float()[None]
    if flip:
        x = x.flip(-1)
    if mode == "sam3":
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
        x = (x / 255.0 - 0.5) / 0.5
        return x[0], (img_size, img_size)
    if mode != "letterbox":
        raise ValueError(f"DATA.PREPROCESS: expected sam3 or letterbox, got {mode!r}")
    scale = img_size / max(h, w)
    nh, nw = min(img_size, int(h * scale + 0.5)), min(img_size, int(w * scale + 0.5))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.pad(x, (0, img_size - nw, 0, img_size - nh))
    return x[0], (nh, nw)


def valid_mask(hw: torch.Tensor, img_size: int, embed_size: int) -> torch.Tensor:
    """(B, 2) valid (h, w) in pixels -> (B, S, S) bool: an embedding cell counts when more than half
    of its pixels are unpadded (the reference's downsample-and-threshold, computed exactly per axis)."""
    edges = torch.arange(embed_size + 1, dtype=torch.float64, device=hw.device) * (img_size / embed_size)
    lo, hi = edges[:-1], edges[1:]

    def cover(n: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, S) fraction of each cell below n
        return ((torch.minimum(hi, n[:, None].double()) - lo).clamp(min=0) / (hi - lo)).clamp(max=1)

    fh, fw = cover(hw[:, 0]), cover(hw[:, 1])
    return (fh[:, :, None] * fw[:, None, :]) > 0.5
