"""merge-bench: cost model, bounds, CLI and JSON on tiny CPU models (fast)."""

from __future__ import annotations

import json

import pytest
import torch

timm = pytest.importorskip("timm")

from merge_core import bench  # noqa: E402


def _tiny(**kwargs):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=7)
    cfg.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **cfg).eval()


def test_vit_macs_matches_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny()
    for block in model.blocks:
        block.attn.fused_attn = False  # explicit matmuls, so the flop counter sees attention
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() == 2 * bench.vit_macs(model)


def test_vit_macs_merged_counts_and_known_value():
    model = bench.build_model("vit_small_patch16_224", torch.device("cpu"), torch.float32)
    assert abs(bench.vit_macs(model) / 1e9 - 4.6) < 0.05  # ViT-S/16: 4.6 GMACs as published
    full, merged = bench.vit_macs(model), bench.vit_macs(model, [16] * 12)
    assert 1.9 < full / merged < 2.1  # the r=16 FLOP ratio quoted in issue 3
    assert bench.vit_macs(model, [0] * 12) == full


@pytest.mark.parametrize("bias", [False, True])
def testbound_forward_equals_timm_at_r0(bias):
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = bench.bound_forward(model, x, [0, 0, 0], bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def testbound_forward_uses_merged_token_counts():
    model = _tiny()
    seen = []
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        bench.bound_forward(model, torch.randn(1, 3, 32, 32), [4, 4, 4], False)
    assert seen == [13, 9, 5]  # 17 tokens -> 13 -> 9 -> 5 (cap: half of the unprotected tokens)
    assert [after for _, after in bench._token_schedule(model, [4, 4, 4])] == seen
    import merge_core as mc

    mc.patch.timm(model)  # the real merging model sees the same token counts
    model.r = 4
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen[3:] == [13, 9, 5]


def test_measure_reports_median():
    calls = []
    out = bench.measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, iters=5)
    assert len(calls) == 7 and out["runs"] == 5 and out["ms_min"] <= out["ms_median"] <= out["ms_max"]


def test_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "b.json"
    code = bench.main(
        [
            "--model",
            "vit_tiny_patch16_224",
            "--batch-size",
            "1",
            "--r",
            "0,8",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--prop-attn",
            "both",
            "--bounds",
            "--tome",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "GMACs/image (multiply-accumulates; FLOPs = 2 x MACs)" in text and "img/s" in text
    data = json.loads(path.read_text())
    kinds = [(row["kind"], row["r"], row["prop_attn"]) for row in data["rows"]]
    assert kinds[0] == ("timm", 0, None)
    assert ("merge", 8, True) in kinds and ("merge", 8, False) in kinds and ("merge", 0, True) in kinds
    assert ("bound", 8, False) in kinds and ("bound_bias", 8, True) in kinds and ("tome", 8, True) in kinds
    assert all("error" not in row for row in data["rows"])
    r8 = next(row for row in data["rows"] if row["kind"] == "merge" and row["r"] == 8)
    assert r8["flop_ratio"] > 1.2 and r8["img_per_s"] > 0 and data["params"] > 5e6
    assert data["environment"]["torch"] == torch.__version__


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--r", "4,-1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch-size", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])


def test_micro_benchmark_runs_on_cpu():
    args = bench.parse_args(["--iters", "1", "--warmup", "0"])
    rows = bench.bench_match_merge(2, 17, 8, 3, torch.device("cpu"), torch.float32, args)
    assert [row["path"] for row in rows] == ["torch"] and rows[0]["ms_median"] > 0
    rows = bench.bench_attention(1, 2, 9, 8, torch.device("cpu"), torch.float32, args)
    assert {row["backend"] for row in rows} == {"sdpa (no size)", "reference", "sdpa", "channel"}
    assert all("error" not in row for row in rows)
