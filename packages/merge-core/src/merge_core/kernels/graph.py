"""One-liner CUDA-graph inference for a patched (or plain) model: ``fast = cuda_graph(model, example)``.

Why: eager merging at small batches is host-bound (kernel launches); a CUDA graph replays the whole forward
(matching, Triton kernels, proportional attention) with no host work, which is possible because the merge
path has static shapes for a fixed r and never syncs with the host. With the ``auto`` merge policy both the
merged graph and the r = 0 graph are captured and timed (10 replays each, CUDA events, best of each); the faster
one is kept and the decision is cached like eager ones (``merge_core.kernels.policy``), so a graphed model
is never slower than the same model graphed without merging.

The returned callable copies its input into the captured input buffer and returns the captured output
tensor, which the next call overwrites (clone it to keep it). Inputs must match the example's shape, dtype
and device. ``torch.compile(model, mode="reduce-overhead")`` is the compiler's equivalent (CUDA graphs over
Inductor code); there the fused kernels run as ``merge_core::*`` custom ops and the requested r always runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import policy


class GraphedForward:
    """A captured forward: ``__call__(x)`` copies ``x`` in, replays, returns the static output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out: Any, merged: bool) -> None:
        self.graph, self.static_in, self.static_out, self.merged = graph, static_in, static_out, merged

    def __call__(self, x: torch.Tensor) -> Any:
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype or x.device != self.static_in.device:
            raise ValueError(
                f"x must have the example's shape/dtype/device {tuple(self.static_in.shape)}/{self.static_in.dtype}/"
                f"{self.static_in.device}, got {tuple(x.shape)}/{x.dtype}/{x.device}"
            )
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


def _capture(model: Callable, static_in: torch.Tensor, mode: str | None, warmup: int):
    with policy.override(mode), torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                model(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static_in)
    return graph, out


def cuda_graph(model: torch.nn.Module, example: torch.Tensor, *, warmup: int = 3, iters: int = 10) -> GraphedForward:
    """Capture ``model(example)`` for inference; with a merging model under the ``auto`` policy keep the faster
    of the merged and the r = 0 graph (see module docstring)."""
    if not isinstance(example, torch.Tensor) or not example.is_cuda:
        raise ValueError(f"example must be a CUDA tensor, got {type(example).__name__}")
    static_in = example.detach().clone()
    r = getattr(model, "r", 0)
    if getattr(model, "_merge_info", None) is None or not r or policy.get_policy(model) == "force":
        graph, out = _capture(model, static_in, "force", warmup)
        return GraphedForward(graph, static_in, out, merged=bool(r))
    from ..schedule import parse_r

    r_list = parse_r(len(model.blocks), r) if hasattr(model, "blocks") else [int(r)]
    key = policy.policy_key(model, static_in, r_list) + " | cuda graph"
    entry = policy.cached_decision(key)
    if entry is not None:
        graph, out = _capture(model, static_in, "force" if entry["merge"] else "zero", warmup)
        return GraphedForward(graph, static_in, out, merged=entry["merge"])
    merged = _capture(model, static_in, "force", warmup)
    plain = _capture(model, static_in, "zero", warmup)
    ms_merged, ms_plain = policy.time_pair(merged[0].replay, plain[0].replay, 2, iters)
    entry = policy.record(key, ms_merged < ms_plain, ms_merged, ms_plain, "cuda graph calibration")
    keep = merged if entry["merge"] else plain
    del merged, plain
    return GraphedForward(keep[0], static_in, keep[1], merged=entry["merge"])


__all__ = ["GraphedForward", "cuda_graph"]
