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
output before its residual add: the qkv projection is the only per-token cost left, but every block pays a
matching, a merge and two unmerges on the reference path.

mode="span" (ours, the fast one) keeps tokens merged across a whole run of consecutive windowed blocks (SAM3:
blocks 0-6, 8-14, 16-22, 24-30 share one window partition). The run's first block computes q/k/v on every
token, matches on the head-mean key after RoPE per window (merge-core), and merges the residual stream, q, k, v
and the RoPE tables together; attention (proportional), projection and MLP of every block in the run then run
on the merged set, the later blocks' qkv included. A merged token's RoPE is the size-weighted mean of its
members' rotations (rotation is linear in (cos, sin), so this is the mean of the rotated members when they
agree). At the run's end each token gets its own pre-merge residual plus the change its merged token went
through (x_i + unmerge(x_m - x_m0)), so what merging averaged away before the run is not lost. Global blocks
run exactly (global r = 0) or as a run of one block merged over the whole grid. It runs on the trunk's fast
layout (window-major tokens, compute-dtype RoPE tables): static shapes, fullgraph compile.

An optional progressive schedule (`span_schedule`, TEACHER.MERGE_SPAN_SCHEDULE: r per block of a windowed run,
e.g. [288, 144]) merges again at later blocks of each run: block k matches the already-merged tokens on its own
post-RoPE keys (merge-core, equal r per window) and size-weighted-merges the residual stream, q/k/v, the RoPE
tables and the sizes once more. The exit composes the steps' unmerge maps from the last to the first:
y <- pre_k + unmerge_k(y - merged_k), where pre_k are the tokens step k merged and merged_k what it made of them,
so every token of every level keeps its own residual plus its merged token's change. The schedule's first entry
is the run's r (`model.r`); the rest apply in every windowed run that merges. Absent: one merge per run."""

from __future__ import annotations

import torch
from torch import nn

from merge_core import bipartite_soft_matching, merge_wavg, proportional_attention
from merge_core.adapter import MergeAdapter, MergeState, remove_patch, state_of

from .sam3_vit import (
    Attention,
    Block,
    SAM3ViT,
    fast_layout_ok,
    from_window_major,
    rotate_fast,
    to_window_major,
    window_partition,
    window_unpartition,
)

MODES = ("attn", "block", "span")


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
    return _match_metric(attn, state, layer, k.mean(dim=1), v, r)


def _match_metric(attn: Attention, state: MergeState, layer: int, metric: torch.Tensor, v: torch.Tensor, r: int):
    """merge-core's bipartite matching (or the state's custom matcher) on `metric` (windows, N, d)."""
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


