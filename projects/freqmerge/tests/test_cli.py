"""End to end through the command-line entry points, on the tiny fake CIFAR-100 and the tiny ViT."""

import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
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


def _png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The PNG's pixels, after checking its size (from the figure size x dpi) and that it is not blank."""
    from PIL import Image

    with Image.open(path) as img:
        assert img.size == size, (path.name, img.size)
        pixels = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10, f"{path.name} is (nearly) constant"
    return pixels


def test_train_writes_the_guide_outputs(trained):
    for rel in (
        "checkpoints/best_model.pth",
        "checkpoints/last_model.pth",
        "logs/training_history.json",
        "logs/train_log.txt",
        "visualizations/training_curves.png",
    ):
        assert (trained / rel).is_file(), rel
    history = json.loads((trained / "logs/training_history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert {"train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr"} <= set(history[0])
    state = torch.load(trained / "checkpoints/best_model.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "step", "rng", "history", "config"} <= set(state)
    assert state["config"]["merge_layers"] == [4, 6, 8, 10] and state["config"]["image_size"] == 112
    assert state["history"] == history
    assert not [p for p in (trained / "checkpoints").iterdir() if ".tmp" in p.name]
    assert list((trained / "logs/tensorboard").glob("events.out.tfevents.*"))
    # 11 x 4 inches at 110 dpi; two panels with curves: many distinct colours, not a blank canvas.
    pixels = _png(trained / "visualizations/training_curves.png", (1210, 440))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


RUN = ["--epochs", "2", "--batch_size", "8", "--max_train_batches", "2", "--max_eval_batches", "1"]
RUN += ["--num_workers", "0", "--no_pretrained", "--deterministic", "--seed", "3"]


def _comparable(state: dict) -> dict:
    history = [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in state["history"]]
    return {"epoch": state["epoch"], "step": state["step"], "history": history}


def test_interrupted_then_resumed_equals_uninterrupted(fake_cifar, tmp_path, tiny_args, monkeypatch, capsys):
    """Kill the run (KeyboardInterrupt) at the start of epoch 2, then `train.py --resume` with no other flag."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train.main([*RUN, *tiny_args, "--data_root", fake_cifar, "--output_dir", str(straight)])

    real = train.train_one_epoch
    calls = []

    def interrupt_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupt_second_epoch)
    with pytest.raises(SystemExit, match="interrupted"):
        train.main([*RUN, *tiny_args, "--data_root", fake_cifar, "--output_dir", str(broken)])
    monkeypatch.setattr(train, "train_one_epoch", real)
    assert torch.load(broken / "checkpoints/last_model.pth", weights_only=True)["epoch"] == 1
    capsys.readouterr()

    monkeypatch.chdir(broken)
    train.main(["--resume"])  # no flags: epochs, batch size, seed, data, model all come from the checkpoint
    err = capsys.readouterr().err
    assert "warning" not in err

    a = torch.load(straight / "checkpoints/last_model.pth", weights_only=True)
    b = torch.load(broken / "checkpoints/last_model.pth", weights_only=True)
    assert _comparable(a) == _comparable(b) and b["epoch"] == 2
    assert a["config"] == {**b["config"], "output_dir": str(straight)}
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 10
    for k in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[k][name], opt_b[k][name]), (k, name)
    assert a["scheduler"] == b["scheduler"]
    hist_a = json.loads((straight / "logs/training_history.json").read_text())
    hist_b = json.loads((broken / "logs/training_history.json").read_text())
    assert [h["epoch"] for h in hist_b] == [1, 2]
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]


_KILL_MID_SAVE = (
    "import os, signal, sys, run_kit; from run_kit import checkpoint as ck\n"
    "state = ck.load_checkpoint(sys.argv[1])\n"
    "os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)\n"
    "ck.save_checkpoint(sys.argv[1], state)\n"
)


def test_resume_warns_per_changed_flag_and_a_killed_save_is_cleaned_up(trained, fake_cifar, tmp_path, capsys):
    import shutil
    import signal
    import subprocess

    out = tmp_path / "resume"
    shutil.copytree(trained, out)
    last = out / "checkpoints/last_model.pth"
    before = torch.load(last, weights_only=True)
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(last)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert len(list(last.parent.glob("last_model.pth.tmp.*"))) == 1
    assert torch.load(last, weights_only=True)["epoch"] == 1  # still the intact old checkpoint

    args = ["--resume", "--output_dir", str(out), "--epochs", "2", "--batch_size", "8", "--max_train_batches", "1"]
    train.main(args)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    # epochs (1 -> 2) and max_train_batches (0 -> 1) differ from the checkpoint; batch_size 8 does not.
    assert warnings == [
        "warning: --epochs: using the command line's 2, the resumed run had 1",
        "warning: --max_train_batches: using the command line's 1, the resumed run had 0",
    ]
    after = torch.load(last, weights_only=True)
    assert after["epoch"] == 2 and after["history"][0] == before["history"][0]
    assert after["config"]["epochs"] == 2 and after["config"]["image_size"] == 112  # rest restored
    assert sorted(p.name for p in last.parent.iterdir()) == ["best_model.pth", "last_model.pth"]


def test_evaluate_all_outputs(trained, fake_cifar, capsys):
    ckpt = str(trained / "checkpoints/best_model.pth")
    args = ["--ckpt", ckpt, "--benchmark", "--visualize", "--confusion", "--data_root", fake_cifar]
    evaluate.main([*args, "--output_dir", str(trained), *COMMON])
    result = json.loads((trained / "logs/eval_results.json").read_text())
    ours = result["results"][-1]
    assert ours["tokens_per_block"][-1] == 48 and ours["img_s"] > 0 and "speedup" in ours
    assert ours["img_s_min"] <= ours["img_s"] <= ours["img_s_max"]
    assert result["results"][0]["gmacs"] > ours["gmacs"]
    assert ours["heatmap_source"].startswith("block 4")
    out = capsys.readouterr().out
    assert "Top-1 (%)" in out and "GFLOPs" in out and "img/s min-max" in out and "timing 1 passes" in out
    # Heatmaps: 3 rows x 4 images at 2.6 x 8 inches per column, 110 dpi; the score row uses the JET map.
    heat = _png(trained / "visualizations/lfgm_heatmaps.png", (1144, 880))
    middle = heat[heat.shape[0] // 3 : 2 * heat.shape[0] // 3]
    assert (middle[..., 0] - middle[..., 2]).max() > 100 and (middle[..., 2] - middle[..., 0]).max() > 100
    conf = _png(trained / "visualizations/confusion_matrix.png", (1760, 1760))  # 16 x 16 inches for 100 classes
    assert len(np.unique(conf.reshape(-1, 3), axis=0)) > 20


def test_cpu_benchmark_defaults_are_small(trained, fake_cifar, capsys):
    """The guide's GPU sizes (64 images x 40 passes) took 9 minutes on CPU; without --bench_* flags use small ones."""
    ckpt = str(trained / "checkpoints/best_model.pth")
    out = trained / "cpu_bench"
    evaluate.main(["--ckpt", ckpt, "--benchmark", "--data_root", fake_cifar, "--output_dir", str(out),
                   "--num_workers", "0", "--max_eval_batches", "1", "--device", "cpu"])  # fmt: skip
    row = json.loads((out / "logs/eval_results.json").read_text())["results"][-1]
    assert (row["batch_size"], row["warmup"], row["iters"]) == (8, 1, 5)
    assert "timing 5 passes of 8 images" in capsys.readouterr().out


def test_evaluate_no_freqmerge(trained, fake_cifar):
    ckpt = str(trained / "checkpoints/best_model.pth")
    out = trained / "plain"
    evaluate.main(["--ckpt", ckpt, "--no_freqmerge", "--data_root", fake_cifar, "--output_dir", str(out), *COMMON])
    result = json.loads((out / "logs/eval_results.json").read_text())
    assert result["results"][0]["tokens_per_block"] == [197] * 12


def test_ablation_file_keeps_both_studies(trained, fake_cifar):
    ckpt = str(trained / "checkpoints/best_model.pth")
    out = trained / "ablation"
    common = ["--ckpt", ckpt, "--data_root", fake_cifar, "--output_dir", str(out), *COMMON]
    ablation.main(["--study", "alpha", *common])
    first = json.loads((out / "logs/ablation_results.json").read_text())
    ablation.main(["--study", "scoring", *common])
    result = json.loads((out / "logs/ablation_results.json").read_text())
    assert result["alpha"] == first["alpha"]  # the alpha study survived the scoring run
    assert result["studies"] == ["alpha", "scoring"] and set(result["runs"]) == {"alpha", "scoring"}
    assert result["runs"]["alpha"]["date"] == first["runs"]["alpha"]["date"]
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
    assert "--ckpt" in err and "not found" in err
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


def test_non_checkpoint_ckpt_is_one_line(capsys, tmp_path):
    """README.md, a text .pth, random bytes, a pickled object: one line naming --ckpt and the file, no traceback."""
    text = tmp_path / "notackpt.pth"
    text.write_text("epoch 3 weights\n")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(256)) * 4)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {}, "obj": Path("x")}, pickled)
    cases = [(PROJECT / "README.md", "text file"), (text, "text file"), (noise, "not a PyTorch checkpoint"),
             (pickled, "weights-only load refuses")]  # fmt: skip
    for path, needle in cases:
        err = _one_line_error(capsys, evaluate.main, ["--ckpt", str(path)], 1)
        assert err.startswith("evaluate: error: argument --ckpt:") or "argument --ckpt:" in err, err
        assert str(path) in err and needle in err and "weights_only=False" not in err, err


def test_wrong_architecture_names_file_and_first_key(trained, capsys, tmp_path):
    ckpt = str(trained / "checkpoints/best_model.pth")
    wide = json.dumps({"patch_size": 8, "embed_dim": 48, "num_heads": 2, "mlp_ratio": 2.0})
    err = _one_line_error(capsys, evaluate.main, ["--ckpt", ckpt, "--model_kwargs", wide], 1)
    assert ckpt in err and "shape mismatch at 'cls_token'" in err and "[1, 1, 32] vs model [1, 1, 48]" in err


def test_corrupt_cifar_is_one_line(capsys, fake_cifar, tmp_path, tiny_args):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(fake_cifar, root)
    train_file = root / "cifar-100-python" / "train"
    train_file.write_bytes(train_file.read_bytes()[:500])
    argv = ["--data_root", str(root), "--output_dir", str(tmp_path), "--no_pretrained", "--num_workers", "0"]
    err = _one_line_error(capsys, train.main, [*argv, *tiny_args], 1)
    assert str(train_file) in err and "corrupt or truncated" in err
