"""One call of a step under torch.profiler, summarised for a benchmark JSON: where the GPU time goes (top
kernels by self time), where the host time goes (top CPU ops), the host syncs and copies the step makes, and
how much of the wall time the GPU is busy (the union of kernel / copy intervals): a step whose GPU is busy
much less than its wall time is waiting on the host (launches, syncs), not on arithmetic."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# CUDA runtime / driver calls that make the host wait for the GPU, or copy between host and device
SYNC_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "cudaMemcpyAsync",
    "cudaMemcpyWithStream",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
)
# .item() / float() / bool() of a tensor; a host sync only for a GPU tensor (one cudaMemcpyAsync D2H + one
# cudaStreamSynchronize each, counted above): AdamW's non-capturable step counters are CPU tensors read so
SCALAR_READ = "aten::_local_scalar_dense"
# kernel launches from the host (eager kernels, inductor's Triton kernels) and CUDA-graph replays
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def _self_device_us(e) -> float:
    """Self device time of a profiler entry (torch >= 2.4 names it device, older cuda)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(e, attr):
            return float(getattr(e, attr))
    return 0.0


def busy_union_us(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total length of the union of [start, end) intervals, and the gaps between them (start, length)."""
    busy, gaps, cur_s, cur_e = 0.0, [], None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
                gaps.append((cur_e, s - cur_e))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy, gaps


def profile_step(fn: Callable[[], object], device: torch.device, top: int = 25) -> dict:
    """fn() once for warm-up, then once under the profiler (CPU, plus CUDA on a GPU). -> wall_ms, gpu_busy_ms,
    gpu_busy_frac, kernels, top_kernels / top_cpu_ops [{name, self_ms, count}], sync_calls {name: count},
    scalar_reads (host reads of tensor values, CPU or GPU tensors), launch_calls {name: {count, host_ms}},
    largest_gaps [{at_ms, ms}] (GPU idle stretches, timed from the first GPU activity)."""
    if top < 1:
        raise ValueError(f"top: expected >= 1, got {top}")
    gpu = device.type == "cuda"
    fn()
    if gpu:
        torch.cuda.synchronize(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if gpu:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    avgs = prof.key_averages()
    kernels = sorted((e for e in avgs if e.device_type == DeviceType.CUDA), key=_self_device_us, reverse=True)
    cpu_ops = sorted((e for e in avgs if e.device_type == DeviceType.CPU), key=lambda e: e.self_cpu_time_total,
                     reverse=True)  # fmt: skip
    counts = {name: 0 for name in SYNC_CALLS}
    launches = {name: [0, 0.0] for name in LAUNCH_CALLS}
    scalar_reads = 0
    for e in avgs:
        if e.key == SCALAR_READ:
            scalar_reads += e.count
        if e.key in counts:
            counts[e.key] += e.count
        if e.key in launches:
            launches[e.key][0] += e.count
            launches[e.key][1] += e.self_cpu_time_total / 1e3
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_us, gaps = busy_union_us(spans)
    first = min((s for s, _ in spans), default=0.0)
    largest = sorted(gaps, key=lambda x: -x[1])[:10]
    return {
        "wall_ms": wall_ms,
        "gpu_busy_ms": busy_us / 1e3,
        "gpu_busy_frac": busy_us / 1e3 / wall_ms if wall_ms > 0 else 0.0,
        "kernels": len(spans),
        "top_kernels": [{"name": e.key, "self_ms": _self_device_us(e) / 1e3, "count": e.count} for e in kernels[:top]],
        "top_cpu_ops": [
            {"name": e.key, "self_ms": e.self_cpu_time_total / 1e3, "count": e.count} for e in cpu_ops[:top]
        ],
        "sync_calls": {k: v for k, v in counts.items() if v},
        "scalar_reads": scalar_reads,
        "launch_calls": {k: {"count": n, "host_ms": ms} for k, (n, ms) in launches.items() if n},
        "largest_gaps": [{"at_ms": (s - first) / 1e3, "ms": g / 1e3} for s, g in largest],
    }
