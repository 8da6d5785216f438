"""Issue 9 target 2: the per-layer matching cost at batch 1-8 under CUDA graphs (plain timm vs merged, graphed).

Variants of the merged model (captured separately; the plan's launch sequence is frozen at capture, so the
switches below only have to hold while capturing):

- ``old``: the metric ``k.mean(1)`` as a torch reduce, matcher, ranking, ``_unm_kernel`` (four launches);
- ``new``: the defaults: head mean inside the plan (``_triton.HEAD_MEAN``, "prepass"), rank + unmerged list in one
  launch (``_triton.FUSED_UNM``);
- ``fused``: ``new`` with the head mean forced into the matcher (the default, ``prepass``, writes it with
  ``_metric_kernel``: faster at every measured shape);
- ``onestep``: ``new`` with the merge scanning r <= 64 sources in one loop step (``_merge.SCAN_ONE_STEP = 64``).

Steps (``--steps``): ``check`` (head mean and plans against the torch path on the GPU, counts of differing
entries), ``e2e`` (interleaved rounds over Williams orders, CUDA events, median of round medians, plain/merged
speedups, max-abs-diff of every variant's output against ``old``), ``micro`` (one layer's plan, 20 calls in one
graph, per variant), ``profile`` (torch.profiler table of one eager forward per variant, per forward).
Run: ``python -m merge_bench.small_batch --steps e2e --out x.json`` (the GPU script runs each step under a
timeout: ``packages/merge-bench/scripts/issue9_small_batch.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch

import merge_core as mc
from merge_core import kernels, matching

from .common import DTYPES, build_model, environment, write_json
from .interleaved import _time, balanced

MODELS = {  # name -> (timm model, kwargs)
    "vit_l_512": ("vit_large_patch16_224", {"img_size": 512}),
    "vit_b_224": ("vit_base_patch16_224", {}),
    "vit_l_224": ("vit_large_patch16_224", {}),
    "tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}),
}
VARIANTS = ("plain", "old", "new", "fused", "onestep")
TARGETS = {("vit_l_512", 1): 1.2, ("vit_b_224", 8): 1.1}  # issue 9 target 2: graphed plain / graphed merged


@contextlib.contextmanager
def settings(variant: str) -> Iterator[None]:
    """The plan configuration of a merged variant (restored afterwards)."""
    from merge_core.kernels import _merge, _triton

    saved = (_triton.HEAD_MEAN, _triton.FUSED_UNM, matching.use_fused_heads, _merge.SCAN_ONE_STEP)
    try:
        if variant == "old":
            _triton.FUSED_UNM = False
            matching.use_fused_heads = lambda keys, score_mod=None: False
        elif variant in ("fused", "prepass"):
            _triton.HEAD_MEAN = variant
        elif variant == "onestep":
            _merge.SCAN_ONE_STEP = 64
        elif variant != "new":
            raise ValueError(f"variant must be one of {VARIANTS[1:]}, got {variant!r}")
        yield
    finally:
        _triton.HEAD_MEAN, _triton.FUSED_UNM, matching.use_fused_heads, _merge.SCAN_ONE_STEP = saved


def _runner(model: torch.nn.Module, x: torch.Tensor, variant: str) -> Callable[[], Any]:
    """A no-argument forward: a captured CUDA graph (``merge_core.kernels.graph.cuda_graph``) on a GPU, eager
    calls under the variant's settings on CPU."""
    if x.is_cuda:
        from merge_core.kernels.graph import cuda_graph

        if variant == "plain":
            graphed = cuda_graph(model, x)
        else:
            with settings(variant):
                graphed = cuda_graph(model, x)
        return lambda: graphed(x)
    if variant == "plain":
        return lambda: model(x)

    def run():
        with settings(variant):
            return model(x)

    return run


def _parse_rows(text: str) -> list[tuple[str, int, int]]:
    rows = []
    for item in text.split(","):
        key, batch, r = item.split(":")
        if key not in MODELS:
            raise ValueError(f"--rows: unknown model {key!r}, choose from {sorted(MODELS)}")
        rows.append((key, int(batch), int(r)))
    return rows


