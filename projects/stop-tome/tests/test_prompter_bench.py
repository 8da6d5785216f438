"""The prompter micro-benchmark (the GPU command of --prompter_conv) runs on CPU with tiny shapes."""

from __future__ import annotations

import json

import pytest
import torch


def _bench_argv(out, *extra):
    return ["--device", "cpu", "--tiny", "--out_dir", str(out), "--warmup", "0", "--iters", "1", *extra]


def test_prompter_bench_cpu_smoke(tmp_path):
    from stop_tome.prompter_bench import main as pb_main

    argv = _bench_argv(tmp_path, "--batches", "1", "--modes", "native,fold2d,fft,auto", "--no_full", "--no_layers")
    with torch.backends.mkldnn.flags(enabled=torch.backends.mkldnn.enabled):  # the smoke run turns oneDNN off
        assert pb_main(argv) == 0
    result = json.loads((tmp_path / "prompter_bench.json").read_text())
    rows = result["whole_prompter"]
    assert [r["mode"] for r in rows] == ["native", "fold2d", "fft", "auto"]
    assert all(r["fwd_ms"] > 0 and r["train_ms"] > 0 and r["max_abs_diff_vs_native"] < 1e-4 for r in rows)
    assert result["best_mode"] in ("native", "fold2d", "fft", "auto") and "per_layer" not in result
    assert "| path |" in (tmp_path / "prompter_bench.log").read_text()


@pytest.mark.slow
def test_prompter_bench_cpu_full_rows(tmp_path):
    """The whole GPU command's code path on CPU, stop-tome-benchmark rows included."""
    from stop_tome.prompter_bench import main as pb_main

    with torch.backends.mkldnn.flags(enabled=torch.backends.mkldnn.enabled):
        assert pb_main(_bench_argv(tmp_path, "--batches", "2,1", "--modes", "native,padded,fold2d")) == 0
    result = json.loads((tmp_path / "prompter_bench.json").read_text())
    assert len(result["per_layer"]) == 7
    full = result["stop_tome_benchmark"]
    assert set(full) >= {f"{result['best_mode']}-force", f"{result['best_mode']}-auto"}
    assert all(r.get("videos_per_s") for payload in full.values() for r in payload["rows"])
