"""The suites: ``gpu`` (issue 3: bounds, ToMe-style, micro, attention), ``sweep`` (issue 9: batch sweep with
forced vs automatic merging, eager vs CUDA graphs, ToMe's ViT-L/16@512 flagship), ``micro``, ``profile``,
``compile`` (issue 9 target 6: compile time and compiled vs eager latency) and ``overhead`` (host cost at r = 0)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .common import environment
from .compile_time import run_compile
from .micro import run_attention, run_micro
from .models import bench_model
from .profile import run_overhead, run_profile

# (model, batch, r) of issue 3's targets
GPU_SUITE = (("vit_small_patch16_224", 512, 16), ("vit_base_patch16_224", 256, 16), ("vit_large_patch16_224", 128, 8))
# (label, timm model, image size, r, batches) of issue 9's batch sweep; ViT-L@512 stops at 64 (one batch-256
# forward takes ~0.35 s, so its rows alone would take minutes of device time) and includes the flagship bs32
SWEEP = (
    ("vit_small", "vit_small_patch16_224", 224, 16, (1, 8, 64, 256)),
    ("vit_base", "vit_base_patch16_224", 224, 16, (1, 8, 64, 256)),
    ("vit_large", "vit_large_patch16_224", 224, 8, (1, 8, 64, 256)),
    ("vit_large@512", "vit_large_patch16_224", 512, 40, (1, 8, 32, 64)),
)


def run_suite(args, log=print, checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``args.suite``; ``checkpoint(payload)`` is called after each section (partial results survive)."""
    checkpoint = checkpoint or (lambda payload: None)
    device, dtype = args.device, args.dtype
    payload: dict[str, Any] = {"suite": args.suite, "environment": environment(device), "dtype": str(dtype)}
    payload.update(warmup=args.warmup, iters=args.iters, mode=args.mode)
    log(f"device: {payload['environment']['device_name']} | {payload['environment']}")
    if args.suite == "profile":
        return run_profile(device, dtype, args, log, checkpoint, payload)
    if args.suite == "overhead":
        return run_overhead(device, dtype, args, log, checkpoint, payload)
    if args.suite == "compile":
        return run_compile(device, dtype, args, log, checkpoint, payload)
    if args.suite == "sweep":
        return _sweep(args, payload, log, checkpoint)
    args.compile_micro = args.compile_micro or args.mode == "compile"
    if not args.no_micro:
        payload["match_merge"] = run_micro(device, dtype, args, log)
        checkpoint(payload)
        if args.suite == "micro":
            payload["attention"] = run_attention(device, dtype, args, log)
            checkpoint(payload)
            return payload
        if args.mode == "eager":
            payload["attention"] = run_attention(device, dtype, args, log)
            checkpoint(payload)
    return _suite_models(args, payload, log, checkpoint)


def _suite_models(args, payload, log, checkpoint):
    device, dtype = args.device, args.dtype
    wanted = set(args.models.split(",")) if args.models else None
    payload["models"] = []
    for name, batch, r in GPU_SUITE:
        if wanted and name.rsplit("_patch", 1)[0] not in wanted:
            continue
        suite_args = argparse.Namespace(**vars(args))
        suite_args.r = [r] if args.mode in ("compile", "cudagraph") else [0, r]  # compiling r=0 rows costs minutes
        suite_args.prop_attn = "both"
        suite_args.bounds = suite_args.tome = suite_args.torch_path = True
        suite_args.auto = args.mode == "eager"
        if args.mode == "compile":  # the qkv-channel path spent minutes in Inductor autotuning: SDPA mask here
            suite_args.attn_backend = "sdpa"
            suite_args.bias_bound = False
        entry: dict[str, Any] = {"model": name, "batch": batch, "rows": []}
        payload["models"].append(entry)

        def on_row(rows, entry=entry):
            entry["rows"] = rows
            checkpoint(payload)

        info, rows = bench_model(name, batch, suite_args, device, dtype, log, on_row=on_row)
        entry.update(info, rows=rows)
        checkpoint(payload)
    return payload


def _sweep(args, payload, log, checkpoint):
    """Per model and batch: plain timm, forced merging (prop_attn off / on), the automatic policy, in eager
    mode and under CUDA graphs (``merge_core.kernels.graph.cuda_graph`` for the automatic row)."""
    wanted = set(args.models.split(",")) if args.models else None
    batches = set(args.batches) if args.batches else None
    payload["sweep"] = []
    for label, name, img, r, sweep_batches in SWEEP:
        if wanted and label not in wanted:
            continue
        for batch in sweep_batches:
            if batches and batch not in batches:
                continue
            sweep_args = argparse.Namespace(**vars(args))
            sweep_args.r, sweep_args.prop_attn, sweep_args.attn_backend = [r], "both", "auto"
            sweep_args.auto = True
            sweep_args.bounds = img == 512 and batch == 32  # the flagship row gets its zero-overhead bounds
            sweep_args.tome = sweep_args.torch_path = False
            sweep_args.mode = "eager+cudagraph" if args.device.type == "cuda" else "eager"
            sweep_args.interleave = True  # eager rows are host-bound: time them round-robin (see models.py)
            entry: dict[str, Any] = {"label": label, "model": name, "img_size": img, "batch": batch, "rows": []}
            payload["sweep"].append(entry)

            def on_row(rows, entry=entry):
                entry["rows"] = rows
                checkpoint(payload)

            try:
                info, rows = bench_model(name, batch, sweep_args, args.device, args.dtype, log, on_row, img_size=img)
            except Exception as exc:  # e.g. out of memory: keep the other rows
                log(f"  {label} batch {batch} failed: {type(exc).__name__}: {exc}")
                entry["error"] = f"{type(exc).__name__}: {exc}"
                continue
            entry.update(info, rows=rows)
            checkpoint(payload)
    return payload
