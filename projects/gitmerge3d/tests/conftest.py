"""Fixtures: synthetic point dicts and the path of the real ScanNet scene in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "pointcloud"


def _points(n: int = 1500, samples: int = 1, seed: int = 0, extent: float = 2.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    coord = torch.rand(n, 3, generator=g) * extent
    grid = torch.div(coord - coord.min(0).values, 0.02, rounding_mode="trunc").int()
    cuts = torch.linspace(0, n, samples + 1).long()[1:]
    return dict(coord=coord, grid_coord=grid, feat=torch.randn(n, 9, generator=g), offset=cuts)


@pytest.fixture
def make_points():
    """Factory of random point dicts (uniform in a cube, 2 cm grid, 9 feature channels)."""
    return _points


@pytest.fixture
def scannet_bin() -> Path:
    path = DATA / "mmdet3d-scannet-demo" / "scene0000_00.bin"
    if not path.exists():
        pytest.skip(f"real scene not found at {path}")
    return path
