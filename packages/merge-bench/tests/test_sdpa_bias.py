"""merge_bench.sdpa_bias on CPU: every case runs or reports its backend's refusal; biased rows match fp32 maths."""

from __future__ import annotations

import json
import math

import pytest
import torch

from merge_bench import sdpa_bias


def test_cpu_rows_and_json(tmp_path):
    payload = sdpa_bias.main(
        ["--device", "cpu", "--warmup", "0", "--iters", "1", "--shapes", "2x2x5x8", "--out", str(tmp_path)]
    )
    rows = payload["rows"]
    assert [r["case"] for r in rows][: len(sdpa_bias.CASES)] == list(sdpa_bias.CASES)
    mixed = {r["case"]: r for r in rows[len(sdpa_bias.CASES) :]}
    assert set(mixed) == {f"{b}, head dims {lay}" for b in ("default", "cudnn") for lay in ("qk72", "v72")}
    for lay in ("qk72", "v72"):  # the math backend runs unequal head dims on CPU: both tricks are exact
        assert mixed[f"default, head dims {lay}"]["max_abs_diff"] < 1e-5
    done = [r for r in rows if "ms_median" in r]
    assert any(r["case"] == "default, bias (B,1,1,N)" for r in done)
    for r in done:
        if r["max_abs_diff"] is not None:
            assert r["max_abs_diff"] < 1e-5  # fp32 on CPU: the bias is applied exactly
    saved = json.loads((tmp_path / "merge-bench-sdpa-bias-cpu.json").read_text())
    assert saved["suite"] == "sdpa-bias" and len(saved["rows"]) == len(rows)


def test_bias_is_log_size_per_key():
    # hand check of what the probe measures: a key of size s gets weight s * exp(q.k * scale)
    q = torch.zeros(1, 1, 1, 4)
    k = torch.zeros(1, 1, 2, 4)
    v = torch.tensor([[[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]])
    bias = torch.tensor([1.0, 3.0]).log()[None, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_bias._mask(bias, "b11n", 1))
    assert torch.allclose(out[0, 0, 0, :2], torch.tensor([0.25, 0.75]))
    assert sdpa_bias._mask(bias, "expand", 3).shape == (1, 3, 2, 2)
    assert math.isclose(sdpa_bias._mask(bias, "b1nn", 3)[0, 0, 1, 1].item(), math.log(3.0), rel_tol=1e-6)


def test_bad_shapes_argument():
    with pytest.raises(ValueError, match="--shapes"):
        sdpa_bias.main(["--device", "cpu", "--shapes", "2x2x5"])