# ----------------------------------------------------------------------------------------------------- e2e
def e2e_row(plain, key: str, batch: int, r: int, prop: bool, args, device, dtype) -> dict[str, Any]:
    """One (model, batch, r, prop_attn) row: every variant captured, then timed in interleaved rounds."""
    merged = copy.deepcopy(plain)
    mc.patch.timm(merged, prop_attn=prop)
    merged.r = r
    merged.merge_policy = "force"
    img = MODELS[key][1].get("img_size", 224)
    x = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    with torch.inference_mode():
        runs = {v: _runner(plain if v == "plain" else merged, x, v) for v in VARIANTS}
        outputs = {v: runs[v]().float().clone() for v in VARIANTS}
        tokens = list(merged._merge_info.tokens)
        for _ in range(args.warmup):
            for fn in runs.values():
                fn()
        if cuda:
            torch.cuda.synchronize()
        rounds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i in range(args.rounds):
            for v in balanced(VARIANTS, i):
                runs[v]()
                rounds[v].append(_time(runs[v], args.iters, cuda))
    row: dict[str, Any] = {"model": key, "batch": batch, "r": r, "prop_attn": prop, "tokens": tokens}
    for v, values in rounds.items():
        row[f"{v}_ms"] = statistics.median(values)
        row[f"{v}_min_ms"] = min(values)
    for v in VARIANTS[1:]:
        row[f"{v}_speedup"] = row["plain_ms"] / row[f"{v}_ms"]
        row[f"{v}_maxdiff_vs_old"] = float((outputs[v] - outputs["old"]).abs().max())
    row["merged_vs_plain_maxdiff"] = float((outputs["new"] - outputs["plain"]).abs().max())  # merging changes it
    row["rounds"] = rounds
    target = TARGETS.get((key, batch))
    row["target"] = target
    del runs, merged
    return row


def run_e2e(args, device, dtype, payload) -> None:
    print(f"{'model':10s} {'bs':>3s} {'r':>3s} prop {'plain':>7s} " + " ".join(f"{v:>13s}" for v in VARIANTS[1:]))
    plains: dict[str, torch.nn.Module] = {}
    for key, batch, r in _parse_rows(args.rows):
        if key not in plains:
            plains.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            plains[key] = build_model(MODELS[key][0], device, dtype, **MODELS[key][1])
        for prop in (False, True) if args.prop == "both" else (args.prop == "on",):
            row = e2e_row(plains[key], key, batch, r, prop, args, device, dtype)
            payload["e2e"].append(row)
            cells = " ".join(f"{row[f'{v}_ms']:7.3f} {row[f'{v}_speedup']:4.2f}x" for v in VARIANTS[1:])
            mark = "" if row["target"] is None else f"  target {row['target']}x: new {row['new_speedup']:.3f}x"
            diffs = ", ".join(f"{v} {row[f'{v}_maxdiff_vs_old']:.2e}" for v in VARIANTS[2:])
            print(
                f"{key:10s} {batch:3d} {r:3d} {'on ' if prop else 'off'}  {row['plain_ms']:7.3f} {cells}{mark}"
                f"  | maxdiff vs old: {diffs}",
                flush=True,
            )
            write_json(args.out, payload, log=lambda _m: None)


# --------------------------------------------------------------------------------------------------- micro
MICRO_SHAPES = {  # (batch, heads, tokens, head dim, r): one layer's matching of the e2e rows' first layers
    "gpu": [(1, 16, 1025, 64, 40), (8, 12, 197, 64, 16), (8, 16, 197, 64, 8)],
    "cpu": [(1, 2, 17, 16, 2), (2, 2, 17, 16, 2)],
}


def _keys(batch: int, heads: int, n: int, d: int, device, dtype) -> torch.Tensor:
    """Keys laid out like timm's qkv output (a strided (B, H, N, D) view)."""
    torch.manual_seed(n + heads)
    return torch.randn(batch, n, 3, heads, d, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)[1]


def _plan_fn(variant: str, keys: torch.Tensor, r: int) -> Callable[[], torch.Tensor]:
    """One layer's whole plan (metric included) for a variant; the settings hold while it is called."""
    from merge_core.kernels import _triton

    if variant == "old":

        def old() -> torch.Tensor:
            m = keys.mean(1)
            return _triton.match_plan_buffer(m[:, ::2], m[:, 1::2], 1, 0, r, None, True)

        return old
    return lambda: _triton.match_plan_heads(keys, 1, 0, r, None, True)


def _reference(keys: torch.Tensor, r: int) -> torch.Tensor:
    with kernels.kernel_mode("never"):
        merge, _ = matching.bipartite_soft_matching(keys.mean(1), r, protected=1)
    plan = merge.plan
    return torch.cat([plan.unm_idx[..., 0], plan.src_idx[..., 0], plan.dst_idx[..., 0]], dim=-1)


def run_micro(args, device, dtype, payload) -> None:
    cuda = device.type == "cuda"
    calls = 20 if cuda else 1
    print(f"{'shape (B,H,N,D,r)':24s} " + " ".join(f"{v:>9s}" for v in VARIANTS[1:]) + "   us per plan")
    for shape in MICRO_SHAPES["gpu" if cuda else "cpu"]:
        batch, heads, n, d, r = shape
        keys = _keys(batch, heads, n, d, device, dtype)
        row: dict[str, Any] = {"shape": shape}
        with torch.inference_mode():
            for v in VARIANTS[1:]:
                with settings(v):
                    fn = _plan_fn(v, keys, r)
                    fn()  # compile
                    if cuda:
                        torch.cuda.synchronize()
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            for _ in range(calls):
                                fn()
                        run = graph.replay
                    else:
                        run = fn
                for _ in range(3):
                    run()
                times = [_time(run, 10, cuda) for _ in range(args.rounds)]
                row[f"{v}_us"] = 1e3 * statistics.median(times) / calls
        payload["micro"].append(row)
        cells = " ".join(f"{row[f'{v}_us']:9.2f}" for v in VARIANTS[1:])
        print(f"{str(shape):24s} {cells}", flush=True)
        write_json(args.out, payload, log=lambda _m: None)


