"""``python -m gitmerge3d.tools.fused_attend_bench``: one merged attend, plain SDPA vs eager merged vs fused (issue 11).

Why: merging lost to plain flash attention because the eager merged attend is ~10 small kernels; merge-core's
``kernels.patch_merge_attn`` does it in one launch. Per shape (``--shape P,H,N,stride,r``; q, k, v are views of a
packed (P, N, 3, H, 16) qkv, as ``SerializedAttention.forward`` makes them) this reports:

- ``fused`` is the kernel as the model calls it (the per-shape tuner picks a variant and block config),
  ``single`` / ``split`` force the one-program kernel / the split variant (S programs per (patch, head) group,
  two launches; ``MERGE_CORE_PMA_VARIANT``'s values);
- ``*_call_ms``: CUDA events around one call after a synchronize (what a forward waits for; includes launches);
- ``*_host_us``: host wall time per call over 200 back-to-back calls without a synchronize (the Python wrapper
  plus Triton's launcher: what bounds a host-bound forward);
- ``*_batch_ms``: 20 back-to-back calls / 20 (throughput: max of host and device time);
- ``*_graph_ms``: a CUDA graph of 10 calls replayed, / 10 (device time only);
- ``fused_configs_ms``: the fused kernel's candidate block configurations, graph-timed;
- ``*_max_diff``: max |output - merge-core's torch oracle| (``merged_patch_attention_reference``); ``*_close``:
  the fraction of output values within 5e-3 of it (a near-tie in the last bit moves a token to another group);
- ``slots_vs_spread`` / ``slots_vs_reference``: fraction of tokens whose fused slot equals ``spread_slots``'
  (the eager path's matcher) / the oracle's ``patch_match`` (mapped to the kernel's slot order).

On a CPU (``--device cpu``, needs ``TRITON_INTERPRET=1``) it runs one call of each for a smoke check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from merge_core import kernels
from merge_core.patch_merge_reference import merged_patch_attention_reference

from .. import merging
from ..models.point_transformer_v3m2 import SerializedAttention

DEFAULT_SHAPES = "40,3,1024,10,921;1,24,1024,10,921;10,6,1024,10,921;3,12,1024,10,921"


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """``P,H,N,stride,r`` -> ints (head dim is 16, as at every Sonata level)."""
    parts = text.split(",")
    if len(parts) != 5 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--shapes entry {text!r} must be P,H,N,stride,r (five non-negative ints)")
    p, h, n, stride, r = (int(x) for x in parts)
    if min(p, h, n, stride) < 1:
        raise ValueError(f"--shapes entry {text!r}: P, H, N and stride must be >= 1")
    return p, h, n, stride, r


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn, device: torch.device, iters: int) -> float:
    """Median ms of one call after a synchronize (CUDA events; host clock on a CPU)."""
    times = []
    for _ in range(iters):
        _sync(device)
        if device.type == "cuda":
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


def batch_ms(fn, device: torch.device, calls: int = 20, repeats: int = 5) -> float:
    """Median over ``repeats`` of (``calls`` back-to-back calls) / ``calls``, CUDA events."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def host_us(fn, device: torch.device, calls: int = 200) -> float:
    """Host microseconds per call: ``calls`` back-to-back calls, no synchronize until the clock stops (the
    device queue absorbs them while the host is the bottleneck)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    _sync(device)
    return (t1 - t0) / calls * 1e6


def graph_ms(fn, device: torch.device, calls: int = 10, repeats: int = 10) -> float | None:
    """Device ms per call: a CUDA graph of ``calls`` calls, replayed ``repeats`` times (median); None if the
    capture fails (reported, not fatal)."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception as exc:  # a capture failure is a result, not a crash
        print(f"graph capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    graph.replay()
    return call_ms(graph.replay, device, repeats) / calls


def _qkv(p: int, h: int, n: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(p * n, 3 * h * 16, generator=g).to(device, dtype)
    return qkv.reshape(p, n, 3, h, 16).permute(2, 0, 3, 1, 4).unbind(0)


def bench_shape(shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device, iters: int) -> dict:
    from merge_core.kernels import patch_merge_attn as pma

    p, h, n, stride, r = shape
    q, k, v = _qkv(p, h, n, dtype, device)
    attn = SerializedAttention(h * 16, h, n).to(device, dtype).eval()
    merging.patch(torch.nn.Sequential(attn), {"tome": "patch", "r": 0.5, "stride": stride})
    mode = "auto" if device.type == "cuda" else "always"
    res: dict = {"shape": dict(P=p, H=h, N=n, D=16, stride=stride, r=r), "dtype": str(dtype).removeprefix("torch.")}

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=attn.scale)

    def eager():
        with merging.fused_attend(False):
            return attn._merged(q, k, v, None, r, stride)[0]

    def fused():
        return pma.patch_merge_attention(q, k, v, r, stride, scale=attn.scale)[0]

    def single():
        return pma.patch_merge_attention(q, k, v, r, stride, scale=attn.scale, variant="single")[0]

    def split():
        return pma.patch_merge_attention(q, k, v, r, stride, scale=attn.scale, variant="split")[0]

    def fused_via_attend():
        return attn._merged(q, k, v, None, r, stride)[0]

    with torch.no_grad(), kernels.kernel_mode(mode):
        if pma.patch_merge_attention(q, k, v, r, stride) is None:
            res["fused"] = "unsupported (nothing merges or too many unmerged sources)"
            return res
        fns = {"sdpa": sdpa, "eager": eager, "fused": fused, "single": single, "split": split,
               "fused_attend": fused_via_attend}  # fmt: skip
        for fn in fns.values():  # compile / tune / fill the layout caches
            fn()
        _sync(device)
        for name, fn in fns.items():
            res[f"{name}_call_ms"] = call_ms(fn, device, iters)
            res[f"{name}_host_us"] = host_us(fn, device, 200 if device.type == "cuda" else 1)
            if device.type == "cuda":
                res[f"{name}_batch_ms"] = batch_ms(fn, device)
                res[f"{name}_graph_ms"] = graph_ms(fn, device)
        if device.type == "cuda":
            configs = {}
            n_slots = pma.unmerged_count(n, r, stride) + n // stride
            for cfg in pma.candidate_configs(n, n_slots, p * h, pma.sm_count(device)):
                run = lambda cfg=cfg: pma.patch_merge_attention(q, k, v, r, stride, scale=attn.scale, config=cfg)  # noqa: E731
                try:
                    run()
                    configs[",".join(map(str, cfg))] = graph_ms(run, device)
                except Exception as exc:
                    configs[",".join(map(str, cfg))] = f"{type(exc).__name__}"
            res["fused_configs_ms"] = configs
            res["fused_tuned_configs"] = pma.tuned_configs()
        out, n_out, slot = pma.patch_merge_attention(q, k, v, r, stride, scale=attn.scale, return_slots=True)
        out_split, _, slot_split = pma.patch_merge_attention(
            q, k, v, r, stride, scale=attn.scale, return_slots=True, variant="split"
        )
        old = eager()
        with kernels.kernel_mode("never"):  # the oracle and a second slot map on merge-core's torch matcher
            ref, m = merged_patch_attention_reference(q, k, v, r, stride, "spread", "off", attn.scale)
            spread, _ = merging.spread_slots(v, r, stride)
        spread_k = merging.spread_slots(v, r, stride)[0]
    n_bins = n // stride
    n_unm = n_out - n_bins
    ref_slot = torch.where(m.slot < n_unm, m.slot + n_bins, m.slot - n_unm)
    res.update(
        kept=n_out,
        fused_max_diff=float((out.float() - ref.float()).abs().max()),
        eager_max_diff=float((old.float() - ref.float()).abs().max()),
        fused_vs_eager_max_diff=float((out.float() - old.float()).abs().max()),
        fused_close=float(((out.float() - ref.float()).abs() <= 5e-3).float().mean()),
        split_max_diff=float((out_split.float() - ref.float()).abs().max()),
        split_slots_vs_reference=float((slot_split == ref_slot).float().mean()),
        eager_close=float(((old.float() - ref.float()).abs() <= 5e-3).float().mean()),
        slots_vs_reference=float((slot == ref_slot).float().mean()),
        slots_vs_spread_torch=float((slot == spread).float().mean()),
        slots_vs_spread=float((slot == spread_k).float().mean()),
    )
    return res


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"{meta['device']}, torch {meta['torch']}, one merged attend (no_rand, prop_attn off), D=16",
        "",
        "| shape P x H x N (stride, r) | kept | SDPA call / batch / graph ms | eager merged call / batch / graph ms "
        "| fused call / batch / graph ms | fused via _merged call ms | fused max diff (close) | eager max diff "
        "| slots = spread_slots | slots = reference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def trio(r: dict, name: str) -> str:
        vals = [r.get(f"{name}_{kind}_ms") for kind in ("call", "batch", "graph")]
        return " / ".join("-" if x is None else f"{x:.3f}" for x in vals)

    for r in rows:
        s = r["shape"]
        head = f"| {s['P']} x {s['H']} x {s['N']} ({s['stride']}, {s['r']}) {r['dtype']}"
        if "fused_call_ms" not in r:
            lines.append(f"{head} | {r.get('fused', '-')} | | | | | | | | |")
            continue
        lines.append(
            f"{head} | {r['kept']} | {trio(r, 'sdpa')} | {trio(r, 'eager')} | {trio(r, 'fused')} "
            f"| {r['fused_attend_call_ms']:.3f} | {r['fused_max_diff']:.2g} ({r['fused_close']:.4f}) "
            f"| {r['eager_max_diff']:.2g} | {r['slots_vs_spread']:.4f} | {r['slots_vs_reference']:.4f} |"
        )
    lines += [
        "",
        "Variants (issue 11 v2): call ms / graph ms / host us per call; tuned = the tuner's pick "
        "(BLOCK_T,BLOCK_S,warps,S; S=0 one program per group)",
        "",
        "| shape P x H (groups) | SDPA | fused (tuned) | single | split | split max diff (slots = ref) |",
        "|---|---|---|---|---|---|",
    ]

    def var(r: dict, name: str) -> str:
        vals = [r.get(f"{name}_call_ms"), r.get(f"{name}_graph_ms"), r.get(f"{name}_host_us")]
        return " / ".join("-" if x is None else f"{x:.3f}" if i < 2 else f"{x:.0f}" for i, x in enumerate(vals))

    for r in rows:
        if "fused_call_ms" in r:
            s = r["shape"]
            lines.append(
                f"| {s['P']} x {s['H']} ({s['P'] * s['H']}) | {var(r, 'sdpa')} | {var(r, 'fused')} "
                f"| {var(r, 'single')} | {var(r, 'split')} "
                f"| {r['split_max_diff']:.2g} ({r['split_slots_vs_reference']:.4f}) |"
            )
    if rows and rows[-1].get("fused_tuned_configs"):  # the tuner's picks so far, every shape class
        lines.append(f"\ntuned (key -> config): {rows[-1]['fused_tuned_configs']}")
    for r in rows:
        if r.get("fused_configs_ms"):
            lines.append(f"\nfused configs (BLOCK_T,BLOCK_S,warps,S -> graph ms) {r['shape']}: {r['fused_configs_ms']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gitmerge3d-fused-attend-bench", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="';'-separated P,H,N,stride,r")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out-dir", default="/tmp/o")
    args = p.parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in args.shapes.split(";") if s.strip()]
        if args.iters < 1:
            raise ValueError(f"--iters must be >= 1, got {args.iters}")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        dtype = getattr(torch, args.dtype)
        rows = [bench_shape(s, dtype, device, args.iters) for s in shapes]
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"gitmerge3d-fused-attend-bench: error: {exc}", file=sys.stderr)
        return 2
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)",
        "torch": torch.__version__,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(meta, rows)
    (out_dir / "fused-attend.json").write_text(json.dumps(dict(meta, rows=rows), indent=2, default=str))
    (out_dir / "fused-attend.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
