"""Never slower than no merging: whether merging pays for a shape, measured once per device and cached on disk.

Why: on a GPU, eager merging costs host time per layer (kernel launches, a sort) and GPU time that does not
shrink with the batch; at small batches the saved matmul work is smaller than that cost and a merged model
runs slower than the plain one (issue 9: 0.18x at ViT-B batch 1 on an H100). No static cost model gets the
crossover right on every host/GPU pair, so the default ``auto`` policy measures it: the first eager forward
of a new (device, model, input shape, dtype, schedule) with CUDA inputs and no autograd times the model with
the requested ``r`` and with ``r = 0`` (3 warm-up + 10 interleaved timed runs each, CUDA events, best of each) and
keeps the faster one. Decisions are cached in memory and in ``$MERGE_CORE_CACHE_DIR/policy-v1.json``
(default ``~/.cache/merge_core``), so later processes on the same machine reuse them.

Not calibrated (the requested ``r`` runs as given): CPU inputs, training (autograd recording with trainable
parameters), ``torch.compile`` tracing and CUDA-graph capture. ``merge_core.kernels.graph.cuda_graph``
makes the same choice for graph replay by timing both captured graphs.

Force the requested ``r``: ``model.merge_policy = "force"`` or ``MERGE_CORE_POLICY=force``. Accuracy and
ablation evaluations should force it: a decision to run r = 0 changes the outputs (they become the unmerged
model's), so an "r = 16" accuracy measured at a small batch on a GPU would otherwise be the r = 0 accuracy.
``last_decision(model)`` tells what the last calibrated forward ran. ``set_decision(model, x, r, merge)`` pins a
decision for one shape in this process (on CPU too, where nothing is calibrated).

Cost per forward of a known shape: a few attribute reads and one dict lookup on a tuple key (shape, dtype,
device, schedule, kernel mode); a decision to run r = 0 then runs the library's own classes (the adapter kit's
zero-cost path, ``merge_core.adapter.MergeState.run_plain``). The timm adapter skips even that lookup on a
repeated r = 0 forward: it remembers the forward's key, which includes ``generation`` (bumped by every
``record``, ``set_decision`` and ``clear_cache``) and ``$MERGE_CORE_POLICY`` (``env_policy``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import get_mode

POLICIES = ("auto", "force")
CACHE_VERSION = "v1"
WARMUP, ITERS = 3, 10

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("merge_core_policy_override", default=None)
_memory: dict[str, dict[str, Any]] = {}
_disk_loaded: set[str] = set()
# per model: a memo of decisions by cheap key (no attribute is added to the model) and the last decision
_per_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# bumped whenever a decision may change (set_decision, record, clear_cache): adapters that remember "this shape
# runs r = 0" (the timm fast path) compare it instead of re-running ``resolve_r``
generation = 0
# $MERGE_CORE_POLICY read without Python frames (``os.environ.get`` costs 3 frames per call): os.environ keeps
# its encoded copy in ``_data``, updated by every ``os.environ[...] = ...`` (monkeypatch.setenv included)
_ENV_DATA: dict = getattr(os.environ, "_data", None) or {}
_ENV_KEY: Any = os.environ.encodekey("MERGE_CORE_POLICY") if hasattr(os.environ, "encodekey") else "MERGE_CORE_POLICY"


def last_decision(model: Any) -> dict[str, Any] | None:
    """The decision the policy applied to ``model``'s last calibrated-or-cached forward (key, merge, timings)."""
    entry = _per_model.get(model)
    return None if entry is None else entry["last"]


