"""``python -m gitmerge3d.tools.launch_bench``: latency, peak memory and launches per forward, per sparse-conv backend.

Why: the Sonata forward is host-bound on an H200 (thousands of kernel launches), so every row reports,
next to the median latency and peak memory, the GPU kernels of one forward (torch.profiler, device-side
kernel/memcpy/memset events), the aten ops that launch them and the host syncs (``gitmerge3d.opcount``).
Rows r0-flash and patch@0.9 (issue 11's target pair) on the real scene and on 4 tiled copies, with the
pure-torch sparse conv and with ``auto`` (spconv-triton on CUDA) when spconv-triton imports; the auto
rows (and, with ``--legacy``, the former launch-heavy paths of ``gitmerge3d.legacy``) also report the
largest deviation of the model output from the torch backend's.

    python -m gitmerge3d.tools.launch_bench --scene projects/gitmerge3d/scene0000_00.bin --out-dir /tmp/o
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

from merge_core.bench import time_calls

from .. import merging
from ..legacy import legacy_paths
from ..models import PointTransformerV3, sonata_config
from ..models import sparse_conv as sc
from ..models.point_transformer_v3m2 import SerializedAttention
from ..models.presets import reduced_config
from ..opcount import count_ops
from .bench import load_inputs

ROWS = {"r0-flash": None, "patch@0.9": ("patch", 0.9)}


def gpu_kernels(fn) -> int:
    """Device-side events (kernels, memcpy, memset) of one call of ``fn`` under torch.profiler (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def top_kernels(fn, device: torch.device, limit: int = 25) -> tuple[list[dict], str]:
    """The ``limit`` entries of one call of ``fn`` with the most self device time (self CPU time on a CPU).

    On CUDA the rows are kernels (and the aten ops above them, as torch.profiler lists both); why: the next
    GPU run should say what dominates the forward, not just how many kernels it launches.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = list(prof.key_averages())
    attr = "self_device_time_total" if cuda and hasattr(events[0], "self_device_time_total") else None
    if cuda and attr is None:
        attr, key = "self_cuda_time_total", "self_cuda_time_total"

    def self_us(e) -> float:
        return float(getattr(e, attr) if cuda else e.self_cpu_time_total)

    events = sorted((e for e in events if self_us(e) > 0), key=self_us, reverse=True)[:limit]
    rows = [{"name": e.key, "self_us": self_us(e), "calls": int(e.count)} for e in events]
    return rows, prof.key_averages().table(sort_by=key, row_limit=limit, max_name_column_width=70)


# profiler ranges around these modules give the time shares of ``--profile`` (merged attention included:
# MergedSerializedAttention is a SerializedAttention)
LABELLED = {"sparse_conv": (sc.SubMConv3d, sc.SparseConv3d), "attention": (SerializedAttention,)}


def _mark(cuda: bool):
    """A point on the device timeline (a recorded CUDA event) or on the host clock."""
    if not cuda:
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def _elapsed_ms(a, b) -> float:
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3


def _enter_range(label: str, cuda: bool, module, args) -> None:
    rf = torch.autograd.profiler.record_function(f"gitmerge3d::{label}")
    rf.__enter__()
    module.__dict__.setdefault("_profile_ranges", []).append((rf, _mark(cuda)))


def _exit_range(label: str, cuda: bool, spans: dict, module, args, output) -> None:
    rf, start = module.__dict__["_profile_ranges"].pop()
    spans.setdefault(label, []).append((start, _mark(cuda)))
    rf.__exit__(None, None, None)


@contextlib.contextmanager
def labelled_ranges(model: torch.nn.Module, cuda: bool, spans: dict):
    """``gitmerge3d::<label>`` profiler ranges around every module of ``LABELLED``, and their (start, end)
    marks appended to ``spans[label]`` (CUDA events on a GPU); hooks removed after."""
    handles = []
    for m in model.modules():
        for label, types in LABELLED.items():
            if isinstance(m, types):
                handles.append(m.register_forward_pre_hook(functools.partial(_enter_range, label, cuda)))
                handles.append(m.register_forward_hook(functools.partial(_exit_range, label, cuda, spans)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def time_shares(fn, model: torch.nn.Module, device: torch.device) -> dict:
    """Share of one forward spent in the sparse convs and in attention, measured two ways.

    - ``*_share``: kernel time, i.e. the device time of the kernels launched inside each module's profiler
      range over that of the whole forward (CPU time on a CPU). Triton kernels (spconv-triton's GEMM, the
      matcher) are *not* tied to a range by the profiler (H200, torch 2.11 / triton 3.6: 74.8 ms of
      ``_gather_gemm_kernel`` missing), so ``device_total_ms`` (all kernels of the profile, the table's
      "Self CUDA time total") and ``unattributed_ms`` (total minus the forward range) are reported too.
    - ``*_span_share``: timeline spans, i.e. CUDA events recorded when each module starts and ends, over the
      forward's span (host clock on a CPU). On a host-bound forward the GPU idles while kernels are
      launched, so spans say where the *latency* goes, kernel time where the GPU work goes.
    Why: says whether the conv backend or attention is worth optimising next.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    spans: dict = {}
    with labelled_ranges(model, cuda, spans), profile(activities=acts) as prof:
        with torch.autograd.profiler.record_function("gitmerge3d::forward"):
            begin = _mark(cuda)
            fn()
            end = _mark(cuda)
            if cuda:
                torch.cuda.synchronize()
    attr = "device_time_total" if cuda else "cpu_time_total"
    cpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    us = {k: sum(float(getattr(e, attr)) for e in cpu if e.name == f"gitmerge3d::{k}") for k in (*LABELLED, "forward")}
    total = max(us["forward"], 1e-9)
    span_ms = {k: sum(_elapsed_ms(a, b) for a, b in spans.get(k, [])) for k in LABELLED}
    forward_span = max(_elapsed_ms(begin, end), 1e-9)
    out = {"clock": "device" if cuda else "cpu", "forward_ms": us["forward"] / 1e3, "forward_span_ms": forward_span}
    if cuda:
        avg = list(prof.key_averages())
        self_attr = "self_device_time_total" if avg and hasattr(avg[0], "self_device_time_total") else None
        device_total = sum(float(getattr(e, self_attr or "self_cuda_time_total")) for e in avg) / 1e3
        out.update({"device_total_ms": device_total, "unattributed_ms": device_total - us["forward"] / 1e3})
    for k in LABELLED:
        out.update({f"{k}_ms": us[k] / 1e3, f"{k}_share": us[k] / total, f"{k}_span_ms": span_ms[k],
                    f"{k}_span_share": span_ms[k] / forward_span})  # fmt: skip
    return out


def case_forward(model, inputs, row: str, backend: str, args, device):
    """Set the backend and the row's merging on ``model``; returns the row's no-grad autocast forward."""
    sc.set_backend(backend)
    merging.remove_patch(model)
    if ROWS[row] is not None:
        mode, r = ROWS[row]
        merging.patch(model, {"tome": mode, "r": r, "no_rand": True})
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            return model(dict(inputs))["feat"]

    return forward


def run_case(model, inputs, row: str, backend: str, args, device, reference: dict) -> dict:
    """Latency, peak memory, aten ops and syncs of one case; no torch.profiler session (see ``profile_case``)."""
    forward = case_forward(model, inputs, row, backend, args, device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    out = forward().float()  # first call: spconv-triton autotunes / compiles here
    first_s = time.perf_counter() - t0
    key = row
    max_diff = None
    if key in reference:
        max_diff = float((out - reference[key]).abs().max())
    else:
        reference[key] = out
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = time_calls(forward, device, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    counts, _ = count_ops(forward)  # a dispatch mode: no CUPTI
    return {
        "row": row,
        "spconv": backend,
        "latency_ms": sorted(times)[len(times) // 2],
        "peak_mem_gib": peak,
        "gpu_kernels": None,
        "aten_launch_ops": counts.total_launches,
        "host_syncs": counts.total_syncs,
        "by_category": dict(counts.by_category()),
        "first_call_s": first_s,
        "max_abs_diff_vs_torch": max_diff,
        # output scale, so the diff above can be read relative to it (fp16 rounding vs a real mismatch)
        "out_max_abs": float(out.abs().max()),
        "out_rms": float(out.pow(2).mean().sqrt()),
        "top_kernels": None,
        "time_shares": None,
        "latency_after_profiler_ms": None,
    }


def profile_case(model, inputs, res: dict, args, device) -> None:
    """The torch.profiler measurements of a timed case (GPU kernels, ``--profile`` tables and shares), then
    its latency again (``latency_after_profiler_ms``).

    Why separate: a profiler session with CUDA activity may leave CUPTI attached (pytorch/pytorch#144455),
    slowing every later kernel launch; launch_bench used to time r0-flash in a clean process and every later
    row after the previous rows' sessions. All cases are now timed before the first session.
    """
    forward = case_forward(model, inputs, res["row"], res["spconv"], args, device)
    forward()
    if device.type == "cuda":
        res["gpu_kernels"] = gpu_kernels(forward)
    if args.profile:
        top, res["profile_table"] = top_kernels(forward, device, args.profile)
        res["top_kernels"] = top
        res["time_shares"] = time_shares(forward, model, device)
    times = time_calls(forward, device, args.warmup, args.iters)
    res["latency_after_profiler_ms"] = sorted(times)[len(times) // 2]


def markdown(result: dict) -> str:
    lines = [
        f"device: {result['device']}, torch {result['torch']}, {result['date']}, AMP={result['amp']}, "
        f"spconv-triton: {result['spconv_triton']}",
        "",
        "| scene | row | spconv | latency ms | peak GiB | GPU kernels | aten launch ops | host syncs | "
        "vs r0 (same backend) | max abs diff vs torch | latency ms after a profiler session |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        base = next(
            (
                b
                for b in result["rows"]
                if b["scene"] == r["scene"] and b["spconv"] == r["spconv"] and b["row"] == "r0-flash"
            ),
            None,
        )
        ratio = f"{r['latency_ms'] / base['latency_ms']:.2f}x" if base else "n/a"
        peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        kern = "n/a" if r["gpu_kernels"] is None else str(r["gpu_kernels"])
        diff = "-" if r["max_abs_diff_vs_torch"] is None else f"{r['max_abs_diff_vs_torch']:.3g}"
        after = r.get("latency_after_profiler_ms")
        after = "-" if after is None else f"{after:.1f}"
        lines.append(
            f"| {r['scene']} ({r['points']} pts) | {r['row']} | {r['spconv']} | {r['latency_ms']:.1f} | {peak} | "
            f"{kern} | {r['aten_launch_ops']} | {r['host_syncs']} | {ratio} | {diff} | {after} |"
        )
    shared = [r for r in result["rows"] if r.get("time_shares")]
    if shared:
        lines += ["", "time shares of one forward: kernel time inside the modules' profiler ranges (device time on "
                  "CUDA), and timeline spans between CUDA events at module start/end (latency):", "",
                  "| scene | row | spconv | kernel ms | sparse conv | attention | span ms | sparse conv span | "
                  "attention span |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in shared:
            s = r["time_shares"]
            lines.append(
                f"| {r['scene']} | {r['row']} | {r['spconv']} | {s['forward_ms']:.1f} | "
                f"{s['sparse_conv_ms']:.1f} ({s['sparse_conv_share']:.0%}) | "
                f"{s['attention_ms']:.1f} ({s['attention_share']:.0%}) | {s['forward_span_ms']:.1f} | "
                f"{s['sparse_conv_span_ms']:.1f} ({s['sparse_conv_span_share']:.0%}) | "
                f"{s['attention_span_ms']:.1f} ({s['attention_span_share']:.0%}) |"
            )
        lines += [f"- {r['row']} {r['spconv']}: all kernels {r['time_shares']['device_total_ms']:.1f} ms of device "
                  f"time, {r['time_shares']['unattributed_ms']:.1f} ms outside the ranges (Triton kernels)"
                  for r in shared if "device_total_ms" in r["time_shares"]]  # fmt: skip
    for r in result["rows"]:
        if r.get("top_kernels"):
            lines += ["", f"top self time, {r['scene']} {r['row']} {r['spconv']}:", "", "| name | self ms | calls |",
                      "|---|---|---|"]  # fmt: skip
            lines += [f"| {k['name'][:90]} | {k['self_us'] / 1e3:.3f} | {k['calls']} |" for k in r["top_kernels"]]
    for note in result["notes"]:
        lines.append(f"\nnote: {note}")
    return "\n".join(lines)


def spconv_triton_status() -> str:
    try:
        import spconv_triton  # noqa: F401

        return f"importable ({getattr(spconv_triton, '__version__', '?')})"
    except Exception as exc:  # noqa: BLE001 - report why, run the torch rows anyway
        return f"not importable ({type(exc).__name__}: {exc})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gitmerge3d-launch-bench", description=__doc__.split("\n")[0])
    p.add_argument("--scene", required=True, help="Pointcept scene folder, or a raw .bin/.ply (converted)")
    p.add_argument("--tiles", default="1,4", help="comma list: 1 = the real scene, 4 = 4 tiled copies")
    p.add_argument("--normals", default="estimate", choices=("estimate", "zero"))
    p.add_argument("--rows", default="r0-flash,patch@0.9")
    p.add_argument(
        "--backends",
        default="torch",
        help="comma list of torch/auto/spconv; auto (spconv-triton) only when named: its first use autotunes "
        "for minutes unless gitmerge3d.tools.spconv_warmup filled the cache",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also print the N kernels with the most self CUDA time per case (self CPU time on a CPU); "
        "written to profile-<scene>-<row>-<backend>.txt, and the share of the forward's time in sparse conv "
        "and in attention",
    )
    p.add_argument("--legacy", action="store_true", help="also the former launch-heavy paths (torch backend)")
    p.add_argument("--reduced", action="store_true", help="toy-width model (CPU check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--time-budget", type=float, default=270.0, help="seconds; later cases are skipped after it")
    p.add_argument("--out-dir", default=os.environ.get("OUT_DIR", "/tmp/o"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        bad = [r for r in rows if r not in ROWS]
        if bad:
            raise ValueError(f"--rows entry {bad[0]!r}: expected one of {', '.join(ROWS)}")
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        bad = [b for b in backends if b not in sc.BACKENDS]
        if bad:
            raise ValueError(f"--backends entry {bad[0]!r}: expected one of {sc.BACKENDS}")
        tiles = [int(t) for t in args.tiles.split(",")]
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        status = spconv_triton_status()
        notes = []
        if args.profile < 0:
            raise ValueError(f"--profile must be >= 0, got {args.profile}")
        if "auto" in backends and (device.type != "cuda" or not status.startswith("importable")):
            notes.append(f"auto rows skipped: device {device.type}, spconv-triton {status}")
            backends = [b for b in backends if b != "auto"]
        torch.manual_seed(0)
        cfg = reduced_config("0c") if args.reduced else sonata_config("0c")
        model = PointTransformerV3(**cfg).to(device).eval()
        scenes = {}
        for t in tiles:
            inputs, _ = load_inputs(args.scene, t, 0.02, device, out_dir / ".scene", args.normals)
            scenes["real" if t == 1 else f"tiled{t}"] = inputs
        results: list[dict] = []
        references: dict = {name: {} for name in scenes}
        meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                    torch=torch.__version__, amp=args.amp, spconv_triton=status,
                    model="sonata-0c" + (" reduced" if args.reduced else ""))  # fmt: skip
        # torch rows of every scene first (then the legacy paths): spconv-triton's first calls autotune,
        # which may eat the budget
        cases = [(b, False) for b in backends if b == "torch"]
        cases += [("torch", True)] if args.legacy else []
        cases += [(b, False) for b in backends if b != "torch"]
        timed = []  # (case context, scene inputs, result): every case is timed before any profiler session
        for backend, old in cases:
            for scene, inputs in scenes.items():
                for row in rows:
                    label = f"{backend}{' legacy' if old else ''}"
                    if time.perf_counter() - start > args.time_budget:
                        notes.append(f"skipped {scene} {row} {label}: time budget {args.time_budget:.0f} s spent")
                        continue
                    with legacy_paths() if old else contextlib.nullcontext():
                        res = run_case(model, inputs, row, backend, args, device, references[scene])
                    res.update(scene=scene, points=int(inputs["coord"].shape[0]))
                    timed.append((old, inputs, res))
                    results.append(dict(res, spconv=label))
                    print(
                        f"{scene} {row} {backend}: {res['latency_ms']:.1f} ms, aten ops {res['aten_launch_ops']}, "
                        f"syncs {res['host_syncs']}, first call {res['first_call_s']:.1f} s",
                        flush=True,
                    )
                    write(out_dir, meta, notes, results, start)  # partial results survive a timeout
        for i, (old, inputs, res) in enumerate(timed):
            label = results[i]["spconv"]
            if time.perf_counter() - start > args.time_budget:
                notes.append(f"profiling of {res['scene']} {res['row']} {label} skipped: time budget spent")
                continue
            with legacy_paths() if old else contextlib.nullcontext():
                profile_case(model, inputs, res, args, device)
            table = res.pop("profile_table", None)
            results[i] = dict(res, spconv=label)
            print(
                f"{res['scene']} {res['row']} {label}: kernels {res['gpu_kernels']}, latency after a profiler "
                f"session {res['latency_after_profiler_ms']:.1f} ms (before: {res['latency_ms']:.1f} ms)",
                flush=True,
            )
            if res.get("time_shares"):
                sh = res["time_shares"]
                print(f"  {sh['clock']} kernel time: sparse conv {sh['sparse_conv_share']:.0%}, attention "
                      f"{sh['attention_share']:.0%} of {sh['forward_ms']:.1f} ms; spans: sparse conv "
                      f"{sh['sparse_conv_span_share']:.0%}, attention {sh['attention_span_share']:.0%} of "
                      f"{sh['forward_span_ms']:.1f} ms", flush=True)  # fmt: skip
            if table:
                name = f"profile-{res['scene']}-{res['row']}-{label.replace(' ', '_')}.txt"
                (out_dir / name).write_text(table + "\n")
                print(f"top {args.profile} by self {'CUDA' if device.type == 'cuda' else 'CPU'} time, "
                      f"{res['scene']} {res['row']} {label}:\n{table}", flush=True)  # fmt: skip
            write(out_dir, meta, notes, results, start)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"gitmerge3d-launch-bench: error: {exc}", file=sys.stderr)
        return 2
    print(write(out_dir, meta, notes, results, start))
    return 0


def write(out_dir: Path, meta: dict, notes: list[str], results: list[dict], start: float) -> str:
    """Write launch-bench.{json,md} (rewritten after every case); returns the markdown table."""
    result = dict(meta, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  wall_s=time.perf_counter() - start, notes=notes, rows=results)  # fmt: skip
    table = markdown(result)
    (out_dir / "launch-bench.json").write_text(json.dumps(result, indent=2))
    (out_dir / "launch-bench.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    raise SystemExit(main())
