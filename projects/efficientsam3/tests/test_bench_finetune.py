"""The finetune benchmark suite at tiny size on CPU: every part is timed, the step runs the frozen path as
often as the trainer would (uncached: teacher + student; cached: student only; EdgeSAM-style: both, twice),
both FPN levels are covered and the JSON holds the stage-1 ratio."""

import json

import pytest
import torch

from efficientsam3.bench import main as bench_main


def test_bench_finetune_tiny_cpu(tmp_path):
    out = tmp_path / "ft.json"
    r = bench_main(["--tiny", "--device", "cpu", "--suite", "finetune", "--warmup", "0", "--iters", "1",
                    "--ft-prompts", "4", "--out", str(out)])["finetune"]  # fmt: skip
    assert json.loads(out.read_text())["finetune"]["summary"] == r["summary"]
    rows = {(row["part"], row.get("level")): row for row in r["rows"]}
    assert r["student"] == "efficientvit_b0" and r["batch"] == 2
    for level in (72, 36):
        for part in ("frozen_teacher", "frozen_student", "ft_step_uncached", "ft_step_cached", "ft_step_cached_device"):
            row = rows[(part, level)]
            assert row["ms"] > 0 and row["frozen_dtype"] == "fp32"  # CPU: no autocast
        assert rows[("ft_step_uncached", level)]["frozen_calls"] == 2
        assert rows[("ft_step_cached", level)]["frozen_calls"] == 1
        assert rows[("ft_step_cached_device", level)]["frozen_calls"] == 1  # the GPU-resident teacher cache
        assert rows[("frozen_student_allq", level)]["ms"] > 0  # the former all-query masks, for comparison
    # two decode iterations with a refinement point: teacher + student, twice
    assert rows[("ft_step_edgesam", 72)]["frozen_calls"] == 4
    stage1 = rows[("stage1_step", None)]
    assert stage1["x_stage1"] == 1.0 and rows[("student_fwd_bwd", None)]["ms"] > 0
    s = r["summary"]
    assert s["ft_step_cached_x_stage1"] == rows[("ft_step_cached", 72)]["ms"] / stage1["ms"]
    cached = min(s["ft_step_cached_x_stage1"], s["ft_step_cached_device_x_stage1"])
    assert s["target_met"] == (cached <= 1.5)
    # the FLOP bound: the frozen path for the student against the student's own forward + backward
    frozen, student = rows[("frozen_student", 72)], rows[("student_fwd_bwd", None)]
    assert s["frozen_student_flop_x_student"] == frozen["gflop_per_img"] / student["gflop_per_img"]
    assert s["frozen_student_x_stage1_at_best"] == frozen["ms"] / stage1["ms"]
    assert all(row["frozen"] == "eager" for row in r["rows"] if "level" in row)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_finetune_tiny_cuda_amp(tmp_path):
    """AMP path: fp16 student autocast + GradScaler, the frozen path under bf16 and fp16 autocast."""
    r = bench_main(["--tiny", "--device", "cuda", "--suite", "finetune", "--warmup", "1", "--iters", "2",
                    "--out", str(tmp_path / "ft.json")])["finetune"]  # fmt: skip
    dtypes = {row.get("frozen_dtype") for row in r["rows"]}
    assert dtypes == {None, "bf16", "fp16"} and all(row["peak_gib"] > 0 for row in r["rows"])


def test_bench_finetune_graphed_mode_and_profile_cpu(tmp_path):
    """--ft-modes graphed (aot_eager here: the capture and autograd without code generation; on the CPU no CUDA
    graph is made) after eager, and --ft-profile: one cached step per mode under the profiler, in the JSON."""
    r = bench_main(["--tiny", "--device", "cpu", "--suite", "finetune", "--warmup", "0", "--iters", "1",
                    "--ft-prompts", "2", "--ft-levels", "72", "--ft-modes", "graphed", "--ft-compile-backend",
                    "aot_eager", "--ft-profile", "--ft-profile-top", "5",
                    "--out", str(tmp_path / "ft.json")])  # fmt: skip
    rows = {(row["part"], row.get("frozen")): row for row in r["finetune"]["rows"]}
    eager, graphed = rows[("ft_step_cached_device", "eager")], rows[("ft_step_cached_device", "graphed")]
    assert graphed["ms"] > 0 and graphed["gflop_per_img"] == eager["gflop_per_img"]  # counted once, on eager
    s = r["finetune"]["summary"]
    assert "compile_s_fp32_72_graphed" in s and "ft_step_cached_x_stage1_graphed" in s
    prof = s["profile"]
    assert set(prof) == {"stage1", "eager", "eager_host_cache", "graphed", "graphed_host_cache"}
    assert s["graphs_fp32_72_graphed"]["warm_up"] >= 2 and s["graphs_fp32_72_graphed"]["during_rows"] == 0
    assert len(prof["graphed"]["top_cpu_ops"]) == 5 and prof["graphed"]["wall_ms"] > 0
