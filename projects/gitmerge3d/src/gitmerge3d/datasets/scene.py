"""Pointcept scene folder -> model input (the validation transform: CenterShift, GridSample, NormalizeColor).

GridSample here keeps the first point of each 2 cm voxel (deterministic; Pointcept's train mode keeps a
random one), which is what the FLOPs/latency tool needs; the full transform pipeline is issue 12's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

REQUIRED = ("coord.npy", "color.npy", "normal.npy")


def load_scene(folder: str | Path) -> dict[str, np.ndarray]:
    folder = Path(folder)
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"scene folder '{folder}' lacks {', '.join(missing)} (convert it with gitmerge3d-convert)"
        )
    return {p.stem: np.load(p) for p in sorted(folder.glob("*.npy"))}


def tile_scene(scene: dict[str, np.ndarray], copies: int, gap: float = 0.5) -> dict[str, np.ndarray]:
    """``copies`` side-by-side translated copies along x (a bigger scene with the same statistics)."""
    if copies < 1:
        raise ValueError(f"--tile must be >= 1, got {copies}")
    width = float(scene["coord"][:, 0].max() - scene["coord"][:, 0].min()) + gap
    out = {}
    for key, arr in scene.items():
        parts = []
        for i in range(copies):
            part = arr.copy()
            if key == "coord":
                part[:, 0] += i * width
            parts.append(part)
        out[key] = np.concatenate(parts)
    return out


def prepare_input(scene: dict[str, np.ndarray], grid_size: float = 0.02, device="cpu") -> dict[str, torch.Tensor]:
    """Model input dict (coord, grid_coord, feat = coord|color/255|normal, offset) of one scene."""
    coord = scene["coord"].astype(np.float32)
    coord = coord - np.array([*(coord.min(0)[:2] + coord.max(0)[:2]) / 2, coord.min(0)[2]], dtype=np.float32)
    grid = np.floor((coord - coord.min(0)) / grid_size).astype(np.int64)
    _, keep = np.unique(grid, axis=0, return_index=True)
    keep = np.sort(keep)
    color = scene["color"][keep].astype(np.float32) / 255.0
    feat = np.concatenate([coord[keep], color, scene["normal"][keep].astype(np.float32)], 1)
    return {
        "coord": torch.from_numpy(coord[keep]).to(device),
        "grid_coord": torch.from_numpy(grid[keep]).int().to(device),
        "feat": torch.from_numpy(feat).to(device),
        "offset": torch.tensor([len(keep)], device=device),
    }
