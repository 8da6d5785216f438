"""tools/train.py, scripts/train.sh and tools/test.py end to end on a reduced-width config and tiny data.

The reduced config inherits a shipped config through ``_base_`` and only shrinks widths/depths (5 stages,
4 orders, the decoder and merging stay); the data is ``conftest.tiny_scannet`` (converted real samples).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gitmerge3d.engine.build import build_model, load_weight, lovasz_softmax
from gitmerge3d.engine.config import load_config
from gitmerge3d.engine.metrics import summarize
from gitmerge3d.engine.tester import pool_scenes
from gitmerge3d.tools import test as test_tool
from gitmerge3d.tools import train as train_tool
from run_kit import load_checkpoint

PROJECT = Path(__file__).resolve().parents[1]
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.isdir("/sys/class/net/lo") else {}
BASE = PROJECT / "configs" / "sonata" / "gitmerge3d-patch-0c-scannet-ft-finetune-100epochs-r0.9-s10.py"


def _tiny_config(folder: Path, data_root: Path, base: Path = BASE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.py"
    path.write_text(
        f"""_base_ = ["{base}"]
model = dict(
    backbone_out_channels=16,
    backbone=dict(
        enc_depths=(1, 1, 1, 1, 1), enc_channels=(16, 16, 32, 32, 32), enc_num_head=(2, 2, 4, 4, 4),
        enc_patch_size=(32,) * 5, dec_depths=(1, 1, 1, 1), dec_channels=(16, 16, 32, 32),
        dec_num_head=(2, 2, 4, 4), dec_patch_size=(32,) * 4, drop_path=0.0,
    ),
)
data = dict(train=dict(data_root="{data_root}"), val=dict(data_root="{data_root}"), test=dict(data_root="{data_root}"))
batch_size = 1
num_worker = 0
epoch = 2
enable_amp = False
seed = 3
"""
    )
    return path


@pytest.fixture(scope="module")
def init_weight(tmp_path_factory, tiny_scannet) -> tuple[Path, Path]:
    """A randomly initialised reduced segmentor saved as a Pointcept-style fine-tune checkpoint."""
    folder = tmp_path_factory.mktemp("cfg")
    cfg_path = _tiny_config(folder, tiny_scannet)
    torch.manual_seed(0)
    model = build_model(load_config(cfg_path).model)
    weight = folder / "init.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weight)
    return cfg_path, weight


@pytest.fixture(scope="module")
def trained(tmp_path_factory, init_weight) -> Path:
    cfg_path, weight = init_weight
    exp = tmp_path_factory.mktemp("exp") / "run"
    rc = train_tool.main(
        ["--config-file", str(cfg_path), "--options", f"save_path={exp}", f"weight={weight}", "max_train_iters=2"]
    )
    assert rc == 0
    return exp


def test_two_iterations_write_the_exp_layout(trained):
    for rel in ("model/model_last.pth", "model/model_best.pth", "config/config.py", "log/log.txt", "log/history.json"):
        assert (trained / rel).is_file(), rel
    ckpt = load_checkpoint(trained / "model" / "model_last.pth")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)  # 2 train scenes, batch 1: one epoch = 2 iterations
    saved = load_config(trained / "config" / "config.py")  # the saved config is itself a loadable config
    assert saved.model.backbone.additional_info.r == 0.9


def test_frozen_parameters_stay_bit_identical(trained, init_weight):
    init = {k[len("module.") :]: v for k, v in torch.load(init_weight[1], weights_only=True)["state_dict"].items()}
    after = load_checkpoint(trained / "model" / "model_last.pth")["model"]
    keys = ("attn.qkv", "attn.proj", "attn.new_layers")
    frozen = [k for k in init if not any(s in k for s in keys)]
    tuned = [k for k in init if any(s in k for s in keys)]
    assert frozen and tuned
    assert all(torch.equal(init[k], after[k]) for k in frozen)
    assert any(not torch.equal(init[k], after[k]) for k in tuned)


def test_resume_continues_the_iteration_count(tmp_path, init_weight, trained):
    exp = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(trained), str(exp)], check=True)
    rc = train_tool.main(
        [
            "--config-file",
            str(exp / "config" / "config.py"),
            "--options",
            f"save_path={exp}",
            "resume=True",
            "max_train_iters=None",
        ]
    )
    assert rc == 0
    ckpt = load_checkpoint(exp / "model" / "model_last.pth")
    assert (ckpt["epoch"], ckpt["step"]) == (2, 4)
    assert ckpt["scheduler"]["last_epoch"] == 4


def test_train_sh_runs_and_resumes(tmp_path, init_weight):
    cfg_path, weight = init_weight
    work = tmp_path / "work"
    (work / "configs" / "tiny").mkdir(parents=True)
    (work / "tools").symlink_to(PROJECT / "tools")
    (work / "scripts").symlink_to(PROJECT / "scripts")
    (work / "configs" / "tiny" / "cfg.py").write_text(cfg_path.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["sh", "scripts/train.sh", "-p", sys.executable, "-m", "1", "-g", "1", "-d", "tiny", "-n", "run"]
    out = subprocess.run(
        [*base, "-c", "cfg", "-w", str(weight), "max_train_iters=2"], cwd=work, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    exp = work / "exp" / "tiny" / "run"
    assert (exp / "model" / "model_best.pth").is_file() and (exp / "config" / "config.py").is_file()
    out = subprocess.run([*base, "-r", "true", "max_train_iters=3"], cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert load_checkpoint(exp / "model" / "model_last.pth")["step"] == 3
    bad = subprocess.run([*base, "-c", "nope"], cwd=work, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "configs/tiny/nope.py" in bad.stderr


@pytest.mark.slow  # two processes over gloo: ~40 s on 2 cores; CI runs run-kit's DDP test
def test_train_sh_two_processes_ddp_on_cpu(tmp_path, init_weight):
    """-g 2 goes through torchrun: 2 gloo processes on CPU (the same code path as 2 GPUs with NCCL)."""
    work = tmp_path / "work"
    (work / "configs" / "tiny").mkdir(parents=True)
    (work / "tools").symlink_to(PROJECT / "tools")
    (work / "scripts").symlink_to(PROJECT / "scripts")
    (work / "configs" / "tiny" / "cfg.py").write_text(init_weight[0].read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29533", **LOOPBACK}
    cmd = [
        "sh",
        "scripts/train.sh",
        "-p",
        sys.executable,
        "-m",
        "1",
        "-g",
        "2",
        "-d",
        "tiny",
        "-c",
        "cfg",
        "-n",
        "ddp",
        "batch_size=2",
    ]
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = load_checkpoint(work / "exp" / "tiny" / "ddp" / "model" / "model_last.pth")
    # 2 train scenes, total batch 2 over 2 ranks: 1 iteration per epoch per rank, 2 epochs
    assert (ckpt["epoch"], ckpt["step"]) == (2, 2)
    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2  # every rank's RNG state


def test_missing_weight_file_is_one_line(tmp_path, init_weight, capsys):
    rc = train_tool.main(
        ["--config-file", str(init_weight[0]), "--options", f"save_path={tmp_path}", f"weight={tmp_path}/no.pth"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "weight file" in err and "no.pth" in err and "\n" not in err


def test_test_py_votes_and_prints_miou(trained, init_weight, capsys):
    rc = test_tool.main(
        [
            "--config-file",
            str(init_weight[0]),
            "--options",
            f"weight={trained}/model/model_best.pth",
            f"save_path={trained}",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "mIoU/mAcc/allAcc" in out and "scene0002_00" in out
    assert (trained / "result" / "metrics.json").is_file()


def test_miou_on_a_hand_made_confusion():
    # rows = ground truth, columns = prediction
    conf = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    s = summarize(conf)
    # class 0: tp 3, union 3+1+0 = 4 -> 0.75; class 1: tp 2, union 4+3-2 = 5 -> 0.4; class 2: tp 0, union 2 -> 0
    assert s["iou"] == pytest.approx([0.75, 0.4, 0.0])
    assert s["mIoU"] == pytest.approx((0.75 + 0.4 + 0.0) / 3)
    assert s["mAcc"] == pytest.approx((3 / 4 + 2 / 4) / 2)  # class 2 has no ground truth
    assert s["allAcc"] == pytest.approx(5 / 8)
    assert math.isnan(summarize(np.zeros((2, 2)))["mIoU"])


def test_missing_data_root_through_train_is_one_line(tmp_path, init_weight, capsys):
    rc = train_tool.main(
        [
            "--config-file",
            str(init_weight[0]),
            "--options",
            f"save_path={tmp_path}/e",
            f"data.train.data_root={tmp_path}/nodata",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "data_root" in err and "nodata" in err and "\n" not in err


def test_wrong_architecture_weight_is_one_line(tmp_path, init_weight, capsys):
    rc = test_tool.main(
        [
            "--config-file",
            str(init_weight[0]),
            "--options",
            f"weight={init_weight[1]}",
            f"save_path={tmp_path}",
            "model.backbone.enc_channels=(16, 16, 32, 32, 48)",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "init.pth" in err and "\n" not in err


def test_lovasz_softmax_by_hand():
    # p(class 0) = [0.8, 0.3], targets [0, 1]. Class 0: errors sorted [0.3, 0.2] with fg [0, 1]:
    # intersection [1, 0], union [2, 2], jaccard [0.5, 1] -> increments [0.5, 0.5] -> 0.3*0.5 + 0.2*0.5 = 0.25.
    # Class 1: errors sorted [0.3, 0.2] with fg [1, 0]: intersection [0, 0], union [1, 2], jaccard [1, 1]
    # -> increments [1, 0] -> 0.3. Mean over the two present classes: 0.275.
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.3, 0.7]]))
    assert lovasz_softmax(logits, torch.tensor([0, 1])).item() == pytest.approx(0.275)
    assert lovasz_softmax(logits, torch.tensor([-1, -1])).item() == 0.0


def test_weight_from_sonata_pretraining_loads_the_encoder(tmp_path, init_weight):
    cfg = load_config(init_weight[0])
    torch.manual_seed(1)
    src = build_model(cfg.model)
    enc = {k: v for k, v in src.backbone.state_dict().items() if not k.startswith("dec.")}
    path = tmp_path / "pretrain.pth"
    torch.save({"state_dict": {f"module.student.backbone.{k}": v for k, v in enc.items()}}, path)
    torch.manual_seed(2)
    dst = build_model(cfg.model)
    dec_before = {k: v.clone() for k, v in dst.backbone.state_dict().items() if k.startswith("dec.")}
    assert load_weight(dst, path) == "backbone"
    after = dst.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in enc.items())
    assert all(torch.equal(after[k], v) for k, v in dec_before.items())  # the new decoder keeps its init


def _labelled(root: Path) -> int:
    """Labelled points over the val split (the only labelled val scene is the 100-point sample)."""
    return sum(int((np.load(f) != -1).sum()) for f in (root / "val").glob("*/segment20.npy"))


@pytest.mark.slow  # two processes over gloo: ~40 s on 2 cores; CI runs run-kit's DDP test
def test_test_py_over_two_processes_counts_each_scene_once(tmp_path, trained, init_weight, tiny_scannet):
    """torchrun --nproc_per_node 2 tools/test.py (gloo on CPU): each rank votes its half of the val scenes, rank 0
    pools them; the pooled confusion equals the one-process run's (per-scene seeding makes the votes equal)."""
    cfg, weight = str(init_weight[0]), f"weight={trained}/model/model_best.pth"
    one, two = tmp_path / "one", tmp_path / "two"
    assert test_tool.main(["--config-file", cfg, "--options", weight, f"save_path={one}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", **LOOPBACK}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tools/test.py", "--config-file", cfg, "--options", weight, f"save_path={two}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[rank 0] scene0000_00" in out.stdout and "[rank 1] scene0002_00" in out.stdout
    assert out.stdout.count("mIoU/mAcc/allAcc") == 1  # written once, by rank 0
    a = json.loads((one / "result" / "metrics.json").read_text())
    b = json.loads((two / "result" / "metrics.json").read_text())
    assert b["world_size"] == 2 and sorted(b["scenes"]) == ["scene0000_00", "scene0002_00"]
    assert b["confusion"] == a["confusion"] and np.sum(b["confusion"]) == _labelled(tiny_scannet) > 0


def test_pooling_refuses_a_scene_counted_twice():
    conf = [[1, 0], [0, 1]]
    scenes = [{"index": 0, "name": "a", "confusion": conf}, {"index": 1, "name": "b", "confusion": conf}]
    assert pool_scenes(scenes, 2)["confusion"] == [[2, 0], [0, 2]]
    with pytest.raises(ValueError, match="scene index 0"):
        pool_scenes([*scenes, scenes[0]], 2)


def test_test_py_with_a_test_time_crop(tmp_path, trained, init_weight, tiny_scannet, capsys):
    crop = "data.test.test_cfg.crop={'type': 'SphereCrop', 'point_max': 64, 'mode': 'all'}"
    opts = [f"weight={trained}/model/model_best.pth", f"save_path={tmp_path}", crop]
    assert test_tool.main(["--config-file", str(init_weight[0]), "--options", *opts]) == 0
    res = json.loads((tmp_path / "result" / "metrics.json").read_text())
    assert np.sum(res["confusion"]) == _labelled(tiny_scannet) and "mIoU/mAcc/allAcc" in capsys.readouterr().out
