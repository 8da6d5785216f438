"""GitMerge3D merging adapter for PT-v3m2: merge inside serialized patch attention, unmerge before proj.

Matching, grouping and the prop-attn modes are merge-core's (``merge_core.binned.patch_match``,
``merge_core.patch_energy.weighted_patch_groups``, ``merge_core.patch_attention.patch_attention``);
this module only wires them into the attention of every encoder and decoder block.

Built on merge-core's adapter kit (``merge_core.adapter.MergeAdapter``): ``patch(model, config)``
swaps the root's class (the per-forward ``MergeState`` reset) and each ``SerializedAttention``'s class
for ``MergedSerializedAttention``; ``remove_patch(model)`` is the kit's. The state records, per
attention block, the tokens kept per patch (``state.tokens``) and a ``LayerRecord`` with the groups
(``state.extra["layers"]``). Merging is inside attention, so the block's own token count never changes
and the kit's ``size``/source maps stay unused.

Config keys follow the official ``additional_info`` dict (see ``parse_merge_config``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from merge_core import kernels
from merge_core.adapter import MergeAdapter, MergeState, state_of
from merge_core.adapter import remove_patch as kit_remove_patch
from merge_core.binned import PatchMatch, official_head_offsets, patch_match
from merge_core.matching import best_destinations
from merge_core.patch_attention import PROP_ATTN, patch_attention
from merge_core.patch_energy import RULES, weighted_patch_groups
from merge_core.schedule import parse_r

from .models.point_transformer_v3m2 import SerializedAttention

MODES = ("patch", "weighted_patch")
_KNOWN_KEYS = {
    "tome",
    "r",
    "stride",
    "no_rand",
    "low_r",
    "threshold",
    "prop_attn",
    "wp_rule",
    "wp_threshold",
    "mean_head",
    "tome_attention",
    "tome_mlp",
    "trace_back",
    "single_head_tome",
    "replace_attn",
}


def default_stride(r: float) -> int:
    """round(1 / (1 - r)): the strides of the official configs (0.7->3, 0.8->5, 0.9->10, 0.95->20).

    The guide's ``ceil(1/(1-r))`` gives 4/6/11/20 in floating point (1/(1-0.9) = 9.999999999999998 is
    fine, but 1/(1-0.8) = 5.000000000000001 -> 6), disagreeing with every shipped config.
    """
    return max(1, round(1.0 / (1.0 - r)))


@dataclass(frozen=True)
class MergeConfig:
    """Validated merging settings. ``r`` is the fraction of each patch merged *away* (0.9 keeps ~10%)."""

    tome: str = "patch"
    r: float = 0.0
    stride: int = 1
    no_rand: bool = True
    low_r: int = 32
    prop_attn: str = "off"
    wp_rule: str = "code"
    wp_threshold: float = 0.2
    mean_head: bool = False


def _fail(key: str, expected: str, got) -> None:
    raise ValueError(f"merging config '{key}' must be {expected}, got {got!r}")


def parse_merge_config(info: Mapping | None) -> MergeConfig | None:
    """Official ``additional_info`` -> MergeConfig (None when merging is off). One-line errors per key.

    Defaults where the official configs omit a key: ``no_rand`` True (the 0a/0b configs omit it and the
    official code then fails), ``stride`` = ``default_stride(r)``, ``prop_attn`` "off" (equal to the
    official per-row bias up to rounding). ``threshold`` is accepted and ignored, as in the official
    code (0.2 is hard-coded there; ours is ``wp_threshold``).
    """
    if info is None:
        return None
    if not isinstance(info, Mapping):
        _fail("additional_info", "a dict", info)
    unknown = sorted(set(info) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"merging config has unknown key '{unknown[0]}' (known: {', '.join(sorted(_KNOWN_KEYS))})")
    tome = info.get("tome", "patch")
    if tome is None or tome is False:
        return None
    if tome not in MODES:
        _fail("tome", f"one of {MODES} or None", tome)
    r = info.get("r", 0.0)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
        _fail("r", "a float in [0, 1) (the fraction merged away)", r)
    stride = info.get("stride")
    if stride is None:
        stride = default_stride(float(r)) if r > 0 else 1
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        _fail("stride", "a positive int", stride)
    for key in ("no_rand", "mean_head"):
        if key in info and not isinstance(info[key], bool):
            _fail(key, "a bool", info[key])
    low_r = info.get("low_r", 32)
    if isinstance(low_r, bool) or not isinstance(low_r, int) or low_r < 1:
        _fail("low_r", "a positive int (tokens kept by the homogeneous patches)", low_r)
    prop = info.get("prop_attn", "off")
    if prop not in PROP_ATTN:
        _fail("prop_attn", f"one of {PROP_ATTN}", prop)
    rule = info.get("wp_rule", "code")
    if rule not in RULES:
        _fail("wp_rule", f"one of {RULES}", rule)
    if info.get("tome_mlp", False):
        _fail("tome_mlp", "False (merging the MLP is not part of GitMerge3D's method)", info["tome_mlp"])
    if not info.get("tome_attention", True):
        _fail("tome_attention", "True", info["tome_attention"])
    if info.get("replace_attn") is not None:
        _fail("replace_attn", "None (the official classes for it do not exist)", info["replace_attn"])
    return MergeConfig(
        tome=tome,
        r=float(r),
        stride=stride,
        no_rand=info.get("no_rand", True),
        low_r=low_r,
        prop_attn=prop,
        wp_rule=rule,
        wp_threshold=float(info.get("wp_threshold", 0.2)),
        mean_head=info.get("mean_head", False),
    )


_LAYOUTS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _spread_layout(heads: int, n: int, stride: int, r_eff: int, device: torch.device):
    """Constants of the ``no_rand`` matcher (they depend on the head only), cached per shape and device.

    Returns (dst (H, n_bins): destination positions, is_dst (H, N) bool, rank_slot (N - r_eff,): the output
    slot of the tokens that keep their own slot, in the order the score sort lists them: unmerged sources
    (slots n_bins, n_bins + 1, ...) then destinations (slots 0 .. n_bins - 1, bin order)).
    """
    key = (heads, n, stride, r_eff, torch.device(device))
    if key not in _LAYOUTS:
        n_bins = n // stride
        offsets = torch.tensor(official_head_offsets(heads, stride), dtype=torch.long)
        dst = torch.arange(n_bins) * stride + offsets[:, None]
        is_dst = torch.zeros(heads, n, dtype=torch.bool).scatter_(1, dst, True)
        n_unm = n - n_bins - r_eff
        rank_slot = torch.cat([torch.arange(n_bins, n_bins + n_unm), torch.arange(n_bins)])
        _LAYOUTS[key] = tuple(t.to(device) for t in (dst, is_dst, rank_slot))
    return _LAYOUTS[key]


_PLANS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _spread_plan(b: int, h: int, n: int, c: int, stride: int, r_eff: int, device: torch.device):
    """``_spread_layout`` already expanded to the call's shapes: (dst gather index (B, H, n_bins, C), is_dst
    (H, N), rank_slot (B*H, N - r_eff)). Why: one dict lookup per call instead of a lookup and two expands
    (host time is what a merged forward on a GPU waits for)."""
    key = (b, h, n, c, stride, r_eff, device)
    plan = _PLANS.get(key)
    if plan is None:
        dst, is_dst, rank_slot = _spread_layout(h, n, stride, r_eff, device)
        plan = (dst[None, :, :, None].expand(b, h, n // stride, c), is_dst, rank_slot.expand(b * h, n - r_eff))
        if len(_PLANS) < 4096:  # shapes are few per scene; bound the cache for shape-varying callers
            _PLANS[key] = plan
    return plan


def spread_slots(metric: torch.Tensor, r: int, stride: int) -> tuple[torch.Tensor, int] | None:
    """GitMerge3D's ``no_rand`` patch matching as one slot map, in 5 kernels per call.

    ``metric`` (B, H, N, C) (any strides with a contiguous last dim). Same groups as
    ``merge_core.binned.patch_match(metric, r, stride, "spread")`` (tested): destinations at the official head
    offsets, every source picks its most similar destination, the ``min(#sources, r)`` best-scoring sources
    merge (stable descending sort, so ties go to the earlier token). Returns (slot (B*H, N), N'): the
    output slot of every token, destinations first (bin order), then the unmerged sources (score order);
    merge-core's order is [unmerged, destinations]: attention does not depend on it. None: nothing merges.

    Kernels: destination gather, fused matcher over *all* N rows (a destination's own row is then masked,
    which saves gathering the sources), mask, sort, one scatter of the kept tokens' slots into the match.
    """
    if metric.dim() != 4:
        raise ValueError(f"metric must be (patches, heads, tokens, channels), got shape {tuple(metric.shape)}")
    b, h, n, c = metric.shape
    n_bins = n // stride
    r_eff = min(n - n_bins, r)
    if r_eff <= 0 or n_bins == 0:
        return None
    dst_index, is_dst, rank_slot = _spread_plan(b, h, n, c, stride, r_eff, metric.device)
    with torch.no_grad():
        dst_metric = metric.gather(2, dst_index).view(b * h, n_bins, c)
        best, slot = best_destinations(metric.reshape(b * h, n, c), dst_metric)
        best.view(b, h, n).masked_fill_(is_dst, float("-inf"))  # destinations rank last, in bin order
        rank = torch.sort(best, dim=-1, descending=True, stable=True).indices
        # merged sources keep their match (= destination slot); the rest get their own slot
        slot.scatter_(1, rank[:, r_eff:], rank_slot)
    return slot, n - r_eff


_PADS: dict[tuple, torch.Tensor] = {}

# largest token count whose ones-channel sum is exact in the dtype (fp16: 2^11, bf16: 2^8, fp32: 2^24)
_EXACT_COUNT = {torch.float16: 2048, torch.bfloat16: 256, torch.float32: 1 << 24, torch.float64: 1 << 53}
PAD = 8  # extra channels after q|k|v: [1, 0, ...] (group sizes come out of the merge; keeps 16-byte rows)


def _ones_pad(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, torch.device(device))
    if key not in _PADS:
        _PADS[key] = torch.zeros(PAD, dtype=dtype, device=device).index_fill_(0, torch.tensor([0], device=device), 1)
    return _PADS[key]


def merge_tokens(x: torch.Tensor, slot: torch.Tensor, num_out: int, size: torch.Tensor | None) -> torch.Tensor:
    """Plain mean of the tokens of every slot: x (G, N, W) -> (G, N', W) (zeros, scatter_add, div).

    ``size`` (G, N') divides all W channels; None: the last ``PAD`` channels of ``x`` are the ones pad, whose
    first channel sums to the size, and only the first ``W - PAD`` channels are divided.
    """
    g, n, w = x.shape
    out = x.new_zeros(g, num_out, w).scatter_add_(1, slot[..., None].expand(g, n, w), x)
    grad = torch.is_grad_enabled() and out.requires_grad  # training: out-of-place (autograd)
    if size is None:
        counts = out[..., w - PAD : w - PAD + 1]
        if grad:
            return torch.cat([out[..., : w - PAD] / counts, out[..., w - PAD :]], -1)
        out[..., : w - PAD].div_(counts)
    else:
        out = out / size[..., None] if grad else out.div_(size[..., None])
    return out


def group_sizes(slot: torch.Tensor, num_out: int) -> torch.Tensor:
    """Tokens per slot, fp32 (G, N')."""
    ones = torch.ones(1, device=slot.device, dtype=torch.float32).expand(slot.shape)
    return torch.zeros(slot.shape[0], num_out, device=slot.device).scatter_add_(1, slot, ones)


def split_groups(low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normal, low) patch indices of a (P,) bool mask, each ascending, with one host sync (the low count).

    Why: ``nonzero`` twice is two syncs per block on a GPU; a stable sort of the mask lists the normal
    patches, then the low ones, each in index order (the same indices ``nonzero`` gives).
    """
    n_low = int(low.sum())
    order = torch.sort(low.to(torch.uint8), stable=True).indices
    return order[: low.shape[0] - n_low], order[low.shape[0] - n_low :]


MERGE_OPS = ("scatter_add", "scatter_reduce")
_MERGE_OP = "scatter_add"


def set_merge_op(op: str) -> None:
    """How the ``no_rand`` path averages the groups: ``scatter_add`` (default: zeros, scatter_add_, div_; 3 ops)
    or ``scatter_reduce`` (one ``scatter_reduce_(mean, include_self=False)`` dispatch, which runs ~8 kernels
    from C++; bit-equal on a CPU; used only with prop_attn off, no RPE bias, no autograd). Why: on a host-bound
    GPU the dispatch count is the cost; which of the two is cheaper there is measured (``host_cost +srmean``)."""
    global _MERGE_OP
    if op not in MERGE_OPS:
        raise ValueError(f"op must be one of {MERGE_OPS}, got {op!r}")
    _MERGE_OP = op


@contextlib.contextmanager
def merge_op(op: str) -> Iterator[None]:
    """Context form of ``set_merge_op`` (restores the previous op)."""
    previous = _MERGE_OP
    set_merge_op(op)
    try:
        yield
    finally:
        set_merge_op(previous)


_GRAPHS_ON = os.environ.get("GITMERGE3D_ATTEND_GRAPHS", "0") == "1"
MAX_ATTEND_GRAPHS = 64  # distinct (shape, settings) keys; a scene has ~9 (one per stage and head count)


def set_attend_graphs(enabled: bool) -> None:
    """Opt in (or out) of CUDA-graph replay of the merged attend (``GITMERGE3D_ATTEND_GRAPHS=1`` at import).

    Why: a merged attend is ~12 small launches and is host-bound (each launch costs host time the GPU waits
    for); a graph replays them from one launch. Inference only (CUDA, no autograd, no RPE bias, ``no_rand``
    ``patch`` mode); each new input shape is captured once (a synchronize + capture, tens of ms). The
    returned tensor is the graph's static output: valid until the next attend of the same shape, which is
    how ``SerializedAttention.forward`` uses it (it gathers the output right away).
    """
    global _GRAPHS_ON
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _GRAPHS_ON = enabled


@contextlib.contextmanager
def attend_graphs(enabled: bool = True) -> Iterator[None]:
    """Context form of ``set_attend_graphs`` (restores the previous setting)."""
    previous = _GRAPHS_ON
    set_attend_graphs(enabled)
    try:
        yield
    finally:
        set_attend_graphs(previous)


_FUSED_ON = os.environ.get("GITMERGE3D_FUSED_ATTEND", "1") != "0"
_FUSED_DTYPES = (torch.float16, torch.bfloat16)


def set_fused_attend(enabled: bool) -> None:
    """Use (or not) merge-core's one-launch merged attention (``kernels.patch_merge_attn``) for the ``no_rand``
    merged attend; on by default, ``GITMERGE3D_FUSED_ATTEND=0`` at import turns it off.

    Why: the eager merged attend is ~10 small kernels whose GPU time exceeds the flash attention on the full
    patch it replaces; the fused kernel does match + select + mean + attention + unmerge in one launch. Taken
    only where it computes the same thing: CUDA tensors under merge-core's kernel mode ``auto``/``always`` (a
    CPU only under ``always`` with ``TRITON_INTERPRET=1``: the tests), no autograd, no RPE bias, no dropout,
    ``no_rand``, no ``mean_head``, ``prop_attn`` "off"/"key", fp16/bf16 (fp32 too on the interpreter), at most
    ``U_MAX`` unmerged sources; everything else keeps the torch path. ``kernels.kernel_mode("never")`` (the
    bench's ``+torchmatch``) turns it off with merge-core's other kernels.
    """
    global _FUSED_ON
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _FUSED_ON = enabled


@contextlib.contextmanager
def fused_attend(enabled: bool = True) -> Iterator[None]:
    """Context form of ``set_fused_attend`` (restores the previous setting)."""
    previous = _FUSED_ON
    set_fused_attend(enabled)
    try:
        yield
    finally:
        set_fused_attend(previous)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fused_kernel():
    """merge-core's fused merged-attention module, or None where Triton does not import."""
    if not kernels.triton_available():
        return None
    from merge_core.kernels import patch_merge_attn

    return patch_merge_attn


def _use_fused(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias, r: int, stride: int) -> bool:
    """Whether ``_merged`` takes the one-launch kernel for this call (see ``set_fused_attend``)."""
    cfg: MergeConfig = attn._merge_info.extra["gitmerge3d"]
    if not _FUSED_ON or bias is not None or not cfg.no_rand or cfg.mean_head or cfg.prop_attn not in ("off", "key"):
        return False
    if attn.training and attn.attn_drop > 0:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    mode = kernels.get_mode()
    if q.is_cuda:
        if mode == "never" or q.dtype not in _FUSED_DTYPES or torch.compiler.is_compiling():
            return False
    elif not (mode == "always" and _interpreting() and q.dtype in (*_FUSED_DTYPES, torch.float32)):
        return False
    module = _fused_kernel()
    return module is not None and module.supported(q, r, stride, cfg.prop_attn)


def _shared_base(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """q, k, v as one (3, *q.shape) strided view when they are equally strided slices of one storage (the
    ``unbind`` of ``SerializedAttention.forward``'s qkv), so the graph's input is loaded with one copy."""
    if not (q.shape == k.shape == v.shape and q.stride() == k.stride() == v.stride() and q.dtype == k.dtype == v.dtype):
        return None
    if not (q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()):
        return None
    step = k.storage_offset() - q.storage_offset()
    if step <= 0 or v.storage_offset() - k.storage_offset() != step:
        return None
    return q.as_strided((3, *q.shape), (step, *q.stride()), q.storage_offset())


class AttendGraph:
    """One merged attend (``MergedSerializedAttention._merged``) captured in a CUDA graph for fixed shapes.

    Input: a static (3, P, H, N, D) buffer loaded by one ``copy_`` (three when q, k, v do not share a base);
    output: the captured (P, H, N, D) unmerged tensor (overwritten by the next replay). The captured ops are
    the eager ones, so the groups are identical; the merged sums may differ from an eager call in the last
    bit, as two eager calls do (``scatter_add_`` on CUDA adds with atomics in no fixed order).
    """

    def __init__(self, fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.qkv = torch.empty((3, *q.shape), dtype=q.dtype, device=q.device)
        self.load(q, k, v)
        self.graph, self.out, self.kept = self.capture(fn, *self.qkv.unbind(0))

    @staticmethod
    def capture(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """(graph, static output, kept) of ``fn(q, k, v)``: two warm-up calls on a side stream (Triton compile,
        layout caches, allocator), then the capture."""
        side = torch.cuda.Stream(q.device)
        side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(q, k, v)
        torch.cuda.current_stream(q.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, kept = fn(q, k, v)
        return graph, out, kept

    def load(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        base = _shared_base(q, k, v)
        if base is not None:
            self.qkv.copy_(base)
        else:
            for dst, src in zip(self.qkv.unbind(0), (q, k, v), strict=True):
                dst.copy_(src)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, int]:
        self.load(q, k, v)
        self.graph.replay()
        return self.out, self.kept


def _graph_device(q: torch.Tensor) -> bool:
    """CUDA tensors outside another capture (a test swaps this, with ``AttendGraph.capture``, to run the cache's
    bookkeeping on a CPU)."""
    return q.is_cuda and not torch.cuda.is_current_stream_capturing()


def _attend_graph(attn, q, k, v, bias, r: int, cfg: MergeConfig) -> AttendGraph | None:
    """The cached graph for this call when graphs are on and the call qualifies (else None: run eager)."""
    if not _GRAPHS_ON or bias is not None or not _graph_device(q) or not cfg.no_rand or attn.training:
        return None
    if torch.is_grad_enabled() or q.shape[0] == 0:
        return None
    graphs = attn._merge_info.extra.setdefault("attend_graphs", {})
    autocast = torch.is_autocast_enabled(q.device.type)
    key = (tuple(q.shape), q.dtype, q.device, r, cfg, attn.scale, autocast, kernels.get_mode(), _FUSED_ON)
    graph = graphs.get(key)
    if graph is None:
        if len(graphs) >= MAX_ATTEND_GRAPHS:
            return None
        graph = graphs[key] = AttendGraph(lambda a, b, c: attn._merged(a, b, c, None, r, cfg.stride), q, k, v)
    return graph


@dataclass
class LayerRecord:
    name: str
    patches: int
    tokens: int
    kept: list[int]  # tokens per patch group after merging (one entry per group: normal, low)
    group_patches: list[int]
    strides: list[int]  # bin stride of each group (n_bins = tokens // stride destinations)


def layer_records(model: nn.Module) -> list[LayerRecord]:
    """Per-attention-block records of the last forward (empty when nothing merged)."""
    return state_of(model).extra.get("layers", [])


def config_of(model: nn.Module) -> MergeConfig:
    return state_of(model).extra["gitmerge3d"]


def resolve_r(r, num_layers: int) -> tuple[float | None, list[int]]:
    """``model.r``: a float in (0, 1) is GitMerge3D's fraction (int(K*r) per patch of K tokens);
    an int or per-layer list is merge-core's count of tokens removed per patch (0 = off)."""
    if isinstance(r, float) and 0.0 < r < 1.0:
        return r, [0] * num_layers
    return None, parse_r(num_layers, r)


class _MergeRoot:
    """Mixin of the patched model: resets the per-forward state, then runs the original forward."""

    def forward(self, *args, **kwargs):
        state: MergeState = self._merge_info
        fraction, counts = resolve_r(self.r, len(state.extra["blocks"]))
        state.begin(len(counts), counts)
        state.extra["fraction"] = fraction
        state.extra["layers"] = []
        return super().forward(*args, **kwargs)


class MergedSerializedAttention(SerializedAttention):
    """SerializedAttention whose patch attention runs on merged tokens (swapped in by the adapter)."""

    _merge_info: MergeState
    _merge_layer: int

    def _tokens_to_merge(self, n: int) -> int:
        state = self._merge_info
        fraction = state.extra.get("fraction")
        if fraction:
            return int(n * fraction)
        return state.r[self._merge_layer] if state.r else 0

    def attend(self, q, k, v, bias, point):
        state = self._merge_info
        cfg: MergeConfig = state.extra["gitmerge3d"]
        b, _, n, _ = q.shape
        r = self._tokens_to_merge(n)
        if r <= 0:
            state.tokens.append(n)
            return super().attend(q, k, v, bias, point)
        low = None
        if cfg.tome == "weighted_patch":
            low = weighted_patch_groups(v, threshold=cfg.wp_threshold, rule=cfg.wp_rule)
        if low is None:
            # the graph cache (opt-in) also wraps the fused kernel: a replay costs less host time than its launch
            graph = _attend_graph(self, q, k, v, bias, r, cfg)
            out, kept = graph(q, k, v) if graph is not None else self._merged(q, k, v, bias, r, cfg.stride)
            self._record(b, n, [kept], [b], [cfg.stride])
            return out
        hi_idx, lo_idx = split_groups(low)
        out = torch.empty_like(v)
        sub = lambda t, i: None if t is None else t[i]  # noqa: E731
        hi_out, hi_kept = self._merged(q[hi_idx], k[hi_idx], v[hi_idx], sub(bias, hi_idx), r, cfg.stride)
        lo_stride = max(n // cfg.low_r, 1)
        lo_out, lo_kept = self._merged(q[lo_idx], k[lo_idx], v[lo_idx], sub(bias, lo_idx), n - cfg.low_r, lo_stride)
        out[hi_idx] = hi_out.to(out.dtype)
        out[lo_idx] = lo_out.to(out.dtype)
        self._record(b, n, [hi_kept, lo_kept], [len(hi_idx), len(lo_idx)], [cfg.stride, lo_stride])
        return out

    def _record(self, patches: int, tokens: int, kept: list[int], groups: list[int], strides: list[int]) -> None:
        state = self._merge_info
        name = state.extra["blocks"][self._merge_layer]
        state.extra["layers"].append(LayerRecord(name, patches, tokens, kept, groups, strides))
        state.tokens.append(kept[0])  # kept tokens per patch inside attention (normal group)

    def _merged(self, q, k, v, bias, r: int, stride: int):
        """Merged attention of (P, H, N, D) q, k, v; returns ((P, H, N, D) output, tokens kept per patch).

        ``no_rand`` (the official setting), where ``_use_fused`` allows: merge-core's one-launch kernel
        (``kernels.patch_merge_attn``: same groups, slot order and output layout). Otherwise q|k|v|ones are
        packed once (one copy), matched by ``spread_slots``, merged by one scatter_add (the ones channel sums
        to the group sizes, so no size kernels and no dtype casts), attended, and unmerged by one gather
        written straight into a (P, N, H, D) buffer, so the caller's transpose + reshape is a view.
        ``no_rand=False`` (random destinations) uses merge-core's ``patch_match`` (``_merged_generic``).
        """
        cfg: MergeConfig = self._merge_info.extra["gitmerge3d"]
        p, h, n, d = q.shape
        if p == 0:
            return v, n
        if not cfg.no_rand:
            return self._merged_generic(q, k, v, bias, r, stride)
        if _use_fused(self, q, k, v, bias, r, stride):
            fused = _fused_kernel().patch_merge_attention(q, k, v, r, stride, prop_attn=cfg.prop_attn, scale=self.scale)
            if fused is not None:
                return fused
        # one-dispatch mean (no sizes needed): only plain attention, no RPE, no autograd
        reduce_mean = _MERGE_OP == "scatter_reduce" and cfg.prop_attn == "off" and bias is None
        reduce_mean = reduce_mean and not torch.is_grad_enabled()
        exact = n <= _EXACT_COUNT.get(q.dtype, 0) and not reduce_mean
        parts = [q, k, v] + ([_ones_pad(q.dtype, q.device).expand(p, h, n, PAD)] if exact else [])
        x = torch.cat(parts, dim=-1)  # (P, H, N, 3D [+ PAD]), contiguous
        metric = x[..., 2 * d : 3 * d]
        if cfg.mean_head:
            metric = metric.mean(dim=1, keepdim=True).expand(metric.shape)
        plan = spread_slots(metric, r, stride)
        if plan is None:
            return SerializedAttention.attend(self, q, k, v, bias, None), n
        slot, n_out = plan
        size = None if exact or reduce_mean else group_sizes(slot, n_out)
        if reduce_mean:
            w, xf = x.shape[-1], x.view(p * h, n, x.shape[-1])
            index = slot[..., None].expand(p * h, n, w)
            merged = xf.new_empty(p * h, n_out, w).scatter_reduce_(1, index, xf, "mean", include_self=False)
            merged = merged.view(p, h, n_out, w)
        else:
            merged = merge_tokens(x.view(p * h, n, x.shape[-1]), slot, n_out, size).view(p, h, n_out, -1)
        qm, km, vm, pad = merged.split((d, d, d, x.shape[-1] - 3 * d), -1)  # one call for the four views
        if size is None and (cfg.prop_attn != "off" or bias is not None):
            size = pad[..., 0].reshape(p * h, n_out).float()
        dropout = self.attn_drop if self.training else 0.0
        if bias is None:
            sizes = None if size is None else size.view(p, h, n_out)
            out = patch_attention(qm, km, vm, sizes, cfg.prop_attn, scale=self.scale, dropout_p=dropout)
        else:
            rows = merge_tokens(bias.reshape(p * h, n, n), slot, n_out, size)
            mb = merge_tokens(rows.transpose(1, 2), slot, n_out, size).transpose(1, 2)
            out = self._biased(qm, km, vm, mb.view(p, h, n_out, n_out), size.view(p, h, n_out), cfg.prop_attn, dropout)
        index = slot.view(p, h, n, 1).expand(p, h, n, d)
        if torch.is_grad_enabled() and out.requires_grad:  # out= has no autograd: plain gather (training)
            return out.gather(2, index), n_out
        unmerged = torch.empty(p, n, h, d, dtype=out.dtype, device=out.device).permute(0, 2, 1, 3)
        torch.gather(out, 2, index, out=unmerged)
        return unmerged, n_out

    def _merged_generic(self, q, k, v, bias, r: int, stride: int):
        """Random destinations per bin (``no_rand=False``): merge-core's ``patch_match`` and ``PatchMatch``."""
        cfg: MergeConfig = self._merge_info.extra["gitmerge3d"]
        n = q.shape[-2]
        m = patch_match(v, r, stride, "random", mean_head=cfg.mean_head)
        if m is None:
            return SerializedAttention.attend(self, q, k, v, bias, None), n
        d = q.shape[-1]
        merged = m.merge(torch.cat([q, k, v], dim=-1))
        qm, km, vm = merged[..., :d], merged[..., d : 2 * d], merged[..., 2 * d :]
        size = m.sizes()
        dropout = self.attn_drop if self.training else 0.0
        if bias is None:
            out = patch_attention(qm, km, vm, size, cfg.prop_attn, scale=self.scale, dropout_p=dropout)
        else:
            out = self._biased(qm, km, vm, self._merge_bias(m, bias), size, cfg.prop_attn, dropout)
        return m.unmerge(out), m.num_out

    @staticmethod
    def _merge_bias(m: PatchMatch, bias: torch.Tensor) -> torch.Tensor:
        """RPE (B, H, K, K) merged along queries and keys (plain means), as the official code does."""
        rows = m.merge(bias)
        return m.merge(rows.transpose(-1, -2)).transpose(-1, -2)

    def _biased(self, q, k, v, bias, size, prop_attn, dropout):
        if prop_attn == "key":
            bias = bias + size.log()[..., None, :].to(bias.dtype)
        elif prop_attn == "faithful":
            bias = bias + size.log()[..., :, None].to(bias.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scale)


class GitMerge3DAdapter(MergeAdapter):
    """merge-core adapter for PT-v3m2: every SerializedAttention (encoder and decoder) merges in-attention.

    ``model.r`` after ``apply``: the config's fraction (float in (0, 1)) or merge-core's per-patch token
    counts (int or per-layer list); 0 runs the unpatched computation exactly.
    """

    name = "gitmerge3d-ptv3"

    def __init__(self, config: MergeConfig):
        self.config = config

    def check(self, model: nn.Module) -> None:
        if not self.layers(model):
            raise TypeError(f"model ({type(model).__name__}) has no SerializedAttention modules to merge")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, SerializedAttention)]

    def protected_tokens(self, model: nn.Module) -> tuple[int, bool, bool]:
        return 0, False, False

    def attach(self, model: nn.Module, state: MergeState) -> None:
        names = {id(m): n for n, m in model.named_modules()}
        blocks = self.layers(model)
        state.extra["gitmerge3d"] = self.config
        state.extra["blocks"] = [names[id(m)] for m in blocks]
        state.extra["layers"] = []
        state.extra["fraction"] = self.config.r  # until the first forward resolves model.r
        self.swap(model, _MergeRoot, state)
        for i, attn in enumerate(blocks):
            self.swap(attn, MergedSerializedAttention, state)
            self.attach_attr(attn, "_merge_info", state, state)
            self.attach_attr(attn, "_merge_layer", i, state)

    def init_r(self, model: nn.Module, state: MergeState) -> None:
        self.attach_attr(model, "r", self.config.r, state)


def patch(model: nn.Module, config: MergeConfig | Mapping) -> MergeState:
    """Enable merging in every SerializedAttention of ``model`` with an ``additional_info``-style config."""
    if isinstance(config, Mapping):
        config = parse_merge_config(config)
    if config is None:
        raise ValueError("merging config has tome=None: nothing to patch (use remove_patch to disable)")
    GitMerge3DAdapter(config).apply(model, prop_attn=False)
    return state_of(model)


def remove_patch(model: nn.Module) -> None:
    """Undo ``patch`` (merge-core's remove: classes, attributes and caches restored); no-op when unpatched."""
    if isinstance(model.__dict__.get("_merge_info"), MergeState):
        kit_remove_patch(model)


def merge_state(model: nn.Module) -> MergeState | None:
    state = model.__dict__.get("_merge_info")
    return state if isinstance(state, MergeState) else None
