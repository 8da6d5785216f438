"""``python -m gitmerge3d.tools.host_cost``: where the host time of a merged forward goes (issue 11).

Why: on an H200 the merged forward was timed 30-80 ms slower than the unmerged one while its device time
was only ~4 ms higher, and rows were timed once each, in a fixed order, 10 calls apiece. This tool times
the rows *interleaved* (``--rounds`` passes over all rows, so drift hits every row alike) and reports per row:

- ``latency_ms``: CUDA events around the call (what launch_bench reports; host clock on a CPU);
- ``enqueue_ms``: host clock from the call to its return, before any synchronize (on a GPU: the host's
  own time, plus waits at the forward's host syncs);
- ``attend_host_us``: host time of one ``attend`` call (patch attention: match, merge, SDPA, unmerge),
  median over the blocks of a forward, no synchronize inside, in a separate pass;
- ``syncs`` / ``aten_ops`` (``gitmerge3d.opcount``) and ``triton_launches`` per forward (CUDA only);
- ``*_after_profiler_ms`` (``--profiler-check``): the same interleaved timing repeated after one
  ``torch.profiler`` session with CUDA activity. launch_bench timed r0-flash first in a clean process and
  every later row after the previous row's profiler sessions; Kineto may leave CUPTI attached after a
  session (pytorch/pytorch#144455: 10-20% slower training afterwards), which slows every later launch.

``--graph-check`` (CUDA): captures one merged ``attend`` (patch@0.9, fp16, real stage-0 shapes) in a CUDA
graph and reports whether it captures, eager vs eager and replay vs eager (bitwise and max difference), the
matching's slot map replayed vs eager, the same under deterministic algorithms, the latency of eager calls
vs replays, and the opt-in graph cache's host time per call (``graph_check``).

Row suffixes are ablations of ``patch@r``: ``+torchmatch`` (merge-core's torch matcher instead of its Triton
kernel), ``+nogc`` (Python's garbage collector off while timing), ``+skipattn`` (``attend`` returns v: the
cost of everything but patch attention), ``+graph`` (the opt-in CUDA-graph cache of the merged attend,
``merging.attend_graphs``; eager on a CPU; a no-op where the fused attend runs), ``+srmean`` (the group mean
as one ``scatter_reduce_`` dispatch, ``merging.merge_op``), ``+nofused`` (the eager merged attend instead of
merge-core's one-launch kernel, ``merging.fused_attend(False)``). ``--tile 4``: 4 side-by-side copies of the
scene (~160k points, as ``bench --tile``). Example (H200, real scene):

    python3 -m gitmerge3d.tools.host_cost --scene projects/gitmerge3d/data_src/scene0000_00.bin \\
        --rows r0,patch@0.9,patch@0.9+torchmatch,patch@0.9+nogc,r0+skipattn --profiler-check --out-dir $OUT_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from merge_core import kernels

from .. import merging
from ..models import PointTransformerV3, sonata_config
from ..models import sparse_conv as sc
from ..models.point_transformer_v3m2 import SerializedAttention
from ..models.presets import reduced_config
from ..opcount import count_ops
from ..profiling import attention_skipped
from .bench import load_inputs

ABLATIONS = ("torchmatch", "nogc", "skipattn", "graph", "srmean", "nofused")


def parse_row(item: str) -> tuple[str | None, float, set[str]]:
    """``r0`` / ``<mode>@<r>`` plus ``+ablation`` suffixes -> (mode or None, r, ablations)."""
    base, *extra = item.split("+")
    bad = [e for e in extra if e not in ABLATIONS]
    if bad:
        raise ValueError(f"--rows entry {item!r}: unknown ablation {bad[0]!r} (known: {', '.join(ABLATIONS)})")
    if base == "r0":
        return None, 0.0, set(extra)
    mode, _, r = base.partition("@")
    try:
        rate = float(r)
    except ValueError:
        rate = -1.0
    if mode not in merging.MODES or not 0.0 < rate < 1.0:
        raise ValueError(f"--rows entry {item!r}: expected r0 or <patch|weighted_patch>@<r in (0,1)>[+ablation]")
    return mode, rate, set(extra)


@contextlib.contextmanager
def ablated(ablations: set[str]) -> Iterator[None]:
    """The row's ablations as one context (matcher mode, garbage collector, attention skipped)."""
    with contextlib.ExitStack() as stack:
        if "torchmatch" in ablations:
            stack.enter_context(kernels.kernel_mode("never"))
        if "skipattn" in ablations:
            stack.enter_context(attention_skipped())
        if "graph" in ablations:
            stack.enter_context(merging.attend_graphs(True))
        if "srmean" in ablations:
            stack.enter_context(merging.merge_op("scatter_reduce"))
        if "nofused" in ablations:
            stack.enter_context(merging.fused_attend(False))
        was_enabled = gc.isenabled()
        if "nogc" in ablations:
            gc.collect()
            gc.disable()
        try:
            yield
        finally:
            if was_enabled:
                gc.enable()


