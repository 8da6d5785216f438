"""Mix3D collate, SphereCrop mode='all' (test-time crop), the scipy-free ElasticDistortion, the unpadded
validation shards and the config/test_cfg key checks. Scenes: ``conftest.tiny_scannet`` (converted real samples).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from gitmerge3d.datasets.pointcept import ScanNetDataset, build_dataset, point_collate_fn
from gitmerge3d.datasets.transform import SphereCrop, gaussian_smooth, trilinear
from gitmerge3d.engine.build import build_model
from gitmerge3d.engine.config import ConfigError, load_config
from gitmerge3d.engine.trainer import ShardSampler, _loader
from gitmerge3d.tools import demo_data
from run_kit import DistEnv

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sonata"
CFG_0C = CONFIGS / "gitmerge3d-patch-0c-scannet-ft.py"
DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "pointcloud"


def _sample(n: int, first_instance: int, tag: float) -> dict:
    return {
        "coord": torch.full((n, 3), tag),
        "segment": torch.arange(n),
        "instance": torch.tensor([first_instance + i if i % 2 == 0 else -1 for i in range(n)]),
        "offset": torch.tensor([n]),
        "name": f"s{tag}",
    }


def test_mix3d_pairs_scenes_by_hand():
    batch = [_sample(2, 0, 0.0), _sample(3, 0, 1.0), _sample(1, 5, 2.0)]
    plain = point_collate_fn(batch, mix_prob=0.0)
    assert plain["offset"].tolist() == [2, 5, 6]
    mixed = point_collate_fn([{k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()} for b in batch], 1.0)
    # samples 0 and 1 overlay into one scene (offset 5), the odd last sample stays alone
    assert mixed["offset"].tolist() == [5, 6]
    assert torch.equal(mixed["coord"], plain["coord"]) and torch.equal(mixed["segment"], plain["segment"])
    # instances: sample 0 has ids [0, -1] (max 0) -> sample 1's ids [0, -1, 2] become [1, -1, 3]; sample 2 unpaired
    assert mixed["instance"].tolist() == [0, -1, 1, -1, 3, 5]
    four = point_collate_fn([_sample(1, 0, float(i)) for i in range(4)], 1.0)
    assert four["offset"].tolist() == [2, 4]
    assert point_collate_fn([_sample(4, 0, 0.0)], 1.0)["offset"].tolist() == [4]


def test_mix3d_probability_is_honoured():
    np.random.seed(0)
    mixed = sum(len(point_collate_fn([_sample(1, 0, 0.0), _sample(1, 0, 1.0)], 0.8)["offset"]) == 1 for _ in range(400))
    assert 280 < mixed < 360  # binomial(400, 0.8): mean 320, sd 8


def test_train_loader_mixes_and_the_model_runs_on_a_mixed_scene(tiny_scannet):
    cfg = load_config(CFG_0C, [f"data.train.data_root={tiny_scannet}"])
    assert cfg.mix_prob == 0.8
    ds = build_dataset(cfg.data.train)
    batch = next(iter(_loader(ds, 2, 0, DistEnv(), shuffle=True, mix_prob=1.0)))
    assert len(batch["offset"]) == 1 and int(batch["offset"][0]) == len(batch["coord"])
    cfg.model.backbone.update(
        enc_depths=(1,) * 5,
        enc_channels=(16, 16, 32, 32, 32),
        enc_num_head=(2, 2, 4, 4, 4),
        enc_patch_size=(32,) * 5,
        dec_depths=(1,) * 4,
        dec_channels=(16, 16, 32, 32),
        dec_num_head=(2, 2, 4, 4),
        dec_patch_size=(32,) * 4,
    )
    cfg.model.backbone_out_channels = 16
    model = build_model(cfg.model)
    logits = model(batch)
    assert logits.shape == (len(batch["coord"]), 20)
    logits.sum().backward()  # overlaid scenes share grid cells: the sparse convs and pooling still run


def test_gaussian_smooth_and_trilinear_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    interpolate = pytest.importorskip("scipy.interpolate")
    rng = np.random.default_rng(0)
    field = rng.standard_normal((7, 5, 9, 3)).astype(np.float32)
    ref = ndimage.gaussian_filter(field, sigma=(1, 1, 1, 0), mode="nearest")
    np.testing.assert_allclose(gaussian_smooth(field, (0, 1, 2)), ref, atol=1e-6)
    lo, step = np.array([-0.3, 0.1, 0.2]), 0.2
    axes = [np.linspace(lo[d], lo[d] + step * (field.shape[d] - 1), field.shape[d]) for d in range(3)]
    interp = interpolate.RegularGridInterpolator(axes, field, bounds_error=False, fill_value=0.0)
    pts = lo + rng.uniform(-0.1, 1.05, (500, 3)) * (np.array(field.shape[:3]) - 1) * step  # some outside
    np.testing.assert_allclose(trilinear(field, lo, step, pts), interp(pts), atol=1e-9)


def _pointcept_crop_all(coord: np.ndarray, point_max: int) -> list[np.ndarray]:
    """Reference of Pointcept's SphereCrop(mode='all') index rule (v1.5 transform.py), for comparison."""
    coord_p, idx_uni, crops = np.random.rand(coord.shape[0]) * 1e-3, np.array([]), []
    index = np.arange(coord.shape[0])
    while idx_uni.size != index.shape[0]:
        init_idx = np.argmin(coord_p)
        dist2 = np.sum(np.power(coord - coord[init_idx], 2), 1)
        idx_crop = np.argsort(dist2)[:point_max]
        crops.append(index[idx_crop])
        weight = dist2[idx_crop]
        coord_p[idx_crop] += np.square(1 - weight / np.max(weight))
        idx_uni = np.unique(np.concatenate((idx_uni, index[idx_crop])))
    return crops


