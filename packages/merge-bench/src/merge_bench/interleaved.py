"""Issue 9 target 1: plain timm vs the patched model under the automatic policy vs forced merging, interleaved.

Why interleaved: the bs1 rows are host-bound 3-14 ms forwards whose single-run medians moved by several
percent between runs (ViT-S bs1 came out at 1.02x in the run where ViT-B bs1 was 0.93x). Each round times
every variant back to back (``iters`` CUDA-event-timed forwards each, after one untimed call; the orders form a
Williams design, so each variant takes each position and follows each other variant equally often), so clock and
host drift, position and carryover effects hit all alike;
the report is the median of the round medians and the minimum. Run: ``python -m merge_bench.interleaved``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

import merge_core as mc
from merge_core.kernels import policy

from .common import DTYPES, build_model, environment, write_json
from .profile import python_calls

VARIANTS = ("plain", "plain_copy", "auto", "forced")  # plain_copy: a second unpatched copy (noise floor)
MODELS = {  # name -> (timm model, kwargs, r)
    "vit_s_224": ("vit_small_patch16_224", {}, 16),
    "vit_b_224": ("vit_base_patch16_224", {}, 16),
    "vit_l_224": ("vit_large_patch16_224", {}, 8),
    "vit_l_512": ("vit_large_patch16_224", {"img_size": 512}, 40),
    "tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}, 2),
}


def _time(fn, iters: int, cuda: bool) -> float:
    """Median milliseconds of ``iters`` calls (CUDA events on a GPU, perf_counter on CPU)."""
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def williams_orders(n: int) -> list[list[int]]:
    """A Williams design: orders of ``range(n)`` in which every variant takes every position equally often and
    directly follows every other variant equally often (n orders for even n, 2n for odd n).

    Why carryover balance and not only positions: on an H200 (2026-12-03, ViT-B bs64) the variant timed right
    after the host-bound forced model (GPU mostly idle for ~16 ms per call) ran ~4% faster: the GPU boosts after
    a low-power stretch. A plain rotation keeps neighbours fixed (the automatic model always followed the plain
    copy and never the forced model), which read as a 3-4% loss that was not the policy's.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(v + i) % n for v in first] for i in range(n)]
    if n % 2:
        orders += [list(reversed(order)) for order in orders]
    return orders


def balanced(variants: tuple[str, ...], round_index: int) -> tuple[str, ...]:
    """The variants in round ``round_index``'s order, cycling through ``williams_orders``."""
    orders = williams_orders(len(variants))
    return tuple(variants[i] for i in orders[round_index % len(orders)])


def build(key: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Plain, automatic and forced copies of one model (one random init, copied: ViT-L init takes seconds)."""
    name, kwargs, r = MODELS[key]
    plain = build_model(name, device, dtype, **kwargs)
    plain_copy, auto, forced = copy.deepcopy(plain), copy.deepcopy(plain), copy.deepcopy(plain)
    for model in (auto, forced):
        mc.patch.timm(model)
        model.r = r
    forced.merge_policy = "force"
    models = {"plain": plain, "plain_copy": plain_copy, "auto": auto, "forced": forced}
    return {**models, "img": kwargs.get("img_size", 224), "r": r, "name": name}


def bench(key: str, models: dict[str, Any], batch: int, args, device: torch.device, dtype: torch.dtype):
    """One row: every variant timed in each round, back to back."""
    x = torch.randn(batch, 3, models["img"], models["img"], device=device, dtype=dtype)
    cuda = device.type == "cuda"
    runs = {k: (lambda m=models[k]: m(x)) for k in VARIANTS}
    with torch.inference_mode():
        if args.pin_zero:  # CPU smoke test of the r = 0 fast path (CPU is never calibrated)
            r_list = [models["r"]] * len(models["auto"].blocks)
            policy.set_decision(models["auto"], x, r_list, merge=False)
        runs["auto"]()  # the policy calibrates here (CUDA), so the rounds time its decision
        for _ in range(args.warmup):
            for fn in runs.values():
                fn()
        if cuda:
            torch.cuda.synchronize()
        rounds: dict[str, list[float]] = {k: [] for k in runs}
        for i in range(args.rounds):
            for k in balanced(VARIANTS, i):
                runs[k]()  # one untimed call: the timed block starts from this variant's own steady state
                rounds[k].append(_time(runs[k], args.iters, cuda))
        runs["auto"]()
        calls = {k: python_calls(fn)[0] for k, fn in runs.items()}
    decision = policy.last_decision(models["auto"])
    row: dict[str, Any] = {"model": key, "timm": models["name"], "batch": batch, "r": models["r"], "rounds": rounds}
    for k, values in rounds.items():
        row[f"{k}_ms"] = statistics.median(values)
        row[f"{k}_min_ms"] = min(values)
    row["auto_speedup"] = row["plain_ms"] / row["auto_ms"]
    row["auto_speedup_min"] = row["plain_min_ms"] / row["auto_min_ms"]
    row["forced_speedup"] = row["plain_ms"] / row["forced_ms"]
    row["plain_copy_speedup"] = row["plain_ms"] / row["plain_copy_ms"]  # the noise floor: two identical models
    row["auto_merges"] = None if decision is None else decision["merge"]
    row["python_calls"] = calls
    row["auto_python_calls_extra"] = calls["auto"] - calls["plain"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_s_224,vit_b_224,vit_l_224,vit_l_512")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="issue9_target1.json")
    parser.add_argument("--pin-zero", action="store_true", help="pin the automatic model's decision to r = 0")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.iters < 1:
        raise ValueError(f"--rounds and --iters must be >= 1, got {args.rounds}, {args.iters}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    payload: dict[str, Any] = {"environment": environment(device), "args": vars(args), "rows": []}
    header = ("model", "bs", "plain ms", "auto ms", "forced ms", "auto x", "min x", "copy x", "+calls")
    print("{:10s} {:>3s} {:>9s} {:>9s} {:>9s} {:>7s} {:>6s} {:>6s} {:>6s} merges".format(*header))
    keys = args.models.split(",")
    for key in keys:
        if key not in MODELS:
            raise ValueError(f"--models: unknown {key!r}, choose from {sorted(MODELS)}")
    for key in keys:
        models = build(key, device, dtype)
        for batch in (int(b) for b in args.batches.split(",")):
            row = bench(key, models, batch, args, device, dtype)
            payload["rows"].append(row)
            print(
                f"{key:10s} {batch:3d} {row['plain_ms']:9.3f} {row['auto_ms']:9.3f} {row['forced_ms']:9.3f} "
                f"{row['auto_speedup']:7.3f} {row['auto_speedup_min']:6.3f} {row['plain_copy_speedup']:6.3f} "
                f"{row['auto_python_calls_extra']:6d} {row['auto_merges']}",
                flush=True,
            )
            write_json(args.out, payload, log=lambda _m: None)
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = all(row["auto_speedup"] >= 0.98 for row in payload["rows"])
    print(f"target 1 (every automatic row >= 0.98x by median of round medians): {'met' if ok else 'MISSED'}")
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