def cache_path() -> Path:
    root = os.environ.get("MERGE_CORE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "merge_core")
    return Path(root) / f"policy-{CACHE_VERSION}.json"


def get_policy(model: Any) -> str:
    """The model's policy: ``model.merge_policy`` if set, else ``$MERGE_CORE_POLICY``, else ``auto``."""
    # read the instance dict first: a missing attribute on an nn.Module goes through Module.__getattr__ and an
    # exception, a measurable cost on every forward (a string attribute is never a parameter or submodule)
    policy = getattr(model, "__dict__", {}).get("merge_policy") or getattr(type(model), "merge_policy", None)
    policy = policy or os.environ.get("MERGE_CORE_POLICY") or "auto"
    if policy not in POLICIES:
        raise ValueError(f"merge_policy must be one of {POLICIES}, got {policy!r}")
    return policy


@contextlib.contextmanager
def override(kind: str | None) -> Iterator[None]:
    """Inside: ``"force"`` runs the requested r, ``"zero"`` runs r = 0, ``None`` restores the policy."""
    if kind not in (None, "force", "zero"):
        raise ValueError(f"override must be None, 'force' or 'zero', got {kind!r}")
    token = _override.set(kind)
    try:
        yield
    finally:
        _override.reset(token)


def _state_field(model: Any, name: str) -> Any:
    state = getattr(model, "_merge_info", None)
    if isinstance(state, dict):
        return state.get(name)
    return getattr(state, name, None)


def policy_key(model: Any, x: torch.Tensor, r_list: Sequence[int]) -> str:
    """What a decision depends on: device, versions, architecture, input shape/dtype, schedule, attention."""
    params = sum(p.numel() for p in model.parameters())
    original = _state_field(model, "original_class") or type(model)
    parts = [
        torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu",
        f"torch {torch.__version__}",
        getattr(original, "__qualname__", str(original)),
        f"params {params}",
        f"x {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}",
        f"r {list(r_list)}",
        f"prop_attn {_state_field(model, 'prop_attn')}",
        f"attn_backend {_state_field(model, 'attn_backend')}",
    ]
    parts.append(f"kernels {get_mode()}")
    return " | ".join(parts)


def _load_disk(path: Path) -> None:
    if str(path) in _disk_loaded:
        return
    _disk_loaded.add(str(path))
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict):
        for key, value in data.items():
            _memory.setdefault(key, value)


