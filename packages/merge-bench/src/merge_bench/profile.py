"""``merge-bench --suite profile``: where the time goes (torch.profiler), an SDPA head-dim sweep, host cost per call;
``--suite overhead``: the host cost of the r = 0 path (plain timm vs patched r=0 vs the policy choosing r=0).

Used to explain the measured tables in docs/gpu-results.md; prints the profiler tables and returns rows.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from merge_core import kernels, patch
from merge_core.bench import bound_forward, measure, time_calls
from merge_core.kernels import policy
from merge_core.matching import bipartite_soft_matching
from merge_core.merge import merge_wavg
from merge_core.schedule import parse_r

from .common import build_model, model_name

# (model, img size, batch, r, prop_attn, kind): issue 9's small-batch cases, the flagship, issue 3's ViT-L
PROFILES = (
    ("vit_base_patch16_224", 224, 1, 16, False, "merge"),
    ("vit_base_patch16_224", 224, 1, 16, True, "merge"),
    ("vit_large_patch16_224", 512, 1, 40, False, "merge"),
    ("vit_large_patch16_224", 512, 32, 40, False, "merge"),
    ("vit_large_patch16_224", 512, 32, 40, False, "bound"),
)


def sdpa_head_dim_sweep(device, dtype, args, log=print) -> list[dict[str, Any]]:
    """SDPA time per head dim (B=256, H=12, N=197): what a padded log(size) channel costs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    b, h, n = 256, 12, 197
    for d in (64, 72, 80):
        qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided, as in a ViT
        cases = {"strided": (q, k, v, None)}
        cases["strided, flash forced"] = (q, k, v, [SDPBackend.FLASH_ATTENTION])
        cases["strided, efficient forced"] = (q, k, v, [SDPBackend.EFFICIENT_ATTENTION])
        for label, (q_, k_, v_, backends) in cases.items():

            def run(q_=q_, k_=k_, v_=v_, backends=backends):
                if backends is None:
                    return F.scaled_dot_product_attention(q_, k_, v_)
                with sdpa_kernel(backends):
                    return F.scaled_dot_product_attention(q_, k_, v_)

            try:
                t = measure(run, device, args.warmup, args.iters)["ms_median"]
            except Exception as exc:  # a forced backend may refuse a shape
                t = float("nan")
                label += f" ({type(exc).__name__})"
            rows.append({"bench": "sdpa_head_dim", "head_dim": d, "case": label, "ms_median": t})
        log(f"  sdpa D={d}: " + ", ".join(f"{r['case']} {r['ms_median']:.3f}" for r in rows if r["head_dim"] == d))
    return rows


def profile_forward(name, img, batch, r, prop_attn, kind, device, dtype, log=print, row_limit=12) -> dict[str, Any]:
    """Profile one forward after warm-up: top CUDA kernels and top host (CPU self time) ops."""
    from torch.profiler import ProfilerActivity, profile

    model = build_model(name, device, dtype, img_size=img)
    x = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
    if kind == "bound":
        r_list = [r] * len(model.blocks)

        def fn():
            return bound_forward(model, x, r_list, prop_attn)
    else:
        patch.timm(model, prop_attn=prop_attn)
        model.r = r
        model.merge_policy = "force"

        def fn():
            return model(x)

    with torch.inference_mode():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - t0) * 1e3  # host time to issue one forward (no sync inside)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    gpu_table = events.table(sort_by=attr, row_limit=row_limit, max_name_column_width=50)
    cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=50)
    gpu_us = sum(getattr(e, attr, 0) or 0 for e in events)
    log(
        f"== profile {name}@{img} bs{batch} r={r} prop_attn={prop_attn} {kind}: GPU busy {gpu_us / 1e3:.2f} ms, "
        f"host issue time {host_ms:.2f} ms"
    )
    log(gpu_table)
    log(cpu_table)
    return {
        "model": name,
        "img_size": img,
        "batch": batch,
        "r": r,
        "prop_attn": prop_attn,
        "kind": kind,
        "gpu_ms": gpu_us / 1e3,
        "host_issue_ms": host_ms,
        "gpu_table": gpu_table,
        "cpu_table": cpu_table,
    }


def launch_overhead(n: int = 500, log=print) -> dict[str, float]:
    """Host microseconds per call (no sync inside the loop): Triton launches vs aten ops vs one merge layer."""
    from merge_core.kernels import _merge, _triton

    device = torch.device("cuda")
    metric = torch.randn(1, 1025, 64, device=device, dtype=torch.float16)
    x = torch.randn(1, 1025, 1024, device=device, dtype=torch.float16)
    a, b = metric[:, ::2], metric[:, 1::2]
    merge, _ = bipartite_soft_matching(metric, 40, class_token=True)
    vals = torch.randn(1, 513, device=device, dtype=torch.float16)
    cases = {
        "triton best_destinations": lambda: _triton.best_destinations(a, b, 1, 0),
        "triton merge_wavg": lambda: _merge.merge_wavg(merge.plan, x, None),
        "aten sort(stable)": lambda: torch.sort(vals, dim=-1, descending=True, stable=True),
        "aten add": lambda: x + x,
        "bipartite_soft_matching (fused)": lambda: bipartite_soft_matching(metric, 40, class_token=True),
        "match + merge_wavg (fused)": lambda: merge_wavg(bipartite_soft_matching(metric, 40, class_token=True)[0], x),
    }
    out = {}
    with torch.inference_mode(), kernels.kernel_mode("auto"):
        for label, fn in cases.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            host = (time.perf_counter() - t0) / n * 1e6
            torch.cuda.synchronize()
            out[label] = host
            log(f"  host time per call: {label:<34} {host:7.1f} us")
    return out


