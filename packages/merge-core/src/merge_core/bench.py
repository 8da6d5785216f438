"""Small timing and cost helpers that projects import; the ``merge-bench`` CLI and suites live in merge-bench.

- ``time_calls``: the repository's one timing loop (CUDA events on GPU, ``perf_counter`` on CPU).
- ``vit_macs``: multiply-accumulates of a timm ViT for a merge schedule (FLOPs = 2 x MACs).
- ``ZeroOverheadBound`` / ``bound_forward``: timm's own blocks on the merged token counts with no matching,
  the speed a merging method would reach if matching and merging cost nothing.

Per-layer token counts have one home, ``merge_core.schedule.tokens_per_layer``; everything here uses it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .attention import proportional_attention
from .schedule import tokens_per_layer


def time_calls(fn: Callable[[], Any], device: torch.device | str, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed calls.

    CUDA: one pair of CUDA events around each call (GPU time of the call's stream, which includes the gaps
    where the GPU waits for the host, so host-bound code is timed as the user sees it); CPU: perf_counter.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(fn: Callable[[], Any], device: torch.device | str, warmup: int, iters: int) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn`` over ``iters`` timed runs after ``warmup`` runs."""
    times = time_calls(fn, device, warmup, iters)
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "runs": iters}


def num_input_tokens(model) -> int:
    """Tokens entering the first block of a timm ViT (patches plus prefix tokens that are concatenated)."""
    prefix = int(model.num_prefix_tokens)
    return model.patch_embed.num_patches + (0 if getattr(model, "no_embed_class", False) and prefix == 0 else prefix)


def vit_macs(model, schedule: Sequence[int] | None = None) -> int:
    """Multiply-accumulates per image of a timm ViT (matmuls only: patch embed, blocks, head).

    Per block with N tokens entering and N' after its merge (ToMe merges between attention and MLP):
    qkv 3ND^2, scores + weighted sum 2N^2 D, projection ND^2, MLP 2N'DH. FLOPs = 2 x MACs.
    """
    depth = len(model.blocks)
    schedule = list(schedule) if schedule is not None else [0] * depth
    if len(schedule) != depth:
        raise ValueError(f"schedule must have one r per block ({depth}), got {len(schedule)}")
    pe = model.patch_embed
    patch_area = math.prod(pe.patch_size) if isinstance(pe.patch_size, Sequence) else pe.patch_size**2
    dim = model.embed_dim
    macs = pe.num_patches * patch_area * pe.proj.in_channels * dim
    n = num_input_tokens(model)
    after = tokens_per_layer(n, schedule, protected=int(model.num_prefix_tokens))
    for block, n_after in zip(model.blocks, after, strict=True):
        attn_dim = block.attn.qkv.out_features // 3
        hidden = block.mlp.fc1.out_features
        macs += n * dim * 3 * attn_dim + 2 * n * n * attn_dim + n * attn_dim * dim
        macs += n_after * dim * hidden + n_after * block.mlp.fc2.in_features * dim
        n = n_after
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        macs += head.in_features * head.out_features
    return int(macs)


def bound_forward(model, x: torch.Tensor, r_list: Sequence[int], bias: bool = False) -> torch.Tensor:
    """timm's own blocks on the merged token counts with no matching (the zero-overhead bound).

    With ``bias`` attention carries a float key bias through SDPA, like proportional attention.
    """
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    counts = tokens_per_layer(x.shape[1], r_list, protected=int(model.num_prefix_tokens))
    for block, after in zip(model.blocks, counts, strict=True):
        h = block.norm1(x)
        if bias:
            attn = block.attn
            b, n, _ = h.shape
            qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            size = torch.ones(b, n, device=h.device, dtype=h.dtype)
            o = proportional_attention(q, k, v, size, scale=attn.scale, backend="sdpa")
            h = attn.proj(attn.norm(o.transpose(1, 2).reshape(b, n, -1)))
        else:
            h = block.attn(h)
        x = x + block.ls1(h)
        x = x[:, :after]
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    return model.forward_head(x)


class ZeroOverheadBound(torch.nn.Module):
    """A timm ViT run by ``bound_forward``: the merged model's token counts at no matching cost."""

    def __init__(self, model: torch.nn.Module, r_list: Sequence[int], bias: bool = False) -> None:
        super().__init__()
        self.model = model
        self.r_list = list(r_list)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bound_forward(self.model, x, self.r_list, self.bias)


__all__ = ["ZeroOverheadBound", "bound_forward", "measure", "num_input_tokens", "time_calls", "vit_macs"]
