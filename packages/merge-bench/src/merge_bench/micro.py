"""Micro rows: one layer's matching + size-weighted merge, and proportional-attention backends.

The prop-attn section (issue 9, target 4) runs as one command with a table and a JSON file::

    PYTHONPATH=packages/merge-core/src:packages/merge-bench/src python3 -m merge_bench.micro --section prop-attn

``--parts e2e,flex`` runs only some of its parts (attention, layer, flex, e2e), e.g. the end-to-end and
FlexAttention rows alone within about two minutes on an H200; ``--out DIR`` puts the JSON into DIR.

The large-N section (issue 9, target 5: ``--section large-n``) times match+merge fused vs plain torch at the
``LARGE_N_SHAPES`` (eager and CUDA graph), the merge alone (sorted-sources vs scan kernel vs torch, same plan),
and checks the fused results against the torch path (plan equality, max abs diff).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from merge_core import kernels
from merge_core.attention import channel_attention, flex_attention_bias, proportional_attention, sdpa_attention
from merge_core.bench import measure
from merge_core.kernels.prop_attn import attn_kernel_mode, qkv_channel_attention
from merge_core.matching import bipartite_soft_matching
from merge_core.merge import merge_wavg

from .common import DTYPES, device_slug, environment, graphed, write_json
from .models import bench_model

# (batch, tokens, metric channels, r, x channels): ViT-B 224 at batch 256 and 1, ViT-L@512 at batch 1 and 32,
# and the long-sequence rows of issue 9 (N = 4096, 16384, 65536; x C = 768 as the issue states)
MATCH_MERGE_SHAPES = (
    (256, 197, 64, 16, 768),
    (1, 197, 64, 16, 768),
    (1, 1025, 64, 40, 1024),
    (32, 1025, 64, 40, 1024),
    (8, 4096, 64, 1024, 768),
    (8, 16384, 64, 4096, 768),
    (2, 65536, 64, 16384, 768),
)
# issue 9 target 5: the long rows plus the ViT rows that must not get slower
LARGE_N_SHAPES = (
    (8, 16384, 64, 4096, 768),
    (8, 4096, 64, 1024, 768),
    (2, 65536, 64, 16384, 768),
    (1, 1025, 64, 40, 1024),
    (32, 1025, 64, 40, 1024),
    (256, 197, 64, 16, 768),
)
# merge-alone variants timed per row: (name, sorted_sources, block_r); block_r = 64 (one loop step for r <= 64)
# only where r <= 64: a candidate for the ViT rows (r = 16..40), which take 2 steps of 32 today
MERGE_VARIANTS = (("sorted", True, None), ("scan", False, None), ("scan_r64", False, 64))
LARGE_N_TINY = ((2, 69, 8, 30, 24), (1, 41, 8, 6, 16))  # --tiny (CPU check): with MAX_PLAN_ROWS = 16
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


# ---------------------------------------------------------------------------------------------------------
# prop-attn section (issue 9, target 4): proportional attention backends, the key-bias kernel, FlexAttention
# probe, and end-to-end prop_attn on vs off. ``python3 -m merge_bench.micro --help``.

# (batch, heads, tokens, head dim): ViT-B/16 bs256 and ViT-L/16@512 bs32, plus their token counts after
# merging (197 - 16k, 1025 - 40k)
PROP_ATTN_SHAPES = (
    (256, 12, 197, 64),
    (256, 12, 149, 64),
    (256, 12, 101, 64),
    (256, 12, 53, 64),
    (32, 16, 1025, 64),
    (32, 16, 785, 64),
    (32, 16, 545, 64),
    (32, 16, 305, 64),
)
TINY_PROP_ATTN_SHAPES = ((2, 2, 17, 32), (2, 2, 70, 64))
# (label, timm model, image size, batch, r): the two rows of target 4
PROP_ATTN_E2E = (
    ("vit_base bs256 r=16", "vit_base_patch16_224", 224, 256, 16),
    ("vit_large@512 bs32 r=40", "vit_large_patch16_224", 512, 32, 40),
)
TINY_PROP_ATTN_E2E = (("vit_tiny@64 bs2 r=2", "vit_tiny_patch16_224", 64, 2, 2),)
# kernel configurations swept at the first shape of each model (BLOCK_M, BLOCK_N, num_warps, num_stages):
# the tuning space (merge_core.kernels.attn_bias.candidate_configs) plus two 2-stage variants
EXTRA_KERNEL_CONFIGS = ((64, 64, 4, 2), (128, 64, 4, 2))


def _timm_layout(batch, heads, tokens, head_dim, device, dtype, pad: int = 0):
    """q, k, v as strided views of one (B, N, 3, H, D + pad) projection output, as timm's reshape leaves them."""
    qkv = torch.randn(batch, tokens, 3, heads, head_dim + pad, device=device, dtype=dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _kernel_ok(device: torch.device) -> bool:
    return kernels.triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _timed(rows, label, fn, device, args, **extra) -> None:
    try:
        timing = measure(fn, device, args.warmup, args.iters)
    except Exception as exc:
        rows.append({"bench": "prop_attn", "path": label, **extra, "error": f"{type(exc).__name__}: {exc}"})
        return
    rows.append({"bench": "prop_attn", "path": label, **extra, **timing})


def bench_prop_attn_shape(batch, heads, tokens, head_dim, device, dtype, args, sweep: bool) -> list[dict[str, Any]]:
    """Attention alone (no projections) on one shape: SDPA without / with a float key mask, the log(size)
    channel (as ``attention.channel_attention`` builds it, and as the qkv projection writes it: SDPA at D + 8),
    the reference, and the key-bias kernel on timm-layout strided q/k/v (plus its config sweep)."""
    torch.manual_seed(0)
    q, k, v = _timm_layout(batch, heads, tokens, head_dim, device, dtype)
    size = torch.randint(1, 4, (batch, tokens), device=device).to(dtype)
    bias = size.log()
    qp, kp, vp = _timm_layout(batch, heads, tokens, head_dim, device, dtype, pad=8)
    scale = head_dim**-0.5
    shape = {"shape": [batch, heads, tokens, head_dim], "dtype": str(dtype).replace("torch.", "")}
    cases = [
        ("sdpa no mask", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)),
        ("sdpa float mask", lambda: sdpa_attention(q, k, v, bias, scale)),
        ("channel (cat+pad copies)", lambda: channel_attention(q, k, v, bias, scale)),
        ("channel qkv (sdpa at D+8)", lambda: F.scaled_dot_product_attention(qp, kp, vp, scale=scale)),
    ]
    if tokens <= 1025 and batch * heads * tokens * tokens <= 2**31:
        cases.append(
            ("reference (explicit softmax)", lambda: proportional_attention(q, k, v, size, backend="reference"))
        )
    if _kernel_ok(device):
        from merge_core.kernels import attn_bias
        from merge_core.kernels.attn_bias import bias_attention

        heuristic = attn_bias.heuristic_config(batch * heads, tokens, head_dim, device)
        shape["kernel_heuristic"] = list(heuristic)
        cases.append(("kernel (default: tuned)", lambda: bias_attention(q, k, v, size=size, scale=scale)))
        cases.append(("kernel (heuristic)", lambda: bias_attention(q, k, v, size=size, scale=scale, config=heuristic)))
        qc, kc, vc = (t.contiguous() for t in (q, k, v))
        cases.append(("kernel contiguous q/k/v", lambda: bias_attention(qc, kc, vc, size=size, scale=scale)))
        for cfg in attn_bias.candidate_configs(head_dim) + EXTRA_KERNEL_CONFIGS if sweep else ():
            cases.append((f"kernel {cfg}", lambda cfg=cfg: bias_attention(q, k, v, size=size, scale=scale, config=cfg)))
    rows: list[dict[str, Any]] = []
    for label, fn in cases:

        def run(fn=fn):
            with torch.inference_mode():
                return fn()

        _timed(rows, label, run, device, args, **shape)
    if _kernel_ok(device):
        tuned = attn_bias.tuned_config(attn_bias.tune_key(q, tokens, True, False))
        for row in rows:
            row["kernel_tuned"] = list(tuned) if tuned else None
    return rows


