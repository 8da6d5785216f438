"""Count the aten ops one forward issues and attribute each to the source line of this project that issued it.

Why: on a GPU the PT-v3m2 forward is host-bound (thousands of small kernel launches), so the number of
kernel-launching ops, not FLOPs, sets the latency. Counting happens under a ``TorchDispatchMode`` (so
composite ops are seen as the aten kernels they decompose into, e.g. ``linear`` -> ``addmm``) and works
on any device; on CPU the counts equal the CUDA launch counts up to kernels that one aten op splits into
several launches (sort, unique, SDPA) or library-internal copies.

- ``launch`` ops: every aten op that is not a view/alias (``OpOverload.is_view``) and not a bare
  allocation (``empty*``); each is at least one kernel on a GPU.
- ``sync`` ops: ops whose output shape depends on data (``nonzero``, ``unique``, ``masked_select``,
  ``bincount`` without ``minlength`` covering the data, ``repeat_interleave`` without ``output_size``, and
  ``index`` / ``index_put_`` with a bool mask, whose internal ``nonzero`` runs below the dispatch mode) or
  that read a value back (``_local_scalar_dense`` = ``.item()``, device-to-host copies); each stalls the
  host on a GPU. ``tensor.tolist()`` on a CPU tensor does not dispatch and is not seen on a CPU.

Attribution: the innermost Python frame inside ``gitmerge3d`` or ``merge_core`` (this module excluded),
reported as ``file:function`` and rolled up into coarse categories (``CATEGORIES``).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach"}
_SYNC = {
    "_local_scalar_dense",
    "nonzero",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "masked_select",
    "is_nonzero",
    "equal",
    "bincount",  # output length max(data) + 1 (CUDA reads the max back)
}
_MASK_INDEX = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index", "_unsafe_index_put"}
_ROOTS = ("gitmerge3d", "merge_core")

# (file, function) prefix -> category; first match wins, "" matches any function of the file
CATEGORIES: list[tuple[str, str, str]] = [
    ("models/sparse_conv.py", "submanifold_neighbors", "sparse conv: neighbour search"),
    ("models/sparse_conv.py", "_keys", "sparse conv: neighbour search"),
    ("legacy.py", "neighbors_per_offset", "sparse conv: neighbour search"),
    ("legacy.py", "hilbert", "serialization (codes, argsort)"),
    ("legacy.py", "patches_per_block", "attention: patch order / padding"),
    ("legacy.py", "merge_core_match", "merging (adapter, match, merge, unmerge)"),
    ("models/sparse_conv.py", "gather_conv", "sparse conv: gather + GEMM"),
    ("models/sparse_conv.py", "", "sparse conv: other (bias, strided)"),
    ("models/serialization.py", "", "serialization (codes, argsort)"),
    ("models/structure.py", "serialization", "serialization (codes, argsort)"),
    ("models/structure.py", "", "Point bookkeeping (batch, sparsify)"),
    ("models/pooling.py", "", "grid pooling / unpooling"),
    ("models/point_transformer_v3m2.py", "patches", "attention: patch order / padding"),
    ("models/point_transformer_v3m2.py", "patch_padding", "attention: patch order / padding"),
    ("models/point_transformer_v3m2.py", "SerializedAttention.forward", "attention: qkv, SDPA, proj"),
    ("models/point_transformer_v3m2.py", "attend", "attention: qkv, SDPA, proj"),
    ("models/point_transformer_v3m2.py", "Block.forward", "block: residual adds"),
    ("models/point_transformer_v3m2.py", "", "block: other"),
    ("models/modules.py", "", "Linear / LayerNorm / GELU (PointSequential)"),
    ("merging.py", "", "merging (adapter, match, merge, unmerge)"),
    ("merge_core/", "", "merging (adapter, match, merge, unmerge)"),
]


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def is_launch(func) -> bool:
    """True for ops that run at least one kernel (not a view/alias, not a bare allocation)."""
    return not (getattr(func, "is_view", False) or _op_name(func) in _ALLOC)


def is_sync(func, args=(), kwargs=None) -> bool:
    """True for ops that need the data on the host (data-dependent shapes, value reads).

    With ``args``: also ``index``/``index_put_`` with a bool/uint8 index (a hidden ``nonzero``) and
    ``repeat_interleave`` with a tensor of repeats and no ``output_size`` (a hidden sum).
    """
    name = _op_name(func)
    if name in _SYNC:
        return True
    kwargs = kwargs or {}
    if name in _MASK_INDEX and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in args[1])
    if name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor"):
        size = kwargs.get("output_size", args[-1] if len(args) >= 4 else None)
        return size is None
    return False


def is_device_to_host(func, args, kwargs) -> bool:
    """A copy from an accelerator to the CPU (``.cpu()``, ``.tolist()`` on CUDA): also a host sync."""
    name = _op_name(func)
    if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
        dev = kwargs.get("device")
        return args[0].device.type != "cpu" and dev is not None and torch.device(dev).type == "cpu"
    if name == "copy_" and len(args) > 1 and all(isinstance(a, torch.Tensor) for a in args[:2]):
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _source(skip: str) -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if path != skip:
            for root in _ROOTS:
                i = path.rfind(f"/{root}/")
                if i >= 0:
                    rel = path[i + len(root) + 2 :] if root == "gitmerge3d" else path[i + 1 :]
                    return f"{rel}:{frame.f_code.co_qualname}"
        frame = frame.f_back
    return "<outside>:<torch>"


def category(source: str) -> str:
    file, _, func = source.partition(":")
    for f, fn, cat in CATEGORIES:
        if (file == f or (f.endswith("/") and file.startswith(f))) and (not fn or fn in func):
            return cat
    return "other"


@dataclass
class OpCount:
    """Per-source counters of one or more forwards (divide by ``forwards`` for per-forward numbers)."""

    launches: Counter = field(default_factory=Counter)  # source -> launching ops
    syncs: Counter = field(default_factory=Counter)  # source -> host-sync ops
    ops: Counter = field(default_factory=Counter)  # aten op name -> launching ops
    views: int = 0
    forwards: int = 1

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def by_category(self) -> Counter:
        out = Counter()
        for src, n in self.launches.items():
            out[category(src)] += n
        return out

    def syncs_by_category(self) -> Counter:
        out = Counter()
        for src, n in self.syncs.items():
            out[category(src)] += n
        return out


class OpCounter(TorchDispatchMode):
    """Dispatch mode filling an ``OpCount``; use as a context manager around a forward."""

    def __init__(self):
        super().__init__()
        self.count = OpCount()
        self._self_file = __file__.replace("\\", "/")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_launch(func):
            src = _source(self._self_file)
            self.count.launches[src] += 1
            self.count.ops[_op_name(func)] += 1
            if is_sync(func, args, kwargs) or is_device_to_host(func, args, kwargs or {}):
                self.count.syncs[src] += 1
        else:
            self.count.views += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, *args, **kwargs) -> tuple[OpCount, object]:
    """Run ``fn(*args, **kwargs)`` once under an ``OpCounter``: (counts, result)."""
    with OpCounter() as counter:
        result = fn(*args, **kwargs)
    return counter.count, result


def format_counts(counts: dict[str, OpCount], top: int = 12) -> str:
    """Markdown tables: launches and syncs per category for every column, then the top sources and ops."""
    names = list(counts)
    cats = sorted(
        {c for oc in counts.values() for c in oc.by_category()}, key=lambda c: -counts[names[0]].by_category()[c]
    )
    lines = [
        "| category | " + " | ".join(f"{n} launches (syncs)" for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for c in cats:
        cells = [f"{oc.by_category()[c]} ({oc.syncs_by_category()[c]})" for oc in counts.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append(
        "| **total** | " + " | ".join(f"**{oc.total_launches}** ({oc.total_syncs})" for oc in counts.values()) + " |"
    )
    for n, oc in counts.items():
        lines += ["", f"top sources ({n}):", "", "| source | launches | syncs |", "|---|---|---|"]
        for src, k in oc.launches.most_common(top):
            lines.append(f"| {src} | {k} | {oc.syncs[src]} |")
        lines.append("")
        lines.append(f"top aten ops ({n}): " + ", ".join(f"{op} {k}" for op, k in oc.ops.most_common(top)))
    return "\n".join(lines)
