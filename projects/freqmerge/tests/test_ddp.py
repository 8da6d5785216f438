"""FreqMerge training under torchrun with 2 CPU processes (gloo): rank-0-only checkpoints, identical loss history
on both ranks, and resume of an interrupted DDP run. (The 2-GPU NCCL run is the README's GPU command.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.isdir("/sys/class/net/lo") else {}

HERE = Path(__file__).parent


def _torchrun(out: Path, tag: str, argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **LOOPBACK}  # gloo over loopback: no lookup of the host name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_train_worker.py"), str(out), tag, *argv]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _ranks(out: Path, tag: str) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"{tag}_rank{r}.json").read_text()) for r in (0, 1))


@pytest.mark.slow
def test_torchrun_gloo_two_processes_train_and_resume(fake_cifar, tmp_path, tiny_args):
    run = tmp_path / "run"
    base = ["--data_root", fake_cifar, "--output_dir", str(run), "--num_workers", "0", "--no_pretrained",
            "--batch_size", "8", "--max_eval_batches", "1", "--device", "cpu", *tiny_args]  # fmt: skip
    _torchrun(tmp_path, "first", [*base, "--epochs", "1"])
    r0, r1 = _ranks(tmp_path, "first")
    assert r0["saves"] == ["last_model.pth", "best_model.pth"] and r1["saves"] == []  # written once, by rank 0
    assert r0["history"] == r1["history"] and len(r0["history"]) == 1  # all-reduced: the same on both ranks
    ckpt = torch.load(run / "checkpoints/last_model.pth", weights_only=True)
    assert isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 2  # each rank's RNG
    assert ckpt["step"] == 2  # 32 images / 2 ranks / batch 8

    _torchrun(tmp_path, "resumed", ["--resume", "--output_dir", str(run), "--epochs", "2"])
    r0, r1 = _ranks(tmp_path, "resumed")
    assert [h["epoch"] for h in r0["history"]] == [1, 2] and r0["history"] == r1["history"]
    assert r0["history"][0] == _ranks(tmp_path, "first")[0]["history"][0]
    assert r1["saves"] == [] and r0["saves"][0] == "last_model.pth"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best_model.pth", "last_model.pth"]
    assert torch.load(run / "checkpoints/last_model.pth", weights_only=True)["step"] == 4
