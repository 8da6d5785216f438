"""GPU throughput benchmark: plain ViT, ToMe and FreqMerge at the same token budget, and the zero-overhead bound.

    PYTHONPATH=packages/merge-core/src:projects/freqmerge/src \\
        python projects/freqmerge/tools/benchmark.py --out projects/freqmerge/results/benchmark.json

Defaults: ViT-S/16 (random weights; speed does not depend on them), 224x224, float16 weights and inputs,
batch 512, keep rate 0.7 on blocks [4, 6, 8, 10] (197 -> 138 -> 97 -> 68 -> 48 tokens).

Variants (all share one set of weights):
- ``baseline``: the unpatched timm model.
- ``bound``: the zero-overhead bound: timm's own block modules (norm1/attn/ls1/norm2/mlp/ls2) run on the
  same per-block token counts as the merged models, the surplus tokens simply cut off after attention (no
  scoring, no matching, no weighted average, no proportional attention): the speed a merge with free
  matching would reach.
- ``tome``: merge-core's ToMe (bipartite soft matching, size-weighted average) at the same budget.
- ``freqmerge``: FreqMerge (LFGM penalty, alpha 0.7), the project's default configuration.
- ``tome_prop`` / ``freqmerge_prop``: the same with ToMe's proportional attention (log(size) key bias), which
  the bound does not pay for (FreqMerge's default leaves it off; ``--prop_attn`` turns it on).
- ``freqmerge_reflect``: FreqMerge with the border-safe LFGM (``--lfgm_border reflect``: FFTs on a mirrored
  2H x 2W grid), to price that option.

Timing: ``--warmup`` untimed passes, then ``--iters`` passes each timed with CUDA events (perf_counter on
CPU), repeated for ``--rounds`` rounds that interleave the variants; img/s = batch / median pass time.
GFLOPs are GMACs per image (torch.utils.flop_counter FLOPs / 2, the guide's convention). Writes JSON.
Smoke test on CPU: ``--device cpu --batch-size 2 --iters 2 --warmup 1 --rounds 1``.
Only torch, timm, merge_core and this package are imported (no matplotlib/tqdm).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone

import timm
import torch
from torch import nn

from merge_core.bench import ZeroOverheadBound, time_calls
from merge_core.patch import timm as patch_timm
from merge_core.schedule import keep_rate_schedule, tokens_per_layer

from .models.freq_merge import FreqMergeMatcher

VARIANTS = ("baseline", "bound", "tome", "freqmerge", "tome_prop", "freqmerge_prop", "freqmerge_reflect")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_variants(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    kwargs = dict(args.model_kwargs)
    kwargs.setdefault("img_size", args.image_size)
    base = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    n_tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    prefix = base.num_prefix_tokens
    schedule = keep_rate_schedule(len(base.blocks), n_tokens, args.keep_rate, args.merge_layers, protected=prefix)
    counts = tokens_per_layer(n_tokens, schedule, protected=prefix)
    models: dict[str, nn.Module] = {}
    for name in args.variants:
        if name == "baseline":
            model = base
        elif name == "bound":
            model = ZeroOverheadBound(copy.deepcopy(base), schedule)
        else:
            model = copy.deepcopy(base)
            prop = name.endswith("_prop")
            border = "reflect" if name.endswith("_reflect") else "wrap"
            if name.startswith("tome"):
                patch_timm(model, prop_attn=prop)
            else:
                matcher = FreqMergeMatcher(
                    alpha=args.alpha,
                    radius=args.hpf_radius,
                    mode=args.penalty_mode,
                    scorer="lfgm",
                    grid=tuple(base.patch_embed.grid_size),
                    border=border,
                )
                patch_timm(model, trace_source="index", prop_attn=prop, match_fn=matcher)
            model.r = list(schedule)
        models[name] = model.to(device=device, dtype=dtype).eval()
    return models, schedule, counts


@torch.inference_mode()
def block_token_counts(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Tokens leaving each block for one forward pass (checks every variant runs the same budget)."""
    inner = model.model if isinstance(model, ZeroOverheadBound) else model
    seen: list[int] = []
    # the MLP runs on the tokens that leave the block, in every variant (the bound never calls Block.forward)
    hooks = [b.mlp.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1])) for b in inner.blocks]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def gmacs(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2.0 / 1e9 / x.shape[0]


@torch.inference_mode()
def time_passes(model: nn.Module, x: torch.Tensor, warmup: int, iters: int) -> list[float]:
    """Seconds per forward pass (merge-core's timing loop: CUDA events on GPU)."""
    return [ms / 1e3 for ms in time_calls(lambda: model(x), x.device, warmup, iters)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="extra timm.create_model kwargs (JSON)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default cuda when available")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the variants")
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--merge-layers", type=int, nargs="+", default=[4, 6, 8, 10])
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--hpf-radius", type=float, default=2.0)
    p.add_argument("--penalty-mode", choices=["shifted", "guide"], default="shifted")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--compile", action="store_true", help="torch.compile every variant first")
    p.add_argument("--out", default="freqmerge_benchmark.json", help="JSON output path")
    args = p.parse_args(argv)
    for name in ("batch_size", "iters", "rounds", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    if args.warmup < 0:
        p.error("argument --warmup: must be >= 0")
    if not 0 < args.keep_rate <= 1:
        p.error("argument --keep-rate: must be in (0, 1]")
    if not 0 <= args.alpha <= 1:
        p.error("argument --alpha: must be in [0, 1]")
    if "baseline" not in args.variants:
        args.variants = ["baseline", *args.variants]
    return args


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    models, schedule, counts = build_variants(args, device, dtype)
    probe = torch.randn(2, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    expected = block_token_counts(models["bound"], probe) if "bound" in models else None
    info: dict[str, dict] = {}
    for name, model in models.items():
        tokens = block_token_counts(model, probe)
        info[name] = {"tokens_per_block": tokens, "gmacs": gmacs(model, probe)}
        if name != "baseline" and expected is not None and tokens != expected:
            raise RuntimeError(f"{name} runs {tokens} tokens per block but the bound runs {expected}")
    runners = {name: torch.compile(m) if args.compile else m for name, m in models.items()}
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    times: dict[str, list[float]] = {name: [] for name in models}
    for rnd in range(args.rounds):
        for name, model in runners.items():
            times[name] += time_passes(model, x, args.warmup, args.iters)
            print(f"round {rnd + 1}/{args.rounds} {name}: {args.batch_size / statistics.median(times[name]):.1f} img/s")
    rows = []
    for name in models:
        med = statistics.median(times[name])
        rows.append(
            {
                "variant": name,
                "gflops": info[name]["gmacs"],
                "img_s": args.batch_size / med,
                "median_ms": med * 1000.0,
                "min_ms": min(times[name]) * 1000.0,
                "tokens_per_block": info[name]["tokens_per_block"],
            }
        )
    base = next(r for r in rows if r["variant"] == "baseline")
    bound = next((r for r in rows if r["variant"] == "bound"), None)
    for r in rows:
        r["speedup"] = r["img_s"] / base["img_s"]
        r["flop_reduction"] = base["gflops"] / r["gflops"]
        if bound is not None:
            r["fraction_of_bound"] = r["img_s"] / bound["img_s"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    result = {
        "device": device_name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": sys.version.split()[0],
        "model": args.model,
        "model_kwargs": args.model_kwargs,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "dtype": str(dtype).replace("torch.", ""),
        "warmup": args.warmup,
        "iters_per_round": args.iters,
        "rounds": args.rounds,
        "compile": args.compile,
        "keep_rate": args.keep_rate,
        "merge_layers": args.merge_layers,
        "alpha": args.alpha,
        "penalty_mode": args.penalty_mode,
        "r_schedule": schedule,
        "tokens_after_block": counts,
        "timing": "median of per-pass times (CUDA events on GPU), img/s = batch / median",
        "gflops_note": "GFLOPs = GMACs per image (torch.utils.flop_counter FLOPs / 2), as the FreqMerge guide",
        "results": rows,
    }
    if os.path.dirname(os.path.abspath(args.out)):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\n{device_name}, {args.model} {args.image_size}px, {result['dtype']}, batch {args.batch_size}")
    print("| Variant | GFLOPs | img/s | Speedup | % of bound |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        frac = f"{100 * r['fraction_of_bound']:.1f}" if "fraction_of_bound" in r else "-"
        print(f"| {r['variant']} | {r['gflops']:.2f} | {r['img_s']:.1f} | {r['speedup']:.2f}x | {frac} |")
    for name in ("freqmerge", "freqmerge_prop"):
        row = next((r for r in rows if r["variant"] == name), None)
        if row is not None and "fraction_of_bound" in row:
            verdict = "meets" if row["fraction_of_bound"] >= 0.9 else "misses"
            share = 100 * row["fraction_of_bound"]
            print(f"{name}: {share:.1f}% of the zero-overhead bound ({verdict} the 90% target)")
    print(f"Saved {args.out}")
    return result


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