# --------------------------------------------------------------------------------------------------- check
def run_check(args, device, dtype, payload) -> None:
    """Head mean and plans of every variant against the torch path (differing entries counted, not asserted:
    on fp16 near-ties the kernels may pick an equally scored different pair, see ``merge_core.kernels``)."""
    from merge_core.kernels import _triton

    shapes = MICRO_SHAPES["gpu" if device.type == "cuda" else "cpu"]
    ok = True
    for batch, heads, n, d, r in shapes:
        keys = _keys(batch, heads, n, d, device, dtype)
        with torch.inference_mode():
            mean = keys.mean(1)
            ours = _triton.head_mean_metric(keys)
            expected = _reference(keys, r)
            row: dict[str, Any] = {
                "shape": (batch, heads, n, d, r),
                "head_mean_differing": int((ours != mean).sum()),
                "head_mean_maxdiff": float((ours.float() - mean.float()).abs().max()),
            }
            for v in VARIANTS[1:]:
                with settings(v):
                    plan = _plan_fn(v, keys, r)()
                row[f"{v}_plan_differing"] = int((plan != expected).sum())
                if v != "old":
                    with settings("old"):
                        old = _plan_fn("old", keys, r)()
                    row[f"{v}_vs_old_differing"] = int((plan != old).sum())
                    ok &= row[f"{v}_vs_old_differing"] == 0 or row["head_mean_differing"] > 0
        payload["check"].append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    payload["check_ok"] = ok
    print(f"check: new plans equal the old path's wherever the head means agree bit for bit: {ok}")
    write_json(args.out, payload, log=lambda _m: None)


# ------------------------------------------------------------------------------------------------- profile
def run_profile(args, device, dtype, payload) -> None:
    """Per-kernel device time of one eager forward of each variant (``forwards`` forwards, divided)."""
    from torch.profiler import ProfilerActivity, profile

    key, batch, r = _parse_rows(args.rows)[0]
    plain = build_model(MODELS[key][0], device, dtype, **MODELS[key][1])
    merged = copy.deepcopy(plain)
    mc.patch.timm(merged, prop_attn=False)
    merged.r = r
    merged.merge_policy = "force"
    img = MODELS[key][1].get("img_size", 224)
    x = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    forwards = 5
    for v in VARIANTS[:3]:
        model = plain if v == "plain" else merged
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            if v != "plain":
                stack.enter_context(settings(v))
            for _ in range(3):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(forwards):
                    model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        events = prof.key_averages()
        rows = []
        for evt in events:
            dev_us = getattr(evt, "self_device_time_total", None)
            if dev_us is None:
                dev_us = getattr(evt, "self_cuda_time_total", 0.0)
            cpu_us = evt.self_cpu_time_total
            rows.append((evt.key, evt.count / forwards, dev_us / forwards, cpu_us / forwards))
        by_device = device.type == "cuda"
        rows.sort(key=lambda row: -(row[2] if by_device else row[3]))
        total = sum(row[2] for row in rows)
        print(f"=== profile {key} bs{batch} r{r} prop off, variant {v}: per forward (device total {total:.1f} us)")
        print(f"{'kernel / op':70s} {'calls':>6s} {'device us':>10s} {'self cpu us':>12s}")
        for name, calls, dev_us, cpu_us in rows[: args.profile_rows]:
            print(f"{name[:70]:70s} {calls:6.1f} {dev_us:10.1f} {cpu_us:12.1f}")
        payload["profile"][v] = [
            {"name": n, "calls_per_forward": c, "device_us": d, "self_cpu_us": u} for n, c, d, u in rows
        ]
    write_json(args.out, payload, log=lambda _m: None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="check,e2e,micro,profile")
    parser.add_argument("--rows", default="vit_l_512:1:40,vit_b_224:8:16,vit_l_224:8:8", help="model:batch:r,...")
    parser.add_argument("--prop", default="both", choices=("off", "on", "both"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="issue9_small_batch.json")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.iters < 1:
        raise ValueError(f"--rounds and --iters must be >= 1, got {args.rounds}, {args.iters}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    steps = args.steps.split(",")
    unknown = set(steps) - {"check", "e2e", "micro", "profile"}
    if unknown:
        raise ValueError(f"--steps: unknown {sorted(unknown)}, choose from check, e2e, micro, profile")
    payload: dict[str, Any] = {
        "environment": environment(device),
        "args": vars(args),
        "check": [],
        "e2e": [],
        "micro": [],
        "profile": {},
    }
    mode = contextlib.nullcontext() if device.type == "cuda" else kernels.kernel_mode("always")
    with mode:
        for step in steps:
            {"check": run_check, "e2e": run_e2e, "micro": run_micro, "profile": run_profile}[step](
                args, device, dtype, payload
            )
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
