"""GPU micro-benchmark of STOP's prompter under every ``--prompter_conv`` path, then STOP's whole-visual rows.

Why: on an H200 STOP's Conv3d prompters were 97% of its GPU time, so token merging could not cut latency. This
times the whole prompter (pixel prompter + region mask + inter-frame prompter, ViT-B/32 shapes: 12 frames, 224 px,
width 768, 7 x 7 patches) per path, forward (eval, fp16 weights) and forward + backward (train mode, fp32 weights
under fp16 autocast, STOP's ``--precision amp``), at 16 videos (STOP's eval batch) and 1, with cuDNN autotuning off
and on (``--cudnn_benchmark``); each conv layer alone per path (``fft`` included); the largest output difference to
``native``; then ``stop-tome-benchmark`` rows for STOP group2-2 at tome_r 0..4 with the fastest path (cuDNN
autotuning on, forced and automatic merge policy) and ``native`` at r = 0 and 2 for reference. CUDA events,
warm-up, medians. Writes ``prompter_bench.json``, the benchmark JSONs and ``prompter_bench.log`` under ``--out_dir``.

``--device cpu --tiny`` is the smoke run of the test suite (tiny shapes, fp32).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from merge_core.bench import time_calls
from run_kit import OneLineArgumentParser, write_json_atomic

from . import benchmark as stop_bench
from .fastconv import FIXED_MODES, auto_choices, clear_auto_cache, prompter_conv
from .prompts import TemporalPrompt

MODES = (*FIXED_MODES, "auto")
FULL = {"width": 768, "heads": 12, "grid": 7, "patch": 32, "frames": 12, "res": 224}
TINY = {"width": 16, "heads": 2, "grid": 4, "patch": 8, "frames": 3, "res": 32}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog="stop-tome-prompter-bench", description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="/tmp/o", help="results folder (json + log)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="16,1", help="videos per call, comma-separated")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {MODES}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument(
        "--budget_s",
        type=float,
        default=300.0,
        help="seconds: measurements past 50%% of it (whole prompter), 85%% (benchmark rows), 100%% are skipped",
    )
    p.add_argument(
        "--cudnn_benchmark",
        default="both",
        choices=["both", "on", "off"],
        help="whole-prompter rows with cuDNN autotuning on and off (both), or one of them",
    )
    p.add_argument("--tiny", action="store_true", help="tiny shapes, fp32 (CPU smoke run)")
    p.add_argument("--no_full", action="store_true", help="skip the stop-tome-benchmark rows")
    p.add_argument("--no_train", action="store_true", help="skip forward + backward")
    p.add_argument("--no_layers", action="store_true", help="skip the per-layer table")
    args = p.parse_args(argv)
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad:
        p.error(f"argument --modes: unknown mode {bad[0]!r}; expected a subset of {MODES}")
    try:
        args.batch_list = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"argument --batches: expected integers separated by ',', got {args.batches!r}")
    if min(args.batch_list) < 1 or args.warmup < 0 or args.iters < 1:
        p.error("--batches and --iters must be positive, --warmup >= 0")
    args.mode_list = args.modes.split(",")
    return args


class Bench:
    """Shared state: device, shapes, log file, time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.shape = TINY if args.tiny else FULL
        self.dtype = torch.float16 if self.cuda and not args.tiny else torch.float32
        self.out = Path(args.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "prompter_bench.log", "w")  # noqa: SIM115 (closed in main)
        self.start = time.perf_counter()
        self.phase_end = args.budget_s
        if args.tiny and not self.cuda:
            # oneDNN's CPU Conv3d costs ~2 s per call on these 11x11 kernels whatever the size: keep the smoke run short
            torch.backends.mkldnn.enabled = False
        self.tp_train = self.prompter().train()  # fp32 weights (autocast in the step), as STOP trains

    def log(self, text: str) -> None:
        print(text, flush=True)
        self.log_file.write(text + "\n")
        self.log_file.flush()

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.phase_end

    def phase(self, share: float) -> None:
        """This phase may run until ``share`` of the budget (later phases keep their time)."""
        self.phase_end = share * self.args.budget_s

    def prompter(self) -> TemporalPrompt:
        s = self.shape
        torch.manual_seed(0)
        tp = TemporalPrompt(s["width"], s["heads"], s["grid"], s["patch"], 4)
        tp.Cal_Net.requires_grad_(False)  # as in CLIP4Clip: it only feeds a hard top-k mask
        return tp.to(self.device)

    def inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shape
        gen = torch.Generator().manual_seed(batch)
        video = torch.randn(batch, s["frames"], 3, s["res"], s["res"], generator=gen)
        frames = torch.randn(batch, s["frames"], 1 + s["grid"] ** 2, s["width"], generator=gen)
        return video.to(self.device), frames.to(self.device)

    def time(self, fn: Callable[[], Any]) -> tuple[float | None, int]:
        """Median ms; one slow first call (> 1 s after warm-up) cuts the timed calls to 2."""
        for _ in range(self.args.warmup):
            fn()
        first = time_calls(fn, self.device, 0, 1)[0]
        iters = 1 if first > 3000 else 2 if first > 1000 else self.args.iters
        times = [first, *time_calls(fn, self.device, 0, iters - 1)] if iters > 1 else [first]
        return statistics.median(times), len(times)


