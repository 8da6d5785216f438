"""timm >= 1.0 VisionTransformer adapter: patch by swapping classes (removable), then set ``model.r``.

Built on ``merge_core.adapter``. What differs from ToMe's timm 0.4.12 patch, and why:
- LayerScale (``ls1``/``ls2``), q/k-norm, attention ``norm``/gate are applied exactly like timm's Block.
- Every prefix token (CLS, distillation, registers: ``num_prefix_tokens``) is protected.
- Pooling heads: ``avg``/``avgmax`` average weighted by token size, ``map`` (attention pool) adds log(size) to
  its keys, so merged tokens count for the patches they hold.
- At r=0 (``model.r == 0``, an all-zero schedule, or the merge policy choosing r = 0) timm's
  ``forward_features``, ``Block.forward`` and fused SDPA ``Attention.forward`` run with no adapter frame inside
  the blocks (``merge_core.adapter.MergeState.run_plain``), bit-exact. From the second ``model(x)`` of the same
  (r, shape, dtype, device, policy state) ``forward`` calls timm's ``VisionTransformer.forward`` directly with
  timm's forwards on the instances: two Python calls more than the unpatched model (issue 9 target 1).
  Under ``torch.compile`` the merging classes' own r = 0 branch calls the same timm forwards.
- timm's API stays: ``forward_features``/``forward_head``/``forward``, ``forward_intermediates`` and
  ``features_only=True`` models (intermediates are unmerged back onto the patch grid, so dense users get a
  full-size map; the final features stay merged), ``attn_mask``/``is_causal`` (merged with the tokens, see
  ``merge_core.adapter.merge_attn_bias``), gradient checkpointing with r > 0, ``fused_attn=False``.
- The r schedule is resolved per forward into a fixed list (no state popped per layer), which keeps
  shapes static for ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch._dynamo
import torch.nn.functional as F
from timm.models._features import FeatureGetterNet, feature_take_indices
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from .. import kernels as _kernels
from ..adapter import (
    MatchFn,
    MergeAdapter,
    MergeState,
    _schedule_key,
    mask_to_bias,
    remove_patch,
    size_bias,
    weighted_mean,
)
from ..attention import proportional_attention
from ..kernels import policy as _policy
from ..kernels.policy import resolve_r
from ..kernels.prop_attn import qkv_channel_attention, qkv_channel_supported
from ..merge import unmerge_to_source


def _mask_kwargs(attn_mask: torch.Tensor | None, is_causal: bool) -> dict[str, Any]:
    """Only pass what was given, so timm versions without ``is_causal`` keep working."""
    kwargs: dict[str, Any] = {}
    if attn_mask is not None:
        kwargs["attn_mask"] = attn_mask
    if is_causal:
        kwargs["is_causal"] = True
    return kwargs


class MergeAttention(Attention):
    """timm Attention; with ``backend`` set it also takes token sizes and returns the merge metric.

    ``attn(x)`` / ``attn(x, attn_mask=...)`` is timm's forward unchanged; ``attn(x, size=..., backend=...,
    need_metric=..., attn_bias=...)`` (the merging path) returns ``(output, mean key or None)``; with
    ``metric_keys=True`` the per-head keys (B, H, N, D) instead of their mean, which the fused matching plan
    averages itself (``MergeState.merge_tokens(keys=...)``: no reduce launch per layer).
    """

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        size: torch.Tensor | None = None,
        backend: str | None = None,
        need_metric: bool = False,
        attn_bias: torch.Tensor | None = None,
        metric_keys: bool = False,
    ):
        if backend is None:
            return Attention.forward(self, x, **_mask_kwargs(attn_mask, is_causal))
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        dropout_p = self.attn_drop.p if self.training else 0.0
        use_qkv_channel = (
            self.fused_attn and attn_bias is None and (backend == "channel" or (backend == "auto" and x.is_cuda))
        )
        if size is not None and use_qkv_channel and qkv_channel_supported(self, dropout_p):
            # log(size) channel written by the qkv projection itself: FlashAttention, no q/k/v copies
            x, k = qkv_channel_attention(self, x, size)
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if size is not None and attn_bias is None and self.fused_attn:
                x = proportional_attention(q, k, v, size, scale=self.scale, dropout_p=dropout_p, backend=backend)
            else:
                bias = attn_bias
                if size is not None:
                    bias = size_bias(size, q.dtype) if bias is None else bias + size_bias(size, q.dtype)
                if self.fused_attn:
                    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
                else:  # timm's explicit path (fused_attn=False is respected, also with proportional attention)
                    attn = (q * self.scale) @ k.transpose(-2, -1)
                    if bias is not None:
                        attn = attn + bias
                    x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, getattr(self, "attn_dim", self.num_heads * self.head_dim))
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        if not need_metric:
            return x, None
        return x, (k if metric_keys else k.mean(1))


class MergeBlock(Block):
    """timm Block with a merge step between attention and MLP (ToMe's placement)."""

    _merge_info: MergeState
    _merge_layer: int

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        state, layer = self._merge_info, self._merge_layer
        if not state.merging:  # r = 0 everywhere: timm's own block, bit for bit
            x = Block.forward(self, x, **_mask_kwargs(attn_mask, is_causal))
            state.tokens.append(x.shape[-2])
            return x
        stash = state.enter_layer(layer)
        if (attn_mask is not None or is_causal) and state.attn_bias is None:
            state.attn_bias = mask_to_bias(attn_mask, is_causal, x.shape[1], x.shape[0], x.dtype, x.device)
        r = state.r[layer]
        keys = r > 0 and state.match_fn is None  # the default matcher takes per-head keys (mean fused in)
        attn_input = self.norm1(x)
        x_attn, metric = self.attn(
            attn_input,
            size=state.attn_size(),
            backend=state.attn_backend,
            need_metric=r > 0,
            attn_bias=state.attn_bias,
            metric_keys=keys,
        )
        x = x + self.drop_path1(self.ls1(x_attn))
        if keys:
            x = state.merge_tokens(layer, x, None, block=self, attn_input=attn_input, keys=metric)
        else:
            x = state.merge_tokens(layer, x, metric, block=self, attn_input=attn_input)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        state.exit_layer(stash)
        return x


_guards_tls = getattr(getattr(torch, "_guards", None), "_TLS", None)


def _tracing_any() -> bool:
    """Whether torch.compile / torch.export is tracing (the fast path's class-free writes are eager only).

    One Python frame in eager (``torch.compiler.is_compiling`` costs two: it calls ``torch.jit.is_scripting``).
    Dynamo calls it for real at trace time (``assume_constant_result``, no guard), when its TracingContext is
    set; non-strict export sets ``torch.compiler._is_compiling_flag``.
    """
    return torch.compiler._is_compiling_flag or getattr(_guards_tls, "tracing_context", None) is not None


if (
    _guards_tls is not None
    and hasattr(torch.compiler, "_is_compiling_flag")
    and hasattr(torch._dynamo, "assume_constant_result")
):
    _is_compiling = torch._dynamo.assume_constant_result(_tracing_any)
else:  # pragma: no cover - older torch: two frames instead of one
    _is_compiling = torch.compiler.is_compiling
_dispatch_depth = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled
_cuda_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)


