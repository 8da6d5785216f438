"""timm >= 1.0 VisionTransformer adapter: patch by swapping classes (removable), then set ``model.r``.

What differs from ToMe's timm 0.4.12 patch, and why:
- LayerScale (``ls1``/``ls2``), q/k-norm, attention ``norm``/gate are applied exactly like timm's Block.
- Every prefix token (CLS, distillation, registers: ``num_prefix_tokens``) is protected.
- ``global_pool='avg'`` / ``'max'`` / ``'avgmax'`` heads pool over patch tokens; the average is weighted by
  token size, so merged tokens count for the patches they hold.
- Without proportional attention, attention is timm's own ``F.scaled_dot_product_attention`` call
  (or its non-fused path when timm's ``fused_attn`` is off); the merge metric is the mean key.
- The r schedule is resolved per forward into a fixed list (no state popped per layer), which keeps
  shapes static for ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from ..attention import BACKENDS, proportional_attention
from ..kernels.policy import resolve_r
from ..kernels.prop_attn import qkv_channel_attention, qkv_channel_supported
from ..matching import bipartite_soft_matching
from ..merge import merge_source, merge_source_index, merge_wavg
from ..schedule import parse_r

MatchFn = Callable[..., tuple[Callable, Callable]]


class MergeAttention(Attention):
    """timm Attention that also returns the merge metric (mean key over heads)."""

    def forward(
        self, x: torch.Tensor, size: torch.Tensor | None = None, backend: str = "auto", need_metric: bool = True
    ):
        """Returns (output, mean key or None); layers that do not merge skip the key mean."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        dropout_p = self.attn_drop.p if self.training else 0.0
        use_qkv_channel = backend == "channel" or (backend == "auto" and x.is_cuda)
        if size is not None and use_qkv_channel and qkv_channel_supported(self, dropout_p):
            # log(size) channel written by the qkv projection itself: FlashAttention, no q/k/v copies
            x, k = qkv_channel_attention(self, x, size)
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if size is not None:
                x = proportional_attention(q, k, v, size, scale=self.scale, dropout_p=dropout_p, backend=backend)
            elif self.fused_attn:
                x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
                x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, N, getattr(self, "attn_dim", self.num_heads * self.head_dim))
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, (k.mean(1) if need_metric else None)


class MergeBlock(Block):
    """timm Block with a merge step between attention and MLP (ToMe's placement)."""

    _merge_info: dict[str, Any]
    _merge_layer: int

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        info = self._merge_info
        r = info["r"][self._merge_layer]
        if attn_mask is not None or is_causal:
            if any(info["r"]):
                raise ValueError("attn_mask/is_causal cannot be combined with token merging (model.r > 0)")
            return Block.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        size = info["size"] if info["prop_attn"] else None
        attn_input = self.norm1(x)
        x_attn, metric = self.attn(attn_input, size, info["attn_backend"], r > 0)
        x = x + self.drop_path1(self.ls1(x_attn))
        if r > 0:
            match = info["match_fn"]
            if match is None:
                merge, unmerge = bipartite_soft_matching(metric, r, protected=info["protected"])
            else:
                merge, unmerge = match(
                    block=self,
                    layer=self._merge_layer,
                    x=x,
                    attn_input=attn_input,
                    metric=metric,
                    r=r,
                    info=info,
                )
            if info["trace_source"] is True:
                info["source"] = merge_source(merge, x, info["source"])
            x, info["size"] = merge_wavg(merge, x, info["size"])
            if info["trace_source"] == "index":
                info["source_index"] = merge_source_index(unmerge, x, info["source_index"])
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class _MergeVisionTransformer:
    """Mixin placed in front of the model's own class; resets merge state on every forward."""

    r: Any
    _merge_info: dict[str, Any]

    def forward_features(self, x: torch.Tensor, *args, **kwargs):
        info = self._merge_info
        r_list = parse_r(len(self.blocks), self.r)
        # never slower than no merging: the policy may run this shape at r = 0 (measured once per device)
        info["r"] = resolve_r(self, x, r_list, lambda: self.forward_features(x, *args, **kwargs))
        info["size"] = None
        info["source"] = None
        info["source_index"] = None
        return super().forward_features(x, *args, **kwargs)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        pool = self.global_pool
        if getattr(self, "attn_pool", None) is not None or pool not in ("avg", "max", "avgmax"):
            return super().forward_head(x, pre_logits=pre_logits)
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        tokens = x[:, start:]
        size = self._merge_info["size"]
        if pool in ("avg", "avgmax"):
            if size is None:
                avg = tokens.mean(dim=1)
            else:
                weights = size[:, start:].to(tokens.dtype)
                avg = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        if pool == "avg":
            x = avg
        elif pool == "max":
            x = tokens.amax(dim=1)
        else:
            x = 0.5 * (avg + tokens.amax(dim=1))
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


def apply_patch(
    model: VisionTransformer,
    trace_source: bool | str = False,
    prop_attn: bool = True,
    *,
    attn_backend: str = "auto",
    match_fn: MatchFn | None = None,
) -> VisionTransformer:
    """Patch a timm VisionTransformer in place for token merging; set ``model.r`` afterwards.

    ``trace_source``: True keeps ToMe's dense source map in ``model._merge_info["source"]``;
    ``"index"`` keeps an O(N) integer map in ``model._merge_info["source_index"]``.
    ``prop_attn``: add log(size) to attention keys (proportional attention).
    ``attn_backend``: see ``merge_core.attention``. ``match_fn``: replaces bipartite matching; it
    is called with keyword args (block, layer, x, attn_input, metric, r, info) and returns
    ``(merge, unmerge)`` (how projects plug in scored or penalised matching).
    Returns the model; ``remove_patch`` undoes it.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    if attn_backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
    if trace_source not in (True, False, "index"):
        raise ValueError(f"trace_source must be True, False or 'index', got {trace_source!r}")
    if getattr(model, "_merge_info", None) is not None:
        remove_patch(model)
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(
                f"model.blocks[{i}] is {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}; "
                "only timm's standard Block/Attention can be patched"
            )
    info: dict[str, Any] = {
        "r": [],
        "size": None,
        "source": None,
        "source_index": None,
        "trace_source": trace_source,
        "prop_attn": prop_attn,
        "attn_backend": attn_backend,
        "protected": int(model.num_prefix_tokens),
        "class_token": model.cls_token is not None,
        "distill_token": getattr(model, "dist_token", None) is not None,
        "match_fn": match_fn,
        "original_class": model.__class__,
    }
    model.__class__ = type(f"Merge{model.__class__.__name__}", (_MergeVisionTransformer, model.__class__), {})
    model.r = 0
    model._merge_info = info
    for i, block in enumerate(model.blocks):
        block.__class__ = MergeBlock
        block.attn.__class__ = MergeAttention
        block._merge_info = info
        block._merge_layer = i
    return model


def remove_patch(model: VisionTransformer) -> VisionTransformer:
    """Undo ``apply_patch``: restore the original classes and drop merge state."""
    info = getattr(model, "_merge_info", None)
    if info is None:
        raise ValueError("model is not patched by merge_core.patch.timm")
    model.__class__ = info["original_class"]
    for block in model.blocks:
        block.__class__ = Block
        block.attn.__class__ = Attention
        del block._merge_info, block._merge_layer
    del model._merge_info, model.r
    model.__dict__.pop("_merge_policy_decision", None)  # set by merge_core.kernels.policy
    return model
