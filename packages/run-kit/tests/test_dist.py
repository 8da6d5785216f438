"""DistEnv in one plain process, and a real 2-process gloo run under torchrun (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_kit import DistEnv, all_reduce_mean, barrier, setup_distributed, wrap_ddp

LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.isdir("/sys/class/net/lo") else {}

HERE = Path(__file__).parent


def test_single_process_needs_no_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = setup_distributed("cpu")
    assert env == DistEnv(0, 0, 1, torch.device("cpu"), True, False)
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, env) is model
    barrier(env)
    assert torch.equal(all_reduce_mean(torch.tensor([2.0, 4.0]), env), torch.tensor([2.0, 4.0]))


def test_bad_device_is_one_line():
    with pytest.raises(ValueError, match=r"^device: unknown device 'gpu0'"):
        setup_distributed("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            setup_distributed("cuda")


def test_torchrun_two_processes_gloo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **LOOPBACK}  # gloo over loopback: no lookup of the host name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert (r0["saves"], r1["saves"]) == (1, 0)  # only rank 0 writes
    assert sorted(p.name for p in tmp_path.glob("*.pth*")) == ["last.pth"]
    assert r0["full"] == r1["full"] and len(r0["full"]) == 3  # all-reduced loss history identical on both ranks
    assert r0["resumed"] == r0["full"] and r1["resumed"] == r1["full"]  # interrupted + resumed == uninterrupted
    assert r0["same"] and r1["same"]
