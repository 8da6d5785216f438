"""``merge-bench``: throughput of timm ViTs with and without token merging, on the current device.

Default (CPU-friendly, no download): build ``vit_small_patch16_224`` with random weights, print its parameter
count, GMACs per image (multiply-accumulates; FLOPs = 2 x MACs) and images/s for several ``r`` next to the
unpatched model, and write the table as JSON::

    merge-bench                                   # CPU: batch 4, fp32, r = 0, 8, 16, a few iterations
    merge-bench --model vit_base_patch16_224 --batch-size 256 --r 0,8,16 --compile
    merge-bench --suite gpu --out results/        # the GPU benchmark of issue 3 (H100 figures in docs/)

Timing: warm-up runs first, then every run is timed on its own (CUDA events on GPU, ``perf_counter`` on
CPU) and the median is reported. ``--suite gpu`` adds the zero-overhead bounds (timm's own blocks on the
merged token counts with no matching, with and without an SDPA float key bias), a ToMe-style unfused
baseline (hand-written softmax attention + torch matching/merge), ``torch.compile`` variants, the
matching+merge microbenchmark and an attention-backend comparison.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import kernels
from .attention import proportional_attention
from .matching import bipartite_soft_matching
from .merge import merge_wavg
from .schedule import parse_r

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (model, batch, r) of issue 3's targets
GPU_SUITE = (("vit_small_patch16_224", 512, 16), ("vit_base_patch16_224", 256, 16), ("vit_large_patch16_224", 128, 8))


# ----------------------------------------------------------------------------- environment and timing


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "kernels_mode": kernels.get_mode(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except Exception:  # pragma: no cover
        info["timm"] = None
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    return info


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed calls.

    CUDA: one pair of CUDA events around each call (GPU time of the call's stream); CPU: perf_counter.
    The one timing loop of the repository: projects' benchmarks call it too.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn`` over ``iters`` timed runs after ``warmup`` runs."""
    times = time_calls(fn, device, warmup, iters)
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "runs": iters}


# ----------------------------------------------------------------------------- models and cost model


