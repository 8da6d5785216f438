"""Micro rows: one layer's matching + size-weighted merge, and proportional-attention backends."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from merge_core import kernels
from merge_core.attention import proportional_attention
from merge_core.bench import measure
from merge_core.matching import bipartite_soft_matching
from merge_core.merge import merge_wavg

from .common import graphed

# (batch, tokens, metric channels, r, x channels): ViT-B 224 at batch 256 and 1, ViT-L@512 at batch 1 and 32,
# and the long-sequence rows of issue 9 (N = 4096, 16384, 65536)
MATCH_MERGE_SHAPES = (
    (256, 197, 64, 16, 768),
    (1, 197, 64, 16, 768),
    (1, 1025, 64, 40, 1024),
    (32, 1025, 64, 40, 1024),
    (8, 4096, 64, 1024, 64),
    (8, 16384, 64, 4096, 64),
    (2, 65536, 64, 16384, 64),
)
# (batch, heads, tokens, head dim): ViT-S/B/L batches of issue 3, ViT-B merged, ViT-L@512 batch 32
ATTENTION_SHAPES = ((512, 6, 197, 64), (256, 12, 197, 64), (256, 12, 99, 64), (128, 16, 197, 64), (32, 16, 1025, 64))


def bench_match_merge(
    batch: int, tokens: int, channels: int, r: int, device: torch.device, dtype: torch.dtype, args, x_channels=None
) -> list[dict[str, Any]]:
    """Matching + size-weighted merge alone: fused kernels vs the plain-torch path (eager, compiled, graphed)."""
    torch.manual_seed(0)
    metric = torch.randn(batch, tokens, channels, device=device, dtype=dtype)
    xc = x_channels or channels
    x = torch.randn(batch, tokens, xc, device=device, dtype=dtype)
    size = torch.randint(1, 4, (batch, tokens, 1), device=device).to(dtype)

    def step(m, xx, s):
        merge, _ = bipartite_soft_matching(m, r, class_token=True)
        return merge_wavg(merge, xx, s)

    out = []
    fused = device.type == "cuda" and kernels.triton_available()
    paths = [("torch", "never", step)]
    if fused:
        paths.insert(0, ("fused", "always", step))
    if getattr(args, "compile_micro", False):
        paths.append(("torch.compile", "never", torch.compile(step, dynamic=False)))
    if device.type == "cuda":
        paths.append(("torch+cudagraph", "never", graphed(step, (metric, x, size))))
    if fused:
        paths.append(("fused+cudagraph", "always", graphed(step, (metric, x, size))))
    for label, mode, fn in paths:

        def run(fn=fn, mode=mode):
            with torch.inference_mode(), kernels.kernel_mode(mode):
                return fn(metric, x, size)

        try:
            run()
            peak = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            timing = measure(run, device, args.warmup, args.iters)
        except Exception as exc:
            out.append({"bench": "match_merge", "path": label, "batch": batch, "tokens": tokens, "error": repr(exc)})
            continue
        out.append(
            {
                "bench": "match_merge",
                "path": label,
                "batch": batch,
                "tokens": tokens,
                "metric_channels": channels,
                "x_channels": xc,
                "r": r,
                "dtype": str(dtype).replace("torch.", ""),
                "peak_extra_mib": peak,
                "score_matrix_mib": batch * ((tokens + 1) // 2) * (tokens // 2) * torch.finfo(dtype).bits / 8 / 2**20,
                **timing,
            }
        )
    return out


def bench_attention(batch, heads, tokens, head_dim, device, dtype, args) -> list[dict[str, Any]]:
    """Proportional attention backends on one shape (plain SDPA without sizes as the reference)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    size = torch.randint(1, 4, (batch, tokens), device=device).to(dtype)
    rows = []
    cases = [("sdpa (no size)", None), ("reference", "reference"), ("sdpa", "sdpa"), ("channel", "channel")]
    if device.type == "cuda":
        cases.append(("flex", "flex"))
    for label, backend in cases:

        def run(backend=backend):
            with torch.inference_mode():
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, v)
                return proportional_attention(q, k, v, size, backend=backend)

        try:
            timing = measure(run, device, args.warmup, args.iters)
        except Exception as exc:
            rows.append({"bench": "attention", "backend": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append(
            {
                "bench": "attention",
                "backend": label,
                "shape": [batch, heads, tokens, head_dim],
                "dtype": str(dtype).replace("torch.", ""),
                **timing,
            }
        )
    return rows


def run_micro(device, dtype, args, log=print, shapes=MATCH_MERGE_SHAPES) -> list[dict[str, Any]]:
    rows_all = []
    for b, n, c, r, xc in shapes:
        rows = bench_match_merge(b, n, c, r, device, dtype, args, x_channels=xc)
        rows_all += rows
        for row in rows:
            if "error" in row:
                log(f"  match+merge B={b} N={n} {row['path']}: {row['error']}")
                continue
            log(
                f"  match+merge B={b} N={n} C={c} xC={row['x_channels']} r={r} {row['path']:<16} "
                f"{row['ms_median']:.3f} ms  peak +{row['peak_extra_mib'] or 0:.1f} MiB "
                f"(score matrix would be {row['score_matrix_mib']:.1f} MiB)"
            )
    return rows_all


def run_attention(device, dtype, args, log=print, shapes=ATTENTION_SHAPES) -> list[dict[str, Any]]:
    rows_all = []
    for b, h, n, d in shapes:
        rows = bench_attention(b, h, n, d, device, dtype, args)
        rows_all += rows
        log(
            f"  attention {b}x{h}x{n}x{d}: "
            + ", ".join(f"{r_['backend']} {r_.get('ms_median', float('nan')):.3f} ms" for r_ in rows)
        )
    return rows_all
