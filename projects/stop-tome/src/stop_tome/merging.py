"""Token merging for STOP / CLIP4Clip on merge-core: per-frame ToMe and a cross-frame (TempMe-style) join.

Per frame: every frame (group) merges the same ``r`` patch tokens per layer with merge-core's bipartite matching,
metric = keys averaged over heads, with the frame's prefix (CLS + local prompts) protected; the global prompts are
never touched. Same r in every frame keeps the (B, T, n, D) layout that STOP's deep prompting needs.
Proportional attention adds log(size) of the *keys* to the logits in both of STOP's attention calls.

Cross-frame (plain CLIP4Clip only): at the given layers ``k`` adjacent groups are joined into one clip (their CLS
tokens first, all protected) and ``ratio`` of the clip's unprotected tokens are merged; later layers attend over the
whole clip and keep merging ``r`` per layer. STOP itself cannot join frames: its local prompts are re-written into
every frame at every layer and the frame count is fixed by the prompt tensors.

The patch swaps classes (as merge-core's timm adapter); ``remove_tome_patch`` restores the model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from merge_core import bipartite_soft_matching, make_visualization, merge_source_index, merge_wavg, parse_r
from merge_core.schedule import tokens_per_layer

from .clip_model import ResidualAttentionBlock, VisionTransformer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class MergeState:
    """Per-forward merging state of one visual tower (reset at every forward)."""

    r: list[int]
    prop_attn: bool = True
    trace_source: bool = False
    cross: dict[int, int] = field(default_factory=dict)  # layer -> number of groups joined there
    cross_ratio: float = 0.3
    size: torch.Tensor | None = None  # (B, groups, n, 1)
    source: torch.Tensor | None = None  # (B, groups, n0) integer: token of the group holding each original token
    protected: int = 1  # protected prefix per group (CLS + local prompts, times frames per group)
    groups: int = 1
    frames: int = 1
    tokens: list[int] = field(default_factory=list)  # tokens per group after each layer's merge (this forward)


def max_r(num_patches: int, num_layers: int) -> int:
    """Largest constant r whose merges fit in one frame's patches (``r * layers <= patches``)."""
    return num_patches // num_layers


def check_schedule(schedule: list[int], num_patches: int, model_name: str, first_cross: int | None = None) -> None:
    """Per-frame merges must fit in a frame's patches; otherwise a one-line error naming the limit."""
    frame_layers = schedule if first_cross is None else schedule[:first_cross]
    total = sum(frame_layers)
    if total > num_patches:
        layers = len(frame_layers)
        raise ValueError(
            f"tome_r: merging {total} tokens per frame over {layers} layers exceeds the {num_patches} patches per "
            f"frame of {model_name}; use tome_r <= {max_r(num_patches, layers)}"
        )


