"""Token merging for STOP / CLIP4Clip, built on merge-core's adapter kit (``merge_core.adapter``).

Per frame: every frame (group) merges the same ``r`` patch tokens per layer through ``MergeState.merge_tokens`` on
(B*T, n, D), metric = keys averaged over heads, with the frame's prefix (CLS + local prompts) protected; the global
prompts are never touched. The same r in every frame keeps the (B, T, n, D) layout that STOP's deep prompting needs.
Proportional attention adds log(size) of the *keys* to the logits in both of STOP's attention calls.

Cross-frame (plain CLIP4Clip only, in the spirit of TempMe's clip merging): at the given layers ``k`` adjacent groups
are joined into one clip (their CLS tokens first, all protected) and ``ratio`` of the clip's unprotected tokens are
merged; later layers attend over the whole clip and keep merging ``r`` per layer. STOP itself cannot join frames:
its local prompts are rewritten into every frame at every layer and the frame count is fixed by the prompt tensors.

The patch swaps classes (``MergeAdapter.swap``); ``remove_tome_patch`` restores the model exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from merge_core import make_visualization, parse_r
from merge_core.adapter import MergeAdapter, MergeState, remove_patch
from merge_core.kernels.policy import resolve_r
from merge_core.merge import source_index_to_dense
from merge_core.schedule import tokens_per_layer

from .clip_model import VisionTransformer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def plan(
    schedule: list[int], tokens: int, protected: int, groups: int, cross: dict[int, int], ratio: float
) -> tuple[list[int], list[int]]:
    """Static per-layer r (join layers get ``ratio`` of the joined clip) and the tokens per group after each layer."""
    r_out, counts = list(schedule), []
    for i in range(len(schedule)):
        k = cross.get(i, 1)
        if k > 1:
            if groups % k:
                raise ValueError(f"tome_cross_frames: {groups} groups at layer {i} cannot be joined {k} at a time")
            groups, tokens, protected = groups // k, tokens * k, protected * k
            r_out[i] = int(ratio * (tokens - protected))
        tokens -= min(r_out[i], (tokens - protected) // 2)
        counts.append(tokens)
    return r_out, counts


def join_groups(k: int, p: int, x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B*C, n, X) -> (B*C/k, k*n, X): k adjacent groups joined as [all k prefixes of p tokens, then the k bodies]."""
    bc, n, c = x.shape
    x = x.view(bc // k, k, n, c)
    return torch.cat([x[:, :, :p].flatten(1, 2), x[:, :, p:].flatten(1, 2)], 1)


def join_source_index(k: int, p: int, source: torch.Tensor, n: int) -> torch.Tensor:
    """Integer source map (B*C, n0) over each group's original tokens -> (B*C/k, k*n0) for the joined groups.

    Values are re-indexed to the joined positions; original tokens are ordered like the tokens (prefixes first),
    which is the row-major patch order of the k frames stacked vertically.
    """
    bc, n0 = source.shape
    member = torch.arange(k, device=source.device).view(1, k, 1)
    s = source.view(bc // k, k, n0)
    new = torch.where(s < p, member * p + s, k * p + member * (n - p) + (s - p))
    return torch.cat([new[..., :p].flatten(1, 2), new[..., p:].flatten(1, 2)], 1)


class _MergeVisual:
    """Mixin in front of ``VisionTransformer``: resets the state per forward and plans the static schedule.

    merge-core's never-slower policy (``merge_core.kernels.policy``) picks the schedule: on a CUDA inference
    forward of a new shape it times the requested r against r = 0 once and keeps the faster
    (``model.merge_policy = "force"`` or ``MERGE_CORE_POLICY=force`` runs the requested r).
    """

    def forward(self, video: torch.Tensor, local_prompts: torch.Tensor | None = None):
        root = self.__dict__.get("_merge_root", self)
        requested = parse_r(len(self.transformer.resblocks), root.r)
        self._merge_info["resolved_r"] = resolve_r(root, video, requested, lambda: self.forward(video, local_prompts))
        return super().forward(video, local_prompts)

    def begin(self, batch: int, frames: int, tokens_per_frame: int, protected: int) -> None:
        st: MergeState = self._merge_info
        layers = len(self.transformer.resblocks)
        st.begin(layers, st["resolved_r"])
        cross = st["cross"] if st.merging else {}  # r = 0 switches every merge off, cross-frame joins included
        check_schedule(st.r, tokens_per_frame - protected, st["model_name"], min(cross) if cross else None)
        if st.merging:
            st.r, st["planned_tokens"] = plan(st.r, tokens_per_frame, protected, frames, cross, st["cross_ratio"])
        st.protected = protected
        st["groups"], st["frames"], st["batch"] = frames, frames, batch
        if st.trace_source:  # "index": integer maps (O(N)); True: ToMe's dense maps
            index = torch.arange(tokens_per_frame, device=self.conv1.weight.device).repeat(batch * frames, 1)
            if st.trace_source is True:
                st.source = source_index_to_dense(index, tokens_per_frame)
            else:
                st.source_index = index

    def groups_after(self, layer: int, groups: int) -> int:
        return self._merge_info["groups"]


class _MergeBlock:
    """Mixin in front of ``ResidualAttentionBlock``: proportional attention, then per-group merging before the MLP."""

    def forward_visual(self, x: torch.Tensor, num_global: int, groups: int) -> torch.Tensor:
        st: MergeState = self._merge_info
        layer = self._merge_layer
        if not st.merging:
            x = super().forward_visual(x, num_global, groups)  # r = 0: the original block, bit for bit
            st.tokens.append((x.shape[1] - num_global) // groups)
            return x
        b, length, d = x.shape
        g = num_global
        q, k, v = self.qkv(self.ln_1(x))
        bias = None
        size = st.attn_size()
        if size is not None:
            bias = torch.cat([size.new_zeros(b, g), size.reshape(b, -1)], 1).log()
        x = x + self.out(self.visual_attention(q, k, v, g, groups, bias))
        join = st["cross"].get(layer, 1)
        per = (length - g) // groups
        if st.r[layer] > 0 or join > 1:
            frames = x[:, g:].reshape(b * groups, per, d)
            metric = k[:, g:].reshape(b * groups, per, k.shape[2], k.shape[3]).mean(2)
            if join > 1:
                frames, metric = self._join(st, frames, metric, join, per)
            frames = st.merge_tokens(layer, frames, metric, block=self)
            x = torch.cat([x[:, :g], frames.reshape(b, -1, d)], 1)
        else:
            st.tokens.append(per)
        return self.feed_forward(x)

    @staticmethod
    def _join(st: MergeState, frames, metric, k: int, per: int):
        p = st.protected
        size = st.size if st.size is not None else frames.new_ones(frames.shape[0], per, 1)
        frames, metric, st.size = (join_groups(k, p, t, 0) for t in (frames, metric, size))
        if st.source_index is not None:
            st.source_index = join_source_index(k, p, st.source_index, per)
        if st.source is not None:  # dense map: via its integer form (every original token has exactly one row)
            index = join_source_index(k, p, st.source.argmax(dim=-2), per)
            st.source = source_index_to_dense(index, frames.shape[1]).to(st.source.dtype)
        st.protected = p * k
        st["groups"] = st["groups"] // k
        return frames, metric


def _visual(model: nn.Module) -> VisionTransformer:
    if isinstance(model, VisionTransformer):
        return model
    visual = getattr(getattr(model, "clip", model), "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"expected a stop_tome CLIP4Clip, CLIP or VisionTransformer, got {type(model).__name__}")
    return visual


class StopMergeAdapter(MergeAdapter):
    """merge-core adapter for ``stop_tome`` models; the root (``model.r``) may be CLIP4Clip, CLIP or the ViT."""

    name = "stop-tome"

    def __init__(self, cross: dict[int, int] | None = None, cross_ratio: float = 0.3) -> None:
        self.cross, self.cross_ratio = dict(cross or {}), cross_ratio

    def check(self, model: nn.Module) -> None:
        visual = _visual(model)
        if self.cross and (visual.num_global or visual.TemporalPrompt is not None):
            raise ValueError(
                "tome_cross_layers: cross-frame merging needs --temporal_prompt none (STOP's per-frame local prompts "
                "are rewritten into every frame at every layer, so frames cannot be joined)"
            )
        layers = len(visual.transformer.resblocks)
        if any(not 0 <= c < layers for c in self.cross) or any(k < 2 for k in self.cross.values()):
            raise ValueError(f"tome_cross_layers must be layer indices in [0, {layers}) joining >= 2 frames")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(_visual(model).transformer.resblocks)

    def protected_tokens(self, model: nn.Module) -> tuple[int, bool, bool]:
        return 1 + _visual(model).num_local, True, False

    def attach(self, model: nn.Module, state: MergeState) -> None:
        visual = _visual(model)
        spec = visual.spec
        state["cross"], state["cross_ratio"] = self.cross, self.cross_ratio
        state["model_name"] = f"ViT-B/{spec.vision_patch_size}" if spec.vision_width == 768 else "this ViT"
        self.swap(visual, _MergeVisual, state)
        self.attach_attr(visual, "_merge_info", state, state)
        if visual is not model:
            self.attach_attr(visual, "_merge_root", model, state)
        for i, block in enumerate(visual.transformer.resblocks):
            self.swap(block, _MergeBlock, state)
            self.attach_attr(block, "_merge_info", state, state)
            self.attach_attr(block, "_merge_layer", i, state)


def apply_tome_patch(
    model: nn.Module,
    r: int | list[int] = 0,
    trace_source: bool | str = False,
    prop_attn: bool = True,
    *,
    cross_layers: list[int] | tuple[int, ...] = (),
    cross_frames: list[int] | tuple[int, ...] = (),
    cross_ratio: float = 0.3,
) -> nn.Module:
    """Patch in place and return ``model``; ``model.r`` (ToMe's convention) can be changed afterwards.

    ``r``: tokens merged per frame per layer (int, ``(r, inflect)`` or a per-layer list, as merge-core's
    ``parse_r``). ``trace_source``: ``"index"`` (integer maps, O(N)) or ``True`` (ToMe's dense maps).
    ``cross_layers`` / ``cross_frames``: join that many groups at those layers (plain CLIP4Clip only); like every
    merge they are off while ``r`` is 0.
    """
    visual = _visual(model)
    cross_layers, cross_frames = list(cross_layers), list(cross_frames)
    if len(cross_layers) != len(cross_frames):
        raise ValueError(f"tome_cross_layers ({cross_layers}) and tome_cross_frames ({cross_frames}) differ in length")
    if cross_layers and sorted(set(cross_layers)) != cross_layers:
        raise ValueError(f"tome_cross_layers must be increasing, got {cross_layers}")
    if not 0.0 <= cross_ratio <= 0.5:
        raise ValueError(f"tome_cross_ratio must be in [0, 0.5], got {cross_ratio}")
    spec = visual.spec
    name = f"ViT-B/{spec.vision_patch_size}" if spec.vision_width == 768 else "this ViT"
    check_schedule(parse_r(spec.vision_layers, r), spec.grid**2, name, cross_layers[0] if cross_layers else None)
    adapter = StopMergeAdapter(dict(zip(cross_layers, cross_frames, strict=True)), cross_ratio)
    adapter.apply(model, trace_source, prop_attn)
    model.r = r
    return model


def remove_tome_patch(model: nn.Module) -> nn.Module:
    """Undo ``apply_tome_patch`` (merge-core's ``remove_patch``: classes back, patch attributes deleted)."""
    return remove_patch(model)


def merge_state(model: nn.Module) -> MergeState:
    """The ``MergeState`` of a patched model's visual tower (last forward: ``tokens``, ``size``, sources)."""
    state = _visual(model).__dict__.get("_merge_info")
    if not isinstance(state, MergeState):
        raise ValueError("model is not patched (apply_tome_patch or --tome_r > 0)")
    return state


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
    frames of a cross-frame clip), side by side; each panel drawn by merge-core's ``make_visualization``.
    """
    visual = _visual(model)
    st = merge_state(model)
    source = st.source_index if st.source_index is not None else st.source
    if source is None:
        raise ValueError("save_merge_visualization needs a forward with tome_trace_source on (--tome_trace_source)")
    frames = denormalize(video.reshape(-1, *video.shape[-4:])[index])
    groups = st["groups"]
    per_group = st["frames"] // groups
    panels = []
    for c in range(groups):
        img = np.concatenate(list(frames[c * per_group : (c + 1) * per_group]), axis=0)
        src = source[index * groups + c]
        panel = make_visualization(img, src, patch_size=visual.spec.vision_patch_size, num_prefix_tokens=st.protected)
        panels.append(np.asarray(panel))
    image = Image.fromarray(np.concatenate(panels, axis=1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image
