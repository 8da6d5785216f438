"""``merge-bench --suite compile``: ``torch.compile`` of plain and patched ViTs (issue 9 target 6).

Per row (plain timm, then merge-core with each ``--prop-attn`` setting at the requested r, forced): eager
latency, the time to the first output of ``torch.compile(model)`` (default mode: tracing, Inductor code
generation, the first run; cold unless ``--compile-cache``), and the compiled steady-state latency. Target 6:
a patched ViT-B compiles in <= 60 s and its compiled forward is at least as fast as eager merging.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from merge_core import patch
from merge_core.bench import measure

from .common import build_model, model_name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _compiler_startup(device: torch.device, backend: str) -> float:
    """Seconds to compile and run a one-op function: the process-wide start-up (imports, worker pools) that
    would otherwise be charged to whichever row compiles first."""
    torch._dynamo.reset()
    start = time.perf_counter()
    torch.compile(lambda a: (a * 2).sin(), backend=backend)(torch.randn(8, device=device))
    _sync(device)
    return time.perf_counter() - start


def compile_row(model, x, backend: str, args, device) -> dict[str, Any]:
    """Eager median, time to first compiled output, compiled median and the compiled-vs-eager output gap."""
    run_eager = lambda: model(x)  # noqa: E731
    with torch.inference_mode():
        eager = measure(run_eager, device, args.warmup, args.iters)
        expected = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        start = time.perf_counter()
        out = compiled(x)
        _sync(device)
        first = time.perf_counter() - start
        steady = measure(lambda fn=compiled: fn(x), device, args.warmup, args.iters)
        diff = _max_diff(out, expected)
    del compiled
    torch._dynamo.reset()
    return {
        "eager_ms": eager["ms_median"],
        "compiled_ms": steady["ms_median"],
        "compiled_ms_min": steady["ms_min"],
        "time_to_first_output_s": first,
        "compiled_vs_eager": eager["ms_median"] / steady["ms_median"],
        "max_abs_diff_vs_eager": diff,
    }


def run_compile(device, dtype, args, log=print, checkpoint=lambda payload: None, payload=None) -> dict[str, Any]:
    """The compile rows of one model and batch (``--model``, default ViT-B; ``--batch-size``; r = max ``--r``)."""
    import torch._inductor.config as inductor_config

    payload = payload if payload is not None else {}
    kwargs: dict[str, Any] = {}
    if args.depth:
        kwargs["depth"] = args.depth
    if args.img_size:
        kwargs["img_size"] = args.img_size
    name = model_name(args)
    base = build_model(name, device, dtype, **kwargs)
    x = torch.randn(args.batch_size, 3, *base.patch_embed.img_size, device=device, dtype=dtype)
    r = max(args.r)
    props = {"on": [True], "off": [False], "both": [False, True]}[args.prop_attn]
    backend = args.compile_backend
    payload["compile"] = info = {
        "model": name,
        "depth": len(base.blocks),
        "img_size": list(base.patch_embed.img_size),
        "batch": args.batch_size,
        "r": r,
        "backend": backend,
        "mode": "default",
        "inductor_caches": bool(args.compile_cache),
        "rows": [],
    }
    saved = inductor_config.force_disable_caches
    inductor_config.force_disable_caches = not args.compile_cache  # a cold compile is what a user waits for
    try:
        info["compiler_startup_s"] = _compiler_startup(device, backend)
        log(
            f"compile: {name} depth {info['depth']} @{info['img_size'][0]}, batch {args.batch_size}, r={r}, "
            f"backend {backend}, caches {'on' if args.compile_cache else 'off'}; compiler start-up "
            f"{info['compiler_startup_s']:.1f} s"
        )
        variants = [("timm", None)] + [("merge", prop) for prop in props]
        for kind, prop in variants:
            model = copy.deepcopy(base)
            if kind == "merge":
                patch.timm(model, prop_attn=prop)
                model.r = r
                model.merge_policy = "force"  # eager merges too (a compiled forward always runs the requested r)
            row: dict[str, Any] = {"kind": kind, "r": r if kind == "merge" else 0, "prop_attn": prop}
            try:
                row.update(compile_row(model, x, backend, args, device))
            except Exception as exc:  # keep the other rows; report the failure
                row["error"] = f"{type(exc).__name__}: {exc}"
                log(f"  {kind} prop_attn={prop} failed: {row['error']}")
            info["rows"].append(row)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _speedups(info["rows"])
            if "error" not in row:
                log("  " + row_text(row))
            checkpoint(payload)
    finally:
        inductor_config.force_disable_caches = saved
    return payload


def _speedups(rows: list[dict[str, Any]]) -> None:
    """Speed-ups against plain timm in the same execution mode (eager vs eager, compiled vs compiled)."""
    base = next((row for row in rows if row["kind"] == "timm" and "error" not in row), None)
    for row in rows:
        if base is not None and "error" not in row:
            row["speedup_eager"] = base["eager_ms"] / row["eager_ms"]
            row["speedup_compiled"] = base["compiled_ms"] / row["compiled_ms"]


def row_text(row: dict[str, Any]) -> str:
    label = row["kind"] + ("" if row["prop_attn"] is None else f" prop_attn={'on' if row['prop_attn'] else 'off'}")
    return (
        f"{label:<24} r={row['r']:<3} first output {row['time_to_first_output_s']:7.1f} s | eager "
        f"{row['eager_ms']:8.3f} ms | compiled {row['compiled_ms']:8.3f} ms ({row['compiled_vs_eager']:.2f}x eager) "
        f"| vs timm: eager {row.get('speedup_eager', float('nan')):.2f}x, compiled "
        f"{row.get('speedup_compiled', float('nan')):.2f}x | max |diff| {row['max_abs_diff_vs_eager']:.2e}"
    )