class ToMeBlock(ResidualAttentionBlock):
    """Visual block with proportional attention and per-group merging between attention and MLP."""

    _tome_state: MergeState
    _tome_layer: int

    def forward_visual(self, x: torch.Tensor, num_global: int, groups: int) -> torch.Tensor:
        st, layer = self._tome_state, self._tome_layer
        q, k, v = self.qkv(self.ln_1(x))
        b, length, h, hd = k.shape
        bias = None
        if st.prop_attn and st.size is not None:
            bias = torch.cat([st.size.new_zeros(b, num_global), st.size.log().flatten(1)], 1)
        x = x + self.out(self.visual_attention(q, k, v, num_global, groups, bias))
        join = st.cross.get(layer, 1)
        r = st.r[layer]
        if r > 0 or join > 1:
            x = self._merge(x, k, num_global, groups, join, r)
        else:
            st.tokens.append((length - num_global) // groups)
        return self.feed_forward(x)

    def _merge(self, x, k, g, groups, join, r):
        st = self._tome_state
        b, length, d = x.shape
        per = (length - g) // groups
        frames = x[:, g:].view(b, groups, per, d)
        metric = k[:, g:].reshape(b, groups, per, k.shape[2], k.shape[3]).mean(3)
        size = st.size if st.size is not None else frames.new_ones(b, groups, per, 1)
        source = st.source
        if join > 1:
            frames, metric, size, source = join_groups(join, st.protected, frames, metric, size, source)
            groups, per, st.protected = groups // join, per * join, st.protected * join
            st.groups = groups
            r = int(st.cross_ratio * (per - st.protected))
        merge, unmerge = bipartite_soft_matching(metric, r, protected=st.protected)
        frames, size = merge_wavg(merge, frames, size)
        if source is not None:
            source = merge_source_index(unmerge, frames, source)
        st.size, st.source = size, source
        st.tokens.append(frames.shape[2])
        return torch.cat([x[:, :g], frames.flatten(1, 2)], 1)


def join_groups(k: int, p: int, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Join ``k`` adjacent groups: (B, C, n, X) -> (B, C/k, k*n, X) as [all k prefixes, then all k bodies].

    The last tensor may be an integer source map (B, C, n0) over each group's original tokens; it is re-indexed to
    the joined positions and its original tokens are ordered the same way (prefixes first), which is the row-major
    patch order of the k frames stacked vertically.
    """
    *feats, source = tensors
    out = []
    for t in feats:
        b, c, n, x = t.shape
        t = t.view(b, c // k, k, n, x)
        out.append(torch.cat([t[:, :, :, :p].flatten(2, 3), t[:, :, :, p:].flatten(2, 3)], 2))
    if source is not None:
        b, c, n0 = source.shape
        n = feats[0].shape[2]
        member = torch.arange(k, device=source.device).view(1, 1, k, 1)
        s = source.view(b, c // k, k, n0)
        new = torch.where(s < p, member * p + s, k * p + member * (n - p) + (s - p))
        source = torch.cat([new[..., :p].flatten(2, 3), new[..., p:].flatten(2, 3)], 2)
    out.append(source)
    return out


class ToMeVisionTransformer(VisionTransformer):
    _tome_state: MergeState

    def begin(self, batch: int, frames: int, tokens_per_frame: int, protected: int) -> None:
        st = self._tome_state
        st.size, st.groups, st.protected, st.frames, st.tokens = None, frames, protected, frames, []
        st.source = None
        if st.trace_source:
            st.source = torch.arange(tokens_per_frame, device=self.conv1.weight.device).expand(batch, frames, -1)

    def groups_after(self, layer: int, groups: int) -> int:
        return self._tome_state.groups


def _visual(model: nn.Module) -> VisionTransformer:
    if isinstance(model, VisionTransformer):
        return model
    visual = getattr(getattr(model, "clip", model), "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"apply_tome_patch: expected a stop_tome CLIP4Clip, CLIP or VisionTransformer, got {type(model)}"
        )
    return visual


def apply_tome_patch(
    model: nn.Module,
    r: int | list[int] = 0,
    trace_source: bool = False,
    prop_attn: bool = True,
    *,
    cross_layers: list[int] | tuple[int, ...] = (),
    cross_frames: list[int] | tuple[int, ...] = (),
    cross_ratio: float = 0.3,
) -> nn.Module:
    """Patch the visual tower in place and return ``model``. State: ``model.clip.visual._tome_state``.

    ``r``: tokens merged per frame per layer (int, or a per-layer list as merge-core's ``parse_r``).
    ``cross_layers`` / ``cross_frames``: join that many groups at those layers (plain CLIP4Clip only).
    """
    visual = _visual(model)
    spec = visual.spec
    layers = spec.vision_layers
    schedule = parse_r(layers, r)
    cross_layers, cross_frames = list(cross_layers), list(cross_frames)
    if len(cross_layers) != len(cross_frames):
        raise ValueError(
            f"tome_cross_layers ({cross_layers}) and tome_cross_frames ({cross_frames}) need the same length"
        )
    if cross_layers:
        if visual.num_global or visual.TemporalPrompt is not None:
            raise ValueError(
                "tome_cross_layers: cross-frame merging needs --temporal_prompt none (STOP's per-frame local prompts "
                "are rewritten into every frame at every layer, so frames cannot be joined)"
            )
        if sorted(cross_layers) != cross_layers or not all(0 <= c < layers for c in cross_layers):
            raise ValueError(f"tome_cross_layers must be increasing layer indices in [0, {layers}), got {cross_layers}")
        if any(k < 2 for k in cross_frames):
            raise ValueError(f"tome_cross_frames must be >= 2 frames per join, got {cross_frames}")
        if not 0.0 <= cross_ratio <= 0.5:
            raise ValueError(f"tome_cross_ratio must be in [0, 0.5], got {cross_ratio}")
    name = f"ViT-B/{spec.vision_patch_size}" if spec.vision_width == 768 else f"ViT(width {spec.vision_width})"
    check_schedule(schedule, spec.grid**2, name, cross_layers[0] if cross_layers else None)
    if isinstance(visual, ToMeVisionTransformer):
        remove_tome_patch(visual)
    state = MergeState(
        r=schedule,
        prop_attn=prop_attn,
        trace_source=bool(trace_source),
        cross=dict(zip(cross_layers, cross_frames, strict=False)),
        cross_ratio=cross_ratio,
    )
    visual._tome_original_class = visual.__class__
    visual.__class__ = ToMeVisionTransformer
    visual._tome_state = state
    for i, block in enumerate(visual.transformer.resblocks):
        block._tome_original_class = block.__class__
        block.__class__ = ToMeBlock
        block._tome_state, block._tome_layer = state, i
    return model


def remove_tome_patch(model: nn.Module) -> nn.Module:
    """Undo ``apply_tome_patch``: original classes back, merging attributes deleted."""
    visual = _visual(model)
    for module in [visual, *visual.transformer.resblocks]:
        if hasattr(module, "_tome_original_class"):
            module.__class__ = module._tome_original_class
            for attr in ("_tome_original_class", "_tome_state", "_tome_layer"):
                if attr in module.__dict__:
                    delattr(module, attr)
    return model


def expected_tokens(tokens_per_frame: int, protected: int, schedule: list[int]) -> list[int]:
    """Tokens per frame after each layer for per-frame merging (merge-core's clamped schedule)."""
    return tokens_per_layer(tokens_per_frame, schedule, protected)


def effective_r(tokens_per_frame: int, protected: int, schedule: list[int]) -> list[int]:
    """Per-layer r actually merged: the last layers merge fewer when half of the remaining patches is less than r."""
    counts = [tokens_per_frame, *expected_tokens(tokens_per_frame, protected, schedule)]
    return [a - b for a, b in zip(counts, counts[1:], strict=False)]


def denormalize(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) CLIP-normalised -> (T, H, W, 3) floats in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (frames.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def save_merge_visualization(model: nn.Module, video: torch.Tensor, path: str | Path, index: int = 0) -> Image.Image:
    """Picture of the merged groups of the last forward for video ``index`` (needs ``tome_trace_source``).

    ``video``: the (B, T, 3, H, W) input of that forward. One panel per group (a frame, or the vertically stacked
    frames of a cross-frame clip), panels side by side; drawn by merge-core's ``make_visualization``.
    """
    visual = _visual(model)
    st = getattr(visual, "_tome_state", None)
    if st is None or st.source is None:
        raise ValueError("save_merge_visualization needs a forward with tome_trace_source on (--tome_trace_source)")
    frames = denormalize(video.reshape(-1, *video.shape[-4:])[index])
    groups = st.source.shape[1]
    per_group = st.frames // groups
    panels = []
    for c in range(groups):
        img = np.concatenate(list(frames[c * per_group : (c + 1) * per_group]), axis=0)
        panels.append(
            np.asarray(
                make_visualization(
                    img, st.source[index, c], patch_size=visual.spec.vision_patch_size, num_prefix_tokens=st.protected
                )
            )
        )
    image = Image.fromarray(np.concatenate(panels, axis=1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image
