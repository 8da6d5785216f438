"""Token merging inside the SAM3 trunk's attention, on merge-core's adapter kit (GitMerge3D style).

In every block with r > 0: after RoPE, the keys' head-mean is the matching metric; merge-core's
bipartite matching pairs tokens *within each window* (windows are the batch dimension, so every window
loses the same r and stays rectangular) or over the whole grid in the global blocks. q, k and v are
size-weighted-merged together, attention runs on the merged set with proportional attention (log size
on the keys), and the output is unmerged back onto every token before the output projection. The
residual stream never shrinks, so the trunk's output keeps its (C, 72, 72) layout.

`model.r` is a per-block list (`window_global_schedule` builds it from a window r and a global r)."""

from __future__ import annotations

import torch
from torch import nn

from merge_core import bipartite_soft_matching, merge_wavg, proportional_attention
from merge_core.adapter import MergeAdapter, MergeState, remove_patch, state_of

from .sam3_vit import Attention, SAM3ViT


class _MergedViT:
    """Root mixin: resolve the schedule once per forward (static shapes; compiles with fullgraph)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._merge_info.begin(len(self.blocks), self.r)
        return super().forward(x)


class _MergedAttention:
    """Attention mixin: merge q/k/v after RoPE, attend on the merged set, unmerge the output."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state: MergeState = self._merge_state
        layer: int = self._merge_layer
        r = state.r[layer]
        b, h, n, d = q.shape
        if r <= 0:
            if len(state.tokens) == layer:
                state.tokens.append(n)
            return super().attend(q, k, v)
        metric = k.mean(dim=1)  # (windows, n, d): the keys attention sees, RoPE included
        if state.match_fn is None:
            merge, unmerge = bipartite_soft_matching(metric, r, protected=0)
        else:
            merge, unmerge = state.match_fn(
                block=self, layer=layer, x=v, attn_input=None, metric=metric, r=r, info=state
            )
        qkv = torch.cat([q, k, v], dim=1).transpose(1, 2).reshape(b, n, 3 * h * d)
        qkv, size = merge_wavg(merge, qkv)
        m = qkv.shape[1]
        q2, k2, v2 = qkv.reshape(b, m, 3 * h, d).transpose(1, 2).split(h, dim=1)
        out = proportional_attention(q2, k2, v2, size if state.prop_attn else None, backend=state.attn_backend)
        out = unmerge(out.transpose(1, 2).reshape(b, m, h * d))
        if len(state.tokens) == layer:
            state.tokens.append(m)
        return out.reshape(b, n, h, d).transpose(1, 2)


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

    def attach(self, model: nn.Module, state: MergeState) -> None:
        self.swap(model, _MergedViT, state)
        for i, block in enumerate(model.blocks):
            attn = block.attn
            assert isinstance(attn, Attention)
            self.swap(attn, _MergedAttention, state)
            self.attach_attr(attn, "_merge_state", state, state)
            self.attach_attr(attn, "_merge_layer", i, state)


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


def apply_merging(model: SAM3ViT, window_r: int, global_r: int, prop_attn: bool = True) -> SAM3ViT:
    """Patch in place and set the schedule; `remove_merging` undoes it."""
    Sam3TrunkAdapter().apply(model, prop_attn=prop_attn)
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