def flex_probe(batch, heads, tokens, head_dim, device, dtype, args, variants) -> list[dict[str, Any]]:
    """FlexAttention with a key-bias ``score_mod``: which way of calling it is slow (issue 9's 12 ms).

    Per variant: first call (compile) time, steady-state median, and dynamo's counters over the timed calls
    (recompiles, graph breaks, unique graphs) plus warnings (e.g. flex's "without torch.compile" fallback).
    Variants: ``once`` torch.compile(flex_attention) with one score_mod built once, under no_grad, under
    inference_mode and with grad mode on (inputs not requiring grad); ``fresh-closure`` the same compiled
    function but a new score_mod closure every call; ``dynamic`` torch.compile(dynamic=True); ``eager``
    flex_attention not compiled; ``repo`` merge-core's ``flex_attention_bias`` (torch.compile of a function
    that builds the closure inside the compiled region).
    """
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    q, k, v = _timm_layout(batch, heads, tokens, head_dim, device, dtype)
    bias = torch.randint(1, 4, (batch, tokens), device=device).to(dtype).log()
    scale = head_dim**-0.5
    expected = proportional_attention(q, k, v, bias.exp(), backend="reference")
    rows: list[dict[str, Any]] = []

    def key_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b, kv_idx]

    flex_args = argparse.Namespace(warmup=min(args.warmup, 3), iters=min(args.iters, 10))  # ms-scale effects
    for variant in variants:
        torch._dynamo.reset()
        counters.clear()
        # a recompiling variant would compile up to dynamo's limit (8) before falling back: stop at 3
        limit = 3 if variant == "fresh-closure" else None
        grad_ctx = {"once-inference_mode": torch.inference_mode, "once-grad_enabled": torch.enable_grad}.get(
            variant, torch.no_grad
        )
        if variant.startswith("once") or variant == "fresh-closure":
            compiled = torch.compile(flex_attention, dynamic=False)
        elif variant == "dynamic":
            compiled = torch.compile(flex_attention, dynamic=True)
        else:
            compiled = flex_attention

        def call(variant=variant, compiled=compiled):
            if variant == "repo":
                return flex_attention_bias(q, k, v, bias, scale)
            if variant == "fresh-closure":

                def fresh(score, b, h, q_idx, kv_idx):
                    return score + bias[b, kv_idx]

                return compiled(q, k, v, score_mod=fresh, scale=scale)
            return compiled(q, k, v, score_mod=key_bias, scale=scale)

        row: dict[str, Any] = {"bench": "flex_probe", "variant": variant, "shape": [batch, heads, tokens, head_dim]}
        config = torch._dynamo.config
        limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        saved_limit = getattr(config, limit_name)
        if limit is not None:
            setattr(config, limit_name, limit)
            row[limit_name] = limit
        try:
            with warnings.catch_warnings(record=True) as caught, grad_ctx():
                warnings.simplefilter("always")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row["first_call_s"] = time.perf_counter() - t0
                row["max_abs_err"] = (out.float() - expected.float()).abs().max().item()
                before = {key: dict(value) for key, value in counters.items()}
                row.update(measure(call, device, flex_args.warmup, flex_args.iters))
            after = {key: dict(value) for key, value in counters.items()}
            row["first_call_counters"] = {k_: sum(v_.values()) for k_, v_ in before.items() if v_}
            row["timed_calls_counters"] = {
                f"{group}.{name}": count - before.get(group, {}).get(name, 0)
                for group, values in after.items()
                for name, count in values.items()
                if count - before.get(group, {}).get(name, 0)
            }
            row["warnings"] = sorted({str(w.message)[:160] for w in caught})
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            setattr(config, limit_name, saved_limit)
        rows.append(row)
    torch._dynamo.reset()
    return rows