def test_sphere_crop_all_matches_pointcept_and_votes_each_point_once(tiny_scannet):
    data = ScanNetDataset("val", str(tiny_scannet)).get_data(1)  # the real 1.2 m column
    n = len(data["coord"])
    limit = n // 3
    np.random.seed(7)
    ref = _pointcept_crop_all(data["coord"], limit)
    np.random.seed(7)
    parts = SphereCrop(point_max=limit, mode="all")({**data, "vote": np.ones(n, dtype=bool)})
    assert len(parts) == len(ref) >= 3
    for part, idx in zip(parts, ref, strict=True):
        assert np.array_equal(np.sort(part["index"]), np.sort(idx))
        assert np.array_equal(part["coord"], data["coord"][part["index"]])
    voted = np.concatenate([p["index"][p["vote"]] for p in parts])
    assert np.array_equal(np.sort(voted), np.arange(n))  # overlapping crops, but one vote per point
    whole = SphereCrop(point_max=n, mode="all")(dict(data))
    assert len(whole) == 1 and np.array_equal(whole[0]["index"], np.arange(n))


def _test_cfg_dataset(tiny_scannet, *options: str) -> ScanNetDataset:
    cfg = load_config(CFG_0C, [f"data.test.data_root={tiny_scannet}", *options])
    return build_dataset(cfg.data.test)


def test_test_cfg_crop_splits_fragments_and_keeps_one_vote_per_point(tiny_scannet):
    crop = "data.test.test_cfg.crop={'type': 'SphereCrop', 'point_max': 64, 'mode': 'all'}"
    ds = _test_cfg_dataset(tiny_scannet, crop)
    plain = _test_cfg_dataset(tiny_scannet)
    item, base = ds[1], plain[1]  # the real column (191 points, one fragment per augmentation)
    n = item["num_points"]
    assert len(item["fragment_list"]) > len(base["fragment_list"])
    assert max(len(f["coord"]) for f in item["fragment_list"]) <= 64
    counts = np.zeros(n, dtype=int)
    for f in item["fragment_list"]:
        np.add.at(counts, f["index"][f["vote"]].numpy(), 1)
    assert (counts == 13).all()  # 13 augmentations, one vote each


