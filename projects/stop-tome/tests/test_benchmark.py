"""The benchmark command runs on CPU with a tiny model, and its FLOP split matches a hand count."""

from __future__ import annotations

import json

import torch

from stop_tome.benchmark import flop_split, main
from stop_tome.merging import apply_tome_patch
from stop_tome.model import CLIP4Clip, task_config
from stop_tome.testing import TINY, tiny_state_dict


def test_benchmark_cli_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--tiny",
        "--batch",
        "2",
        "--frames",
        "4",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--modes",
        "DGL,none,cross",
        "--cross_layers",
        "1",
        "--cross_frames",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["mode"], r["r"]) for r in rows} == {(m, r) for m in ("DGL", "none") for r in (0, 1, 2)} | {
        ("cross", 1),
        ("cross", 2),
    }
    for r in rows:
        assert r["videos_per_s"] > 0 and r["gflops_visual"] >= r["gflops_blocks"] > 0
    dgl = {r["r"]: r for r in rows if r["mode"] == "DGL"}
    assert dgl[2]["gflops_blocks"] < dgl[1]["gflops_blocks"] < dgl[0]["gflops_blocks"]
    assert "| model | mode | tome_r |" in capsys.readouterr().out


def _block_macs(n_tokens: int, n_after: int, d: int, g: int = 0, frames: int = 1) -> int:
    """Hand count of one visual block (per video): qkv + out proj on all tokens, attention scores and weighted sum
    (frames: n x (g + n) each; globals: g x all), MLP on the merged tokens."""
    total_in = g + frames * n_tokens
    total_out = g + frames * n_after
    proj = total_in * d * 3 * d + total_in * d * d
    attn = frames * 2 * n_tokens * (g + n_tokens) * d + 2 * g * total_in * d
    mlp = 2 * total_out * d * 4 * d
    return proj + attn + mlp


def test_flop_split_matches_hand_count():
    """Plain CLIP4Clip tiny model, 2 frames, r=2: blocks = sum over layers of the hand count (FLOPs = 2 MACs),
    plus the matching's cosine scores per frame: even tokens (ceil(n/2)) x odd tokens (floor(n/2)) x head dim."""
    model = CLIP4Clip(None, tiny_state_dict(), task_config(temporal_prompt="none", max_frames=2)).eval()
    apply_tome_patch(model, r=2)
    video = torch.randn(1, 2, 3, 64, 64)
    got = flop_split(model, video, None)
    d, n = TINY.vision_width, 17
    macs = 0
    for _ in range(TINY.vision_layers):
        scores = 2 * ((n + 1) // 2) * (n // 2) * d  # two frames; one head, so head dim = width
        macs += _block_macs(n, n - 2, d, frames=2) + scores
        n -= 2
    assert got["gflops_blocks"] * 1e9 == 2 * macs


def test_meta_flops_full_size_targets(tmp_path):
    """Full-size ViT-B/32, 12 frames, FLOPs on the meta device (no weights, no compute): STOP's r=2 removes >= 20%
    of the transformer-block FLOPs but under 10% of the visual path (the prompter is untouched by merging)."""
    out = tmp_path / "flops.json"
    assert (
        main(["--device", "meta", "--models", "ViT-B/32", "--modes", "group2-2", "--r_b32", "0,2,4", "--out", str(out)])
        == 0
    )
    rows = {r["r"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[2]["block_flops_cut"] >= 0.20 and rows[2]["visual_flops_cut"] < 0.10
    assert rows[0]["gflops_outside_blocks"] > rows[0]["gflops_blocks"]  # the prompter costs more than the ViT
    assert rows[4]["tokens_per_frame_out"] == 54 - 11 * 4 - 2  # r=4: the last layer merges only 2 (half of 5)
