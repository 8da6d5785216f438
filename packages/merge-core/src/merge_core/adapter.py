"""The adapter kit: what every model adapter (timm, torchvision, Hugging Face, a project's own) is built from.

- ``MergeState``: the typed per-forward state (schedule, token sizes, source maps, options). It also reads
  like ToMe's ``_tome_info`` dict (``state["size"]``), so ToMe-era code keeps working.
- ``MatchFn``: the protocol of a custom matcher (FreqMerge's ``FreqMergeMatcher`` is one).
- ``MergeAdapter``: the base that attaches a patch (class swaps recorded in the state) and removes it
  (classes restored, every ``_merge_core_*`` cache and patch attribute deleted).
- ``MergeState.merge_tokens``: the one merge step (matching, source tracing, size-weighted average, masks,
  token-count record) that every adapter calls between attention and MLP.
- ``weighted_mean`` / ``size_bias``: size-weighted pooling and the proportional-attention key bias.
- The zero-cost r = 0 path: layers swapped with ``swap(..., steps_out=True)`` get a class of their own per patch;
  ``MergeState.run_plain`` runs a forward whose schedule is all zero with those classes' ``forward`` set to the
  library's own (two class attribute writes per forward, undone after it), so an unmerged forward runs exactly
  the unpatched code with no adapter frame inside the layers.

``docs/writing-an-adapter.md`` walks through writing an adapter with these pieces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .matching import MergeFn, bipartite_soft_matching, bipartite_soft_matching_heads
from .merge import merge_source, merge_source_index, merge_wavg
from .schedule import parse_r

STATE_ATTRS = ("_merge_info", "_tome_info")
CACHE_PREFIX = "_merge_core_"
TRACE_MODES = (False, True, "index")


@runtime_checkable
class MatchFn(Protocol):
    """A custom matcher: called by ``MergeState.merge_tokens`` at every layer with ``r > 0``.

    Keyword arguments: ``block`` (the patched block), ``layer`` (its index), ``x`` (tokens after attention,
    (B, N, C)), ``attn_input`` (the normed block input attention saw), ``metric`` (mean key, (B, N, C')),
    ``r`` (tokens to remove) and ``info`` (the ``MergeState``). Returns ToMe-style ``(merge, unmerge)``.
    """

    def __call__(
        self,
        *,
        block: nn.Module,
        layer: int,
        x: torch.Tensor,
        attn_input: torch.Tensor | None,
        metric: torch.Tensor,
        r: int,
        info: MergeState,
    ) -> tuple[MergeFn, MergeFn]: ...


@dataclass(eq=False)
class MergeState:
    """Options fixed at patch time plus the state of the current forward (reset by ``begin``).

    Per forward: ``r`` (resolved schedule), ``size`` (B, N, 1) tokens per merged token, ``source`` (dense
    ToMe map, ``trace_source=True``), ``source_index`` (B, N0) integer map (``trace_source="index"``),
    ``attn_bias`` (a caller's attention mask, merged with the tokens), ``tokens`` (token count leaving
    each layer, as the tensors had it). ``extra`` holds anything a project adds with ``state["key"] = v``.
    """

    trace_source: bool | str = False
    prop_attn: bool = True
    protected: int = 1
    class_token: bool = True
    distill_token: bool = False
    attn_backend: str = "auto"
    match_fn: MatchFn | None = None
    r: list[int] = field(default_factory=list)
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    source_index: torch.Tensor | None = None
    attn_bias: torch.Tensor | None = None
    tokens: list[int] = field(default_factory=list)
    merging: bool = False  # whether any layer of this forward merges (False at r=0: the plain model runs)
    need_index: bool = False
    checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # undo log of the patch: (module, original class) and (module, attribute name) pairs
    patched: list[tuple[nn.Module, type]] = field(default_factory=list, repr=False)
    attached: list[tuple[nn.Module, str]] = field(default_factory=list, repr=False)
    # classes of this patch that step out at r = 0: (per-patch merging class, original class, the per-patch
    # class's own ``forward`` or None; transformers' layers get one from ``__init_subclass__``)
    stepping: list[tuple[type, type, Any]] = field(default_factory=list, repr=False)
    _entries: dict[int, tuple] = field(default_factory=dict, repr=False)
    _matches: dict[int, tuple] = field(default_factory=dict, repr=False)
    _schedules: dict[tuple, list[int]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ per forward
    def schedule(self, num_layers: int, r: Any) -> list[int]:
        """``parse_r(num_layers, r)``, cached by ``r``'s value (an O(1) check for an int); do not mutate the list.

        Why: the r = 0 path must cost the unpatched model nothing measurable, and ``parse_r`` validates
        every entry with ABC checks (microseconds per call, twice per forward before the cache). Under
        ``torch.compile`` the cache is bypassed: dynamo guards on the dict it reads, so a miss filled during the
        first trace made the second call recompile the whole model.
        """
        if _compiling():  # traced: no cache (a dict read is a guard, the first trace's write a recompile)
            return parse_r(num_layers, r)
        key = _schedule_key(num_layers, r)
        schedule = self._schedules.get(key) if key is not None else None
        if schedule is None:
            schedule = parse_r(num_layers, r)
            if key is not None:
                if len(self._schedules) >= 16:  # a handful of forms per model (model.r, resolved lists)
                    self._schedules.clear()
                self._schedules[key] = schedule
        return schedule

    def begin(self, num_layers: int, r: Any, *, checkpointing: bool = False, need_index: bool = False) -> None:
        """Reset the per-forward state; ``r`` is resolved once into a static per-layer list.

        Change the schedule of a forward only through ``begin`` (it also sets ``merging``). With an all-zero
        schedule, run the library's forward through ``run_plain``.
        """
        schedule = self.schedule(num_layers, r)
        self.r = list(schedule)
        self.merging = any(schedule)
        self.size = None
        self.source = None
        self.source_index = None
        self.attn_bias = None
        self.tokens = []
        self.need_index = need_index
        self.checkpointing = checkpointing
        self._entries = {}
        self._matches = {}

    def run_plain(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``forward(*args, **kwargs)`` with every stepping-out layer on its library's own ``forward``.

        Why: at r = 0 (``model.r == 0``, an all-zero schedule, the policy choosing r = 0) the patched model must
        cost what the unpatched one costs. Each per-patch class gets its original class's ``forward`` as a class
        attribute for this call (two writes for a ViT, whatever its depth) and loses it afterwards, even on an
        exception, so the layers' ``__call__`` (hooks included) dispatches straight to the library's code. Not
        under ``torch.compile`` (dynamo cannot trace a class write): there the merging classes' own r = 0 branch
        runs the same library forwards, exactly. Like the rest of the per-forward state this is not thread-safe,
        and ``copy.deepcopy`` copies share the per-patch classes: do not run copies concurrently in threads.
        """
        if not self.stepping or _compiling():
            return forward(*args, **kwargs)
        for own, original, _ in self.stepping:
            own.forward = original.forward
        try:
            return forward(*args, **kwargs)
        finally:
            for own, _, saved in self.stepping:
                if saved is not None:
                    own.forward = saved
                elif "forward" in own.__dict__:
                    del own.forward

    def fill_tokens(self, num_layers: int, n: int) -> None:
        """Token record of a forward that merged nothing: ``n`` tokens leave every layer."""
        if not self.merging:
            self.tokens = [n] * num_layers

    def attn_size(self) -> torch.Tensor | None:
        """The ``size`` attention should weight keys by (None without proportional attention)."""
        return self.size if self.prop_attn else None

    def merge_tokens(
        self,
        layer: int,
        x: torch.Tensor,
        metric: torch.Tensor | None,
        *,
        block: nn.Module | None = None,
        attn_input: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Merge ``self.r[layer]`` tokens of ``x`` (..., N, C) matched on ``metric``; record the token count.

        Leading dims are free (per-frame merging passes (B*T, N, C)); ``size``/sources follow ``x``.
        ``keys`` (B, H, N, D) with ``metric=None``: the metric is ``keys.mean(1)``, which the default matcher
        computes inside its fused kernels where they run (``matching.bipartite_soft_matching_heads``: no
        separate reduce launch per layer); a custom ``match_fn`` gets the averaged tensor as before.
        """
        r = self.r[layer]
        if r > 0:
            saved = self._matches.get(layer) if self.checkpointing else None
            if saved is not None:  # checkpoint recompute: the matching of the first run (random matchers too)
                merge, unmerge = saved
            elif self.match_fn is None:
                if metric is None:
                    merge, unmerge = bipartite_soft_matching_heads(keys, r, protected=self.protected)
                else:
                    merge, unmerge = bipartite_soft_matching(metric, r, protected=self.protected)
            else:
                if metric is None and keys is not None:
                    metric = keys.mean(1)
                merge, unmerge = self.match_fn(
                    block=block, layer=layer, x=x, attn_input=attn_input, metric=metric, r=r, info=self
                )
            if self.checkpointing:
                self._matches[layer] = (merge, unmerge)
            if self.trace_source is True:
                self.source = merge_source(merge, x, self.source)
            if self.attn_bias is not None:
                self.attn_bias = merge_attn_bias(merge, self.attn_bias)
            x, self.size = merge_wavg(merge, x, self.size)
            if self.trace_source == "index" or self.need_index:
                self.source_index = merge_source_index(unmerge, x, self.source_index)
        if len(self.tokens) == layer:
            self.tokens.append(x.shape[-2])
        return x

    # ------------------------------------------------------------------ gradient checkpointing
    def enter_layer(self, layer: int) -> tuple | None:
        """Call at a block's start; returns a stash when this call replays the layer (checkpoint recompute).

        A recomputed block must see the state its first run saw, not the state the forward ended with, and
        ``merge_tokens`` reuses that run's matching (a random or stateful matcher would otherwise differ).
        """
        if not self.checkpointing:
            return None
        saved = self._entries.get(layer)
        current = (self.size, self.source, self.source_index, self.attn_bias, self.tokens)
        if saved is None:
            self._entries[layer] = current[:4]
            return None
        self.size, self.source, self.source_index, self.attn_bias = saved
        self.tokens = list(range(layer))  # keeps the count record untouched (length check in merge_tokens)
        return current

    def exit_layer(self, stash: tuple | None) -> None:
        """Restore the end-of-forward state after a replayed layer (pair of ``enter_layer``)."""
        if stash is not None:
            self.size, self.source, self.source_index, self.attn_bias, self.tokens = stash

    # ------------------------------------------------------------------ ToMe's dict view
    def _field_names(self) -> tuple[str, ...]:
        return tuple(
            f.name
            for f in fields(self)
            if not f.name.startswith("_") and f.name not in ("patched", "attached", "stepping")
        )

    def __getitem__(self, key: str) -> Any:
        if key in self._field_names():
            return getattr(self, key)
        if key in self.extra:
            return self.extra[key]
        raise KeyError(f"merge state has no key {key!r}; known: {', '.join(self._field_names())}")

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._field_names():
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._field_names() or key in self.extra

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        return [*self._field_names(), *self.extra]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


_PLAIN_NUMBERS = frozenset((int, float))


def _schedule_key(num_layers: int, r: Any) -> tuple | None:
    """A hashable value-copy of ``r`` for the schedule cache; None for forms that are not cached (tensors...)."""
    kind = type(r)
    if kind is int:
        return (num_layers, r)
    if (kind is list or kind is tuple) and set(map(type, r)) <= _PLAIN_NUMBERS:  # C-level: O(1) Python frames
        return (num_layers, kind, *r)
    return None


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def merge_attn_bias(merge: MergeFn, bias: torch.Tensor) -> torch.Tensor:
    """Merge an additive attention bias (B, H, Nq, Nk) on both token axes.

    A merged token keeps the most permissive entry of its members (``amax``): it may attend wherever any of
    its members could. The key weighting of merged tokens is proportional attention's job, not the mask's.
    """
    b, h, n, _ = bias.shape
    rows = merge(bias.permute(0, 2, 1, 3).reshape(b, n, h * n), mode="amax")  # (B, Nq', H*Nk)
    n2 = rows.shape[1]
    cols = rows.reshape(b, n2, h, n).permute(0, 3, 2, 1).reshape(b, n, h * n2)  # (B, Nk, H*Nq')
    cols = merge(cols, mode="amax")  # (B, Nk', H*Nq')
    return cols.reshape(b, n2, h, n2).permute(0, 2, 3, 1).contiguous()


def mask_to_bias(
    attn_mask: torch.Tensor | None, is_causal: bool, n: int, batch: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Turn a bool / float / causal mask into a float bias (B, H or 1, N, N) that can be merged.

    As in timm and SDPA, ``is_causal`` takes precedence over ``attn_mask``.
    """
    if is_causal:
        attn_mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if attn_mask.dim() not in (2, 3, 4):
        raise ValueError(f"attn_mask must have shape (N, N), (B, N, N) or (B, H, N, N), got {tuple(attn_mask.shape)}")
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        bias = bias.masked_fill(~attn_mask, float("-inf"))
    else:
        bias = attn_mask.to(dtype)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    if bias.shape[-2:] != (n, n):
        raise ValueError(f"attn_mask must cover {n} x {n} tokens, got {tuple(attn_mask.shape)}")
    return bias.expand(batch, bias.shape[1], n, n)


def size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention's key bias log(size) as (B, 1, 1, N), for any additive-mask attention."""
    return size[..., 0].log().to(dtype)[:, None, None, :]


def weighted_mean(x: torch.Tensor, size: torch.Tensor | None, start: int = 0) -> torch.Tensor:
    """Mean of tokens ``x[:, start:]`` weighted by how many input tokens each one holds (ToMe's MAE pooling)."""
    tokens = x[:, start:]
    if size is None:
        return tokens.mean(dim=1)
    weights = size[:, start:].to(tokens.dtype)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1)


@functools.cache
def merged_class(mixin: type, cls: type) -> type:
    """One shared subclass per (mixin, original class): ``Merge<Name>``, the mixin's methods first."""
    return type(f"Merge{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})


def state_class(state: MergeState, merging: type, original: type) -> type:
    """The per-patch subclass of ``merging`` that steps out to ``original.forward`` (one per state and class)."""
    for own, seen, _ in state.stepping:
        if own.__bases__[0] is merging and seen is original:
            return own
    own = type(merging.__name__, (merging,), {"__module__": merging.__module__, "__qualname__": merging.__qualname__})
    state.stepping.append((own, original, own.__dict__.get("forward")))
    return own


class MergeAdapter:
    """Base of every adapter: subclass, implement ``check``/``layers``/``attach``; ``apply`` and ``remove`` do the rest.

    ``attach(model, state)`` swaps classes with ``self.swap(module, mixin, state)`` and sets attributes
    with ``self.attach_attr(module, name, value, state)``; both are undone by ``remove``.
    """

    name = "adapter"

    def check(self, model: nn.Module) -> None:
        """Raise TypeError naming what is unsupported."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The blocks that merge, in order (their count is the schedule length)."""
        raise NotImplementedError

    def protected_tokens(self, model: nn.Module) -> tuple[int, bool, bool]:
        """(protected prefix length, has class token, has distillation token)."""
        return 1, True, False

    def attach(self, model: nn.Module, state: MergeState) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared machinery
    def apply(
        self,
        model: nn.Module,
        trace_source: bool | str = False,
        prop_attn: bool = True,
        *,
        attn_backend: str = "auto",
        match_fn: MatchFn | None = None,
    ) -> nn.Module:
        """Patch ``model`` in place (re-patching replaces an earlier patch); set ``model.r`` afterwards."""
        from .attention import BACKENDS

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_trace_source(trace_source)
        if not isinstance(prop_attn, bool):
            raise TypeError(f"prop_attn must be True or False, got {type(prop_attn).__name__} {prop_attn!r}")
        if attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        if match_fn is not None and not callable(match_fn):
            raise TypeError(
                f"match_fn must be callable (see merge_core.adapter.MatchFn), got {type(match_fn).__name__}"
            )
        if getattr(model, "_merge_info", None) is not None:
            remove_patch(model)
        self.check(model)
        protected, class_token, distill_token = self.protected_tokens(model)
        state = MergeState(
            trace_source=trace_source,
            prop_attn=prop_attn,
            protected=protected,
            class_token=class_token,
            distill_token=distill_token,
            attn_backend=attn_backend,
            match_fn=match_fn,
        )
        self.attach(model, state)
        for name in STATE_ATTRS:
            self.attach_attr(model, name, state, state)
        self.init_r(model, state)
        return model

    def init_r(self, model: nn.Module, state: MergeState) -> None:
        """Give the model ToMe's ``model.r`` (0: no merging until the user sets it)."""
        self.attach_attr(model, "r", 0, state)

    @staticmethod
    def swap(module: nn.Module, cls: type, state: MergeState, *, steps_out: bool = False) -> None:
        """Give ``module`` class ``cls`` if it subclasses the module's class, else ``mixin`` + the module's class.

        Recorded in the state, so ``remove`` restores the original class. ``steps_out=True`` (layers, their
        attention): the module gets a subclass of its own per patch and class, whose ``forward`` is the original
        class's during ``MergeState.run_plain``; the merging class must still compute the original forward
        exactly when ``state.merging`` is False (it runs so under ``torch.compile``).
        """
        original = type(module)
        state.patched.append((module, original))
        merging = cls if issubclass(cls, original) else merged_class(cls, original)
        if steps_out:
            merging = state_class(state, merging, original)
        module.__class__ = merging

    @staticmethod
    def attach_attr(module: nn.Module, name: str, value: Any, state: MergeState) -> None:
        """Set a plain attribute (never registered as a submodule) that ``remove`` deletes."""
        module.__dict__[name] = value
        state.attached.append((module, name))


def check_trace_source(trace_source: object) -> None:
    if not (isinstance(trace_source, bool) or (isinstance(trace_source, str) and trace_source == "index")):
        raise ValueError(f"trace_source must be True, False or 'index', got {trace_source!r}")


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo any merge-core patch: restore every swapped class, delete patch attributes and ``_merge_core_*`` caches."""
    state = model.__dict__.get("_merge_info")
    if not isinstance(state, MergeState):
        raise ValueError(f"model ({type(model).__name__}) is not patched by merge_core (no _merge_info state)")
    state.stepping.clear()
    for module, cls in reversed(state.patched):
        module.__class__ = cls
    for module, name in reversed(state.attached):
        module.__dict__.pop(name, None)
    for module in model.modules():
        for key in [key for key in module.__dict__ if key.startswith(CACHE_PREFIX)]:
            del module.__dict__[key]
    state.patched.clear()
    state.attached.clear()
    return model


def state_of(model: nn.Module) -> MergeState:
    """The ``MergeState`` of a patched model (one-line error otherwise)."""
    state = getattr(model, "_merge_info", None)
    if not isinstance(state, MergeState):
        raise ValueError(f"model ({type(model).__name__}) is not patched by merge_core")
    return state


__all__ = [
    "MatchFn",
    "MergeAdapter",
    "MergeState",
    "mask_to_bias",
    "merge_attn_bias",
    "merged_class",
    "remove_patch",
    "size_bias",
    "state_of",
    "weighted_mean",
]
