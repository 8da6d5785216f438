"""Converter, scene preparation and the benchmark CLI (reduced model, CPU), on the real ScanNet scene."""

import json

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from gitmerge3d import merging
from gitmerge3d.datasets import convert_scene, estimate_normals, load_scene, prepare_input, tile_scene
from gitmerge3d.models import PointTransformerV3
from gitmerge3d.models.presets import reduced_config
from gitmerge3d.tools import bench, convert

TESTS = "/work/shared/data/pointcloud/mmdet3d-tests"


def test_convert_real_scene_and_run_reduced_model(scannet_bin, tmp_path):
    scene_dir = convert_scene(scannet_bin, tmp_path, normals="zero")
    scene = load_scene(scene_dir)
    raw = np.fromfile(scannet_bin, dtype=np.float32).reshape(-1, 6)
    assert scene["coord"].shape == (40684, 3) and scene["color"].dtype == np.uint8
    np.testing.assert_array_equal(scene["coord"], raw[:, :3])
    assert not scene["normal"].any()
    # a crop keeps the CPU test fast; the model sees real geometry and colours
    keep = np.nonzero(scene["coord"][:, 0] < scene["coord"][:, 0].min() + 1.5)[0]
    crop = {k: v[keep] for k, v in scene.items()}
    inputs = prepare_input(crop)
    assert inputs["feat"].shape[1] == 9 and 0 <= float(inputs["feat"][:, 3:6].min())
    torch.manual_seed(0)
    model = PointTransformerV3(**reduced_config("0c"))
    merging.patch(model, {"tome": "patch", "r": 0.9})
    out = model(inputs)["feat"]
    out.square().mean().backward()
    assert out.shape[0] == inputs["coord"].shape[0] and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_convert_labels_and_ply(tmp_path):
    pts = f"{TESTS}/scannet/points/scene0000_00.bin"
    scene = convert_scene(
        pts,
        tmp_path,
        semantic_mask=f"{TESTS}/scannet/semantic_mask/scene0000_00.bin",
        instance_mask=f"{TESTS}/scannet/instance_mask/scene0000_00.bin",
    )
    seg = np.load(scene / "segment20.npy")
    nyu = np.fromfile(f"{TESTS}/scannet/semantic_mask/scene0000_00.bin", dtype=np.int64)
    # nyu40 -> ScanNet20 by hand: wall 1 -> 0, floor 2 -> 1, chair 5 -> 4, otherfurniture 39 -> 19, 13 -> ignore
    lut = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 8: 7, 9: 8, 10: 9, 11: 10, 12: 11, 14: 12, 16: 13}
    lut |= {24: 14, 28: 15, 33: 16, 34: 17, 36: 18, 39: 19}
    assert seg.tolist() == [lut.get(int(v), -1) for v in nyu]
    assert np.load(scene / "normal.npy").shape == (100, 3)
    # ply with normals and colours
    v = np.zeros(
        4, dtype=[(a, "f4") for a in ("x", "y", "z", "nx", "ny", "nz")] + [(c, "u1") for c in ("red", "green", "blue")]
    )
    v["x"] = [0, 1, 0, 0]
    v["nz"] = 1.0
    v["red"] = [10, 20, 30, 40]
    PlyData([PlyElement.describe(v, "vertex")]).write(str(tmp_path / "room.ply"))
    out = load_scene(convert_scene(tmp_path / "room.ply", tmp_path / "ply", normals="file"))
    assert out["color"][:, 0].tolist() == [10, 20, 30, 40] and np.all(out["normal"][:, 2] == 1)


def test_estimated_normals_of_a_plane():
    g = np.random.default_rng(0)
    plane = np.c_[g.random((200, 2)), np.full(200, 0.5)].astype(np.float32)
    n = estimate_normals(plane)
    np.testing.assert_allclose(np.abs(n[:, 2]), 1.0, atol=1e-4)


def test_convert_errors(tmp_path, capsys):
    assert convert.main([str(tmp_path / "nope.bin"), str(tmp_path)]) == 2
    assert "input scene" in capsys.readouterr().err
    (tmp_path / "bad.bin").write_bytes(np.zeros(7, dtype=np.float32).tobytes())
    assert convert.main([str(tmp_path / "bad.bin"), str(tmp_path)]) == 2
    assert "--bin-dims=6" in capsys.readouterr().err
    (tmp_path / "a.xyz").write_text("0 0 0")
    with pytest.raises(ValueError, match="must be a .ply or an mmdetection3d .bin"):
        convert_scene(tmp_path / "a.xyz", tmp_path)


def test_tile_scene():
    scene = {"coord": np.array([[0, 0, 0], [1, 0, 0]], np.float32), "color": np.zeros((2, 3), np.uint8)}
    tiled = tile_scene(scene, 3, gap=0.5)
    assert tiled["coord"][:, 0].tolist() == [0, 1, 1.5, 2.5, 3.0, 4.0]


def test_bench_cli_on_cpu(scannet_bin, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = bench.main(
        ["--scene", str(scannet_bin), "--reduced", "--rows", "r0-flash,patch@0.9", "--warmup", "0", "--iters", "1"]
        + ["--grid-size", "0.08", "--out", str(out), "--no-amp", "--normals", "zero"]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    r0, merged = res["rows"]
    assert res["points_raw"] == 40684 and r0["peak_mem_gib"] is None
    assert merged["attention_gmacs"] < r0["attention_gmacs"] and merged["whole_model_gmacs"] < r0["whole_model_gmacs"]
    assert "| patch@0.9 |" in capsys.readouterr().out
    out2 = tmp_path / "macs.json"
    assert bench.main(["--scene", str(out.parent / ".gitmerge3d-bench-scene" / "scene"), "--reduced", "--macs-only"]
                      + ["--rows", "patch@0.9", "--grid-size", "0.08", "--out", str(out2)]) == 0  # fmt: skip
    only = json.loads(out2.read_text())["rows"][0]
    assert only["latency_ms"] is None and only["attention_gmacs"] == merged["attention_gmacs"]
    assert bench.main(["--scene", str(scannet_bin), "--rows", "patch@1.5"]) == 2
    assert "--rows entry" in capsys.readouterr().err