def test_unsupported_keys_are_one_line_errors(tiny_scannet):
    bad = [
        ("data.test.test_cfg.scale2kitti=None", "test_cfg.scale2kitti"),
        ("data.test.test_cfg.crop={'type': 'SphereCrop', 'point_max': 10, 'mode': 'random'}", "mode='all'"),
        ("data.test.test_cfg.crop=dict(type='SphereCrop')", "a transform must be a dict"),
        ("data.test.lr_file='x'", "'lr_file'"),
    ]
    for opt, word in bad:
        with pytest.raises(ValueError) as exc:
            _test_cfg_dataset(tiny_scannet, opt)
        assert word in str(exc.value) and "\n" not in str(exc.value)
    for opt, word in [("hooks=[]", "'hooks'"), ("mix_prob=1.5", "mix_prob"), ("eval_epoch=3", "eval_epoch")]:
        with pytest.raises(ConfigError) as exc:
            load_config(CFG_0C, [opt])
        assert word in str(exc.value) and "\n" not in str(exc.value)
    cfg = load_config(CFG_0C, [f"data.train.data_root={tiny_scannet}"])
    cfg.data.train.transform.append(dict(type="SphereCrop", point_max=10, mode="all"))
    with pytest.raises(ValueError, match="test_cfg.crop only"):
        build_dataset(cfg.data.train)


def test_validation_shards_count_every_scene_once():
    shards = [list(ShardSampler(5, r, 2)) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    padded = [list(DistributedSampler(range(5), num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert sum(map(len, padded)) == 6  # what DistributedSampler would have done: scene 0 twice


def test_eval_loader_under_ddp_takes_its_shard(tiny_scannet):
    cfg = load_config(CFG_0C, [f"data.val.data_root={tiny_scannet}"])
    ds = build_dataset(cfg.data.val)
    env = DistEnv(rank=1, world_size=2, distributed=True, is_main=False)
    names = [b["name"][0] for b in _loader(ds, 1, 0, env, shuffle=False)]
    assert names == ["scene0002_00"]  # rank 1 of 2 over [scene0000_00, scene0002_00]


def test_demo_data_for_the_ddp_script(tmp_path):
    """gitmerge3d.tools.demo_data (what scripts/ddp_gpu_run.sh trains on) from the ../shared samples."""
    src = tmp_path / "src"
    for rel, dst in [
        ("mmdet3d-scannet-demo/scene0000_00.bin", "scene0000_00.bin"),
        ("mmdet3d-tests/scannet/points/scene0000_00.bin", "points/scene0000_00.bin"),
        ("mmdet3d-tests/scannet/semantic_mask/scene0000_00.bin", "semantic_mask/scene0000_00.bin"),
    ]:
        if not (DATA / rel).is_file():
            pytest.skip("../shared/data/pointcloud samples not found")
        (src / dst).parent.mkdir(parents=True, exist_ok=True)
        (src / dst).write_bytes((DATA / rel).read_bytes())
    out = tmp_path / "demo"
    assert demo_data.main([str(src), str(out), "--max-points", "300", "--normals", "zero"]) == 0
    assert len(list((out / "train").iterdir())) == 8 and len(list((out / "val").iterdir())) == 3
    demo = np.fromfile(src / "scene0000_00.bin", dtype=np.float32).reshape(-1, 6)[:, :3]
    cols = [np.load(out / "train" / f"scene{100 + k:04d}_00" / "coord.npy") for k in range(4)]
    assert all(len(c) == 300 for c in cols)  # every quarter of the 40k-point scene has more than 300 points
    rows = {tuple(r) for r in demo}
    assert all(tuple(r) in rows for c in cols for r in c)  # real points, unchanged
    a = np.load(out / "val" / "scene0000_00" / "coord.npy")
    b = np.load(out / "val" / "scene0001_00" / "coord.npy")
    np.testing.assert_allclose(b, np.stack([-a[:, 1] + 0.3, a[:, 0] + 0.3, a[:, 2] + 0.3], 1), atol=1e-5)
    assert not (out / "train" / "scene0100_00" / "segment20.npy").exists()  # the demo scene has no labels
    assert demo_data.main([str(tmp_path / "none"), str(out)]) == 2
