"""``stop-tome-benchmark``: speed, peak memory and GFLOPs of the visual path with per-frame / cross-frame merging.

Random weights (no files needed): ViT-B/32 and ViT-B/16 CLIP towers in STOP (group2-2), DGL and plain CLIP4Clip
form, plus the cross-frame mode on plain CLIP4Clip. Per row: videos/s, peak memory, GFLOPs per video of the
transformer blocks and of the whole visual path (``torch.utils.flop_counter``, FLOPs = 2 x MACs). Inputs are a
batch of videos as in STOP's evaluation (``--batch_size_val 16``, 12 frames). ``--tiny`` runs a tiny random model
on CPU (the test suite does this); GPU command in the project README.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from merge_core.bench import time_calls
from merge_core.kernels.graph import cuda_graph
from merge_core.kernels.policy import last_decision
from run_kit import OneLineArgumentParser, write_json_atomic

from .clip_model import CLIP, ClipSpec
from .fastconv import DEFAULT_MODE, auto_choices, get_prompter_conv, prompter_conv, set_prompter_conv
from .fastconv import MODES as CONV_MODES
from .merging import apply_tome_patch, merge_state
from .model import CLIP4Clip, task_config
from .testing import TINY

SPECS = {
    "ViT-B/32": ClipSpec(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": ClipSpec(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
}
MODES = ("group2-2", "DGL", "none", "cross")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_R = {"ViT-B/32": "0,1,2,3,4", "ViT-B/16": "0,2,4,8,12,16", "tiny": "0,1,2"}


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.replace("-", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected integers separated by ',' or '-', got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(prog="stop-tome-benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="ViT-B/32,ViT-B/16", help="comma-separated: ViT-B/32, ViT-B/16")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--r_b32", default=DEFAULT_R["ViT-B/32"], help="tome_r values for ViT-B/32")
    p.add_argument("--r_b16", default=DEFAULT_R["ViT-B/16"], help="tome_r values for ViT-B/16")
    p.add_argument("--batch", type=int, default=16, help="videos per forward")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--policy", default="auto", choices=["auto", "force"], help="merge-core never-slower policy")
    p.add_argument("--no_prop_attn", action="store_true", help="proportional attention off")
    p.add_argument("--cross_layers", default="8-9-10", help="cross-frame joins (TempMe-like default)")
    p.add_argument("--cross_frames", default="2-2-3")
    p.add_argument("--cross_ratio", type=float, default=0.3)
    p.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke run)")
    p.add_argument(
        "--no_cudnn_benchmark",
        action="store_true",
        help="keep cuDNN's default algorithm choice (STOP's 11x11 / 15x25 Conv3d prompters are ~97%% of its GPU time)",
    )
    p.add_argument(
        "--prompter_conv",
        default=DEFAULT_MODE,
        choices=list(CONV_MODES),
        help="execution of STOP's prompter Conv3d layers (stop_tome.fastconv; default auto, native = STOP's exact op "
        "order); FLOPs are always counted native",
    )
    p.add_argument(
        "--cuda_graph",
        action="store_true",
        help="time the forward replayed as a CUDA graph (merge_core.kernels.graph.cuda_graph; no host cost)",
    )
    p.add_argument("--out", default=None, help="JSON results (default: results/stop-tome-benchmark-<device>.json)")
    args = p.parse_args(argv)
    for name in ("batch", "frames", "iters"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name}: expected a positive integer, got {getattr(args, name)}")
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad:
        p.error(f"argument --modes: unknown mode {bad[0]!r}; expected a subset of {MODES}")
    models = ["tiny"] if args.tiny else args.models.split(",")
    bad = [m for m in models if m not in SPECS and m != "tiny"]
    if bad:
        p.error(f"argument --models: unknown model {bad[0]!r}; expected ViT-B/32 or ViT-B/16")
    if args.tiny and args.cross_layers == p.get_default("cross_layers"):
        # the tiny model has 3 layers: the 12-layer default joins would be out of range
        args.cross_layers, args.cross_frames = "1-2", "2-2"
    args.model_list, args.mode_list = models, args.modes.split(",")
    return args


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _flops(fn) -> int:
    # native convolutions: padded / folded paths would count their zero channels
    with torch.no_grad(), prompter_conv("native"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flop_split(model: CLIP4Clip, video: torch.Tensor, local: torch.Tensor | None) -> dict[str, float]:
    """GFLOPs per video: whole visual path, transformer blocks (attention, MLP, matching, merging) and the rest
    (STOP's pixel and inter-frame prompters, patch embedding, output projection)."""
    vis, one = model.clip.visual, video[:1]
    lp = None if local is None else local[:, :1] if local.dim() == 5 else local[:, None]
    total = _flops(lambda: model.get_video_features(one, None, local))
    tower = _flops(lambda: vis(one, lp))

    def stem():
        v, region = vis.TemporalPrompt(one) if vis.TemporalPrompt is not None else (one, None)
        frames = vis.embed(v)
        if vis.TemporalPrompt is not None:
            vis.TemporalPrompt.inter_frame_prompt(frames, region)

    blocks = tower - _flops(stem)
    return {
        "gflops_visual": total / 1e9,
        "gflops_blocks": blocks / 1e9,
        "gflops_outside_blocks": (total - blocks) / 1e9,
    }


def bench_row(model, spec_name, mode, r, video, local, args, device) -> dict[str, Any]:
    cross = mode == "cross"
    apply_tome_patch(
        model,
        r=r,
        prop_attn=not args.no_prop_attn,
        cross_layers=_ints(args.cross_layers, "--cross_layers") if cross else (),
        cross_frames=_ints(args.cross_frames, "--cross_frames") if cross else (),
        cross_ratio=args.cross_ratio,
    )
    model.merge_policy = args.policy
    row: dict[str, Any] = {"model": spec_name, "mode": mode, "r": r, "prop_attn": not args.no_prop_attn}
    row.update(flop_split(model, video, local))

    def fn():
        with torch.no_grad():
            model.get_video_features(video, None, local)  # the evaluation path: ViT, projection, pooling

    if device.type == "meta":  # FLOPs only (shapes are all a FLOP count needs)
        st = merge_state(model)
        row.update(ms=None, videos_per_s=None, tokens_per_frame_out=st.tokens[-1], groups_out=st["groups"])
        row.update(r_run=list(st.r), policy_merged=None)
        return row
    if args.cuda_graph and device.type == "cuda":
        # the requested r is captured (the policy steps aside under capture); the graph removes the host cost
        graphed = cuda_graph(lambda v: model.get_video_features(v, None, local), video, warmup=args.warmup)

        def fn():
            graphed(video)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = time_calls(fn, device, args.warmup, args.iters)
    ms = statistics.median(times)
    st = merge_state(model)
    row.update(
        ms=ms,
        videos_per_s=args.batch / (ms / 1e3),
        tokens_per_frame_out=st.tokens[-1] if st.tokens else None,
        groups_out=st["groups"],
        r_run=list(st.r),
    )
    decision = last_decision(model)
    row["policy_merged"] = None if decision is None else bool(decision["merge"])
    if device.type == "cuda":
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["peak_activation_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return row


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """All rows of ``args``; the process-wide ``--prompter_conv`` mode is restored afterwards."""
    old = get_prompter_conv()
    try:
        return _run(args, log)
    finally:
        set_prompter_conv(old)


def _run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    device, dtype = _device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark  # fixed shapes: let cuDNN pick the Conv3d kernel
    set_prompter_conv(args.prompter_conv)
    if device.type in ("cpu", "meta") and dtype == torch.float16:
        dtype = torch.float32  # fp16 matmuls on CPU are not what anyone deploys; say so in the output
        log("note: fp16 on CPU replaced by fp32")
    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else ("meta (FLOPs only)" if device.type == "meta" else platform.processor() or "cpu"),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": args.batch,
        "frames": args.frames,
        "policy": args.policy,
        "cuda_graph": bool(args.cuda_graph),
        "cudnn_benchmark": device.type == "cuda" and not args.no_cudnn_benchmark,
        "prompter_conv": args.prompter_conv,
    }
    rows: list[dict[str, Any]] = []
    out = Path(args.out) if args.out else Path("results") / f"stop-tome-benchmark-{_slug(env['device'])}.json"
    for name in args.model_list:
        plain_base = None
        spec = TINY if name == "tiny" else SPECS[name]
        torch.manual_seed(0)
        build = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
        with build:
            sd = CLIP(spec).state_dict()
        r_values = _ints(DEFAULT_R["tiny"] if name == "tiny" else (args.r_b32 if "32" in name else args.r_b16), "r")
        gen = torch.Generator().manual_seed(0)
        shape = (args.batch, args.frames, 3, spec.image_resolution, spec.image_resolution)
        video = torch.empty(shape, device="meta") if device.type == "meta" else torch.randn(shape, generator=gen)
        video = video.to(device, dtype)
        for mode in args.mode_list:
            cfg = task_config(temporal_prompt="none" if mode == "cross" else mode, max_frames=args.frames)
            with build:
                model = CLIP4Clip(None, sd, cfg).to(device, dtype).eval()
            with torch.no_grad():
                _, local = model.encode_prompts()
            base = plain_base if mode == "cross" else None  # cross rows compare with plain CLIP4Clip at r=0
            for r in r_values:
                if mode == "cross" and r == 0:
                    continue  # r = 0 switches every merge off: the plain CLIP4Clip row
                try:
                    row = bench_row(model, name, mode, r, video, local, args, device)
                except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:  # keep the other rows of a GPU session
                    rows.append({"model": name, "mode": mode, "r": r, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    log(f"{name} {mode} r={r}: {rows[-1]['error']}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if r == 0:
                    base = row
                if base is not None:
                    compare(row, base)
                rows.append(row)
                log(_row_text(row))
                write_json_atomic(out, {"environment": env, "rows": rows})  # partial results survive a crash
            if mode == "none":
                plain_base = base
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.prompter_conv == "auto":
        env["prompter_conv_auto_choices"] = auto_choices()
    payload = {"environment": env, "rows": rows}
    write_json_atomic(out, payload)
    log(f"wrote {out}")
    log(markdown_table(rows))
    return payload


def compare(row: dict[str, Any], base: dict[str, Any]) -> None:
    """Speed-up and FLOP cuts of ``row`` against the r = 0 row of the same model (and mode)."""
    if row["videos_per_s"] and base["videos_per_s"]:
        row["speedup"] = row["videos_per_s"] / base["videos_per_s"]
    row["block_flops_cut"] = 1 - row["gflops_blocks"] / base["gflops_blocks"]
    row["visual_flops_cut"] = 1 - row["gflops_visual"] / base["gflops_visual"]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-") or "cpu"


def _row_text(row: dict[str, Any]) -> str:
    mem = f" {row['peak_mem_mib']:.0f} MiB" if "peak_mem_mib" in row else ""
    speed = "-" if row["videos_per_s"] is None else f"{row['videos_per_s']:8.1f}"
    return (
        f"{row['model']:9s} {row['mode']:9s} r={row['r']:<3d} {speed} videos/s{mem} "
        f"GFLOPs visual {row['gflops_visual']:.4g} blocks {row['gflops_blocks']:.4g}"
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | mode | tome_r | videos/s | x vs r=0 | peak MiB | GFLOPs blocks | GFLOPs visual | "
        "blocks cut | visual cut | policy merged |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]

    def pct(row: dict[str, Any], key: str) -> str:
        return f"{100 * row[key]:.1f}%" if key in row else "-"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['r']} | {r['error'][:60]} |" + " |" * 7)
            continue
        mem = f"{r['peak_mem_mib']:.0f}" if "peak_mem_mib" in r else "-"
        merged = "-" if r["policy_merged"] is None else r["policy_merged"]
        speed = "-" if r["videos_per_s"] is None else f"{r['videos_per_s']:.1f}"
        speedup = f"{r['speedup']:.2f}" if "speedup" in r else "-"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['r']} | {speed} | {speedup} | "
            f"{mem} | {r['gflops_blocks']:.4g} | {r['gflops_visual']:.4g} | {pct(r, 'block_flops_cut')} | "
            f"{pct(r, 'visual_flops_cut')} | {merged} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
