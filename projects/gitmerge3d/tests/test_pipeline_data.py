"""Transforms, datasets and collate on tiny converted scenes (see conftest.tiny_scannet for how they are made)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from gitmerge3d.datasets.pointcept import ScanNetDataset, build_dataset, collate_fn
from gitmerge3d.datasets.transform import (
    CenterShift,
    GridSample,
    NormalizeColor,
    RandomFlip,
    RandomRotateTargetAngle,
    RandomScale,
    SphereCrop,
    fnv_hash,
)
from gitmerge3d.engine.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sonata"


def _fnv_reference(row) -> int:
    """FNV-1 64-bit over the row's values, with python ints (independent of the numpy version)."""
    h = 14695981039346656037
    for v in row:
        h = (h * 1099511628211) % 2**64
        h ^= int(v)
    return h


def test_fnv_hash_matches_python_reference():
    grid = np.array([[0, 0, 0], [1, 2, 3], [511, 7, 65000]], dtype=np.int64)
    assert fnv_hash(grid).tolist() == [_fnv_reference(r) for r in grid]


def test_center_shift_by_hand():
    d = {"coord": np.array([[0, 0, 1], [2, 4, 3]], np.float32)}
    out = CenterShift(apply_z=True)(d)["coord"]
    assert out.tolist() == [[-1, -2, 0], [1, 2, 2]]


def test_grid_sample_train_one_point_per_voxel():
    coord = np.array([[0.001, 0, 0], [0.015, 0.01, 0], [0.05, 0, 0], [0.051, 0.001, 0.001]], np.float32)
    out = GridSample(0.02, mode="train", return_grid_coord=True)({"coord": coord.copy(), "segment": np.arange(4)})
    assert len(out["coord"]) == 2  # voxels (0,0,0) and (2,0,0)
    assert sorted(out["grid_coord"][:, 0].tolist()) == [0, 2]


def test_grid_sample_test_fragments_cover_every_point_once(tiny_scannet):
    data = ScanNetDataset("val", str(tiny_scannet)).get_data(1)  # the real crop
    n = len(data["coord"])
    frags = GridSample(0.1, mode="test", return_grid_coord=True)(data)  # coarse: many points per voxel
    assert len(frags) > 1
    voted = np.concatenate([f["index"][f["vote"]] for f in frags])
    assert np.array_equal(np.sort(voted), np.arange(n))  # every point exactly once
    for f in frags:  # each fragment keeps one point per voxel
        assert len(np.unique(f["grid_coord"], axis=0)) == len(f["index"]) == len(frags[0]["index"])


def test_sphere_crop_keeps_nearest():
    coord = np.arange(10, dtype=np.float32)[:, None].repeat(3, 1)
    out = SphereCrop(point_max=3, mode="center")({"coord": coord})
    assert out["coord"][:, 0].tolist() == [4, 5, 6]


def test_train_pipeline_and_collate(tiny_scannet):
    cfg = load_config(CONFIGS / "gitmerge3d-patch-0c-scannet-ft.py", [f"data.train.data_root={tiny_scannet}"])
    ds = build_dataset(cfg.data.train)
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert a["feat"].shape[1] == 9 and a["grid_coord"].dtype == torch.int32
    assert float(a["feat"][:, 3:6].max()) <= 1.0  # NormalizeColor
    batch = collate_fn([a, b])
    assert batch["offset"].tolist() == [len(a["coord"]), len(a["coord"]) + len(b["coord"])]
    assert set(batch["segment"].tolist()) <= set(range(-1, 20))


def test_test_mode_builds_13_augmentations(tiny_scannet):
    cfg = load_config(CONFIGS / "gitmerge3d-patch-0c-scannet-ft.py", [f"data.test.data_root={tiny_scannet}"])
    item = build_dataset(cfg.data.test)[0]
    assert item["num_points"] == 100 and len(item["fragment_list"]) >= 13


def test_missing_data_root_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        ScanNetDataset("train", str(tmp_path / "nowhere"))
    assert "data_root" in str(exc.value) and "\n" not in str(exc.value)


def test_test_augmentations_by_hand():
    pts = {"coord": np.array([[1.0, 0.0, 0.5]], np.float32), "normal": np.array([[1.0, 0.0, 0.0]], np.float32)}
    rot = RandomRotateTargetAngle(angle=[1 / 2], axis="z", center=[0, 0, 0], p=1)(copy.deepcopy(pts))
    np.testing.assert_allclose(rot["coord"], [[0.0, 1.0, 0.5]], atol=1e-6)  # x-axis -> y-axis
    np.testing.assert_allclose(rot["normal"], [[0.0, 1.0, 0.0]], atol=1e-6)
    flip = RandomFlip(p=1)(copy.deepcopy(pts))
    np.testing.assert_allclose(flip["coord"], [[-1.0, 0.0, 0.5]])  # x and y mirrored (y is 0)
    scaled = RandomScale(scale=[0.95, 0.95])(copy.deepcopy(pts))
    np.testing.assert_allclose(scaled["coord"], [[0.95, 0.0, 0.475]], rtol=1e-6)
    color = NormalizeColor()({"color": np.array([[255, 0, 51]], np.uint8)})["color"]
    np.testing.assert_allclose(color, [[1.0, 0.0, 0.2]], rtol=1e-6)