class _SpanViT:
    """Root mixin for mode="span": the fast layout with runs of windowed blocks on merged tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: MergeState = self._merge_info
        state.begin(len(self.blocks), self.r)
        if not state.merging:
            return super().forward(x)  # r = 0: the unpatched forward, bit for bit
        ws = self.cfg.window_size
        x = self.patch_embed(x)
        h, w = x.shape[1], x.shape[2]
        x = self.ln_pre(x + self.abs_pos(h, w))
        t = span_tokens(self, to_window_major(x, ws), (h // ws) * (w // ws), state)
        return from_window_major(t, ws, h, w)


def block_runs(model: SAM3ViT) -> list[tuple[int, int]]:
    """[start, stop) of each run of consecutive windowed blocks; a global block is a run of its own."""
    runs: list[tuple[int, int]] = []
    for i, blk in enumerate(model.blocks):
        prev = runs[-1] if runs else None
        if prev and blk.window_size and model.blocks[prev[0]].window_size and prev[1] == i:
            runs[-1] = (prev[0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def span_tokens(model: SAM3ViT, t: torch.Tensor, windows: int, state: MergeState) -> torch.Tensor:
    """All blocks over window-major tokens (B, N, C): runs with r > 0 merged, the others exact."""
    tail = state.extra.get("span_schedule", ())[1:]
    for start, stop in block_runs(model):
        blocks = list(model.blocks[start:stop])
        r = state.r[start]
        if any(state.r[i] != r for i in range(start, stop)):
            raise ValueError(
                f"model.r: span mode takes one r per run of windowed blocks (later merges: "
                f"TEACHER.MERGE_SPAN_SCHEDULE); blocks {start}-{stop - 1} need one r, got {state.r[start:stop]}"
            )
        groups = windows if blocks[0].window_size else 1
        if r <= 0:
            for blk in blocks:
                t = blk.forward_tokens(t, windows)
                state.tokens.append(t.shape[1] // groups)
        else:
            steps = (r, *tail) if blocks[0].window_size else (r,)
            if len(steps) > len(blocks):
                raise ValueError(
                    f"TEACHER.MERGE_SPAN_SCHEDULE: {len(steps)} steps, longer than the run of blocks "
                    f"{start}-{stop - 1} ({len(blocks)} blocks)"
                )
            t = _merged_run(blocks, start, t, groups, steps, state)
    return t


def _attend_merged(attn: Attention, q, k, v, size: torch.Tensor, state: MergeState) -> torch.Tensor:
    """Proportional attention over merged (bw, m, C) q/k/v, then the output projection."""
    bw, m, c = q.shape
    q, k, v = (z.reshape(bw, m, attn.num_heads, attn.head_dim).transpose(1, 2) for z in (q, k, v))
    out = proportional_attention(q, k, v, size if state.prop_attn else None, backend=state.attn_backend)
    return attn.proj(out.transpose(1, 2).reshape(bw, m, c))


def _merged_run(
    blocks: list[Block], layer: int, t: torch.Tensor, groups: int, steps: tuple[int, ...], state: MergeState
) -> torch.Tensor:
    """One run of blocks on tokens merged per group (window, or the whole grid), merging `steps[k]` more tokens
    per group at the run's k-th block: see the module docstring."""
    b, n, c = t.shape
    x = t.reshape(b * groups, n // groups, c)
    bw, m = x.shape[0], x.shape[1]
    first = blocks[0]
    heads, d = first.attn.num_heads, first.attn.head_dim
    cos, sin = first.attn.rope_cos.view(m, 1, 1, d), first.attn.rope_sin.view(m, 1, 1, d)
    tables = torch.cat([first.attn.rope_cos, first.attn.rope_sin], dim=-1).to(x.dtype).expand(bw, m, 2 * d)
    size = None
    undo: list[tuple] = []  # per step: (tokens it merged, what it made of them, its unmerge)
    for i, blk in enumerate(blocks):
        attn = blk.attn
        mm = x.shape[1]
        qkv = attn.qkv(blk.norm1(x)).view(bw, mm, 3, heads, d)
        qk = rotate_fast(qkv[:, :, :2], cos, sin)  # (bw, mm, 2, heads, d)
        v = qkv[:, :, 2].reshape(bw, mm, c)
        r = steps[i] if i < len(steps) else 0
        if r > 0:
            merge, unmerge = _match_metric(attn, state, layer + i, qk[:, :, 1].mean(dim=2), v, r)
            merged, size = merge_wavg(merge, torch.cat([x, qk.reshape(bw, mm, 2 * c), v, tables], dim=-1), size)
            x0, q, k, v, cos_m, sin_m = merged.split([c, c, c, c, d, d], dim=-1)
            undo.append((x, x0, unmerge))
            mm = x0.shape[1]
            tables = torch.cat([cos_m, sin_m], dim=-1)
            cos, sin = cos_m.reshape(bw, mm, 1, 1, d), sin_m.reshape(bw, mm, 1, 1, d)
            x = x0
        else:
            q, k = qk[:, :, 0].reshape(bw, mm, c), qk[:, :, 1].reshape(bw, mm, c)
        x = x + _attend_merged(attn, q, k, v, size, state)
        x = x + blk.mlp(blk.norm2(x))
        state.tokens.append(mm)
    for pre, x0, unmerge in reversed(undo):  # each level keeps its own pre-merge residual
        x = pre + unmerge(x - x0)
    return x.reshape(b, n, c)


class Sam3TrunkAdapter(MergeAdapter):
    """merge-core adapter for `SAM3ViT` (no class token: nothing is protected)."""

    name = "sam3_trunk"

    def check(self, model: nn.Module) -> None:
        if not isinstance(model, SAM3ViT):
            raise TypeError(f"Sam3TrunkAdapter patches SAM3ViT, got {type(model).__name__}")
        if self.mode == "span" and not fast_layout_ok(model.cfg):
            cfg = model.cfg
            raise ValueError(
                f"TEACHER.MERGE_MODE: span needs windows tiling the grid, got grid {cfg.grid}, window {cfg.window_size}"
            )

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
        if self.mode == "span":  # the root runs the blocks itself; blocks keep their classes
            self.swap(model, _SpanViT, state)
            return
        self.swap(model, _MergedViT, state)
        for i, block in enumerate(model.blocks):
            assert isinstance(block, Block) and isinstance(block.attn, Attention)
            for module, mixin in ((block, _MergedBlock), (block.attn, _MergedAttention)):
                self.swap(module, mixin, state)
                self.attach_attr(module, "_merge_state", state, state)
                self.attach_attr(module, "_merge_layer", i, state)


def window_global_schedule(model: SAM3ViT, window_r: int, global_r: int) -> list[int]:
    """Per-block r: `window_r` tokens per window in windowed blocks, `global_r` in the global blocks."""
    for name, r in (("MERGE_R", window_r), ("MERGE_GLOBAL_R", global_r)):
        if isinstance(r, bool) or not isinstance(r, int):
            raise ValueError(f"TEACHER.{name}: expected an int >= 0, got {r!r}")
    if window_r < 0 or global_r < 0:
        raise ValueError(f"TEACHER.MERGE_R / MERGE_GLOBAL_R: expected >= 0, got {window_r}, {global_r}")
    return [global_r if blk.window_size == 0 else window_r for blk in model.blocks]


def check_span_schedule(model: SAM3ViT, schedule) -> tuple[int, ...]:
    """The progressive schedule as a tuple of ints, each step at most half the tokens left in a window (the
    bipartite maximum), no longer than the shortest windowed run; trailing zeros dropped (all-zero: ())."""
    name = "TEACHER.MERGE_SPAN_SCHEDULE"
    if not isinstance(schedule, (list, tuple)) or any(isinstance(r, bool) or not isinstance(r, int) for r in schedule):
        raise ValueError(f"{name}: expected a list of ints >= 0 (r per block of a windowed run), got {schedule!r}")
    steps = tuple(schedule)
    if any(r < 0 for r in steps):
        raise ValueError(f"{name}: expected ints >= 0, got {list(steps)}")
    while steps and not steps[-1]:  # trailing zeros merge nothing: [288, 0] is [288]
        steps = steps[:-1]
    if not steps:
        return ()
    if steps[0] <= 0:
        raise ValueError(
            f"{name}: the first entry is the merge at each run's first block, expected > 0, got {list(steps)}"
        )
    ws = model.cfg.window_size
    runs = [stop - start for start, stop in block_runs(model) if model.blocks[start].window_size]
    if not ws or not runs:
        raise ValueError(f"{name}: the trunk has no windowed blocks to merge progressively")
    if len(steps) > min(runs):
        raise ValueError(f"{name}: {len(steps)} steps, longer than the shortest run of windowed blocks ({min(runs)})")
    n = ws * ws
    for k, r in enumerate(steps):
        if r > n // 2:
            raise ValueError(
                f"{name}: step {k} merges {r} of the {n} tokens left per window, at most half ({n // 2}), "
                f"got {list(steps)}"
            )
        n -= r
    return steps


def attended_tokens(model: SAM3ViT, schedule: list[int], span_schedule=()) -> list[int]:
    """Tokens each block's attention runs on (per window in windowed blocks), ToMe's half clamp applied; with
    a progressive `span_schedule` (span mode) its later steps merge again at the later blocks of windowed runs."""
    out = []
    for blk, r in zip(model.blocks, schedule, strict=True):
        n = (blk.window_size or model.cfg.grid) ** 2
        out.append(n - min(r, n // 2))
    tail = tuple(span_schedule)[1:]
    for start, stop in block_runs(model) if tail else ():
        if model.blocks[start].window_size and schedule[start] > 0:
            n = out[start]
            for i, r in enumerate(tail[: stop - start - 1], start=start + 1):
                n -= min(r, n // 2)
                out[i:stop] = [n] * (stop - i)
    return out


def apply_merging(
    model: SAM3ViT,
    window_r: int,
    global_r: int,
    prop_attn: bool = True,
    mode: str = "attn",
    span_schedule=None,
) -> SAM3ViT:
    """Patch in place and set the schedule; `remove_merging` undoes it. `span_schedule` (mode "span"): r per block
    of each windowed run, its first entry the window r (`window_r` must be 0 or equal to it)."""
    steps = check_span_schedule(model, span_schedule) if span_schedule is not None else ()
    if steps:
        if mode != "span":
            raise ValueError(f"TEACHER.MERGE_SPAN_SCHEDULE: needs TEACHER.MERGE_MODE span, got {mode!r}")
        if window_r not in (0, steps[0]):
            raise ValueError(
                f"TEACHER.MERGE_R: the span schedule's first entry is the window r ({steps[0]}); "
                f"expected 0 or {steps[0]}, got {window_r!r}"
            )
        window_r = steps[0]
    Sam3TrunkAdapter(mode).apply(model, prop_attn=prop_attn)
    model.r = window_global_schedule(model, window_r, global_r)
    state_of(model).extra["span_schedule"] = steps
    return model


def remove_merging(model: SAM3ViT) -> SAM3ViT:
    return remove_patch(model)


__all__ = [
    "Sam3TrunkAdapter",
    "apply_merging",
    "attended_tokens",
    "block_runs",
    "check_span_schedule",
    "remove_merging",
    "span_tokens",
    "state_of",
    "window_global_schedule",
]
