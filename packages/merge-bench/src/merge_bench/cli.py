"""``merge-bench``: throughput of timm ViTs with and without token merging, on the current device.

Default (CPU-friendly, no download): build ``vit_small_patch16_224`` with random weights, print its parameter
count, GMACs per image (multiply-accumulates; FLOPs = 2 x MACs) and images/s for several ``r`` next to the
unpatched model, and write the table as JSON::

    merge-bench                                   # CPU: batch 4, fp32, r = 0, 8, 16, a few iterations
    merge-bench --model vit_base_patch16_224 --batch-size 256 --r 0,8,16 --compile
    merge-bench --suite gpu                       # issue 3: ViT-S/B/L, bounds, ToMe-style, micro, attention
    merge-bench --suite sweep                     # issue 9: batch 1..256, forced vs automatic, eager vs graphs
    merge-bench --suite sweep,compile             # several suites in one run (one JSON each)
    merge-bench --suite compile                   # issue 9 target 6: time to first compiled output, steady state
    merge-bench --suite overhead --device cpu     # host cost of the r = 0 path: plain vs patched r=0 vs policy r=0

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

from .common import DTYPES, device_slug, environment, model_name, write_json
from .models import bench_model
from .suites import run_suite

SUITES = ("model", "gpu", "sweep", "micro", "profile", "compile", "overhead")
CUDA_ONLY = ("profile",)
# suites whose file name carries no --mode suffix (they pick their execution modes themselves)
NO_MODE_SUFFIX = ("sweep", "profile", "compile", "overhead")


def _suite_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in SUITES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected suites from {', '.join(SUITES)} (comma-separated), got {text!r}")
    return list(dict.fromkeys(names))


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
    p.add_argument(
        "--model",
        default=None,
        help="timm model name (random weights); default vit_small_patch16_224, suite compile vit_base_patch16_224",
    )
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
    p.add_argument("--warmup", type=int, default=None, help="default: 2 on CPU, 10 on CUDA (overhead: 20)")
    p.add_argument("--iters", type=int, default=None, help="timed runs, median reported (5 CPU, 30 CUDA; overhead 300)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", default="results/merge-bench.json", help="suite model: JSON path ('' to skip)")
    p.add_argument(
        "--suite",
        type=_suite_list,
        default=["model"],
        help=f"one or more of {', '.join(SUITES)}, comma-separated (default model); one JSON per suite",
    )
    p.add_argument("--models", default=None, help="gpu/sweep: subset, e.g. vit_small,vit_large@512")
    p.add_argument("--batches", type=_int_list, default=None, help="sweep: subset of batch sizes")
    p.add_argument("--out", default="results", help="suites: folder for the JSON")
    p.add_argument("--compile-micro", action="store_true", help="micro: add a torch.compile'd torch path")
    p.add_argument("--no-micro", action="store_true", help="suite gpu: skip the micro/attention benchmarks")
    p.add_argument("--depth", type=int, default=None, help="blocks (default: the model's; overhead: 2)")
    p.add_argument("--img-size", type=int, default=None, help="overhead/compile: image size (default: the model's)")
    p.add_argument("--compile-backend", default="inductor", help="compile: torch.compile backend (tests: aot_eager)")
    p.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        default="default",
        help="compile: torch.compile mode (reduce-overhead: CUDA graphs, the small-batch mode; CUDA only)",
    )
    p.add_argument(
        "--compile-dynamic",
        choices=["auto", "on", "off"],
        default="auto",
        help="compile: torch.compile(dynamic=None|True|False) (default auto = None)",
    )
    p.add_argument("--compile-skip-timm", action="store_true", help="compile: only the merge-core rows")
    p.add_argument(
        "--compile-cache",
        action="store_true",
        help="compile: keep Inductor's on-disk caches (default: off, so time to first output is a cold compile)",
    )
    args = p.parse_args(argv)
    args.suites = args.suite
    args.suite = args.suites[0]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    cuda = device.type == "cuda"
    if not cuda and ("cudagraph" in args.mode or any(s in CUDA_ONLY for s in args.suites)):
        p.error(f"--mode {args.mode} / --suite {','.join(args.suites)} need a CUDA device")
    args.device = device
    args.dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if cuda else torch.float32)
    args.batch_size = args.batch_size if args.batch_size is not None else (256 if cuda else 4)
    overhead_only = args.suites == ["overhead"]
    args.warmup = args.warmup if args.warmup is not None else (20 if overhead_only else 10 if cuda else 2)
    args.iters = args.iters if args.iters is not None else (300 if overhead_only else 30 if cuda else 5)
    if args.batch_size <= 0 or args.iters <= 0 or args.warmup < 0:
        p.error("--batch-size and --iters must be > 0, --warmup >= 0")
    if (args.depth is not None and args.depth <= 0) or (args.img_size is not None and args.img_size <= 0):
        p.error(f"--depth and --img-size must be > 0, got {args.depth} and {args.img_size}")
    return args


def suite_path(args) -> Path:
    mode = "" if args.mode == "eager" or args.suite in NO_MODE_SUFFIX else f"-{args.mode}"
    return Path(args.out) / f"merge-bench-{args.suite}{mode}-{device_slug(args.device)}.json"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = print
    for suite in args.suites:
        args.suite = suite
        if suite != "model":
            path = suite_path(args)
            run_suite(args, log, checkpoint=lambda payload, path=path: write_json(path, payload, lambda *a: None))
            log(f"wrote {path}")
            continue
        env = environment(args.device)
        log(f"device: {env['device_name']} ({args.device}) | torch {env['torch']} | timm {env['timm']}")
        extra = {"depth": args.depth} if args.depth else {}
        info, rows = bench_model(model_name(args), args.batch_size, args, args.device, args.dtype, log, **extra)
        if args.json:
            write_json(args.json, {"environment": env, **info, "rows": rows}, log)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
