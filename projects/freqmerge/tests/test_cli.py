"""End to end through the command-line entry points, on the tiny fake CIFAR-100 and the tiny ViT."""

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

from freqmerge import ablation, evaluate, train

PROJECT = Path(__file__).resolve().parents[1]
COMMON = [
    "--num_workers",
    "0",
    "--max_eval_batches",
    "1",
    "--bench_batch_size",
    "2",
    "--bench_iters",
    "1",
    "--bench_warmup",
    "0",
]


def test_train_writes_the_guide_outputs(trained):
    for rel in (
        "checkpoints/best_model.pth",
        "checkpoints/last_model.pth",
        "logs/training_history.json",
        "visualizations/training_curves.png",
    ):
        assert (trained / rel).is_file(), rel
    history = json.loads((trained / "logs/training_history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert {"train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr"} <= set(history[0])
    state = torch.load(trained / "checkpoints/best_model.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "history", "config"} <= set(state)
    assert state["config"]["merge_layers"] == [4, 6, 8, 10] and state["config"]["image_size"] == 112
    assert not [p for p in (trained / "checkpoints").iterdir() if ".tmp" in p.name]


def test_resume_continues_from_the_last_epoch(trained, fake_cifar, tmp_path, tiny_args):
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(trained, out)
    before = torch.load(out / "checkpoints/last_model.pth", weights_only=True)
    args = ["--epochs", "2", "--data_root", fake_cifar, "--output_dir", str(out), "--resume", "--num_workers", "0"]
    train.main([*args, "--max_train_batches", "1", "--no_pretrained", *tiny_args])
    history = json.loads((out / "logs/training_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    after = torch.load(out / "checkpoints/last_model.pth", weights_only=True)
    assert after["epoch"] == 2 and after["history"][0] == before["history"][0]


def test_evaluate_all_outputs(trained, fake_cifar, capsys):
    ckpt = str(trained / "checkpoints/best_model.pth")
    args = ["--ckpt", ckpt, "--benchmark", "--visualize", "--confusion", "--data_root", fake_cifar]
    evaluate.main([*args, "--output_dir", str(trained), *COMMON])
    assert (trained / "visualizations/lfgm_heatmaps.png").is_file()
    assert (trained / "visualizations/confusion_matrix.png").is_file()
    result = json.loads((trained / "logs/eval_results.json").read_text())
    ours = result["results"][-1]
    assert ours["tokens_per_block"][-1] == 48 and ours["img_s"] > 0 and "speedup" in ours
    assert result["results"][0]["gmacs"] > ours["gmacs"]
    assert ours["heatmap_source"].startswith("block 4")
    out = capsys.readouterr().out
    assert "Top-1 (%)" in out and "GFLOPs" in out


def test_evaluate_no_freqmerge(trained, fake_cifar):
    ckpt = str(trained / "checkpoints/best_model.pth")
    out = trained / "plain"
    evaluate.main(["--ckpt", ckpt, "--no_freqmerge", "--data_root", fake_cifar, "--output_dir", str(out), *COMMON])
    result = json.loads((out / "logs/eval_results.json").read_text())
    assert result["results"][0]["tokens_per_block"] == [197] * 12


def test_ablation_all(trained, fake_cifar):
    ckpt = str(trained / "checkpoints/best_model.pth")
    out = trained / "ablation"
    ablation.main(["--study", "all", "--ckpt", ckpt, "--data_root", fake_cifar, "--output_dir", str(out), *COMMON])
    result = json.loads((out / "logs/ablation_results.json").read_text())
    assert [r["alpha"] for r in result["alpha"]] == [0.0, 0.25, 0.5, 0.7, 1.0]
    assert [r["scorer"] for r in result["scoring"]] == [None, "random", "attention", "lfgm"]
    for row in result["alpha"] + result["scoring"]:
        assert 0 <= row["top1"] <= 100 and row["img_s"] > 0 and "speedup" in row
    assert result["scoring"][0]["tokens_per_block"][-1] == 197
    assert result["scoring"][1]["tokens_per_block"][-1] == 48


def _one_line_error(capsys, fn, argv, code):
    with pytest.raises(SystemExit) as info:
        fn(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == code or (code == 1 and isinstance(info.value.code, str))
    if isinstance(info.value.code, str):
        err = info.value.code
    assert "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--alpha", "1.5"], "--alpha"),
        (["--keep_rate", "0"], "--keep_rate"),
        (["--merge_layers", "x"], "--merge_layers"),
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--batch_size", "two"], "--batch_size"),
        (["--model_kwargs", "{bad"], "--model_kwargs"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_cli_values_are_one_line(capsys, argv, needle):
    assert needle in _one_line_error(capsys, train.main, argv, 2)


def test_runtime_errors_are_one_line(capsys, fake_cifar, tmp_path, tiny_args):
    err = _one_line_error(capsys, train.main, ["--data_root", str(tmp_path), "--no_pretrained", *tiny_args], 1)
    assert "cifar-100-python/" in err
    argv = ["--data_root", fake_cifar, "--merge_layers", "4", "12", "--no_pretrained", "--output_dir", str(tmp_path)]
    err = _one_line_error(capsys, train.main, [*argv, *tiny_args], 1)
    assert "--merge_layers" in err
    err = _one_line_error(capsys, evaluate.main, ["--ckpt", str(tmp_path / "nope.pth")], 1)
    assert "--ckpt" in err
    err = _one_line_error(capsys, ablation.main, ["--study", "depth"], 2)
    assert "--study" in err


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "ablation.py"])
def test_thin_wrappers_run_from_the_project_folder(script, monkeypatch, capsys):
    """`python train.py ...` from the project folder (in-process via runpy; a fresh interpreter is slow here)."""
    monkeypatch.chdir(PROJECT)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setattr(sys, "path", [str(PROJECT), *sys.path])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(PROJECT / script), run_name="__main__")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {script}") and (
        "--study" in out if script == "ablation.py" else "--no_freqmerge" in out
    )


def test_project_config_module_and_console_scripts(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = runpy.run_path(str(PROJECT / "config.py"))
    assert namespace["KEEP_RATE"] == 0.7 and namespace["MERGE_LAYERS"] == [4, 6, 8, 10]
    bindir = Path(sys.executable).parent
    for name in ("freqmerge-train", "freqmerge-evaluate", "freqmerge-ablation"):
        exe = bindir / name
        assert exe.is_file(), f"{name} is not installed next to {sys.executable}"
        assert f"from freqmerge.{name.split('-')[1]} import main" in exe.read_text()


def test_config_has_every_guide_parameter():
    from freqmerge import config

    expected = {
        "BACKBONE": "vit_small_patch16_224",
        "IMAGE_SIZE": 224,
        "MERGE_LAYERS": [4, 6, 8, 10],
        "KEEP_RATE": 0.7,
        "ALPHA": 0.7,
        "HPF_RADIUS": 2,
        "BATCH_SIZE": 32,
        "LR": 3e-4,
        "WEIGHT_DECAY": 0.01,
        "NUM_EPOCHS": 20,
        "USE_AMP": True,
        "CUDNN_BENCHMARK": True,
        "CUDNN_DETERMINISTIC": False,
        "USE_MULTI_GPU": True,
        "EMPTY_CACHE_EVERY_N_EPOCHS": 5,
        "USE_GRAD_CHECKPOINT": False,
    }
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert os.path.basename(config.BEST_CHECKPOINT) == "best_model.pth"