def _plain_key(model: Any, x: torch.Tensor) -> tuple:
    """What a remembered r = 0 forward depends on; the fast path in ``forward`` builds the same tuple inline."""
    return (
        model.r,
        x.shape,
        x.dtype,
        x.device,
        _kernels._mode,
        _policy.generation,
        _policy._override.get(),
        model.__dict__.get("merge_policy"),
        getattr(type(model), "merge_policy", None),
        _policy._ENV_DATA.get(_policy._ENV_KEY),
        _grad_enabled(),
        _dispatch_depth(),
    )


class _MergeVisionTransformer:
    """Mixin placed in front of the model's own class; resets merge state on every forward."""

    r: Any
    _merge_info: MergeState
    _merge_num_layers: int
    _merge_plain: tuple | None

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """timm's ``forward``; a forward known to run r = 0 goes straight to timm's code (issue 9 target 1).

        Why: at batch 1 a ViT forward is host-bound, and the r = 0 path through ``forward_features`` cost ~19
        Python calls (schedule, policy lookup, class writes). Once a forward for this (``r``, shape, dtype,
        device, policy state) ran r = 0, the next one checks one tuple (C-level reads only), puts timm's own
        forwards on the model's and layers' instances (no class write: on Python 3.13 repeated class writes
        disable the type cache, 4x slower attribute reads) and calls the model class's ``forward``: two Python
        calls more than the unpatched model (this one and ``_tracing_any``). Anything else (a
        new key, extra arguments, tracing, capture) takes the full path below, which also calibrates.
        """
        plain = self.__dict__.get("_merge_plain")
        if (
            plain is not None
            and not args
            and not kwargs
            and not _is_compiling()  # first: dynamo must not trace the key below (C calls break fullgraph)
            and plain[0]
            == (
                self.r,
                x.shape,
                x.dtype,
                x.device,
                _kernels._mode,
                _policy.generation,
                _policy._override.get(),
                self.__dict__.get("merge_policy"),
                getattr(type(self), "merge_policy", None),
                _policy._ENV_DATA.get(_policy._ENV_KEY),
                _grad_enabled(),
                _dispatch_depth(),
            )
            and not (x.is_cuda and _cuda_capturing())
        ):
            _, zeros, tokens, forward, slots, slot, entry = plain
            state = self._merge_info
            state.r, state.merging, state.tokens = list(zeros), False, list(tokens)
            state.size = state.source = state.source_index = state.attn_bias = None
            state.need_index = state.checkpointing = False
            state._entries, state._matches = {}, {}
            if slot is not None:
                slot["last"] = entry
            for module, name, bound in slots:
                module.__dict__[name] = bound
            try:
                return forward(self, x)
            finally:
                for module, name, _ in slots:
                    module.__dict__.pop(name, None)
        out = super().forward(x, *args, **kwargs)
        if not args and not kwargs and not self._merge_info.merging and not _is_compiling():
            self._remember_plain(x)
        return out

    def _remember_plain(self, x: torch.Tensor) -> None:
        """After a full-path r = 0 forward: remember its key so the next one takes the fast path."""
        state = self._merge_info
        depth = self._merge_num_layers
        if _schedule_key(depth, self.r) is None or len(state.tokens) != depth or (x.is_cuda and _cuda_capturing()):
            return
        if not state.stepping:  # stepping out disabled (merge-bench's "r = 0 branch" row): the merging classes run
            return
        requested_zero = not any(state.schedule(depth, self.r))
        slot = entry = None
        if not requested_zero:  # the policy chose r = 0: only for inference (training runs the requested r)
            if _grad_enabled() or _policy._override.get() is not None:
                return
            slot = _policy._per_model.get(self)
            entry = slot and slot["last"]
            if not entry or entry["merge"]:
                return
        key = list(_plain_key(self, x))
        key[0] = list(self.r) if isinstance(self.r, list) else self.r  # a copy: in-place edits must miss
        originals = {id(module): original for module, original in state.patched}
        model_class = originals[id(self)]
        slots = [
            (self, name, getattr(model_class, name).__get__(self))
            for name in ("forward_features", "forward_head", "pool")
            if hasattr(model_class, name)
        ]
        for block in self.blocks:
            for module in (block, block.attn):
                slots.append((module, "forward", originals[id(module)].forward.__get__(module)))
        record = (tuple(key), list(state.r), list(state.tokens), model_class.forward, slots, slot, entry)
        self.__dict__["_merge_plain"] = record

    def _begin(self, need_index: bool = False, r: Any = None) -> MergeState:
        """Reset the per-forward state with ``self.r`` (or an already resolved ``r`` list)."""
        state = self._merge_info
        checkpointing = bool(getattr(self, "grad_checkpointing", False)) and torch.is_grad_enabled()
        state.begin(len(self.blocks), self.r if r is None else r, checkpointing=checkpointing, need_index=need_index)
        return state

    def forward_features(self, x: torch.Tensor, *args, **kwargs):
        state, depth = self._merge_info, self._merge_num_layers
        r = state.schedule(depth, self.r)
        if any(r):  # never slower than no merging: the policy may run this shape at r = 0 (measured per device)
            r = resolve_r(self, x, r, lambda: self.forward_features(x, *args, **kwargs))
        if any(r):
            self._begin(r=r)
            return super().forward_features(x, *args, **kwargs)
        state.begin(depth, r)  # the zero-cost path: timm's forward_features, Block and Attention forwards
        x = state.run_plain(super().forward_features, x, *args, **kwargs)
        state.fill_tokens(depth, x.shape[-2])
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        size = self._merge_info.size
        weighted = getattr(self, "attn_pool", None) is not None or self.global_pool in ("avg", "avgmax")
        if size is None or not weighted or size.shape[:2] != x.shape[:2]:
            return super().forward_head(x, pre_logits=pre_logits)  # nothing to weight: timm's own head
        x = self._merge_pool(x, size)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """timm's ``pool`` (timm >= 1.0.2x), size-weighted for merged tokens."""
        size = self._merge_info.size
        kind = self.global_pool if pool_type is None else pool_type
        weighted = getattr(self, "attn_pool", None) is not None or kind in ("avg", "avgmax")
        if size is None or not weighted or size.shape[:2] != x.shape[:2]:
            return super().pool(x, pool_type)
        return self._merge_pool(x, size, kind)

    def _merge_pool(self, x: torch.Tensor, size: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """timm's avg / avgmax / attention pooling with merged tokens weighted by their size."""
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        if getattr(self, "attn_pool", None) is not None:
            return self.attn_pool(x[:, start:], attn_mask=size_bias(size[:, start:], x.dtype))
        avg = weighted_mean(x, size, start)
        return avg if (kind or self.global_pool) == "avg" else 0.5 * (avg + x[:, start:].amax(dim=1))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ):
        """timm's ``forward_intermediates``; merged intermediates are unmerged onto the full patch grid.

        Each intermediate token of a merged group carries its group's features (``unmerge_to_source``),
        so NCHW maps keep timm's H x W. The final features (``x``) stay merged (N' tokens).
        """
        state = self._begin(need_index=True)
        options = dict(
            indices=indices,
            return_prefix_tokens=return_prefix_tokens,
            norm=norm,
            stop_early=stop_early,
            output_fmt=output_fmt,
            intermediates_only=intermediates_only,
            output_dict=output_dict,
            **_mask_kwargs(attn_mask, is_causal),
        )
        if not state.merging:  # timm's own code, blocks included (the zero-cost path; ``tokens`` stays empty)
            return state.run_plain(super().forward_intermediates, x, **options)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        mask = _mask_kwargs(attn_mask, is_causal)
        intermediates = []
        for i, blk in enumerate(blocks):
            if mask:
                x = blk(x, **mask)
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                if state.source_index is not None:
                    y = unmerge_to_source(y, state.source_index)
                intermediates.append(y)
        prefix = self.num_prefix_tokens
        prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
        intermediates = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            feat_size = getattr(self.patch_embed, "dynamic_feat_size", None)
            grid = feat_size((height, width)) if feat_size is not None else self.patch_embed.grid_size
            intermediates = [y.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


class _MergeFeatureGetter:
    """Mixin for ``features_only=True`` wrappers: ``wrapper.r`` is the wrapped model's ``r``."""

    @property
    def r(self) -> Any:
        return self.model.r

    @r.setter
    def r(self, value: Any) -> None:
        self.model.r = value


class TimmAdapter(MergeAdapter):
    """``merge_core.patch.timm``: timm's VisionTransformer (and its ``features_only`` wrapper)."""

    name = "timm"

    @staticmethod
    def _vit(model: torch.nn.Module) -> VisionTransformer:
        return model.model if isinstance(model, FeatureGetterNet) else model

    def check(self, model: torch.nn.Module) -> None:
        vit = self._vit(model)
        if not isinstance(vit, VisionTransformer):
            raise TypeError(
                f"model must be a timm VisionTransformer (or its features_only wrapper), got {type(vit).__name__}"
            )
        for i, block in enumerate(vit.blocks):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise TypeError(
                    f"model.blocks[{i}] is {type(block).__name__} with "
                    f"{type(getattr(block, 'attn', None)).__name__}; only timm's standard Block/Attention are supported"
                )

    def layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return list(self._vit(model).blocks)

    def protected_tokens(self, model: torch.nn.Module) -> tuple[int, bool, bool]:
        vit = self._vit(model)
        return int(vit.num_prefix_tokens), vit.cls_token is not None, getattr(vit, "dist_token", None) is not None

    def attach(self, model: torch.nn.Module, state: MergeState) -> None:
        vit = self._vit(model)
        self.swap(vit, _MergeVisionTransformer, state)
        self.attach_attr(vit, "_merge_num_layers", len(vit.blocks), state)
        self.attach_attr(vit, "_merge_plain", None, state)
        for i, block in enumerate(vit.blocks):
            self.swap(block, MergeBlock, state, steps_out=True)
            self.swap(block.attn, MergeAttention, state, steps_out=True)
            self.attach_attr(block, "_merge_info", state, state)
            self.attach_attr(block, "_merge_layer", i, state)
        if vit is not model:
            self.attach_attr(vit, "r", 0, state)
            for name in ("_merge_info", "_tome_info"):
                self.attach_attr(vit, name, state, state)
            self.swap(model, _MergeFeatureGetter, state)

    def init_r(self, model: torch.nn.Module, state: MergeState) -> None:
        if isinstance(model, FeatureGetterNet):
            return  # the wrapper's r is a property onto the wrapped model
        self.attach_attr(model, "r", 0, state)


ADAPTER = TimmAdapter()


def apply_patch(
    model: VisionTransformer,
    trace_source: bool | str = False,
    prop_attn: bool = True,
    *,
    attn_backend: str = "auto",
    match_fn: MatchFn | None = None,
) -> VisionTransformer:
    """Patch a timm VisionTransformer in place for token merging; set ``model.r`` afterwards.

    ``trace_source``: True keeps ToMe's dense source map in ``model._merge_info.source``;
    ``"index"`` keeps an O(N) integer map in ``model._merge_info.source_index``.
    ``prop_attn``: add log(size) to attention keys (proportional attention).
    ``attn_backend``: see ``merge_core.attention``. ``match_fn``: replaces bipartite matching (see
    ``merge_core.adapter.MatchFn``). Returns the model; ``remove_patch`` undoes it.
    """
    return ADAPTER.apply(model, trace_source, prop_attn, attn_backend=attn_backend, match_fn=match_fn)


__all__ = ["MergeAttention", "MergeBlock", "TimmAdapter", "apply_patch", "remove_patch"]
