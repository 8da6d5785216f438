"""Whole-model rows: plain timm, merge-core (forced r or the automatic policy), bounds, ToMe-style baseline."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from typing import Any

import torch

from merge_core import kernels, patch
from merge_core.bench import bound_forward, measure, time_calls, vit_macs
from merge_core.kernels import policy
from merge_core.kernels.graph import cuda_graph
from merge_core.schedule import parse_r

from .common import build_model, count_params

# Row kinds: timm (unpatched), merge (patched, policy "force": the requested r always runs), merge_auto
# (patched, default policy "auto"), merge_torch (fused kernels off), tome (ToMe-style unfused: hand-written
# softmax attention + torch matching), bound / bound_bias (zero-overhead bounds, no matching).


def variants(args) -> list[dict[str, Any]]:
    """The rows to time, as dicts with kind, r, prop_attn (and attn_backend for merge rows)."""
    rows: list[dict[str, Any]] = [{"kind": "timm", "r": 0, "prop_attn": None}]
    props = {"on": [True], "off": [False], "both": [False, True]}[args.prop_attn]
    backends = [b for b in args.attn_backend.split(",") if b]
    for r in args.r:
        for prop in props:
            for backend in backends if prop else backends[:1]:
                rows.append({"kind": "merge", "r": r, "prop_attn": prop, "attn_backend": backend})
    if getattr(args, "auto", False):
        for r in args.r:
            if r > 0:
                rows.append({"kind": "merge_auto", "r": r, "prop_attn": True, "attn_backend": "auto"})
    if getattr(args, "bounds", False):
        for r in args.r:
            if r > 0:
                rows.append({"kind": "bound", "r": r, "prop_attn": False})
                if getattr(args, "bias_bound", True):
                    rows.append({"kind": "bound_bias", "r": r, "prop_attn": True})
    if getattr(args, "torch_path", False):
        for r in args.r:
            if r > 0:
                for prop in props:
                    rows.append({"kind": "merge_torch", "r": r, "prop_attn": prop, "attn_backend": backends[0]})
    if getattr(args, "tome", False):
        for r in args.r:
            if r > 0:
                rows.append({"kind": "tome", "r": r, "prop_attn": True, "attn_backend": "reference"})
    return rows


def make_fn(model, row: dict[str, Any], x: torch.Tensor, execution: str) -> Callable[[], Any]:
    """Callable timing one row: ``execution`` is eager, compile (torch.compile) or cudagraph (captured)."""
    kind = row["kind"]
    if kind == "timm":
        fn = model
    elif kind in ("bound", "bound_bias"):
        r_list = parse_r(len(model.blocks), row["r"])

        def fn(inp, _m=model, _r=r_list, _b=kind == "bound_bias"):
            return bound_forward(_m, inp, _r, _b)
    else:
        patch.timm(model, prop_attn=row["prop_attn"], attn_backend=row.get("attn_backend", "auto"))
        model.r = row["r"]
        model.merge_policy = "auto" if kind == "merge_auto" else "force"
        fn = model
    if execution == "compile":
        torch._dynamo.reset()
        fn = torch.compile(fn)
    mode = "never" if kind in ("tome", "merge_torch") else "auto"

    def run():
        with torch.inference_mode(), kernels.kernel_mode(mode):
            return fn(x)

    if execution == "cudagraph":  # every row through the same one-liner: input copy + replay, alike for all
        with kernels.kernel_mode(mode):
            fast = cuda_graph(fn, x)  # merge_auto: keeps the faster of the merged / r=0 graph
        if kind == "merge_auto":
            row["graph_merged"] = fast.merged
        return lambda: fast(x)
    return run


def _unpatch(model) -> None:
    if getattr(model, "_merge_info", None) is not None:
        patch.remove_patch(model)
    model.__dict__.pop("merge_policy", None)


def _timed_rows(model, rows, x, execution, args, device, log) -> list[tuple[dict, Any, dict | None, str | None]]:
    """Time every row; with ``args.interleave`` each row gets its own copy of the model and the rows are timed
    round-robin (one call of each per round), so host-speed drift over the run hits all rows alike."""
    interleave = getattr(args, "interleave", False)
    built = []
    for row in rows:
        target = copy.deepcopy(model) if interleave else model
        if not interleave:
            _unpatch(model)
        try:
            fn = make_fn(target, row, x, execution)
            if not interleave:
                built.append((row, target, measure(fn, device, args.warmup, args.iters), None))
                del fn
                continue
            for _ in range(args.warmup):  # also triggers the policy's one-time calibration
                fn()
            built.append((row, target, fn, None))
        except Exception as exc:  # keep the other rows; report the failure
            log(f"  {row} failed: {type(exc).__name__}: {exc}")
            built.append((row, target, None, f"{type(exc).__name__}: {exc}"))
    if interleave:
        times: list[list[float]] = [[] for _ in built]
        for _ in range(args.iters):
            for k, (_, _, fn, err) in enumerate(built):
                if err is None:
                    times[k] += time_calls(fn, device, 0, 1)
        built = [
            (row, target, None if err else _summary(times[k]), err) for k, (row, target, _, err) in enumerate(built)
        ]
    return built


def _summary(times: list[float]) -> dict[str, float]:
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "runs": len(times)}


def bench_model(
    name: str, batch: int, args, device: torch.device, dtype: torch.dtype, log=print, on_row=None, **model_kwargs
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Time every row of ``variants(args)`` in each execution mode of ``args.mode`` on one model and batch."""
    model = build_model(name, device, dtype, **model_kwargs)
    info = {"model": name, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "params": count_params(model)}
    info["img_size"] = list(model.patch_embed.img_size)
    info["gmacs_per_image"] = vit_macs(model) / 1e9
    info["interleaved"] = bool(getattr(args, "interleave", False))
    log(
        f"{name} @{info['img_size'][0]}: {info['params'] / 1e6:.1f} M params, {info['gmacs_per_image']:.2f} "
        f"GMACs/image (multiply-accumulates; FLOPs = 2 x MACs), batch {batch}, {info['dtype']}, {device}"
    )
    x = torch.randn(batch, 3, *model.patch_embed.img_size, device=device, dtype=dtype)
    results = []
    modes = {
        "eager": ["eager"],
        "compile": ["compile"],
        "both": ["eager", "compile"],
        "cudagraph": ["cudagraph"],
        "eager+cudagraph": ["eager", "cudagraph"],
    }
    with torch.inference_mode():  # process warm-up (allocator, thread pools) so the first row is not penalised
        for _ in range(max(1, args.warmup)):
            model(x)
    for execution in modes[args.mode]:
        rows = [dict(row) for row in variants(args)]
        rows = [row for row in rows if execution == "eager" or row["kind"] not in ("tome", "merge_torch")]
        base = None
        for row, target, timing, err in _timed_rows(model, rows, x, execution, args, device, log):
            if err is not None:
                results.append({**info, **row, "execution": execution, "error": err})
                continue
            r_list = parse_r(len(model.blocks), row["r"])
            res = {**info, **row, "compiled": execution == "compile", "execution": execution, **timing}
            if row["kind"] == "merge_auto":
                decision = policy.last_decision(target)
                merged = row.get("graph_merged") if execution == "cudagraph" else (decision or {}).get("merge")
                res["policy_merged"] = merged
                if decision is not None and execution != "cudagraph":
                    res["policy_ms_merged"], res["policy_ms_plain"] = decision["ms_merged"], decision["ms_plain"]
                if merged is False:
                    r_list = [0] * len(r_list)
            macs = vit_macs(model, r_list)
            res["img_per_s"] = batch / (timing["ms_median"] / 1e3)
            res["gmacs_per_image_merged"] = macs / 1e9
            res["flop_ratio"] = info["gmacs_per_image"] * 1e9 / macs
            if row["kind"] == "timm":
                base = res["img_per_s"]
            res["speedup"] = res["img_per_s"] / base if base else None
            results.append(res)
            log("  " + row_text(res))
            if on_row is not None:  # partial results survive a time limit
                on_row(results)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    _unpatch(model)
    return info, results


def row_text(res: dict[str, Any]) -> str:
    label = res["kind"]
    if res.get("prop_attn") is not None and res["kind"] in ("merge", "merge_torch"):
        label += f" prop_attn={'on' if res['prop_attn'] else 'off'}"
        if res["prop_attn"] and res.get("attn_backend", "auto") != "auto":
            label += f"({res['attn_backend']})"
    if res["kind"] == "merge_auto" and res.get("policy_merged") is not None:
        label += " (merges)" if res["policy_merged"] else " (runs r=0)"
    label += {"compile": " compiled", "cudagraph": " cudagraph"}.get(res.get("execution", "eager"), "")
    speed = f"{res['speedup']:.2f}x" if res.get("speedup") else "-"
    return (
        f"{label:<40} r={res['r']:<3} {res['img_per_s']:>10.1f} img/s  {res['ms_median']:8.3f} ms  "
        f"speedup {speed:>6}  FLOP-ideal {res['flop_ratio']:.2f}x"
    )