def _save_disk(path: Path, key: str, entry: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = entry
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home keeps the in-memory decision
        warnings.warn(f"merge_core policy cache not written to {path}: {exc}", stacklevel=3)


def cached_decision(key: str) -> dict[str, Any] | None:
    _load_disk(cache_path())
    return _memory.get(key)


def _bump() -> None:
    global generation
    generation += 1


def env_policy() -> Any:
    """``$MERGE_CORE_POLICY`` (encoded; None when unset) at the cost of one dict lookup, for fast-path keys."""
    return _ENV_DATA.get(_ENV_KEY)


def record(key: str, merge: bool, ms_merged: float, ms_plain: float, how: str) -> dict[str, Any]:
    """Store one decision in memory and on disk; returns the entry."""
    _bump()
    entry = {"merge": bool(merge), "ms_merged": ms_merged, "ms_plain": ms_plain, "how": how}
    _memory[key] = entry
    _save_disk(cache_path(), key, entry)
    return entry


def clear_cache(disk: bool = False) -> None:
    """Forget decisions (in this process; also on disk with ``disk=True``)."""
    _bump()
    _memory.clear()
    _disk_loaded.clear()
    _per_model.clear()
    if disk:
        with contextlib.suppress(FileNotFoundError):
            cache_path().unlink()


def _dispatch_mode_active() -> bool:
    """A torch dispatch mode (FlopCounterMode, FakeTensorMode, ...) is recording: run the requested ``r`` as given.

    Why: calibrating would time 26 forwards inside the mode (a FLOP counter then reported 103 GMACs for a 3 GMAC
    ViT-S on a 2x H200 DDP run, 2026-11-29), and a cached "do not merge" would make it count the unmerged model.
    """
    return torch._C._len_torch_dispatch_stack() > 0


def _applies(model: Any, x: torch.Tensor) -> bool:
    """Whether a decision may replace the requested r: not during graph capture, not in training."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()))


def _calibratable(model: Any, x: torch.Tensor) -> bool:
    """Whether a new shape may be timed: CUDA inputs, not tracing, not capturing, not training."""
    return x.is_cuda and not torch.compiler.is_compiling() and _applies(model, x)


def _slot(model: Any) -> dict[str, Any]:
    """Per-model memo, reset when the model was re-patched (decisions depend on the patch's options)."""
    state = getattr(model, "__dict__", {}).get("_merge_info")
    slot = _per_model.get(model)
    if slot is None or slot["state"] is not state:
        slot = {"memo": {}, "last": slot["last"] if slot else None, "state": state}
        _per_model[model] = slot
    return slot


def _fast_key(x: torch.Tensor, r_list: Sequence[int]) -> tuple:
    """The in-process memo key: O(1) hashing of the shape, dtype, device, schedule and kernel mode (no strings)."""
    return (x.shape, x.dtype, x.device, tuple(r_list), get_mode())


def set_decision(model: Any, x: torch.Tensor, r_list: Sequence[int], merge: bool) -> dict[str, Any]:
    """Pin the decision for ``model`` on inputs shaped like ``x`` with schedule ``r_list`` (this process only).

    Applies on any device under the ``auto`` policy (CPU included, where nothing is calibrated): a deployment
    that knows its small batches should run unmerged, and tests and benchmarks of the r = 0 path on CPU.
    """
    _bump()
    entry = {"key": "set_decision", "merge": bool(merge), "ms_merged": None, "ms_plain": None, "how": "set_decision"}
    _slot(model)["memo"][_fast_key(x, r_list)] = entry
    return entry


def time_pair(run_merged: Callable[[], Any], run_plain: Callable[[], Any], warmup: int, iters: int, device=None):
    """Fastest of ``iters`` milliseconds of two callables, interleaved so clock drift hits both alike.

    CUDA: CUDA events (stream time, host-bound gaps included); CPU: perf_counter.
    """
    cuda = device is None or torch.device(device).type == "cuda"
    times: dict[str, list[float]] = {"merged": [], "plain": []}
    for _ in range(warmup):
        run_merged()
        run_plain()
    if cuda:
        torch.cuda.synchronize()
    for _ in range(iters):
        for name, fn in (("merged", run_merged), ("plain", run_plain)):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    # best of N: a calibration on a shared host sees spikes (H200 run 2026-11-29: a ViT-L bs128 calibration
    # median of 36.8 ms for a configuration that times 23.0 ms), and one bad median is cached for good
    return min(times["merged"]), min(times["plain"])


def resolve_r(model: Any, x: torch.Tensor, r_list: list[int], run: Callable[[], Any]) -> list[int]:
    """The schedule to run this forward: ``r_list`` or all zeros when merging was measured slower.

    ``run()`` must execute the model's merging forward on ``x`` (it is called under ``override`` while
    calibrating; the adapter's forward re-enters this function and gets the overridden schedule).
    A known shape costs one dict lookup on a tuple key; only a new CUDA shape builds the string key, reads the
    disk cache or calibrates. CPU inputs are never calibrated: only decisions pinned by ``set_decision`` apply.
    """
    if torch.compiler.is_compiling():  # first: dynamo cannot trace ContextVar.get (fullgraph would break)
        return r_list
    kind = _override.get()
    if kind == "zero":
        return [0] * len(r_list)
    if kind == "force" or not any(r_list):
        return r_list
    if get_policy(model) == "force" or _dispatch_mode_active():
        return r_list
    slot = _slot(model)
    fast_key = _fast_key(x, r_list)
    entry = slot["memo"].get(fast_key)
    if entry is not None:
        if not _applies(model, x):
            return r_list
    elif not _calibratable(model, x):
        return r_list
    else:
        key = policy_key(model, x, r_list)
        entry = cached_decision(key)
        if entry is None:

            def forced():
                with override("force"):
                    run()

            def plain():
                with override("zero"):
                    run()

            with torch.no_grad():
                ms_merged, ms_plain = time_pair(forced, plain, WARMUP, ITERS, x.device)
            entry = record(key, ms_merged < ms_plain, ms_merged, ms_plain, "eager calibration")
        entry = {"key": key, **entry}
        slot["memo"][fast_key] = entry
    slot["last"] = entry
    return list(r_list) if entry["merge"] else [0] * len(r_list)


__all__ = [
    "POLICIES",
    "cache_path",
    "cached_decision",
    "clear_cache",
    "env_policy",
    "generation",
    "get_policy",
    "last_decision",
    "override",
    "policy_key",
    "record",
    "resolve_r",
    "set_decision",
    "time_pair",
]