def _forward(tp: TemporalPrompt, video: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, mask = tp(video)
    return out, tp.inter_frame_prompt(frames, mask)


def whole_prompter(b: Bench) -> list[dict[str, Any]]:
    """Forward and forward + backward of the whole prompter, per cuDNN setting, batch and path."""
    rows: list[dict[str, Any]] = []
    # on first: the setting stop-tome-benchmark uses
    wanted = {"both": (True, False), "on": (True,), "off": (False,)}[b.args.cudnn_benchmark]
    cudnn_settings = wanted if b.cuda else (False,)
    for cudnn in cudnn_settings:
        torch.backends.cudnn.benchmark = cudnn
        for batch in b.args.batch_list:
            video, frames = b.inputs(batch)
            tp_eval = b.prompter().to(b.dtype).eval()
            with torch.no_grad(), prompter_conv("native"):
                ref = [t.float() for t in _forward(tp_eval, video.to(b.dtype), frames.to(b.dtype))]
            for mode in b.args.mode_list:
                row: dict[str, Any] = {"cudnn_benchmark": cudnn, "batch": batch, "mode": mode}
                rows.append(row)
                if b.over_budget():
                    row["skipped"] = "time budget"
                    continue
                clear_auto_cache()  # auto re-times under this cuDNN setting
                _measure(b, row, tp_eval, video, frames, ref)
                b.log(_whole_text(row))
                if row.get("auto_choices"):
                    b.log("  auto picked: " + "; ".join(f"{k} -> {v}" for k, v in row["auto_choices"].items()))
                if b.cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(b.device)
    return rows


def _measure(b: Bench, row: dict[str, Any], tp_eval, video, frames, ref: list[torch.Tensor]) -> None:
    """One whole-prompter row: output difference to native, forward ms, forward + backward ms, peak memory."""
    with prompter_conv(row["mode"]):
        v16, f16 = video.to(b.dtype), frames.to(b.dtype)
        with torch.no_grad():
            out = _forward(tp_eval, v16, f16)
            row["max_abs_diff_vs_native"] = max(
                float((o.float() - r).abs().max()) for o, r in zip(out, ref, strict=True)
            )
            row["max_abs_native"] = max(float(r.abs().max()) for r in ref)
            del out
            row["fwd_ms"], row["fwd_runs"] = b.time(lambda: _forward(tp_eval, v16, f16))
        if row["mode"] == "auto":
            row["auto_choices"] = auto_choices()
        if not b.args.no_train and not b.over_budget():
            row["train_ms"], row["train_runs"] = b.time(lambda: _train_step(b, b.tp_train, video, frames))
        if b.cuda:
            row["peak_mib"] = torch.cuda.max_memory_allocated(b.device) / 2**20


def _train_step(b: Bench, tp: TemporalPrompt, video: torch.Tensor, frames: torch.Tensor) -> None:
    with torch.autocast(b.device.type, dtype=torch.float16, enabled=b.cuda and not b.args.tiny):
        out, inter = _forward(tp, video, frames)
        loss = out.float().square().mean() + inter.float().square().mean()
    loss.backward()
    tp.zero_grad(set_to_none=True)


def _whole_text(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"cudnn.benchmark={int(row['cudnn_benchmark'])} batch={row['batch']:<3d} {row['mode']:13s} skipped"
    train = f"{row['train_ms']:9.2f}" if "train_ms" in row else "        -"
    return (
        f"cudnn.benchmark={int(row['cudnn_benchmark'])} batch={row['batch']:<3d} {row['mode']:13s} "
        f"fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {train} ms  max|diff| {row['max_abs_diff_vs_native']:.3g}"
    )


def per_layer(b: Bench, batch: int) -> list[dict[str, Any]]:
    """Each conv layer alone at its real input shape (forward, inference dtype), per fixed path, cuDNN on."""
    if b.cuda:
        torch.backends.cudnn.benchmark = True
    tp = b.prompter().to(b.dtype).eval()
    s = b.shape
    pix = (batch, 3, s["frames"], s["res"], s["res"])
    tok = (batch, 1, s["frames"], s["grid"] ** 2, s["width"])
    layers = [
        ("Conv.0", tp.Conv[0], pix),
        ("Conv.1", tp.Conv[1], (batch, 9, *pix[2:])),
        ("Conv.5", tp.Conv[5], (batch, 9, *pix[2:])),
        ("Cal_Net", tp.Cal_Net, pix),
        ("InterConv.0", tp.InterConv[0], tok),
        ("InterConv.2", tp.InterConv[2], (batch, 9, *tok[2:])),
        ("Cal_Net_Inter", tp.Cal_Net_Inter, tok),
    ]
    rows = []
    for name, layer, shape in layers:
        x = torch.randn(shape, device=b.device, dtype=b.dtype)
        row: dict[str, Any] = {"layer": name, "input": list(shape), "batch": batch}
        for mode in FIXED_MODES:
            if b.over_budget():
                row[mode] = None
                continue
            with torch.no_grad(), prompter_conv(mode):
                row[mode] = b.time(lambda layer=layer, x=x: layer(x))[0]
        rows.append(row)
        b.log(f"{name:14s} " + " ".join(f"{m} {_ms(row[m])}" for m in FIXED_MODES))
    return rows


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def best_mode(rows: list[dict[str, Any]], batch: int) -> str:
    """The fastest path of the whole-prompter forward at ``batch`` with cuDNN autotuning on (else off)."""
    timed = [r for r in rows if r["batch"] == batch and "fwd_ms" in r]
    on = [r for r in timed if r["cudnn_benchmark"]] or timed
    return min(on, key=lambda r: r["fwd_ms"])["mode"] if on else "native"


def full_rows(b: Bench, mode: str) -> dict[str, Any]:
    """``stop-tome-benchmark`` STOP group2-2 rows: best path forced / auto policy, and native for reference."""
    common = ["--modes", "group2-2", "--device", str(b.device), "--frames", str(b.shape["frames"])]
    if b.args.tiny:
        common += ["--tiny", "--batch", "2", "--warmup", "1", "--iters", "2", "--dtype", "fp32"]
    else:
        common += ["--models", "ViT-B/32", "--batch", "16", "--warmup", "3", "--iters", "10", "--dtype", "fp16"]
    runs = {
        f"{mode}-force": ["--policy", "force", "--prompter_conv", mode],
        f"{mode}-auto": ["--policy", "auto", "--prompter_conv", mode],
    }
    if mode != "native":  # the reference: STOP's own Conv3d path at r = 0 and 2
        runs["native-force"] = ["--policy", "force", "--prompter_conv", "native", "--r_b32", "0,2"]
    out: dict[str, Any] = {}
    for tag, extra in runs.items():
        if b.over_budget():
            out[tag] = {"skipped": "time budget"}
            b.log(f"stop-tome-benchmark {tag}: skipped (time budget)")
            continue
        path = b.out / f"stop-tome-benchmark-{tag}.json"
        b.log(f"\n## stop-tome-benchmark {tag}")
        args = stop_bench.parse_args([*common, *extra, "--out", str(path)])
        out[tag] = stop_bench.run(args, log=b.log)
    return out


def whole_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| cudnn.benchmark | batch | path | fwd ms | x vs native | fwd+bwd ms | x vs native | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["cudnn_benchmark"], r["batch"]): r for r in rows if r["mode"] == "native" and "fwd_ms" in r}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {int(r['cudnn_benchmark'])} | {r['batch']} | {r['mode']} | skipped | | | | |")
            continue
        n = base.get((r["cudnn_benchmark"], r["batch"]), {})
        fx = f"{n['fwd_ms'] / r['fwd_ms']:.1f}x" if n else "-"
        tr = f"{r['train_ms']:.2f}" if "train_ms" in r else "-"
        tx = f"{n['train_ms'] / r['train_ms']:.1f}x" if "train_ms" in r and "train_ms" in n else "-"
        lines.append(
            f"| {int(r['cudnn_benchmark'])} | {r['batch']} | {r['mode']} | {r['fwd_ms']:.2f} | {fx} | {tr} | {tx} | "
            f"{r['max_abs_diff_vs_native']:.3g} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    b = Bench(args)
    env = {
        "device": torch.cuda.get_device_name(b.device) if b.cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if b.cuda else None,
        "dtype_inference": str(b.dtype).replace("torch.", ""),
        "train": "fp32 weights, fp16 autocast" if b.cuda and not args.tiny else "fp32",
        "shape": b.shape,
        "warmup": args.warmup,
        "iters": args.iters,
    }
    b.log(f"# prompter micro-benchmark on {env['device']} (torch {env['torch']}, cuDNN {env['cudnn']})")
    result: dict[str, Any] = {"environment": env}
    try:
        b.phase(0.5)
        result["whole_prompter"] = whole_prompter(b)
        write_json_atomic(b.out / "prompter_bench.json", result)
        best = best_mode(result["whole_prompter"], max(args.batch_list))
        result["best_mode"] = best
        b.log(f"\nfastest path (batch {max(args.batch_list)}, forward, cuDNN autotuning on): {best}")
        b.phase(0.85)
        if not args.no_full:
            result["stop_tome_benchmark"] = full_rows(b, best)
        write_json_atomic(b.out / "prompter_bench.json", result)
        b.phase(1.0)
        if not args.no_layers:
            b.log("\n## each conv layer alone (forward ms, cuDNN autotuning on)")
            result["per_layer"] = per_layer(b, max(args.batch_list))
            write_json_atomic(b.out / "prompter_bench.json", result)
        b.log("\n## whole prompter\n" + whole_table(result["whole_prompter"]))
        full = result.get("stop_tome_benchmark", {})
        for tag, payload in full.items():
            if "rows" in payload:
                b.log(f"\n### stop-tome-benchmark {tag}\n" + stop_bench.markdown_table(payload["rows"]))
        b.log(f"\ntotal {time.perf_counter() - b.start:.0f} s; wrote {b.out / 'prompter_bench.json'}")
    finally:
        result["seconds"] = time.perf_counter() - b.start
        (b.out / "prompter_bench.json").write_text(json.dumps(result, indent=1, default=str))
        b.log_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
