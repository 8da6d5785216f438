"""``merge-bench``: throughput of timm ViTs with and without token merging, on the current device.

Default (CPU-friendly, no download): build ``vit_small_patch16_224`` with random weights, print its parameter
count, GMACs per image (multiply-accumulates; FLOPs = 2 x MACs) and images/s for several ``r`` next to the
unpatched model, and write the table as JSON::

    merge-bench                                   # CPU: batch 4, fp32, r = 0, 8, 16, a few iterations
    merge-bench --model vit_base_patch16_224 --batch-size 256 --r 0,8,16 --compile
    merge-bench --suite gpu                       # issue 3: ViT-S/B/L, bounds, ToMe-style, micro, attention
    merge-bench --suite sweep                     # issue 9: batch 1..256, forced vs automatic, eager vs graphs

Timing: warm-up runs first, then every run is timed on its own (CUDA events on GPU, ``perf_counter`` on
CPU) and the median is reported. Suites write one JSON per suite and device into ``--out``
(``merge-bench-<suite>[-<mode>]-<device>.json``), replacing the previous run's file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .common import DTYPES, device_slug, environment, write_json
from .models import bench_model
from .suites import run_suite

SUITES = ("model", "gpu", "sweep", "micro", "profile")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative ints, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="merge-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 256 on CUDA")
    p.add_argument("--r", type=_int_list, default=[0, 8, 16], help="comma-separated r values (default 0,8,16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--prop-attn", choices=["on", "off", "both"], default="on")
    p.add_argument("--attn-backend", default="auto", help="proportional attention backend(s), comma-separated")
    p.add_argument(
        "--mode",
        choices=["eager", "compile", "both", "cudagraph", "eager+cudagraph"],
        default="eager",
        help="eager, torch.compile, both, or the forward captured in a CUDA graph (CUDA only)",
    )
    p.add_argument("--compile", action="store_const", const="both", dest="mode", help="same as --mode both")
    p.add_argument("--bounds", action="store_true", help="add the zero-overhead bounds (no matching)")
    p.add_argument("--tome", action="store_true", help="add the ToMe-style unfused baseline")
    p.add_argument("--torch-path", action="store_true", help="add merge rows with the fused kernels off")
    p.add_argument("--auto", action="store_true", help="add rows with the automatic (never-slower) merge policy")
    p.add_argument("--interleave", action="store_true", help="time rows round-robin, one model copy per row")
    p.add_argument("--warmup", type=int, default=None, help="default: 2 on CPU, 10 on CUDA")
    p.add_argument("--iters", type=int, default=None, help="timed runs, median reported (5 CPU, 30 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", default="results/merge-bench.json", help="suite model: JSON path ('' to skip)")
    p.add_argument("--suite", choices=SUITES, default="model", help="model (default), gpu, sweep, micro or profile")
    p.add_argument("--models", default=None, help="gpu/sweep: subset, e.g. vit_small,vit_large@512")
    p.add_argument("--batches", type=_int_list, default=None, help="sweep: subset of batch sizes")
    p.add_argument("--out", default="results", help="suites: folder for the JSON")
    p.add_argument("--compile-micro", action="store_true", help="micro: add a torch.compile'd torch path")
    p.add_argument("--no-micro", action="store_true", help="suite gpu: skip the micro/attention benchmarks")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    cuda = device.type == "cuda"
    if not cuda and ("cudagraph" in args.mode or args.suite in ("profile",)):
        p.error(f"--mode {args.mode} / --suite {args.suite} need a CUDA device")
    args.device = device
    args.dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if cuda else torch.float32)
    args.batch_size = args.batch_size if args.batch_size is not None else (256 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.iters = args.iters if args.iters is not None else (30 if cuda else 5)
    if args.batch_size <= 0 or args.iters <= 0 or args.warmup < 0:
        p.error("--batch-size and --iters must be > 0, --warmup >= 0")
    return args


def suite_path(args) -> Path:
    mode = "" if args.mode == "eager" or args.suite in ("sweep", "profile") else f"-{args.mode}"
    return Path(args.out) / f"merge-bench-{args.suite}{mode}-{device_slug(args.device)}.json"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = print
    if args.suite != "model":
        path = suite_path(args)
        run_suite(args, log, checkpoint=lambda payload: write_json(path, payload, lambda *a: None))
        log(f"wrote {path}")
        return 0
    env = environment(args.device)
    log(f"device: {env['device_name']} ({args.device}) | torch {env['torch']} | timm {env['timm']}")
    info, rows = bench_model(args.model, args.batch_size, args, args.device, args.dtype, log)
    if args.json:
        write_json(args.json, {"environment": env, **info, "rows": rows}, log)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