def bench_prop_attn_layer(batch, heads, tokens, head_dim, device, dtype, args) -> list[dict[str, Any]]:
    """A timm ``Attention`` layer (qkv projection + attention + head merge + proj) with token sizes:
    plain (no sizes), the padded-qkv channel path, and the key-bias kernel path (``qkv_channel_attention``)."""
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    dim = heads * head_dim
    attn = Attention(dim, num_heads=heads, qkv_bias=True).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
    size = torch.randint(1, 4, (batch, tokens, 1), device=device).to(dtype)

    def finish(o):
        return attn.proj(o.transpose(1, 2).reshape(batch, tokens, dim))

    cases = [
        ("layer: timm Attention, no sizes", lambda: attn(x)),
        (
            "layer: channel (padded qkv, sdpa D+8)",
            lambda: finish(qkv_channel_attention(attn, x, size, kernel=False)[0]),
        ),
    ]
    if _kernel_ok(device):
        cases.append(("layer: key-bias kernel", lambda: finish(_with_kernel(qkv_channel_attention, attn, x, size)[0])))
    shape = {"shape": [batch, heads, tokens, head_dim], "dtype": str(dtype).replace("torch.", "")}
    rows: list[dict[str, Any]] = []
    for label, fn in cases:

        def run(fn=fn):
            with torch.inference_mode(), kernels.kernel_mode("always" if device.type != "cuda" else "auto"):
                return fn()

        _timed(rows, label, run, device, args, **shape)
    return rows


