"""CPU smoke test of the GPU benchmark (the real run is ViT-S, batch 512, fp16 on a GPU: see README)."""

import json
import runpy
import sys
from pathlib import Path

from freqmerge import benchmark

PROJECT = Path(__file__).resolve().parents[1]
TINY = json.dumps({"patch_size": 8, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0})
SMOKE = ["--device", "cpu", "--batch-size", "2", "--iters", "2", "--warmup", "1", "--rounds", "1"]


def test_benchmark_smoke_all_variants(tmp_path):
    out = tmp_path / "bench.json"
    result = benchmark.run(
        benchmark.parse_args([*SMOKE, "--image-size", "112", "--model-kwargs", TINY, "--out", str(out)])
    )
    saved = json.loads(out.read_text())
    assert saved["device"] == result["device"] and saved["batch_size"] == 2 and saved["dtype"] == "float32"
    rows = {r["variant"]: r for r in saved["results"]}
    assert list(rows) == list(benchmark.VARIANTS)
    assert rows["baseline"]["tokens_per_block"] == [197] * 12
    counts = [197] * 4 + [138] * 2 + [97] * 2 + [68] * 2 + [48] * 2
    for name in ("bound", "tome", "freqmerge", "tome_prop", "freqmerge_prop", "freqmerge_reflect"):
        assert rows[name]["tokens_per_block"] == counts
        assert rows[name]["gflops"] < rows["baseline"]["gflops"]
        assert rows[name]["img_s"] > 0 and "fraction_of_bound" in rows[name] and "speedup" in rows[name]
    assert saved["tokens_after_block"] == counts and saved["r_schedule"][4] == 59


def test_bound_uses_timm_blocks_and_matches_plain_model_without_merging():
    import timm
    import torch

    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=112, **json.loads(TINY)).eval()
    bound = benchmark.ZeroOverheadBound(model, [0] * 12)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(bound(x), model(x))


def test_tools_script_runs_from_the_source_tree(tmp_path, monkeypatch, capsys):
    """tools/benchmark.py as a script (in-process via runpy: a fresh interpreter costs ~15 s of imports here)."""
    repo = PROJECT.parents[1]
    out = tmp_path / "b.json"
    argv = [
        *SMOKE,
        "--image-size",
        "112",
        "--model-kwargs",
        TINY,
        "--variants",
        "bound",
        "freqmerge",
        "--out",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))
    runpy.run_path(str(PROJECT / "tools/benchmark.py"), run_name="__main__")
    assert str(repo / "packages/merge-core/src") in sys.path and str(PROJECT / "src") in sys.path
    rows = [r["variant"] for r in json.loads(out.read_text())["results"]]
    assert rows == ["baseline", "bound", "freqmerge"]
    assert "% of bound" in capsys.readouterr().out
