"""The command line: the guide's flags, a 1-step train + eval on the real clips, resume == uninterrupted run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_kit import load_checkpoint
from stop_tome import engine
from stop_tome.main import main
from stop_tome.params import parse_args

LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.isdir("/sys/class/net/lo") else {}

GUIDE_EXAMPLE = """--do_train 1 --data_path data/MSRVTT_data.json --features_path data/MSRVTT_Videos
--output_dir output/tome_msrvtt --max_words 32 --max_frames 12 --batch_size 128 --lr 1e-4 --epochs 5 --tome_r 2
--tome_prop_attn --pretrained_clip_name "ViT-B/32" --sim_header "meanP" --temporal_prompt "DGL\""""


def test_guide_flags_parse_as_written():
    args, explicit = parse_args(shlex.split(GUIDE_EXAMPLE))
    assert args.do_train == 1 and args.tome_r == 2 and args.tome_prop_attn is True and args.temporal_prompt == "DGL"
    assert {"tome_r", "max_frames", "lr"} <= explicit
    args, _ = parse_args(
        shlex.split(
            "--tome_r 2 --tome_trace_source --tome_prop_attn --max_frames 12 "
            "--pretrained_clip_name ViT-B/32 --do_train --output_dir o"
        )
    )
    assert args.do_train == 1 and args.tome_trace_source
    assert parse_args(["--do_eval", "--no-tome_prop_attn", "--output_dir", "o"])[0].tome_prop_attn is False
    assert parse_args(["--do_eval", "--tome_prop_attn", "0", "--output_dir", "o"])[0].tome_prop_attn is False
    assert parse_args(["--do_eval", "--lora", "False", "--output_dir", "o"])[0].lora is False  # STOP: always True


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--output_dir", "o"], "one of --do_train or --do_eval is required"),
        (["--do_eval", "--output_dir", "o", "--tome_r", "-1"], "argument --tome_r: expected an integer >= 0"),
        (["--do_eval", "--output_dir", "o", "--temporal_prompt", "x"], "argument --temporal_prompt: invalid choice"),
        (["--do_eval", "--output_dir", "o", "--tome_r", "2", "--tome_cross_layers", "8"], "needs --temporal_prompt"),
    ],
)
def test_bad_flags_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and "\n" not in err


def _argv(msrvtt_dir: Path, weights_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data_path", str(msrvtt_dir / "MSRVTT_data.json"),
        "--features_path", str(msrvtt_dir / "videos"),
        "--output_dir", str(out),
        "--pretrained_dir", str(weights_dir),
        "--max_words", "12", "--max_frames", "2", "--batch_size", "2", "--batch_size_val", "3",
        "--num_thread_reader", "0", "--lr", "1e-3", "--no_tensorboard", "--device", "cpu",
        # no --prompter_conv: the default auto = fold2d on CPU (oneDNN's Conv3d costs seconds per call)
        *extra,
    ]  # fmt: skip


def test_train_one_step_then_eval_with_merging(msrvtt_dir, weights_dir, tmp_path):
    out = tmp_path / "run"
    argv = _argv(
        msrvtt_dir,
        weights_dir,
        out,
        "--do_train",
        "1",
        "--epochs",
        "1",
        "--max_train_steps",
        "1",
        "--tome_r",
        "2",
        "--tome_trace_source",
        "--freeze_clip",
        "1",
        "--precision",
        "amp",
    )
    assert main(argv) == 0
    history = json.loads((out / "history.json").read_text())
    metrics = history[-1]
    for key in ("t2v_R1", "t2v_R5", "t2v_R10", "t2v_MdR", "t2v_MnR", "v2t_R1", "v2t_MnR"):
        assert key in metrics
    assert metrics["pairs"] == 4 and metrics["bad_videos"] == 0
    assert 1 <= metrics["t2v_MnR"] <= 4
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 1 and ckpt["epoch"] == 1
    assert sorted(p.name for p in (out / "merge_vis").iterdir())[:1] == ["epoch1_video7001.png"]
    # evaluation from the trained weights, ViT-B/16 name -> the TorchScript archive in the weights folder
    ev = tmp_path / "eval"
    assert (
        main(
            _argv(
                msrvtt_dir,
                weights_dir,
                ev,
                "--do_eval",
                "--init_model",
                str(out / "best.pt"),
                "--tome_r",
                "2",
                "--freeze_clip",
                "1",
            )
        )
        == 0
    )
    assert json.loads((ev / "history.json").read_text())[-1]["pairs"] == 4


def test_missing_weights_is_a_one_line_error(msrvtt_dir, tmp_path, capsys):
    assert main(_argv(msrvtt_dir, tmp_path, tmp_path / "o", "--do_eval")) == 2
    err = capsys.readouterr().err
    assert "--pretrained_clip_name 'ViT-B/32'" in err and "nothing is downloaded" in err


def test_resume_equals_uninterrupted(msrvtt_dir, weights_dir, tmp_path, monkeypatch):
    common = [
        "--do_train",
        "1",
        "--epochs",
        "2",
        "--max_train_steps",
        "1",
        "--tome_r",
        "1",
        "--freeze_clip",
        "1",
        "--seed",
        "3",
    ]
    full = tmp_path / "full"
    assert main(_argv(msrvtt_dir, weights_dir, full, *common)) == 0

    part = tmp_path / "part"
    real_save = engine.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if Path(path).name == engine.CKPT_NAME:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(_argv(msrvtt_dir, weights_dir, part, *common))
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    assert load_checkpoint(part / "checkpoint.pt")["step"] == 1
    assert main(_argv(msrvtt_dir, weights_dir, part, "--resume", str(part), "--epochs", "2")) == 0

    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert a["step"] == b["step"] == 2 and a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    steps = [row["step"] for row in json.loads((part / "history.json").read_text()) if "loss" in row]
    assert steps == [1, 2]


@pytest.mark.slow
def test_torchrun_two_processes_cpu(msrvtt_dir, weights_dir, tmp_path):
    """DDP through torchrun on CPU (gloo): features all-gathered with gradients, sharded eval gathered on rank 0."""

    out = tmp_path / "ddp"
    argv = _argv(
        msrvtt_dir,
        weights_dir,
        out,
        "--do_train",
        "1",
        "--epochs",
        "1",
        "--max_train_steps",
        "1",
        "--tome_r",
        "1",
        "--freeze_clip",
        "1",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "stop_tome.main",
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **LOOPBACK}  # gloo over loopback: no lookup of the host name
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["pairs"] == 4 and load_checkpoint(out / "checkpoint.pt")["step"] == 1


def test_eval_skips_and_counts_a_corrupt_video(msrvtt_dir, weights_dir, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for p in (msrvtt_dir / "videos").iterdir():
        if p.stem != "video7003":
            (videos / p.name).symlink_to(p)
    (videos / "video7003.mp4").write_bytes(b"\x1a\x45\xdf\xa3 not really a video" * 50)
    out = tmp_path / "eval"
    argv = _argv(msrvtt_dir, weights_dir, out, "--do_eval", "--temporal_prompt", "none")
    argv[argv.index("--features_path") + 1] = str(videos)
    assert main(argv) == 0
    row = json.loads((out / "history.json").read_text())[-1]
    assert row["pairs"] == 3 and row["bad_videos"] == 1
    assert "skipped video video7003" in capsys.readouterr().out
