"""The benchmark command at tiny size on CPU, and the guide's shell scripts (one plain process, GPUS=0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from efficientsam3.bench import main as bench_main
from efficientsam3.convert import main as convert_main
from efficientsam3.engine.export import main as export_main
from efficientsam3.engine.stage1 import main as train_main
from efficientsam3.store import EmbeddingStore

PROJECT = Path(__file__).resolve().parents[1]


def test_bench_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    r = bench_main(["--tiny", "--device", "cpu", "--students", "efficientvit_b0", "--merge", "2:8", "6:24",
                    "--distill-steps", "2", "--distill-images", "8", "--train-student", "efficientvit_b0",
                    "--warmup", "0", "--iters", "1", "--weight-scale", "15", "--workdir", str(tmp_path / "w"),
                    "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["tiny"] and saved["device"]
    s = r["students"][0]
    assert s["student"] == "efficientvit_b0" and s["img_per_s"] > 0 and s["gmacs"] > 0
    exact, fast, m1, m2, b1, b2 = r["teacher"]
    assert b1["teacher"] == "merged-block" and b1["attended"] == m1["attended"]
    assert exact["teacher"] == "exact-ref" and exact["cos_mean"] == 1.0 and exact["tflop_per_img"] > 0
    assert fast["teacher"] == "exact-fast" and fast["cos_min"] > 0.99999 and fast["speedup"] == 1.0
    assert fast["tflop_per_img"] == exact["tflop_per_img"]  # same model FLOPs, another op order
    assert m1["attended"] == [14, 56, 14, 56] and m2["attended"] == [10, 40, 10, 40]
    assert 1.0 > m1["cos_mean"] > m2["cos_mean"]  # more merging, less fidelity
    assert [d["targets"] for d in r["distill"]] == ["exact", "attn 2:8", "attn 6:24", "block 2:8", "block 6:24"]
    t = r["train"][0]
    assert t["record_bytes"] == 4 + 16 * 8 * 8 * 2 and t["store_read_mb_s"] > 0 and t["read_headroom"] > 0


def _bash(script, *args, cwd):
    env = dict(os.environ, GPUS="0", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(PROJECT / "stage1" / "scripts" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_export_script_one_process(tiny_cfg, sa1b, tmp_path):
    """The guide's script path end to end (one fresh interpreter: slow on a loaded machine, so only this one)."""
    store = tmp_path / "emb"
    r = _bash("save_image_embeddings.sh", f"CFG={tiny_cfg}", f"DATA_PATH={sa1b}", f"OUTPUT={store}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(EmbeddingStore(str(store))) == 4


def test_entry_points_fail_in_one_line(tiny_cfg, sa1b, tmp_path, capsys):
    for main, argv in (
        (train_main, ["--cfg", str(tiny_cfg), "--opts", "TRAIN.NOPE", "1"]),
        (train_main, ["--cfg", str(tiny_cfg), "--data-path", str(sa1b), "--teacher-embed-path", str(tmp_path / "x"),
                      "--output", str(tmp_path / "o"), "--device", "cpu"]),
        (export_main, ["--cfg", str(tmp_path / "missing.yaml")]),
        (convert_main, ["--student-ckpt", str(tmp_path / "a.pth"), "--sam3-checkpoint", "b", "--output", "c"]),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and ": error: " in err, err


def test_teacher_suite_survives_a_failed_compile_and_keeps_the_time_budget(monkeypatch, tmp_path):
    """A compile that raises leaves a one-line 'skipped' row (the eager rows and the JSON stay); merged rows
    that would overrun --time-budget are skipped, not started."""
    import efficientsam3.bench as bench

    def boom(*args, **kwargs):
        raise RuntimeError("no inductor here\nsecond line")

    monkeypatch.setattr(bench, "_compiled", boom)
    out = tmp_path / "t.json"
    common = ["--tiny", "--device", "cpu", "--suite", "teacher", "--compile", "--merge", "2:8", "--merge-modes",
              "attn", "--warmup", "0", "--iters", "1", "--peak-tflops", "989", "--out", str(out)]  # fmt: skip
    rows = bench_main(common)["teacher"]
    assert [r["teacher"] for r in rows] == ["exact-ref", "exact-fast", "exact-fast-compiled", "merged-attn-compiled"]
    assert rows[2]["skipped"] == rows[3]["skipped"] == "error: RuntimeError: no inductor here"
    assert rows[1]["mfu"] > 0 and json.loads(out.read_text())["teacher"][1]["teacher"] == "exact-fast"
    rows = bench_main([*common, "--time-budget", "1"])["teacher"]
    assert rows[-1]["skipped"] == "time budget"
