"""Fixtures: synthetic point dicts and the path of the real ScanNet scene in ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gitmerge3d.datasets import convert_scene

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


def _write_crop_bin(src: Path, dst: Path, x0: float, y0: float, size: float) -> Path:
    """A square column of the real scene as an mmdetection3d .bin (xyz + rgb float32)."""
    pts = np.fromfile(src, dtype=np.float32).reshape(-1, 6)
    keep = (pts[:, 0] >= x0) & (pts[:, 0] < x0 + size) & (pts[:, 1] >= y0) & (pts[:, 1] < y0 + size)
    pts[keep].tofile(dst)
    return dst


def _rotate_scene(folder: Path, quarter_turns: int, shift: float) -> None:
    """Rotate a converted scene about z by quarter turns and shift it (coord and normal files)."""
    rot = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    mat = np.linalg.matrix_power(rot, quarter_turns)
    for name in ("coord", "normal"):
        arr = np.load(folder / f"{name}.npy") @ mat.T
        if name == "coord":
            arr = arr + shift
        np.save(folder / f"{name}.npy", arr.astype(np.float32))


@pytest.fixture(scope="session")
def tiny_scannet(tmp_path_factory) -> Path:
    """A tiny Pointcept ScanNet root, every scene made by ``convert_scene`` from ../shared/data/pointcloud.

    train/scene0000_00: the labelled 100-point mmdetection3d ScanNet sample (nyu40 ids -> segment20);
    train/scene0001_00: the same, rotated a quarter turn about z and shifted by 0.3 m;
    val/scene0000_00:   the labelled sample again (so validation has labels);
    val/scene0002_00:   a 1.2 m x 1.2 m column cropped from the real 40k-point demo scene (no labels, -1).
    Normals are estimated by the converter.
    """
    pts = DATA / "mmdet3d-tests" / "scannet" / "points" / "scene0000_00.bin"
    sem = DATA / "mmdet3d-tests" / "scannet" / "semantic_mask" / "scene0000_00.bin"
    demo = DATA / "mmdet3d-scannet-demo" / "scene0000_00.bin"
    if not (pts.exists() and sem.exists() and demo.exists()):
        pytest.skip("../shared/data/pointcloud samples not found")
    root = tmp_path_factory.mktemp("scannet")
    convert_scene(pts, root / "train", name="scene0000_00", semantic_mask=sem)
    _rotate_scene(convert_scene(pts, root / "train", name="scene0001_00", semantic_mask=sem), 1, 0.3)
    convert_scene(pts, root / "val", name="scene0000_00", semantic_mask=sem)
    crop = _write_crop_bin(demo, root / "crop.bin", 3.0, 3.0, 1.2)
    convert_scene(crop, root / "val", name="scene0002_00")
    return root