def _with_kernel(fn, *args):
    """``fn(*args)`` with the key-bias kernel switched on (it is off by default: see prop_attn)."""
    with attn_kernel_mode("always"):
        return fn(*args)


def prop_attn_e2e(label, name, img, batch, r, device, dtype, args, log=print) -> list[dict[str, Any]]:
    """timm vs merge-core prop_attn off / on (kernel) interleaved, then prop_attn on with the kernel off
    (the padded-qkv channel path, last round's default) against its own timm row."""
    run_args = argparse.Namespace(**vars(args))
    run_args.r, run_args.prop_attn, run_args.attn_backend = [r], "both", "auto"
    run_args.auto = run_args.bounds = run_args.tome = run_args.torch_path = False
    run_args.mode, run_args.interleave = "eager", True
    rows: list[dict[str, Any]] = []
    with attn_kernel_mode("always"):
        _, found = bench_model(name, batch, run_args, device, dtype, log, img_size=img)
    rows += [{**row, "label": label, "attn_kernel": "always"} for row in found]
    run_args.prop_attn = "on"
    with attn_kernel_mode("never"):
        _, found = bench_model(name, batch, run_args, device, dtype, log, img_size=img)
    rows += [{**row, "label": label, "attn_kernel": "never"} for row in found]
    return rows


def _e2e_summary(rows) -> list[str]:
    """prop on / prop off ratios per model (target 4: >= 0.95x)."""
    lines = []
    for label in dict.fromkeys(row["label"] for row in rows):
        mine = [row for row in rows if row["label"] == label and "ms_median" in row]

        def ms(kind, prop, kernel, mine=mine):
            hits = [
                r_["ms_median"]
                for r_ in mine
                if r_["kind"] == kind and r_["prop_attn"] == prop and r_["attn_kernel"] == kernel
            ]
            return hits[0] if hits else float("nan")

        timm, off, on = ms("timm", None, "always"), ms("merge", False, "always"), ms("merge", True, "always")
        timm2, channel = ms("timm", None, "never"), ms("merge", True, "never")
        lines.append(
            f"  {label:<26} timm {timm:8.3f} ms | prop off {off:8.3f} ms ({timm / off:.2f}x) | prop on (kernel) "
            f"{on:8.3f} ms ({timm / on:.2f}x) -> on/off {off / on:.3f}x | prop on (channel) {channel:8.3f} ms "
            f"({timm2 / channel:.2f}x of its timm {timm2:.3f}) -> channel/off {off / channel * timm2 / timm:.3f}x"
        )
    return lines


PARTS = ("attention", "layer", "flex", "e2e")


def parse_parts(text: str | None) -> list[str]:
    """``--parts`` (comma-separated subset of ``PARTS``; None or "all" = every part), so that the slow parts
    (the FlexAttention compiles, the end-to-end models) can run alone inside one short device call."""
    if text is None or text == "all":
        return list(PARTS)
    parts = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise ValueError(f"--parts must be a comma-separated subset of {', '.join(PARTS)} (or all), got {text!r}")
    return parts


