"""``merge-bench --suite profile``: where the time goes (torch.profiler), and an SDPA head-dim sweep.

Used to explain the measured tables in docs/gpu-results.md; prints the profiler tables and returns rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import kernels
from ..bench import bound_forward, build_model, measure


def sdpa_head_dim_sweep(device, dtype, args, log=print) -> list[dict[str, Any]]:
    """SDPA time per head dim (B=256, H=12, N=197): what a padded log(size) channel costs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    b, h, n = 256, 12, 197
    for d in (64, 72, 80, 96, 128):
        qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided, as in a ViT
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        cases = {"strided": (q, k, v, None), "contiguous": (qc, kc, vc, None)}
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


def profile_forward(name, batch, r, prop_attn, kind, device, dtype, log=print, row_limit=14) -> dict[str, Any]:
    """Profile one forward (after warm-up) and print the top CUDA kernels."""
    from torch.profiler import ProfilerActivity, profile

    from .. import patch

    model = build_model(name, device, dtype)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    if kind == "bound":
        r_list = [r] * len(model.blocks)

        def fn():
            return bound_forward(model, x, r_list, prop_attn)
    else:
        patch.timm(model, prop_attn=prop_attn)
        model.r = r

        def fn():
            return model(x)

    mode = "never" if kind == "merge_torch" else "auto"
    with torch.inference_mode(), kernels.kernel_mode(mode):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    table = events.table(sort_by=attr, row_limit=row_limit, max_name_column_width=60)
    gpu_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    log(f"== profile {name} bs{batch} r={r} prop_attn={prop_attn} {kind}: GPU busy {gpu_us / 1e3:.2f} ms")
    log(table)
    return {
        "model": name,
        "batch": batch,
        "r": r,
        "prop_attn": prop_attn,
        "kind": kind,
        "gpu_ms": gpu_us / 1e3,
        "table": table,
    }


def launch_overhead(n: int = 2000, log=print) -> dict[str, float]:
    """Host-side microseconds per call (tiny inputs, no sync inside the loop): Triton launches vs aten ops."""
    import time

    from ..kernels import _triton
    from ..matching import bipartite_soft_matching
    from ..merge import merge_wavg

    device = torch.device("cuda")
    metric = torch.randn(2, 17, 64, device=device, dtype=torch.float16)
    x = torch.randn(2, 17, 64, device=device, dtype=torch.float16)
    a, b = metric[:, ::2], metric[:, 1::2]
    merge, _ = bipartite_soft_matching(metric, 4, class_token=True)
    vals = torch.randn(2, 9, device=device, dtype=torch.float16)
    cases = {
        "triton best_destinations": lambda: _triton.best_destinations(a, b, 1, 0),
        "triton merge_wavg": lambda: _triton.merge_wavg(merge.plan, x, None),
        "aten sort(stable)": lambda: torch.sort(vals, dim=-1, descending=True, stable=True),
        "aten add": lambda: x + x,
        "bipartite_soft_matching (fused)": lambda: bipartite_soft_matching(metric, 4, class_token=True),
        "match + merge_wavg (fused)": lambda: merge_wavg(bipartite_soft_matching(metric, 4, class_token=True)[0], x),
    }
    out = {}
    for label, fn in cases.items():
        for _ in range(50):
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