@contextlib.contextmanager
def attend_timer(times: list[float]) -> Iterator[None]:
    """Append the host microseconds of every ``attend`` call (plain and merged classes) to ``times``."""
    saved = SerializedAttention.__dict__["attend"], merging.MergedSerializedAttention.__dict__["attend"]

    def wrap(fn):
        def timed(self, *args):
            t0 = time.perf_counter()
            out = fn(self, *args)
            times.append((time.perf_counter() - t0) * 1e6)
            return out

        return timed

    SerializedAttention.attend = wrap(saved[0])
    merging.MergedSerializedAttention.attend = wrap(saved[1])
    try:
        yield
    finally:
        SerializedAttention.attend, merging.MergedSerializedAttention.attend = saved


@contextlib.contextmanager
def triton_launch_counter(counter: list[int]) -> Iterator[None]:
    """Count ``JITFunction.run`` calls (one per Triton kernel launch) into ``counter[0]``; no-op without Triton."""
    try:
        from triton.runtime.jit import JITFunction
    except Exception:  # pragma: no cover - depends on the environment
        yield
        return
    saved = JITFunction.run

    def run(self, *args, **kwargs):
        counter[0] += 1
        return saved(self, *args, **kwargs)

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = saved


def timed_calls(fn, device: torch.device, iters: int) -> tuple[list[float], list[float]]:
    """(latency ms, enqueue ms) of ``iters`` calls; the device is idle at the start of every call."""
    cuda = device.type == "cuda"
    lat, enq = [], []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        enq.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            end.record()
            end.synchronize()
            lat.append(start.elapsed_time(end))
        else:
            lat.append(enq[-1])
    return lat, enq


