"""The host-cost tool (issue 11): row parsing, ablations that restore what they change, the CPU run."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from gitmerge3d import merging
from gitmerge3d.models.point_transformer_v3m2 import SerializedAttention
from gitmerge3d.tools import host_cost
from merge_core import kernels

from .conftest import DATA

SCENE = DATA / "mmdet3d-tests" / "scannet" / "points" / "scene0000_00.bin"


def test_parse_row():
    assert host_cost.parse_row("r0") == (None, 0.0, set())
    assert host_cost.parse_row("patch@0.9+torchmatch+nogc") == ("patch", 0.9, {"torchmatch", "nogc"})
    with pytest.raises(ValueError, match="unknown ablation 'fast'"):
        host_cost.parse_row("patch@0.9+fast")
    with pytest.raises(ValueError, match="expected r0 or"):
        host_cost.parse_row("patch@1.5")


def test_ablations_restore_state():
    plain, merged = SerializedAttention.__dict__["attend"], merging.MergedSerializedAttention.__dict__["attend"]
    mode, gc_on = kernels.get_mode(), gc.isenabled()
    with host_cost.ablated({"torchmatch", "nogc", "skipattn", "graph"}):
        assert kernels.get_mode() == "never" and not gc.isenabled() and merging._GRAPHS_ON
        assert SerializedAttention.__dict__["attend"] is not plain
    assert kernels.get_mode() == mode and gc.isenabled() == gc_on and not merging._GRAPHS_ON
    times: list[float] = []
    with host_cost.attend_timer(times):
        assert merging.MergedSerializedAttention.__dict__["attend"] is not merged
    assert SerializedAttention.__dict__["attend"] is plain
    assert merging.MergedSerializedAttention.__dict__["attend"] is merged


def test_timed_calls_on_cpu_equal_enqueue():
    lat, enq = host_cost.timed_calls(lambda: torch.ones(3).sum(), torch.device("cpu"), 3)
    assert lat == enq and len(lat) == 3 and all(t >= 0 for t in lat)


def test_host_cost_cli_on_cpu(tmp_path, capsys):
    if not SCENE.exists():
        pytest.skip(f"sample scene not found at {SCENE}")
    args = ["--scene", str(SCENE), "--reduced", "--device", "cpu", "--rounds", "1", "--iters", "1", "--warmup", "0"]
    rows = "r0,patch@0.9,patch@0.9+skipattn,patch@0.9+graph"
    assert host_cost.main(args + ["--rows", rows, "--profiler-check", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "host-cost.json").read_text())
    by = {r["row"]: r for r in data["rows"]}
    assert list(by) == rows.split(",")
    assert by["r0"]["attend_calls"] == by["patch@0.9"]["attend_calls"] == 9  # 5 encoder + 4 decoder blocks
    assert by["patch@0.9"]["syncs"] == by["r0"]["syncs"]  # merging adds no host sync
    assert by["patch@0.9+graph"]["out_max_diff_vs_plain"] == 0.0  # graphs are CUDA-only: eager on a CPU
    assert by["r0"]["out_max_diff_vs_plain"] is None
    assert by["patch@0.9"]["aten_ops"] > by["r0"]["aten_ops"] > by["patch@0.9+skipattn"]["aten_ops"]
    assert all(r["latency_after_profiler_ms"] > 0 and r["triton_launches"] is None for r in data["rows"])
    md = (tmp_path / "host-cost.md").read_text()
    assert "| patch@0.9 |" in md and "aten ops of patch@0.9 vs r0: " in md and "scatter_add_ +9" in md
    assert by["patch@0.9"]["aten_ops_by_name"]["sort"] == by["r0"]["aten_ops_by_name"].get("sort", 0) + 9
    assert host_cost.main(args + ["--rows", "r0+x", "--out-dir", str(tmp_path)]) == 2
    assert "unknown ablation 'x'" in capsys.readouterr().err


def test_graph_check_needs_cuda():
    assert host_cost.graph_check(torch.device("cpu")) == {"captured": None, "error": "needs CUDA"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merged_attend_captures_in_a_cuda_graph():
    """The merged attention path is sync-free with static shapes per scene, so a CUDA graph can hold it."""
    res = host_cost.graph_check(torch.device("cuda"), patches=4)
    assert res["captured"], res.get("error")
    # the groups are replayed exactly; the merged fp16 sums only up to CUDA scatter_add_'s atomic order
    assert res["slots_equal"] and res["replay_close"] and res["cached_close"]
