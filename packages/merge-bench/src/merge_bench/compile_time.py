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


def _dynamo_counts() -> dict[str, int]:
    """Dynamo's process-wide counters that tell whether a compiled model is one graph and stays compiled."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "frames": int(counters["frames"].get("ok", 0)),
    }


def _counts_since(before: dict[str, int]) -> dict[str, int]:
    now = _dynamo_counts()
    return {key: now[key] - before[key] for key in now}


def _timed_totals() -> dict[str, tuple[int, float]]:
    """(calls, seconds) so far of every phase dynamo/Inductor time with ``dynamo_timed`` (tracing, AOT, lowering,
    code generation, Triton compilation waits, autotuning benchmarks, ...), process-wide."""
    from torch._dynamo import utils

    metrics = getattr(utils, "compilation_time_metrics", {})
    return {key: (len(values), float(sum(values))) for key, values in metrics.items()}


def compile_breakdown(before: dict[str, tuple[int, float]]) -> dict[str, float]:
    """Seconds per phase since ``before``, largest first. Phases nest (outer ones include inner ones) and a
    re-entrant phase sums its nested calls, so values do not add up to the wall time."""
    after = _timed_totals()
    spent = {key: after[key][1] - before.get(key, (0, 0.0))[1] for key in after}
    return dict(sorted(((k, round(v, 3)) for k, v in spent.items() if v > 0), key=lambda kv: -kv[1]))


def compile_row(model, x, backend: str, args, device) -> dict[str, Any]:
    """Time to first compiled output, graph / recompile counts, compiled and eager medians, output gap.

    Compiled first, on a model that has not run eagerly yet (what a user does: patch, set r, compile, call),
    so state an eager forward would leave behind cannot hide a recompile. ``graphs_second_call`` counts the
    graphs dynamo compiled during the second and third calls (0: no recompile); any recompile during the
    timed calls would show up in ``graphs_timed_calls``. ``compile_breakdown_s`` tells where the first call's
    time went (dynamo's ``compile_times`` phases); ``inductor_kernels`` counts the kernels Inductor generated.
    """
    from torch._inductor import metrics as inductor_metrics

    mode = getattr(args, "compile_mode", "default")
    dynamic = {"auto": None, "on": True, "off": False}[getattr(args, "compile_dynamic", "auto")]
    row: dict[str, Any] = {"compile_mode": mode, "dynamic": dynamic}
    with torch.inference_mode():
        torch._dynamo.reset()
        before = _dynamo_counts()
        timed_before = _timed_totals()
        inductor_metrics.reset()
        compiled = torch.compile(model, backend=backend, mode=None if mode == "default" else mode, dynamic=dynamic)
        start = time.perf_counter()
        out = compiled(x).clone()  # reduce-overhead: later replays overwrite the graph's output buffer
        _sync(device)
        row["time_to_first_output_s"] = time.perf_counter() - start
        row["inductor_kernels"] = int(inductor_metrics.generated_kernel_count)
        row["compile_breakdown_s"] = compile_breakdown(timed_before)
        first = _counts_since(before)
        row.update(graphs=first["graphs"], graph_breaks=first["graph_breaks"])
        start = time.perf_counter()
        compiled(x)
        compiled(x)
        _sync(device)
        row["second_call_s"] = time.perf_counter() - start
        row["graphs_second_call"] = _counts_since(before)["graphs"] - first["graphs"]
        middle = _dynamo_counts()
        steady = measure(lambda fn=compiled: fn(x), device, args.warmup, args.iters)
        row["graphs_timed_calls"] = _counts_since(middle)["graphs"]
        eager = measure(lambda: model(x), device, args.warmup, args.iters)
        expected = model(x)
        row["max_abs_diff_vs_eager"] = _max_diff(out, expected)
    del compiled
    torch._dynamo.reset()
    row.update(
        eager_ms=eager["ms_median"],
        compiled_ms=steady["ms_median"],
        compiled_ms_min=steady["ms_min"],
        compiled_vs_eager=eager["ms_median"] / steady["ms_median"],
    )
    return row


def run_compile(device, dtype, args, log=print, checkpoint=lambda payload: None, payload=None) -> dict[str, Any]:
    """The compile rows of one model and batch (``--model``, default ViT-B; ``--batch-size``; r = max ``--r``)."""
    import torch._inductor.config as inductor_config

    payload = payload if payload is not None else {}
    if getattr(args, "compile_mode", "default") == "reduce-overhead" and device.type != "cuda":
        raise ValueError("--compile-mode reduce-overhead needs a CUDA device (it captures CUDA graphs)")
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
        "mode": getattr(args, "compile_mode", "default"),
        "dynamic": getattr(args, "compile_dynamic", "auto"),
        "inductor_caches": bool(args.compile_cache),
        "rows": [],
    }
    saved = inductor_config.force_disable_caches
    inductor_config.force_disable_caches = not args.compile_cache  # a cold compile is what a user waits for
    try:
        info["compiler_startup_s"] = _compiler_startup(device, backend)
        log(
            f"compile: {name} depth {info['depth']} @{info['img_size'][0]}, batch {args.batch_size}, r={r}, "
            f"backend {backend}, mode {info['mode']}, dynamic {info['dynamic']}, "
            f"caches {'on' if args.compile_cache else 'off'}; compiler start-up "
            f"{info['compiler_startup_s']:.1f} s"
        )
        variants = ([] if getattr(args, "compile_skip_timm", False) else [("timm", None)]) + [
            ("merge", prop) for prop in props
        ]
        for kind, prop in variants:
            model = copy.deepcopy(base)
            if kind == "merge":
                patch.timm(model, prop_attn=prop)
                model.r = r
                model.merge_policy = "force"  # eager merges too (a compiled forward always runs the requested r)
            row: dict[str, Any] = {"kind": kind, "r": r if kind == "merge" else 0, "prop_attn": prop}
            log(f"  compiling {kind} prop_attn={prop} ...")  # a time limit that cuts a row still names it
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
                top = list(row["compile_breakdown_s"].items())[:12]
                log(
                    f"    {row['inductor_kernels']} Inductor kernels; compile phases (s, nested): "
                    + ", ".join(f"{k} {v:.1f}" for k, v in top)
                )
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
        f"{label:<24} r={row['r']:<3} first output {row['time_to_first_output_s']:7.1f} s "
        f"({row['graphs']} graph(s), {row['graph_breaks']} breaks, recompiles on 2nd call {row['graphs_second_call']}) "
        f"| eager {row['eager_ms']:8.3f} ms | compiled {row['compiled_ms']:8.3f} ms "
        f"({row['compiled_vs_eager']:.2f}x eager) | vs timm: eager {row.get('speedup_eager', float('nan')):.2f}x, "
        f"compiled {row.get('speedup_compiled', float('nan')):.2f}x | max |diff| {row['max_abs_diff_vs_eager']:.2e}"
    )
