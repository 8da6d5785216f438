"""merge-bench suites ``overhead`` (host cost of the r = 0 path) and ``compile`` (time to first compiled output)
on tiny CPU models, and several suites in one invocation."""

from __future__ import annotations

import json

import pytest

from merge_bench import cli, micro
from merge_bench.compile_time import run_compile

TINY = ["--device", "cpu", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--warmup", "1"]


def _overhead(tmp_path, depth: int) -> dict:
    out = tmp_path / f"d{depth}"
    argv = [*TINY, "--suite", "overhead", "--depth", str(depth), "--iters", "3", "--r", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    data = json.loads((out / "merge-bench-overhead-cpu.json").read_text())
    return {row["kind"]: row for row in data["overhead"]["rows"]}


def test_overhead_rows_are_exact_and_the_r0_path_costs_nothing_per_layer(tmp_path):
    shallow, deep = _overhead(tmp_path, 2), _overhead(tmp_path, 5)
    for rows in (shallow, deep):
        assert set(rows) == {"timm", "merge_r0", "merge_auto_r0", "merge_r0_branch"}
        assert all(row["bitwise_equal_to_timm"] for row in rows.values())
        assert rows["merge_auto_r0"]["policy_merged"] is False  # the policy's decision was r = 0
        assert all(row["runs"] == 3 and row["ms_median"] > 0 for row in rows.values())
    # Python calls per forward counted by sys.setprofile: the stepped-out path adds a constant at the model's
    # root, the same at depth 2 and 5 (nothing per layer); the merging classes' r = 0 branch adds calls per layer
    for kind in ("merge_r0", "merge_auto_r0"):
        assert shallow[kind]["python_calls_extra"] == deep[kind]["python_calls_extra"] > 0
    branch_growth = deep["merge_r0_branch"]["python_calls_extra"] - shallow["merge_r0_branch"]["python_calls_extra"]
    assert branch_growth >= 3 * 2  # at least MergeBlock.forward and MergeAttention.forward for each extra layer
    assert deep["timm"]["python_calls"] > shallow["timm"]["python_calls"]  # timm's own per-layer calls are counted


def test_compile_and_overhead_suites_in_one_invocation(tmp_path):
    argv = [*TINY, "--depth", "2", "--batch-size", "1", "--r", "4", "--iters", "2", "--prop-attn", "off"]
    argv += ["--suite", "overhead,compile", "--compile-backend", "aot_eager", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert (tmp_path / "merge-bench-overhead-cpu.json").exists()
    data = json.loads((tmp_path / "merge-bench-compile-cpu.json").read_text())
    info = data["compile"]
    assert info["model"] == "vit_tiny_patch16_224" and info["depth"] == 2 and info["backend"] == "aot_eager"
    assert info["inductor_caches"] is False and info["compiler_startup_s"] > 0
    rows = {(row["kind"], row["prop_attn"]): row for row in info["rows"]}
    assert set(rows) == {("timm", None), ("merge", False)}
    for row in rows.values():
        assert "error" not in row
        assert row["time_to_first_output_s"] > 0 and row["eager_ms"] > 0 and row["compiled_ms"] > 0
        assert row["max_abs_diff_vs_eager"] < 1e-4  # the compiled forward computes what eager computes
        # one graph, no break, and the second call and the timed calls reuse it (the patched model is
        # compiled before any eager forward, as a user would)
        counts = (row["graphs"], row["graph_breaks"], row["graphs_second_call"], row["graphs_timed_calls"])
        assert counts == (1, 0, 0, 0)
        assert row["compile_mode"] == "default" and row["dynamic"] is None
        # where the first call's time went: dynamo's timed phases (nested, re-entrant ones summed per call)
        phases = row["compile_breakdown_s"]
        # seconds rounded to 1 ms: short phases may read 0.0, the whole compile must not
        assert phases["_compile.compile_inner"] > 0 and all(v >= 0 for v in phases.values())
        assert list(phases.values()) == sorted(phases.values(), reverse=True)
        assert row["inductor_kernels"] == 0  # aot_eager generates no code
    assert rows["merge", False]["r"] == 4 and rows["timm", None]["speedup_compiled"] == 1.0


def test_compile_mode_options_are_checked():
    args = cli.parse_args([*TINY, "--suite", "compile", "--compile-mode", "reduce-overhead"])
    assert args.compile_mode == "reduce-overhead" and args.compile_dynamic == "auto"
    with pytest.raises(ValueError, match="reduce-overhead needs a CUDA device"):
        run_compile(args.device, args.dtype, args, log=lambda *a: None)
    with pytest.raises(SystemExit):
        cli.parse_args(["--suite", "compile", "--compile-mode", "fast"])


def test_prop_attn_parts_are_parsed():
    assert micro.parse_parts(None) == list(micro.PARTS) and micro.parse_parts("all") == list(micro.PARTS)
    assert micro.parse_parts("e2e, flex") == ["e2e", "flex"]
    for bad in ("e2e,fast", ","):
        with pytest.raises(ValueError, match="--parts must be"):
            micro.parse_parts(bad)
    with pytest.raises(SystemExit):
        micro.main(["--parts", "nope", "--device", "cpu"])


def test_prop_attn_layer_part_alone_writes_only_its_rows(tmp_path):
    argv = ["--tiny", "--device", "cpu", "--parts", "layer", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]
    assert micro.main(argv) == 0
    data = json.loads((tmp_path / "merge-bench-prop-attn-cpu.json").read_text())
    assert data["parts"] == ["layer"] and data["layer"]
    assert data["attention"] == [] and data["flex_probe"] == [] and data["e2e"] == []


def test_suite_lists_are_checked():
    for argv in (["--suite", "sweep,fast"], ["--suite", ","]):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
    args = cli.parse_args(["--suite", "sweep,compile,sweep", "--device", "cpu"])
    assert args.suites == ["sweep", "compile"] and args.suite == "sweep"
    args.suite = "compile"
    assert cli.suite_path(args).name == "merge-bench-compile-cpu.json"