def profile_once(fn, device: torch.device) -> None:
    """One ``torch.profiler`` session (CUDA activity on a GPU) around ``fn``: what launch_bench did between rows."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def measure(
    model, inputs, rows: list[str], device, rounds: int, warmup: int, iters: int, amp: bool, profiler_check: bool
) -> list[dict]:
    """Interleaved timing of every row (again after a profiler session with ``profiler_check``), then one
    counting pass and one attend-timing pass per row."""
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            return model(dict(inputs))["feat"]

    def setup(row: str) -> set[str]:
        mode, r, abl = parse_row(row)
        merging.remove_patch(model)
        if mode is not None:
            merging.patch(model, {"tome": mode, "r": r, "no_rand": True})
        return abl

    def interleaved() -> dict:
        stats = {row: {"latency": [], "enqueue": []} for row in rows}
        for _ in range(rounds):
            for row in rows:
                with ablated(setup(row)):
                    for _ in range(warmup):
                        forward()
                    lat, enq = timed_calls(forward, device, iters)
                stats[row]["latency"] += lat
                stats[row]["enqueue"] += enq
        return stats

    stats = interleaved()
    after = None
    if profiler_check:
        setup(rows[0])
        profile_once(forward, device)
        after = interleaved()
    out, feats = [], {}
    for row in rows:
        with ablated(setup(row)):
            forward()
            torch.manual_seed(0)  # the same serialization-order shuffle in every row
            feats[row] = forward().float()
            counts, _ = count_ops(forward)
            launches = [0]
            with triton_launch_counter(launches):
                forward()
            attend: list[float] = []
            with attend_timer(attend):
                forward()
            blocks = len(attend)
            attend.clear()
            with attend_timer(attend):
                for _ in range(iters):
                    forward()
        lat, enq = stats[row]["latency"], stats[row]["enqueue"]
        out.append({
            "row": row,
            "latency_ms": statistics.median(lat),
            "latency_min_ms": min(lat),
            "enqueue_ms": statistics.median(enq),
            "enqueue_min_ms": min(enq),
            "attend_host_us": statistics.median(attend),
            "attend_host_sum_ms": sum(attend) / iters / 1e3,
            "attend_calls": blocks,
            "syncs": counts.total_syncs,
            "aten_ops": counts.total_launches,
            "aten_ops_by_name": dict(counts.ops),
            "syncs_by_source": dict(counts.syncs),
            "triton_launches": launches[0] if device.type == "cuda" else None,
            "samples": len(lat),
            "out_max_diff_vs_plain": _diff_vs_plain(row, feats),
            "latency_after_profiler_ms": None if after is None else statistics.median(after[row]["latency"]),
            "enqueue_after_profiler_ms": None if after is None else statistics.median(after[row]["enqueue"]),
        })  # fmt: skip
    return out


def _diff_vs_plain(row: str, feats: dict) -> float | None:
    """Max |output - output of the same row without ablations| (None when that row was not run): shows that
    ``+graph`` (or ``+torchmatch``) computes the same forward up to rounding."""
    plain = row.split("+")[0]
    if plain == row or plain not in feats:
        return None
    return float((feats[row] - feats[plain]).abs().max())


def graph_check(device: torch.device, patches: int = 40, heads: int = 3, tokens: int = 1024, dim: int = 16) -> dict:
    """One merged ``attend`` (patch@0.9, fp16) and CUDA graphs. Defaults: stage 0 of Sonata on the real scene
    (40 patches of 1024 tokens, 3 heads of 16 channels). Reports:

    - ``eager_equal``: two eager calls bit-equal? (False: ``scatter_add_`` on CUDA sums with atomics in no
      fixed order, so fp16 sums differ in the last bit from call to call: why ``replay_equal`` was False);
    - ``slots_equal``: the matching (slot map of ``spread_slots``) replayed from a graph == eager (it has no
      atomics, so the groups must be identical);
    - ``replay_equal`` / ``replay_max_diff``: the captured attend vs an eager call; ``replay_close``: within
      fp16 rounding (2e-3);
    - ``deterministic``: the same with ``torch.use_deterministic_algorithms(True)`` (eager twice, replay);
    - ``eager_ms`` / ``replay_ms``: CUDA-event latency per eager call vs per raw replay (20 each);
    - ``cached_*``: the opt-in graph cache (``merging.attend_graphs``): close to eager, latency, and the host
      microseconds per call (median enqueue time, device idle at each start) eager vs cached.
    """
    if device.type != "cuda":
        return {"captured": None, "error": "needs CUDA"}
    attn = SerializedAttention(heads * dim, heads, tokens).to(device, torch.float16).eval()
    merging.patch(torch.nn.Sequential(attn), {"tome": "patch", "r": 0.9, "no_rand": True})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(patches, heads, tokens, dim, generator=g).to(device, torch.float16) for _ in range(3))
    r, stride = int(tokens * 0.9), attn._merge_info.extra["gitmerge3d"].stride

    def call():
        return attn.attend(q, k, v, None, None)

    def slots():
        return merging.spread_slots(v, r, stride)[0]

    def diff(a, b) -> float:
        return float((a.float() - b.float()).abs().max())

    res: dict = {}
    with torch.no_grad(), merging.attend_graphs(False):
        e1, e2 = call().clone(), call().clone()
        res["eager_equal"] = bool(torch.equal(e1, e2))
        res["eager_max_diff"] = diff(e1, e2)
        try:
            graph, static = _capture(call, device)
            slot_graph, static_slot = _capture(slots, device)
        except Exception as exc:  # the reason is the result
            return dict(res, captured=False, error=f"{type(exc).__name__}: {exc}"[:400])
        graph.replay()
        slot_graph.replay()
        torch.cuda.synchronize(device)
        res.update(captured=True, replay_equal=bool(torch.equal(static, e1)), replay_max_diff=diff(static, e1))
        res["replay_close"] = bool(torch.allclose(static.float(), e1.float(), atol=2e-3, rtol=2e-3))
        res["slots_equal"] = bool(torch.equal(static_slot, slots()))
        res["eager_ms"] = statistics.median(timed_calls(call, device, 20)[0])
        res["replay_ms"] = statistics.median(timed_calls(graph.replay, device, 20)[0])
        eager_lat, eager_host = timed_calls(call, device, 50)
        with merging.attend_graphs(True):
            try:
                first = call().clone()  # captures
                cached = call()
                res["cached_close"] = bool(torch.allclose(cached.float(), e1.float(), atol=2e-3, rtol=2e-3))
                res["cached_first_max_diff"] = diff(first, e1)
                cached_lat, cached_host = timed_calls(call, device, 50)
            except Exception as exc:
                res["cached_error"] = f"{type(exc).__name__}: {exc}"[:400]
                cached_lat = cached_host = [float("nan")]
        res["eager_call_ms"] = statistics.median(eager_lat)
        res["cached_call_ms"] = statistics.median(cached_lat)
        res["eager_host_us"] = statistics.median(eager_host) * 1e3
        res["cached_host_us"] = statistics.median(cached_host) * 1e3
        res["deterministic"] = _deterministic_check(call, device)  # last: a failed capture ends the check
    return res


def _capture(fn, device: torch.device):
    """(graph, static output) of ``fn`` captured after 3 warm-up calls on a side stream (the documented recipe)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    return graph, static