def run_profile(device, dtype, args, log=print, checkpoint=lambda payload: None, payload=None) -> dict[str, Any]:
    payload = payload if payload is not None else {}
    payload["launch_overhead_us"] = launch_overhead(log=log)
    checkpoint(payload)
    payload["sdpa_head_dim"] = sdpa_head_dim_sweep(device, dtype, args, log)
    checkpoint(payload)
    payload["profiles"] = []
    for name, img, batch, r, prop, kind in PROFILES:
        payload["profiles"].append(profile_forward(name, img, batch, r, prop, kind, device, dtype, log))
        checkpoint(payload)
    return payload


# rows of the overhead suite: what each one runs at r = 0
OVERHEAD_ROWS = {
    "timm": "unpatched timm model",
    "merge_r0": "patched, model.r = 0 (timm's own classes stepped back in)",
    "merge_auto_r0": "patched, model.r = R, policy auto with a decision to run r = 0 for this shape",
    "merge_r0_branch": "patched, model.r = 0, merging classes kept (their r = 0 branch: the path before the "
    "zero-cost step-out, and the path under torch.compile)",
}


def python_calls(fn) -> tuple[int, int]:
    """(Python function calls, C function calls) of one ``fn()``, counted with ``sys.setprofile``.

    Why: per-forward host work that no timer noise hides; a zero-cost r = 0 path adds a constant handful of
    calls at the model root and none per layer.
    """
    counts = [0, 0]

    def profiler(frame, event, arg):
        if event == "call":
            counts[0] += 1
        elif event == "c_call":
            counts[1] += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return counts[0], counts[1]


def _overhead_models(args, device, dtype) -> tuple[dict[str, Any], torch.Tensor, int]:
    kwargs: dict[str, Any] = {"depth": args.depth or 2}
    if args.img_size:
        kwargs["img_size"] = args.img_size
    base = build_model(model_name(args), device, dtype, **kwargs)
    x = torch.randn(1, 3, *base.patch_embed.img_size, device=device, dtype=dtype)
    r = max(args.r) if max(args.r) > 0 else 16
    models: dict[str, Any] = {"timm": base}
    for kind in ("merge_r0", "merge_auto_r0", "merge_r0_branch"):
        model = copy.deepcopy(base)
        patch.timm(model)
        model.merge_policy = "auto"  # the default policy, whatever MERGE_CORE_POLICY says
        model.r = 0
        if kind == "merge_auto_r0":
            model.r = r
            # what a calibration that found merging slower leaves (CPU is never calibrated, so pin it)
            policy.set_decision(model, x, parse_r(len(model.blocks), r), merge=False)
        if kind == "merge_r0_branch":
            model._merge_info.stepping.clear()  # nothing steps out: the merging classes run their r = 0 branch
        models[kind] = model
    return models, x, r


def run_overhead(device, dtype, args, log=print, checkpoint=lambda payload: None, payload=None) -> dict[str, Any]:
    """Per-forward wall time (round-robin, median) and Python call counts of the r = 0 rows at batch 1.

    A tiny depth keeps the forward short, so the adapter's host cost is a visible share of it.
    """
    payload = payload if payload is not None else {}
    models, x, r = _overhead_models(args, device, dtype)
    base = models["timm"]
    payload["overhead"] = info = {
        "model": model_name(args),
        "depth": len(base.blocks),
        "img_size": list(base.patch_embed.img_size),
        "batch": 1,
        "r_requested_policy_row": r,
        "rows": [],
    }
    with torch.inference_mode():
        expected = base(x)
        for _ in range(args.warmup):
            for model in models.values():
                model(x)
        times: dict[str, list[float]] = {kind: [] for kind in models}
        for _ in range(args.iters):  # round-robin: host-speed drift hits every row alike
            for kind, model in models.items():
                times[kind] += time_calls(lambda model=model: model(x), device, 0, 1)
        calls = {kind: python_calls(lambda model=model: model(x)) for kind, model in models.items()}
        exact = {kind: bool(torch.equal(model(x), expected)) for kind, model in models.items()}
    decision = policy.last_decision(models["merge_auto_r0"])
    base_ms = statistics.median(times["timm"])
    log(
        f"overhead: {info['model']} depth {info['depth']} @{info['img_size'][0]}, batch 1, {str(dtype)[6:]}, {device}, "
        f"{args.iters} round-robin runs (median)"
    )
    log(f"  {'row':<18} {'ms median':>10} {'vs timm':>9} {'us extra':>9} {'py calls':>9} {'C calls':>8}  exact")
    for kind, samples in times.items():
        median = statistics.median(samples)
        row = {
            "kind": kind,
            "what": OVERHEAD_ROWS[kind],
            "ms_median": median,
            "ms_min": min(samples),
            "ms_max": max(samples),
            "runs": len(samples),
            "ratio_vs_timm": base_ms / median,
            "us_extra_median": (median - base_ms) * 1e3,
            "python_calls": calls[kind][0],
            "c_calls": calls[kind][1],
            "python_calls_extra": calls[kind][0] - calls["timm"][0],
            "bitwise_equal_to_timm": exact[kind],
        }
        if kind == "merge_auto_r0":
            row["policy_merged"] = None if decision is None else decision["merge"]
        info["rows"].append(row)
        log(
            f"  {kind:<18} {median:10.4f} {row['ratio_vs_timm']:8.3f}x {row['us_extra_median']:9.1f} "
            f"{row['python_calls']:9d} {row['c_calls']:8d}  {exact[kind]}"
        )
    checkpoint(payload)
    return payload
