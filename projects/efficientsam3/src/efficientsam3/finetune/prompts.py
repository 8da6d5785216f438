"""Geometry-FT prompts from SA-1B annotations.

Each annotation gives its box (`bbox`, XYWH, original pixels) and its first `point_coords` entry (the click
SAM's data engine used). Boxes are jittered per corner by N(0, 0.1 x box w|h), clamped to +-20 px (SAM3's
box-noise recipe). Prompts are sorted by area (largest first) and, when there are more than `max_prompts`,
a random subset is kept (in area order). All of an image's prompts form one geometric prompt; the batch is
right-padded with True = padding. EdgeSAM-style mode: one random annotation, 50/50 box-only or point-only.
Coordinates follow the image preprocessing (square stretch or letterbox) and are divided by IMG_SIZE;
boxes come out as normalised cx, cy, w, h (SAM3's Prompt format)."""

from __future__ import annotations

import torch

JITTER_STD = 0.1
JITTER_MAX_PX = 20.0


def _scale(orig_hw: tuple[int, int], img_size: int, mode: str) -> tuple[float, float]:
    """(sx, sy): original pixels -> preprocessed pixels, matching data.transforms.preprocess."""
    h, w = orig_hw
    if mode == "sam3":
        return img_size / w, img_size / h
    if mode != "letterbox":
        raise ValueError(f"DATA.PREPROCESS: expected sam3 or letterbox, got {mode!r}")
    s = img_size / max(h, w)
    nh, nw = min(img_size, int(h * s + 0.5)), min(img_size, int(w * s + 0.5))
    return nw / w, nh / h


def jitter_boxes(xyxy: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add N(0, 0.1 w) to x1, x2 and N(0, 0.1 h) to y1, y2, each offset clamped to +-20 px."""
    w = (xyxy[:, 2] - xyxy[:, 0]).clamp(min=0)
    h = (xyxy[:, 3] - xyxy[:, 1]).clamp(min=0)
    std = torch.stack([w, h, w, h], dim=1) * JITTER_STD
    noise = torch.randn(xyxy.shape, generator=generator, dtype=xyxy.dtype) * std
    return xyxy + noise.clamp(-JITTER_MAX_PX, JITTER_MAX_PX)


def sample_prompts(
    annotations: list[dict],
    orig_hw: tuple[int, int],
    img_size: int = 1008,
    mode: str = "sam3",
    max_prompts: int = 16,
    jitter: bool = True,
    flip: bool = False,
    single: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """boxes (N, 4) normalised cxcywh, points (N, 2) normalised xy, box_pad / point_pad (N,) True = unused."""
    if max_prompts < 1:
        raise ValueError(f"DISTILL.MAX_PROMPTS: expected >= 1, got {max_prompts}")
    h, w = orig_hw
    anns = [a for a in annotations if a.get("bbox") and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    if not anns:
        raise ValueError("annotations: no annotation with a positive-size bbox")
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
    area = torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns], dtype=torch.float64)
    pts = [a["point_coords"][0] if a.get("point_coords") else None for a in anns]
    centre = xywh[:, :2] + xywh[:, 2:] / 2
    points = torch.stack(
        [torch.tensor(p, dtype=torch.float64) if p is not None else c for p, c in zip(pts, centre, strict=True)]
    )
    order = torch.argsort(area, descending=True, stable=True)
    if single:
        order = order[torch.randint(len(order), (1,), generator=generator)]
    elif len(order) > max_prompts:
        keep = torch.randperm(len(order), generator=generator)[:max_prompts]
        order = order[keep.sort().values]
    xyxy = torch.cat([xywh[order, :2], xywh[order, :2] + xywh[order, 2:]], dim=1)
    points = points[order]
    if jitter:
        xyxy = jitter_boxes(xyxy, generator)
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
    if flip:
        xyxy = torch.stack([w - xyxy[:, 2], xyxy[:, 1], w - xyxy[:, 0], xyxy[:, 3]], dim=1)
        points = torch.stack([w - points[:, 0], points[:, 1]], dim=1)
    sx, sy = _scale(orig_hw, img_size, mode)
    xyxy = xyxy * torch.tensor([sx, sy, sx, sy], dtype=torch.float64) / img_size
    points = points * torch.tensor([sx, sy], dtype=torch.float64) / img_size
    boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
    n = len(order)
    box_pad = torch.zeros(n, dtype=torch.bool)
    point_pad = torch.zeros(n, dtype=torch.bool)
    if single:
        use_box = bool(torch.rand((), generator=generator) < 0.5)
        (point_pad if use_box else box_pad)[:] = True
    return {"boxes": boxes.float(), "points": points.float(), "box_pad": box_pad, "point_pad": point_pad}


def collate_prompts(prompts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the largest prompt count: boxes (B, N, 4), points (B, N, 2), pads (B, N) True = padding."""
    n = max(len(p["boxes"]) for p in prompts)
    b = len(prompts)
    out = {
        "boxes": torch.zeros(b, n, 4),
        "points": torch.zeros(b, n, 2),
        "box_pad": torch.ones(b, n, dtype=torch.bool),
        "point_pad": torch.ones(b, n, dtype=torch.bool),
    }
    for i, p in enumerate(prompts):
        k = len(p["boxes"])
        for name in out:
            out[name][i, :k] = p[name]
    return out


def pad_prompts(prompts: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Right-pad a collated prompt batch to n boxes and n points (padding: zeros, pad True), so a compiled frozen
    path sees one prompt shape whatever the batch's largest prompt count (padding is masked out of every
    attention and of the scoring mean, so the outputs are unchanged up to rounding)."""
    have = prompts["boxes"].shape[1]
    if prompts["points"].shape[1] != have:
        raise ValueError(f"prompts: expected as many points as boxes, got {prompts['points'].shape[1]} / {have}")
    if have > n:
        raise ValueError(f"DISTILL.MAX_PROMPTS: a batch has {have} prompts, more than {n}")
    if have == n:
        return prompts
    out = {}
    for name in ("boxes", "points", "box_pad", "point_pad"):
        v = prompts[name]
        fill = v.new_ones if v.dtype == torch.bool else v.new_zeros
        out[name] = torch.cat([v, fill(v.shape[0], n - have, *v.shape[2:])], 1)
    return out