def build_model(name: str, device: torch.device, dtype: torch.dtype, **kwargs):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return model.to(device=device, dtype=dtype).eval()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def vit_macs(model, schedule: Sequence[int] | None = None) -> int:
    """Multiply-accumulates per image of a timm ViT (matmuls only: patch embed, blocks, head).

    Per block with N tokens entering and N' after its merge (ToMe merges between attention and MLP):
    qkv 3ND^2, scores + weighted sum 2N^2 D, projection ND^2, MLP 2N'DH. FLOPs = 2 x MACs.
    """
    depth = len(model.blocks)
    schedule = list(schedule) if schedule is not None else [0] * depth
    prefix = int(model.num_prefix_tokens)
    pe = model.patch_embed
    num_patches = pe.num_patches
    patch_area = math.prod(pe.patch_size) if isinstance(pe.patch_size, Sequence) else pe.patch_size**2
    dim = model.embed_dim
    macs = num_patches * patch_area * pe.proj.in_channels * dim
    n = num_patches + (0 if getattr(model, "no_embed_class", False) and prefix == 0 else prefix)
    for block, r in zip(model.blocks, schedule, strict=True):
        attn_dim = block.attn.qkv.out_features // 3
        hidden = block.mlp.fc1.out_features
        macs += n * dim * 3 * attn_dim + 2 * n * n * attn_dim + n * attn_dim * dim
        n -= min(r, (n - prefix) // 2)
        fc2 = block.mlp.fc2.in_features
        macs += n * dim * hidden + n * fc2 * dim
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        macs += head.in_features * head.out_features
    return int(macs)


def _token_schedule(model, r_list: Sequence[int]) -> list[tuple[int, int]]:
    """(tokens in attention, tokens after the merge) per block, r clamped as in matching."""
    prefix = int(model.num_prefix_tokens)
    n = model.patch_embed.num_patches + prefix
    out = []
    for r in r_list:
        after = n - min(r, (n - prefix) // 2)
        out.append((n, after))
        n = after
    return out


def bound_forward(model, x: torch.Tensor, r_list: Sequence[int], bias: bool = False) -> torch.Tensor:
    """timm's own blocks on the merged token counts with no matching (the zero-overhead bound).

    With ``bias`` attention carries a float key bias through SDPA, like proportional attention.
    """
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for block, (_, after) in zip(model.blocks, _token_schedule(model, r_list), strict=True):
        h = block.norm1(x)
        if bias:
            attn = block.attn
            b, n, _ = h.shape
            qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            size = torch.ones(b, n, device=h.device, dtype=h.dtype)
            o = proportional_attention(q, k, v, size, scale=attn.scale, backend="sdpa")
            h = attn.proj(attn.norm(o.transpose(1, 2).reshape(b, n, -1)))
        else:
            h = block.attn(h)
        x = x + block.ls1(h)
        x = x[:, :after]
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    return model.forward_head(x)


class ZeroOverheadBound(torch.nn.Module):
    """A timm ViT run by ``bound_forward``: the merged model's token counts at no matching cost."""

    def __init__(self, model: torch.nn.Module, r_list: Sequence[int], bias: bool = False) -> None:
        super().__init__()
        self.model = model
        self.r_list = list(r_list)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bound_forward(self.model, x, self.r_list, self.bias)


# ----------------------------------------------------------------------------- model benchmark


def _variants(args) -> list[dict[str, Any]]:
    """The rows to time, as dicts: kind in {timm, merge, tome, bound, bound_bias}."""
    rows: list[dict[str, Any]] = [{"kind": "timm", "r": 0, "prop_attn": None}]
    props = {"on": [True], "off": [False], "both": [False, True]}[args.prop_attn]
    backends = [b for b in args.attn_backend.split(",") if b]
    for r in args.r:
        for prop in props:
            for backend in backends if prop else backends[:1]:
                rows.append({"kind": "merge", "r": r, "prop_attn": prop, "attn_backend": backend})
    if args.bounds:
        for r in args.r:
            if r > 0:
                rows.append({"kind": "bound", "r": r, "prop_attn": False})
                if getattr(args, "bias_bound", True):
                    rows.append({"kind": "bound_bias", "r": r, "prop_attn": True})
    if getattr(args, "torch_path", False):  # same model, fused kernels off: what the kernels buy
        for r in args.r:
            if r > 0:
                for prop in props:
                    rows.append({"kind": "merge_torch", "r": r, "prop_attn": prop, "attn_backend": backends[0]})
    if args.tome:
        for r in args.r:
            if r > 0:
                rows.append({"kind": "tome", "r": r, "prop_attn": True, "attn_backend": "reference"})
    return rows


def _make_fn(model, row: dict[str, Any], x: torch.Tensor, execution: str) -> Callable[[], Any]:
    """Callable timing one row: ``execution`` is eager, compile (torch.compile) or cudagraph (captured)."""
    from . import patch

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
        fn = model
    if execution == "compile":
        torch._dynamo.reset()
        fn = torch.compile(fn)
    mode = "never" if kind in ("tome", "merge_torch") else "auto"

    def run():
        with torch.inference_mode(), kernels.kernel_mode(mode):
            return fn(x)

    if execution == "cudagraph":  # static shapes and no host syncs: the whole forward is capturable
        graphed = _graphed(lambda: run(), ())
        return lambda: graphed()
    return run


def bench_model(
    name: str, batch: int, args, device: torch.device, dtype: torch.dtype, log=print, on_row=None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from . import patch

    model = build_model(name, device, dtype)
    info = {"model": name, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "params": count_params(model)}
    info["gmacs_per_image"] = vit_macs(model) / 1e9
    log(
        f"{name}: {info['params'] / 1e6:.1f} M params, {info['gmacs_per_image']:.2f} GMACs/image "
        f"(multiply-accumulates; FLOPs = 2 x MACs), batch {batch}, {info['dtype']}, {device}"
    )
    x = torch.randn(batch, 3, *model.patch_embed.img_size, device=device, dtype=dtype)
    results = []
    modes = {"eager": ["eager"], "compile": ["compile"], "both": ["eager", "compile"], "cudagraph": ["cudagraph"]}
    with torch.inference_mode():  # process warm-up (allocator, thread pools) so the first row is not penalised
        for _ in range(max(1, args.warmup)):
            model(x)
    for execution in modes[args.mode]:
        compiled = execution == "compile"
        base = None
        for row in _variants(args):
            if execution != "eager" and row["kind"] in ("tome", "merge_torch"):
                continue
            if getattr(model, "_merge_info", None) is not None:
                patch.remove_patch(model)
            t0 = time.perf_counter()
            try:
                fn = _make_fn(model, row, x, execution)
                timing = measure(fn, device, args.warmup, args.iters)
            except Exception as exc:  # keep the other rows; report the failure
                log(f"  {row} failed: {type(exc).__name__}: {exc}")
                results.append({**info, **row, "compiled": compiled, "error": f"{type(exc).__name__}: {exc}"})
                continue
            r_list = parse_r(len(model.blocks), row["r"])
            macs = vit_macs(model, r_list)
            res = {**info, **row, "compiled": compiled, "execution": execution, **timing}
            res["img_per_s"] = batch / (timing["ms_median"] / 1e3)
            res["gmacs_per_image_merged"] = macs / 1e9
            res["flop_ratio"] = info["gmacs_per_image"] * 1e9 / macs
            if row["kind"] == "timm":
                base = res["img_per_s"]
            res["speedup"] = res["img_per_s"] / base if base else None
            res["setup_s"] = time.perf_counter() - t0 - timing["ms_median"] * (args.warmup + args.iters) / 1e3
            results.append(res)
            log("  " + _row_text(res))
            if on_row is not None:  # partial results survive a time limit
                on_row(results)
    if getattr(model, "_merge_info", None) is not None:
        patch.remove_patch(model)
    return info, results


def _row_text(res: dict[str, Any]) -> str:
    label = res["kind"]
    if res.get("prop_attn") is not None and res["kind"] in ("merge", "merge_torch"):
        label += f" prop_attn={'on' if res['prop_attn'] else 'off'}"
        if res["prop_attn"] and res.get("attn_backend", "auto") != "auto":
            label += f"({res['attn_backend']})"
    label += {"compile": " compiled", "cudagraph": " cudagraph"}.get(res.get("execution", "eager"), "")
    speed = f"{res['speedup']:.2f}x" if res.get("speedup") else "-"
    return (
        f"{label:<34} r={res['r']:<3} {res['img_per_s']:>10.1f} img/s  {res['ms_median']:8.2f} ms  "
        f"speedup {speed:>6}  FLOP-ideal {res['flop_ratio']:.2f}x"
    )


# ----------------------------------------------------------------------------- microbenchmarks


def bench_match_merge(
    batch: int, tokens: int, channels: int, r: int, device: torch.device, dtype: torch.dtype, args, x_channels=None
) -> list[dict[str, Any]]:
    """Matching + size-weighted merge alone: fused kernels vs the plain-torch path (eager and compiled)."""
    torch.manual_seed(0)
    metric = torch.randn(batch, tokens, channels, device=device, dtype=dtype)
    xc = x_channels or channels
    x = torch.randn(batch, tokens, xc, device=device, dtype=dtype)
    size = torch.randint(1, 4, (batch, tokens, 1), device=device).to(dtype)

    def step(m, xx, s):
        merge, _ = bipartite_soft_matching(m, r, class_token=True)
        return merge_wavg(merge, xx, s)

    out = []
    paths = [("torch", "never", step)]
    if device.type == "cuda" and kernels.triton_available():
        paths.insert(0, ("fused", "always", step))
    if args.compile_micro:
        paths.append(("torch.compile", "never", torch.compile(step, dynamic=False)))
    if device.type == "cuda" and kernels.triton_available():
        paths.append(("fused+cudagraph", "always", _graphed(step, (metric, x, size))))
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
            out.append({"path": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        row = {
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
        out.append(row)
    return out


def _graphed(fn: Callable, inputs: tuple) -> Callable:
    """Capture ``fn(*inputs)`` in a CUDA graph (works because the path has no host syncs)."""
    holder: dict[str, Any] = {}

    def run(*_args):
        if "graph" not in holder:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                holder["out"] = fn(*inputs)
            holder["graph"] = graph
        holder["graph"].replay()
        return holder["out"]

    return run


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


# ----------------------------------------------------------------------------- CLI


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
    p.add_argument(
        "--attn-backend",
        default="auto",
        help="proportional attention backend(s), comma-separated (merge_core.attention)",
    )
    p.add_argument(
        "--mode",
        choices=["eager", "compile", "both", "cudagraph"],
        default="eager",
        help="eager, torch.compile, both, or the eager forward captured in a CUDA graph (CUDA only)",
    )
    p.add_argument("--compile", action="store_const", const="both", dest="mode", help="same as --mode both")
    p.add_argument("--bounds", action="store_true", help="add the zero-overhead bounds (no matching)")
    p.add_argument("--tome", action="store_true", help="add the ToMe-style unfused baseline")
    p.add_argument("--torch-path", action="store_true", help="add merge rows with the fused kernels off")
    p.add_argument("--warmup", type=int, default=None, help="default: 2 on CPU, 10 on CUDA")
    p.add_argument("--iters", type=int, default=None, help="timed runs, median reported (5 CPU, 30 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", default="results/merge-bench.json", help="output JSON path ('' to skip)")
    p.add_argument(
        "--suite",
        choices=["model", "gpu", "micro", "profile"],
        default="model",
        help="model: one model (default); gpu: issue-3 suite (ViT-S/B/L, bounds, ToMe-style, micro); micro: micro only",
    )
    p.add_argument("--models", default=None, help="suite gpu: comma-separated subset of vit_small,vit_base,vit_large")
    p.add_argument("--out", default="results", help="suite gpu/micro: folder for the JSON (file name has the date)")
    p.add_argument("--compile-micro", action="store_true", help="micro: add a torch.compile'd torch path")
    p.add_argument("--no-micro", action="store_true", help="suite gpu: skip the micro/attention benchmarks")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    cuda = device.type == "cuda"
    args.device = device
    args.dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if cuda else torch.float32)
    args.batch_size = args.batch_size if args.batch_size is not None else (256 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.iters = args.iters if args.iters is not None else (30 if cuda else 5)
    if args.batch_size <= 0 or args.iters <= 0 or args.warmup < 0:
        p.error("--batch-size and --iters must be > 0, --warmup >= 0")
    return args


def _write_json(path: str | os.PathLike, payload: dict[str, Any], log=print) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    log(f"wrote {path}")


def run_suite(args, log=print, checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The issue-3 GPU suite; ``checkpoint(payload)`` is called after each section (partial results survive)."""
    checkpoint = checkpoint or (lambda payload: None)
    device, dtype = args.device, args.dtype
    payload: dict[str, Any] = {"environment": environment(device), "dtype": str(dtype), "warmup": args.warmup}
    payload["iters"] = args.iters
    log(f"device: {payload['environment']['device_name']} | torch {torch.__version__} | {payload['environment']}")
    if args.suite == "profile":
        from .benchmarks.profile import profile_forward, sdpa_head_dim_sweep

        payload["sdpa_head_dim"] = sdpa_head_dim_sweep(device, dtype, args, log)
        checkpoint(payload)
        payload["profiles"] = []
        for name, batch, r, prop, kind in (
            ("vit_large_patch16_224", 128, 8, False, "merge"),
            ("vit_large_patch16_224", 128, 8, False, "merge_torch"),
            ("vit_large_patch16_224", 128, 8, False, "bound"),
            ("vit_small_patch16_224", 512, 16, True, "merge"),
            ("vit_small_patch16_224", 512, 16, True, "bound"),
        ):
            payload["profiles"].append(profile_forward(name, batch, r, prop, kind, device, dtype, log))
            checkpoint(payload)
        return payload
    args.compile_micro = args.compile_micro or args.mode != "eager"
    if args.no_micro:
        return _suite_models(args, payload, log, checkpoint)
    micro = []
    for b, n, c, r, xc in ((256, 197, 64, 16, None), (256, 197, 64, 16, 768), (8, 16384, 64, 4096, None)):
        rows = bench_match_merge(b, n, c, r, device, dtype, args, x_channels=xc)
        micro += rows
        for row in rows:
            if "error" in row:
                log(f"  match+merge {row['path']}: {row['error']}")
                continue
            log(
                f"  match+merge B={b} N={n} C={c} xC={row['x_channels']} r={r} {row['path']:<14} "
                f"{row['ms_median']:.3f} ms  peak +{row['peak_extra_mib'] or 0:.1f} MiB "
                f"(score matrix would be {row['score_matrix_mib']:.1f} MiB)"
            )
    payload["match_merge"] = micro
    checkpoint(payload)
    if args.suite == "micro":
        return payload
    if args.mode in ("compile", "cudagraph"):
        return _suite_models(args, payload, log, checkpoint)
    attn = []
    for b, h, n, d in ((512, 6, 197, 64), (256, 12, 197, 64), (256, 12, 99, 64), (128, 16, 197, 64)):
        rows = bench_attention(b, h, n, d, device, dtype, args)
        attn += rows
        log(
            f"  attention {b}x{h}x{n}x{d}: "
            + ", ".join(f"{r_['backend']} {r_.get('ms_median', float('nan')):.3f} ms" for r_ in rows)
        )
    payload["attention"] = attn
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
        if args.mode == "compile":  # the qkv-channel path spent minutes in Inductor autotuning: SDPA mask here
            suite_args.attn_backend = "sdpa"
            suite_args.bias_bound = False  # one compile less per model (minutes)
        if name == "vit_base_patch16_224" and args.attn_backend == "auto" and args.mode == "eager":
            # compare backends on one model; flex is left to the attention microbenchmark: compiling it
            # in-process slowed every later eager (host-bound) row in our H100 runs
            suite_args.attn_backend = "auto,sdpa,reference"
        entry: dict[str, Any] = {"model": name, "batch": batch, "rows": []}
        payload["models"].append(entry)

        def on_row(rows, entry=entry):
            entry["rows"] = rows
            checkpoint(payload)

        info, rows = bench_model(name, batch, suite_args, device, dtype, log, on_row=on_row)
        entry.update(info, rows=rows)
        checkpoint(payload)
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = print
    if args.suite in ("gpu", "micro", "profile"):
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
        dev = environment(args.device)["device_name"].replace(" ", "-").replace("/", "-")
        mode = "" if args.mode == "eager" else f"-{args.mode}"
        path = Path(args.out) / f"merge-bench-{args.suite}{mode}-{dev}-{stamp}.json"
        run_suite(args, log, checkpoint=lambda payload: _write_json(path, payload, lambda *a: None))
        log(f"wrote {path}")
        return 0
    env = environment(args.device)
    log(f"device: {env['device_name']} ({args.device}) | torch {env['torch']} | timm {env['timm']}")
    info, rows = bench_model(args.model, args.batch_size, args, args.device, args.dtype, log)
    if args.json:
        _write_json(args.json, {"environment": env, **info, "rows": rows}, log)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
