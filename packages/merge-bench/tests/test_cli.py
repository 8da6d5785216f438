"""merge-bench: CLI, JSON, model rows and micro rows on tiny CPU models (fast)."""

from __future__ import annotations

import json

import pytest
import torch

from merge_bench import cli, micro


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "b.json"
    argv = ["--model", "vit_tiny_patch16_224", "--batch-size", "1", "--r", "0,8", "--iters", "1", "--warmup", "0"]
    argv += ["--prop-attn", "both", "--bounds", "--tome", "--auto", "--json", str(path)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "GMACs/image (multiply-accumulates; FLOPs = 2 x MACs)" in text and "img/s" in text
    data = json.loads(path.read_text())
    kinds = [(row["kind"], row["r"], row["prop_attn"]) for row in data["rows"]]
    assert kinds[0] == ("timm", 0, None)
    assert ("merge", 8, True) in kinds and ("merge", 8, False) in kinds and ("merge", 0, True) in kinds
    assert ("bound", 8, False) in kinds and ("bound_bias", 8, True) in kinds and ("tome", 8, True) in kinds
    assert ("merge_auto", 8, True) in kinds
    assert all("error" not in row for row in data["rows"])
    r8 = next(row for row in data["rows"] if row["kind"] == "merge" and row["r"] == 8)
    assert r8["flop_ratio"] > 1.2 and r8["img_per_s"] > 0 and data["params"] > 5e6
    assert data["environment"]["torch"] == torch.__version__


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--r", "4,-1"], ["--batch-size", "0"], ["--suite", "fast"], ["--device", "gpu0"]):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.parse_args(["--device", "cuda"])
        with pytest.raises(SystemExit):
            cli.parse_args(["--mode", "cudagraph"])
    assert "--r" in capsys.readouterr().err


def test_suite_file_is_one_per_suite_and_device():
    args = cli.parse_args(["--suite", "micro", "--out", "res", "--device", "cpu"])
    assert str(cli.suite_path(args)).startswith("res/merge-bench-micro-") and "2026" not in str(cli.suite_path(args))


def test_micro_rows_run_on_cpu():
    args = cli.parse_args(["--iters", "1", "--warmup", "0", "--device", "cpu"])
    rows = micro.bench_match_merge(2, 17, 8, 3, torch.device("cpu"), torch.float32, args)
    assert [row["path"] for row in rows] == ["torch"] and rows[0]["ms_median"] > 0
    rows = micro.bench_attention(1, 2, 9, 8, torch.device("cpu"), torch.float32, args)
    assert {row["backend"] for row in rows} == {"sdpa (no size)", "reference", "sdpa", "channel"}
    assert all("error" not in row for row in rows)


def test_interleaved_rows_use_their_own_model_copies(tmp_path):
    path = tmp_path / "i.json"
    argv = ["--model", "vit_tiny_patch16_224", "--batch-size", "1", "--r", "8", "--iters", "2", "--warmup", "0"]
    assert cli.main([*argv, "--prop-attn", "both", "--auto", "--interleave", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["interleaved"] is True
    rows = {(row["kind"], row["prop_attn"]): row for row in data["rows"]}
    assert set(rows) == {("timm", None), ("merge", False), ("merge", True), ("merge_auto", True)}
    assert all(row["runs"] == 2 and "error" not in row for row in rows.values())
    assert rows["merge", True]["gmacs_per_image_merged"] < rows["timm", None]["gmacs_per_image_merged"]