def _deterministic_check(call, device: torch.device) -> dict:
    """Eager twice and one replay under ``torch.use_deterministic_algorithms(True)`` (restored after)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = call().clone(), call().clone()
        out = {"eager_equal": bool(torch.equal(a, b))}
        graph, static = _capture(call, device)
        graph.replay()
        torch.cuda.synchronize(device)
        out["replay_equal"] = bool(torch.equal(static, a))
        out["eager_ms"] = statistics.median(timed_calls(call, device, 20)[0])
    except Exception as exc:  # e.g. an op without a deterministic CUDA implementation
        out = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        torch.use_deterministic_algorithms(was)
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"{meta['device']}, torch {meta['torch']}, {meta['points']} points, {meta['model']}, amp={meta['amp']}, "
        f"spconv={meta['spconv']}, {meta['rounds']} interleaved rounds x {meta['iters']} calls",
        "",
        "| row | latency ms (min) | host enqueue ms (min) | attend host us (median) | attend host ms / fwd "
        "| attend calls | syncs | aten ops | Triton launches | latency / enqueue ms after a profiler session |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tl = "-" if r["triton_launches"] is None else r["triton_launches"]
        prof = "-"
        if r["latency_after_profiler_ms"] is not None:
            prof = f"{r['latency_after_profiler_ms']:.1f} / {r['enqueue_after_profiler_ms']:.1f}"
        lines.append(
            f"| {r['row']} | {r['latency_ms']:.1f} ({r['latency_min_ms']:.1f}) | {r['enqueue_ms']:.1f} "
            f"({r['enqueue_min_ms']:.1f}) | {r['attend_host_us']:.0f} | {r['attend_host_sum_ms']:.2f} "
            f"| {r['attend_calls']} | {r['syncs']} | {r['aten_ops']} | {tl} | {prof} |"
        )
    diffs = [f"{r['row']} {r['out_max_diff_vs_plain']:.3g}" for r in rows if r.get("out_max_diff_vs_plain") is not None]
    if diffs:
        lines.append("\noutput max |diff| vs the row without ablations: " + ", ".join(diffs))
    base = rows[0]["aten_ops_by_name"]
    for r in rows[1:]:
        names = set(base) | set(r["aten_ops_by_name"])
        diff = {n: r["aten_ops_by_name"].get(n, 0) - base.get(n, 0) for n in sorted(names)}
        text = ", ".join(f"{n} {d:+d}" for n, d in diff.items() if d)
        lines.append(f"\naten ops of {r['row']} vs {rows[0]['row']}: {text or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gitmerge3d-host-cost", description=__doc__.split("\n")[0])
    p.add_argument("--scene", required=True, help="Pointcept scene folder, or a raw .bin/.ply (converted)")
    p.add_argument("--normals", default="zero", choices=("estimate", "zero"))
    p.add_argument("--rows", default="r0,patch@0.9,patch@0.9+torchmatch,patch@0.9+nogc,r0+nogc")
    p.add_argument("--spconv", default="torch", choices=sc.BACKENDS)
    p.add_argument("--reduced", action="store_true", help="toy-width model (CPU check)")
    p.add_argument("--tile", type=int, default=1, help="side-by-side copies of the scene (4 -> ~160k points)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profiler-check", action="store_true", help="time again after one torch.profiler session")
    p.add_argument("--graph-check", action="store_true", help="capture one merged attend in a CUDA graph")
    p.add_argument("--out-dir", default="/tmp/o")
    args = p.parse_args(argv)
    try:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        for r in rows:
            parse_row(r)
        for name in ("rounds", "iters", "tile"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        sc.set_backend(args.spconv)
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = PointTransformerV3(**(reduced_config("0c") if args.reduced else sonata_config("0c"))).to(device)
        inputs, _ = load_inputs(args.scene, args.tile, 0.02, device, out_dir / ".scene", args.normals)
        results = measure(
            model.eval(), inputs, rows, device, args.rounds, args.warmup, args.iters, args.amp, args.profiler_check
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"gitmerge3d-host-cost: error: {exc}", file=sys.stderr)
        return 2
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "points": int(inputs["coord"].shape[0]),
        "tile": args.tile,
        "amp": args.amp,
        "spconv": args.spconv,
        "model": "sonata-0c" + (" reduced" if args.reduced else ""),
        "rounds": args.rounds,
        "iters": args.iters,
    }
    table = markdown(meta, results)
    if args.graph_check:
        meta["graph_check"] = graph_check(device)
        table += f"\n\nCUDA graph of one merged attend (patch@0.9, 40 x 3 x 1024 x 16 fp16): {meta['graph_check']}"
    (out_dir / "host-cost.json").write_text(json.dumps(dict(meta, rows=results), indent=2))
    (out_dir / "host-cost.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