def run_prop_attn(device, dtype, args, log=print, checkpoint=None) -> dict[str, Any]:
    """The prop-attn section: attention rows per shape, layer rows, the flex probe, end-to-end rows.

    ``checkpoint(payload)`` runs after each part (partial results survive a time limit), as in ``suites``.
    """
    checkpoint = checkpoint or (lambda payload: None)
    # getattr defaults: merge-bench's suite runner can call this with its own argparse namespace
    tiny = getattr(args, "tiny", False)
    parts = set(parse_parts(getattr(args, "parts", None)))
    if not getattr(args, "flex", True):
        parts.discard("flex")
    if not getattr(args, "e2e", True):
        parts.discard("e2e")
    shapes = TINY_PROP_ATTN_SHAPES if tiny else PROP_ATTN_SHAPES
    payload: dict[str, Any] = {"suite": "prop-attn", "environment": environment(device), "dtype": str(dtype)}
    payload.update(warmup=args.warmup, iters=args.iters, parts=[p for p in PARTS if p in parts])
    payload.update(attention=[], layer=[], flex_probe=[], e2e=[])
    log(f"device: {payload['environment']['device_name']} | torch {torch.__version__} | parts {payload['parts']}")
    if "attention" in parts:
        log(f"{'shape':<20} {'path':<34} {'ms median':>10} {'vs sdpa no mask':>16}")
    swept = set()
    for b, h, n, d in shapes if "attention" in parts else ():
        sweep = (b, h) not in swept and not tiny
        swept.add((b, h))
        rows = bench_prop_attn_shape(b, h, n, d, device, dtype, args, sweep)
        payload["attention"] += rows
        base = next((r_["ms_median"] for r_ in rows if r_["path"] == "sdpa no mask" and "ms_median" in r_), None)
        for row in rows:
            ms = row.get("ms_median")
            text = f"{ms:10.3f} {base / ms if base and ms else float('nan'):15.2f}x" if ms else row.get("error", "")
            log(f"{b}x{h}x{n}x{d:<8} {row['path']:<34} {text}")
        if rows and rows[0].get("kernel_heuristic"):
            configs = f"heuristic {rows[0]['kernel_heuristic']} tuned {rows[0]['kernel_tuned']}"
            log(f"{b}x{h}x{n}x{d:<8} kernel config: {configs}")
        checkpoint(payload)
    for b, h, n, d in ((shapes[0], shapes[4]) if not tiny else shapes) if "layer" in parts else ():
        rows = bench_prop_attn_layer(b, h, n, d, device, dtype, args)
        payload["layer"] += rows
        for row in rows:
            log(f"{b}x{h}x{n}x{d:<8} {row['path']:<34} {row.get('ms_median', float('nan')):10.3f}")
        checkpoint(payload)
    if "e2e" in parts:  # before flex: the rows target 4 needs, if a time limit cuts the run
        for label, name, img, batch, r in TINY_PROP_ATTN_E2E if tiny else PROP_ATTN_E2E:
            try:
                payload["e2e"] += prop_attn_e2e(label, name, img, batch, r, device, dtype, args, log)
            except Exception as exc:  # e.g. out of memory: keep the other rows
                log(f"  {label} failed: {type(exc).__name__}: {exc}")
                payload["e2e"].append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
            checkpoint(payload)
        for line in _e2e_summary([row for row in payload["e2e"] if "kind" in row]):
            log(line)
    if "flex" in parts:
        compiled = device.type == "cuda"
        main = ("once-no_grad", "once-inference_mode", "repo") if compiled else ("eager",)
        probes = [(shapes[0], main + (("once-grad_enabled", "fresh-closure", "dynamic", "eager") if compiled else ()))]
        if not tiny:
            probes.append((shapes[4], main))
        for (b, h, n, d), variants in probes:
            rows = flex_probe(b, h, n, d, device, dtype, args, variants)
            payload["flex_probe"] += rows
            for row in rows:
                text = (
                    f"{row['ms_median']:10.3f} ms (1st call {row['first_call_s']:.1f} s, err {row['max_abs_err']:.0e}) "
                    f"timed-call counters {row['timed_calls_counters']} warnings {len(row['warnings'])}"
                    if "ms_median" in row
                    else row.get("error", "")
                )
                log(f"{b}x{h}x{n}x{d:<8} flex {row['variant']:<29} {text}")
            checkpoint(payload)
    return payload


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def bench_large_n(batch, tokens, channels, r, x_channels, device, dtype, args) -> list[dict[str, Any]]:
    """One ``LARGE_N_SHAPES`` row: match+merge fused vs torch (eager, CUDA graph), the merge alone on one plan
    (sorted-sources kernel, scan kernel, torch), and a correctness check of the fused path against torch."""
    from merge_core.kernels import _merge

    torch.manual_seed(0)
    metric = torch.randn(batch, tokens, channels, device=device, dtype=dtype)
    x = torch.randn(batch, tokens, x_channels, device=device, dtype=dtype)
    size = torch.randint(1, 4, (batch, tokens, 1), device=device).to(dtype)
    shape = {"batch": batch, "tokens": tokens, "metric_channels": channels, "x_channels": x_channels, "r": r}
    shape["dtype"] = str(dtype).replace("torch.", "")
    fused_ok = kernels.triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")

    def step(m, xx, s):
        merge, _ = bipartite_soft_matching(m, r, class_token=True)
        return merge_wavg(merge, xx, s)

    def plan_of(mode):
        with torch.inference_mode(), kernels.kernel_mode(mode):
            return bipartite_soft_matching(metric, r, class_token=True)[0].plan

    rows: list[dict[str, Any]] = []
    if fused_ok:
        try:
            rows.append(_large_n_check(metric, x, size, r, shape, plan_of, step))
        except Exception as exc:  # e.g. out of memory: keep the timing rows
            rows.append({"bench": "large_n_check", **shape, "error": f"{type(exc).__name__}: {exc}"})

    paths = [("torch", "never", step)]
    if fused_ok:
        paths.insert(0, ("fused", "always", step))
    if device.type == "cuda":
        paths.append(("torch+cudagraph", "never", graphed(step, (metric, x, size))))
        if fused_ok:
            paths.append(("fused+cudagraph", "always", graphed(step, (metric, x, size))))
    if fused_ok:  # the merge alone on one plan (the fused plan; index lists as the kernel gets them)
        p = plan_of("always")
        idx = (p.unm_idx, p.src_idx, p.dst_idx, p.protected_b)
        for name, sorted_sources, block_r in MERGE_VARIANTS:
            if block_r and r > block_r:
                continue

            def merge_only(m, xx, s, o=sorted_sources, br=block_r):
                return _merge.merge_wavg_indices(xx, s, *idx, sorted_sources=o, block_r=br)

            paths.append((f"merge {name}", "always", merge_only))
        merge_p = _merge_fn(p)
        paths.append(("merge torch", "never", lambda m, xx, s: merge_wavg(merge_p, xx, s)))
    for label, mode, fn in paths:

        def run(fn=fn, mode=mode):
            with torch.inference_mode(), kernels.kernel_mode(mode):
                return fn(metric, x, size)

        try:
            timing = measure(run, device, args.warmup, args.iters)
        except Exception as exc:  # e.g. out of memory on the torch path: keep the other rows
            rows.append({"bench": "large_n", "path": label, **shape, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append({"bench": "large_n", "path": label, **shape, **timing})
    return rows


def _large_n_check(metric, x, size, r, shape, plan_of, step) -> dict[str, Any]:
    """Fused vs torch on the device: plan equality, end-to-end max abs diff (when the plans agree), and each
    merge kernel variant on the torch path's plan against the torch merge (fp16) and an fp32 torch merge."""
    from merge_core.kernels import _merge

    tokens = metric.shape[-2]
    ref_plan, plan = plan_of("never"), plan_of("always")
    check: dict[str, Any] = {"bench": "large_n_check", **shape}
    with torch.inference_mode():
        with kernels.kernel_mode("never"):
            ref_x, ref_s = step(metric, x, size)
            m_ref = merge_wavg(_merge_fn(ref_plan), x, size)
            m_ref32 = merge_wavg(_merge_fn(ref_plan), x.float(), size.float())
        with kernels.kernel_mode("always"):
            out_x, out_s = step(metric, x, size)
        names = ("unm_idx", "src_idx", "dst_idx")
        check["plan_equal"] = all(torch.equal(getattr(ref_plan, k), getattr(plan, k)) for k in names)
        check["plan_rows_differing"] = int((ref_plan.src_idx != plan.src_idx).sum().item())
        check["e2e_max_abs_diff"] = _max_diff(out_x, ref_x) if check["plan_equal"] else None
        check["e2e_size_equal"] = bool(torch.equal(out_s, ref_s)) if check["plan_equal"] else None
        check["merge_torch_vs_fp32_max_abs_diff"] = _max_diff(m_ref[0], m_ref32[0])
        idx_ref = (ref_plan.unm_idx, ref_plan.src_idx, ref_plan.dst_idx, ref_plan.protected_b)
        for name, sorted_sources, block_r in MERGE_VARIANTS:
            if block_r and r > block_r:
                continue
            mx, ms = _merge.merge_wavg_indices(x, size, *idx_ref, sorted_sources=sorted_sources, block_r=block_r)
            check[f"merge_{name}_max_abs_diff"] = _max_diff(mx, m_ref[0])
            check[f"merge_{name}_vs_fp32_max_abs_diff"] = _max_diff(mx, m_ref32[0])
            check[f"merge_{name}_size_max_abs_diff"] = _max_diff(ms, m_ref[1])
        check["merge_auto_sorted"] = _merge.use_sorted_sources(tokens, ref_plan.r)
    return check


def _merge_fn(plan):
    """A merge closure carrying ``plan`` (what ``merge_wavg`` dispatches on): the torch path applies it with
    ``apply_plan``, the fused path hands the plan to the kernel."""
    from merge_core.matching import apply_plan

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        return apply_plan(x, plan.unm_idx, plan.src_idx, plan.dst_idx, plan.protected_a, plan.protected_b, mode)

    merge.plan = plan
    return merge


def run_large_n(device, dtype, args, log=print, shapes=LARGE_N_SHAPES, checkpoint=None) -> dict[str, Any]:
    """The large-N section: rows per shape, a summary line each (fused vs torch, graph and eager)."""
    payload: dict[str, Any] = {"environment": environment(device), "rows": [], "summary": []}
    for b, n, c, r, xc in shapes:
        t0 = time.perf_counter()
        rows = bench_large_n(b, n, c, r, xc, device, dtype, args)
        payload["rows"] += rows
        ms = {row["path"]: row["ms_median"] for row in rows if "ms_median" in row}
        for row in rows:
            if row["bench"] == "large_n_check":
                keys = [k for k in row if k.endswith(("equal", "diff", "differing", "sorted"))]
                log(f"  check B={b} N={n}: " + ", ".join(f"{k}={row[k]}" for k in keys))
            elif "error" in row:
                log(f"  B={b} N={n} {row['path']}: {row['error']}")
        line = f"B={b} N={n} C={c} xC={xc} r={r}: " + ", ".join(f"{k} {v:.4f} ms" for k, v in ms.items())
        for fused, plain in (("fused", "torch"), ("fused+cudagraph", "torch+cudagraph")):
            if fused in ms and plain in ms:
                line += f" | {plain}/{fused} {ms[plain] / ms[fused]:.2f}x"
        log(line + f"  ({time.perf_counter() - t0:.1f} s)")
        payload["summary"].append(line)
        if checkpoint:
            checkpoint(payload)
    return payload


def main(argv=None) -> int:
    """``python3 -m merge_bench.micro``: the prop-attn or large-N section as one command (table on stdout, JSON)."""
    p = argparse.ArgumentParser(prog="python3 -m merge_bench.micro", description=main.__doc__)
    p.add_argument("--section", choices=["prop-attn", "large-n"], default="prop-attn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=None, help="default 10 (CUDA), 1 (CPU)")
    p.add_argument("--iters", type=int, default=None, help="default 30 (CUDA), 2 (CPU)")
    p.add_argument("--json", default=None, help="output path (default <out>/merge-bench-prop-attn-<device>.json)")
    p.add_argument("--out", default="results", help="folder of the default JSON path (default results)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and model (a CPU check of the command)")
    p.add_argument(
        "--parts",
        default="all",
        help=f"comma-separated parts to run: {','.join(PARTS)} (default all; e.g. --parts e2e,flex, ~2 min on an H200)",
    )
    p.add_argument("--no-flex", dest="flex", action="store_false", help="skip the FlexAttention probe")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end rows")
    args = p.parse_args(argv)
    try:
        parse_parts(args.parts)
    except ValueError as exc:
        p.error(str(exc))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if cuda else torch.float32)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.iters = args.iters if args.iters is not None else (30 if cuda else 2)
    if args.iters <= 0 or args.warmup < 0:
        p.error("--iters must be > 0 and --warmup >= 0")
    path = args.json or f"{args.out}/merge-bench-{args.section}-{device_slug(device)}.json"
    if args.section == "large-n":
        shapes = LARGE_N_SHAPES
        if args.tiny:  # tiny shapes, and the tiled (long-sequence) plan forced so the CPU check covers it
            shapes, kernels.MAX_PLAN_ROWS = LARGE_N_TINY, 16
        run_large_n(device, dtype, args, shapes=shapes, checkpoint=lambda payload: write_json(path, payload, print))
        print(f"wrote {path}")
        return 0
    run_prop_attn(device, dtype, args, checkpoint=lambda payload: write_json(path, payload, lambda *a: None))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
