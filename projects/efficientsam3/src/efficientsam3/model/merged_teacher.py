"""Token merging inside the SAM3 trunk's attention, on merge-core's adapter kit (GitMerge3D style).

In every block with r > 0: after RoPE, the keys' head-mean is the matching metric; merge-core's
bipartite matching pairs tokens *within each window* (windows are the batch dimension, so every window
loses the same r and stays rectangular) or over the whole grid in the global blocks. q, k and v are
size-weighted-merged together, attention runs on the merged set with proportional attention (log size
on the keys), and the output is unmerged back onto every token before the output projection. The
residual stream never shrinks, so the trunk's output keeps its (C, 72, 72) layout.

`model.r` is a per-block list (`window_global_schedule` builds it from a window r and a global r).

mode="attn" (default, the issue's design) saves only attention: ~14.5% of the trunk's FLOPs at 1008 px
(window blocks 8%, global blocks 43%), so it cannot exceed ~1.17x. mode="block" (ToMeSD-style, ours) also
runs the output projection and the MLP on the merged set of the same matching and unmerges each sub-layer's
output before its residual add: the qkv projection is the only per-token cost left."""

from __future__ import annotations

import torch
from torch import nn

from merge_core import bipartite_soft_matching, merge_wavg, proportional_attention
from merge_core.adapter import MergeAdapter, MergeState, remove_patch, state_of

from .sam3_vit import Attention, Block, SAM3ViT, window_partition, window_unpartition

MODES = ("attn", "block")


class _MergedViT:
    """Root mixin: resolve the schedule once per forward (static shapes; compiles with fullgraph)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._merge_info.begin(len(self.blocks), self.r)
        return super().forward(x)


class _MergedAttention:
    """Attention mixin: merge q/k/v after RoPE, attend on the merged set, unmerge the output."""

    fast_ok = False  # the merged trunk runs SAM3ViT's reference path (its hooks live there)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state: MergeState = self._merge_state
        layer: int = self._merge_layer
        r = state.r[layer]
        b, h, n, d = q.shape
        if r <= 0:
            if len(state.tokens) == layer:
                state.tokens.append(n)
            return super().attend(q, k, v)
        merge, unmerge = _match(self, state, layer, k, v, r)  # keys as attention sees them, RoPE included
        qkv = torch.cat([q, k, v], dim=1).transpose(1, 2).reshape(b, n, 3 * h * d)
        qkv, size = merge_wavg(merge, qkv)
        m = qkv.shape[1]
        q2, k2, v2 = qkv.reshape(b, m, 3 * h, d).transpose(1, 2).split(h, dim=1)
        out = proportional_attention(q2, k2, v2, size if state.prop_attn else None, backend=state.attn_backend)
        out = unmerge(out.transpose(1, 2).reshape(b, m, h * d))
        if len(state.tokens) == layer:
            state.tokens.append(m)
        return out.reshape(b, n, h, d).transpose(1, 2)


def _match(attn: Attention, state: MergeState, layer: int, k: torch.Tensor, v: torch.Tensor, r: int):
    metric = k.mean(dim=1)
    if state.match_fn is None:
        return bipartite_soft_matching(metric, r, protected=0)
    return state.match_fn(block=attn, layer=layer, x=v, attn_input=None, metric=metric, r=r, info=state)


class _MergedBlock:
    """Block mixin for mode="block": attention, projection and MLP on the merged tokens of each window."""

    fast_ok = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: MergeState = self._merge_state
        layer: int = self._merge_layer
        r = state.r[layer]
        if r <= 0 or state.extra.get("mode", "attn") != "block":
            return super().forward(x)
        hw = (x.shape[1], x.shape[2])
        ws = self.window_size

        def split(t: torch.Tensor):
            return window_partition(t, ws) if ws else (t, hw)

        def join(t: torch.Tensor, padded) -> torch.Tensor:
            return window_unpartition(t, ws, padded, hw) if ws else t

        y, padded = split(self.norm1(x))
        b, h, w, c = y.shape
        attn = self.attn
        q, k, v = attn.qkv_rope(y)
        merge, unmerge = _match(attn, state, layer, k, v, r)
        heads, d = q.shape[1], q.shape[3]
        qkv, size = merge_wavg(merge, torch.cat([q, k, v], dim=1).transpose(1, 2).reshape(b, h * w, 3 * c))
        m = qkv.shape[1]
        q2, k2, v2 = qkv.reshape(b, m, 3 * heads, d).transpose(1, 2).split(heads, dim=1)
        out = proportional_attention(q2, k2, v2, size if state.prop_attn else None, backend=state.attn_backend)
        out = attn.proj(out.transpose(1, 2).reshape(b, m, c))
        x = x + join(unmerge(out).reshape(b, h, w, c), padded)
        z, padded = split(self.norm2(x))
        z = self.mlp(merge(z.reshape(b, h * w, c), mode="mean"))
        if len(state.tokens) == layer:
            state.tokens.append(m)
        return x + join(unmerge(z).reshape(b, h, w, c), padded)


class Sam3TrunkAdapter(MergeAdapter):
    """merge-core adapter for `SAM3ViT` (no class token: nothing is protected)."""

    name = "sam3_trunk"

    def check(self, model: nn.Module) -> None:
        if not isinstance(model, SAM3ViT):
            raise TypeError(f"Sam3TrunkAdapter patches SAM3ViT, got {type(model).__name__}")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def protected_tokens(self, model: nn.Module) -> tuple[int, bool, bool]:
        return 0, False, False

    def __init__(self, mode: str = "attn") -> None:
        if mode not in MODES:
            raise ValueError(f"TEACHER.MERGE_MODE: expected one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode

    def attach(self, model: nn.Module, state: MergeState) -> None:
        state.extra["mode"] = self.mode
        self.swap(model, _MergedViT, state)
        for i, block in enumerate(model.blocks):
            assert isinstance(block, Block) and isinstance(block.attn, Attention)
            for module, mixin in ((block, _MergedBlock), (block.attn, _MergedAttention)):
                self.swap(module, mixin, state)
                self.attach_attr(module, "_merge_state", state, state)
                self.attach_attr(module, "_merge_layer", i, state)


def window_global_schedule(model: SAM3ViT, window_r: int, global_r: int) -> list[int]:
    """Per-block r: `window_r` tokens per window in windowed blocks, `global_r` in the global blocks."""
    if window_r < 0 or global_r < 0:
        raise ValueError(f"TEACHER.MERGE_R / MERGE_GLOBAL_R: expected >= 0, got {window_r}, {global_r}")
    return [global_r if blk.window_size == 0 else window_r for blk in model.blocks]


def attended_tokens(model: SAM3ViT, schedule: list[int]) -> list[int]:
    """Tokens each block's attention runs on (per window in windowed blocks), ToMe's half clamp applied."""
    out = []
    for blk, r in zip(model.blocks, schedule, strict=True):
        n = (blk.window_size or model.cfg.grid) ** 2
        out.append(n - min(r, n // 2))
    return out


def apply_merging(model: SAM3ViT, window_r: int, global_r: int, prop_attn: bool = True, mode: str = "attn") -> SAM3ViT:
    """Patch in place and set the schedule; `remove_merging` undoes it."""
    Sam3TrunkAdapter(mode).apply(model, prop_attn=prop_attn)
    model.r = window_global_schedule(model, window_r, global_r)
    return model


def remove_merging(model: SAM3ViT) -> SAM3ViT:
    return remove_patch(model)


__all__ = [
    "Sam3TrunkAdapter",
    "apply_merging",
    "attended_tokens",
    "remove_merging",
    "state_of",
    "window_global_schedule",
]
