"""Hugging Face transformers adapter: ViT, DINOv2, CLIP vision and SigLIP vision encoders (transformers >= 5).

``merge_core.patch.hf(model)`` on ``ViTModel``, ``ViTForImageClassification``, ``Dinov2Model`` (also with
registers, which stay protected like the class token),
``CLIPVisionModel(WithProjection)``, ``CLIPModel`` (its vision tower), ``SiglipVisionModel``, ``SiglipModel``
(vision tower) or the bare vision transformers; then ``model.r = ...``. Every encoder layer merges between
attention and MLP; at r=0 the layers run transformers' own forward with no adapter frame inside (the adapter
kit's zero-cost path, ``MergeState.run_plain``), bit-exact. Outputs keep their types;
``last_hidden_state`` (and ``hidden_states``) hold the merged tokens (N' instead of N). The SigLIP
attention-pool head weights merged tokens by size; CLS pooling needs nothing. Heads that average patch
tokens without sizes (``Dinov2ForImageClassification``, ``SiglipForImageClassification``) are rejected.
``attention_mask`` and ``output_attentions=True`` with r > 0 are rejected (image encoders do not use masks; the
merging path computes attention without materialising maps); ``output_hidden_states`` works (merged lengths).

transformers is not imported here: classes are recognised by name, so ``import merge_core`` never needs it.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from torch import nn

from ..adapter import MatchFn, MergeAdapter, MergeState, size_bias
from ..attention import proportional_attention

# the top-level classes accepted; the vision tower (the module running embeddings + encoder) is the
# first of these children that exists, else the model itself (transformers 5 flattened CLIPVisionModel)
ROOTS = (
    "ViTModel",
    "ViTForImageClassification",
    "Dinov2Model",
    "Dinov2WithRegistersModel",
    "CLIPVisionTransformer",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel",
    "SiglipVisionTransformer",
    "SiglipVisionModel",
    "SiglipModel",
)
TOWERS = ("vision_model", "vit")
REJECTED = {
    "Dinov2ForImageClassification": "averages patch tokens without sizes; patch model.dinov2 and pool with "
    "merge_core.adapter.weighted_mean",
    "Dinov2WithRegistersForImageClassification": "averages patch tokens without sizes; patch "
    "model.dinov2_with_registers and pool with merge_core.adapter.weighted_mean",
    "SiglipForImageClassification": "averages tokens without sizes; patch model.vision_model instead",
    "ViTForMaskedImageModeling": "reconstructs every patch, which needs the unmerged token grid",
}
PROTECTED = {
    "ViTLayer": 1,
    "Dinov2Layer": 1,
    "Dinov2WithRegistersLayer": 1,
    "CLIPEncoderLayer": 1,
    "SiglipEncoderLayer": 0,
}


def _class_name(module: nn.Module, names) -> str | None:
    for cls in type(module).__mro__:
        if cls.__name__ in names and cls.__module__.startswith("transformers."):
            return cls.__name__
    return None


def hf_attention(
    attn: nn.Module, h: torch.Tensor, size: torch.Tensor | None, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers q/k/v/o attention module with proportional attention; returns (output, mean key)."""
    b, n, _ = h.shape
    d = attn.head_dim
    q = attn.q_proj(h).view(b, n, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(b, n, -1, d).transpose(1, 2)
    v = attn.v_proj(h).view(b, n, -1, d).transpose(1, 2)
    scale = attn.scaling if hasattr(attn, "scaling") else attn.scale
    p = getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0))
    out = proportional_attention(q, k, v, size, scale=scale, dropout_p=p if attn.training else 0.0, backend=backend)
    proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    return proj(out.transpose(1, 2).reshape(b, n, -1)), k.mean(1)


def _vit_layer(layer: nn.Module, x: torch.Tensor, state: MergeState, i: int) -> torch.Tensor:
    h = layer.layernorm_before(x)
    a, metric = hf_attention(layer.attention, h, state.attn_size(), state.attn_backend)
    x = layer.dropout(a) + x
    x = state.merge_tokens(i, x, metric, block=layer, attn_input=h)
    return layer.dropout(layer.mlp(layer.layernorm_after(x))) + x


def _dinov2_layer(layer: nn.Module, x: torch.Tensor, state: MergeState, i: int) -> torch.Tensor:
    h = layer.norm1(x)
    a, metric = hf_attention(layer.attention, h, state.attn_size(), state.attn_backend)
    x = layer.drop_path(layer.layer_scale1(a)) + x
    x = state.merge_tokens(i, x, metric, block=layer, attn_input=h)
    return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))) + x


def _clip_layer(layer: nn.Module, x: torch.Tensor, state: MergeState, i: int) -> torch.Tensor:
    h = layer.layer_norm1(x)
    a, metric = hf_attention(layer.self_attn, h, state.attn_size(), state.attn_backend)
    x = x + a
    x = state.merge_tokens(i, x, metric, block=layer, attn_input=h)
    return x + layer.mlp(layer.layer_norm2(x))


LAYERS: dict[str, Callable[[nn.Module, torch.Tensor, MergeState, int], torch.Tensor]] = {
    "ViTLayer": _vit_layer,
    "Dinov2Layer": _dinov2_layer,
    "Dinov2WithRegistersLayer": _dinov2_layer,
    "CLIPEncoderLayer": _clip_layer,
    "SiglipEncoderLayer": _clip_layer,
}


def _attentions_requested(layer: nn.Module, kwargs: dict) -> bool:
    """Whether this forward records attention maps (the merging path computes attention without them)."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    if kwargs.get("output_attentions"):
        return True
    try:
        active = collector.get() if collector is not None else None
    except Exception:  # pragma: no cover - transformers internals differ
        return False
    return isinstance(active, dict) and "attentions" in active


class _MergeLayer:
    """An encoder layer that merges; at r=0 it is transformers' own forward."""

    _merge_info: MergeState
    _merge_layer: int
    _merge_kind: str

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        state, layer = self._merge_info, self._merge_layer
        if not state.merging:
            out = super().forward(hidden_states, attention_mask, *args, **kwargs)
            state.tokens.append(out.shape[-2])
            return out
        if attention_mask is not None and state.extra.get("user_attention_mask", True):
            raise ValueError("attention_mask cannot be combined with token merging (model.r > 0) in the HF adapter")
        # else: transformers built an all-visible mask itself (some versions do under tracing); dropping it is exact
        if _attentions_requested(self, kwargs):
            raise ValueError("output_attentions=True cannot be combined with token merging (model.r > 0)")
        stash = state.enter_layer(layer)
        x = LAYERS[self._merge_kind](self, hidden_states, state, layer)
        state.exit_layer(stash)
        return x


class _MergeTower:
    """The vision tower: resets the merge state at every forward (``r`` is read from the patched model)."""

    def forward(self, *args, **kwargs):
        owner, state, depth = self.__dict__["_merge_owner"], self._merge_info, self._merge_num_layers
        if not any(state.schedule(depth, owner.r)):  # the zero-cost path: transformers' own layers
            state.begin(depth, owner.r)
            out = state.run_plain(super().forward, *args, **kwargs)
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is None and isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
                hidden = out[0]
            if hidden is not None:
                state.fill_tokens(depth, hidden.shape[-2])
            return out
        flag = "is_activation_checkpointing" if hasattr(type(owner), "is_activation_checkpointing") else None
        flag = flag or "is_gradient_checkpointing"
        checkpointing = torch.is_grad_enabled() and bool(getattr(owner, flag, False))
        state.begin(depth, owner.r, checkpointing=checkpointing)
        pos = self._merge_mask_pos
        user_mask = kwargs.get("attention_mask") is not None or (0 <= pos < len(args) and args[pos] is not None)
        state.extra["user_attention_mask"] = user_mask
        return super().forward(*args, **kwargs)


class _MergeSiglipHead:
    """SigLIP's attention-pool head with log(size) on its keys, so merged tokens weigh as many patches."""

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        size = self._merge_info.size
        if size is None or size.shape[:2] != hidden_state.shape[:2]:
            return super().forward(hidden_state)
        batch, n = hidden_state.shape[:2]
        heads = self.attention.num_heads
        bias = size_bias(size, hidden_state.dtype).expand(batch, heads, 1, n).reshape(batch * heads, 1, n)
        probe = self.probe.repeat(batch, 1, 1)
        x = self.attention(probe, hidden_state, hidden_state, attn_mask=bias, need_weights=False)[0]
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


def _positional_index(fn: Callable, name: str) -> int:
    """Index of ``name`` among ``fn``'s positional arguments after ``self`` (-1 if none); read at patch time."""
    params = [
        p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    names = [p.name for p in params[1:]]
    return names.index(name) if name in names else -1


def _keep_output_capture(new: type, original: type) -> None:
    """transformers 5 finds what ``output_hidden_states`` may record by the model's class name; register ours too.

    Without it a patched model silently returns ``hidden_states=None``. transformers is already loaded here
    (the model is one of its classes), so this only looks the module up.
    """
    capturing = sys.modules.get("transformers.utils.output_capturing")
    registry = getattr(capturing, "_CAN_RECORD_REGISTRY", None)
    if isinstance(registry, dict):
        entry = dict.get(registry, str(original))
        if entry:
            dict.__setitem__(registry, str(new), entry)


class HFAdapter(MergeAdapter):
    name = "hf"

    @staticmethod
    def tower(model: nn.Module) -> nn.Module:
        for name in TOWERS:
            child = getattr(model, name, None)
            if isinstance(child, nn.Module):
                return child
        return model

    def check(self, model: nn.Module) -> None:
        rejected = _class_name(model, REJECTED)
        if rejected is not None:
            raise TypeError(f"{rejected} is not supported: it {REJECTED[rejected]}")
        if _class_name(model, ROOTS) is None:
            raise TypeError(
                f"model must be one of the Hugging Face vision encoders {sorted(ROOTS)}, got {type(model).__name__}"
            )
        if not self.layers(model):
            raise TypeError(f"no supported encoder layers ({sorted(LAYERS)}) found in {type(model).__name__}")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in self.tower(model).modules() if _class_name(m, LAYERS) is not None]

    def protected_tokens(self, model: nn.Module) -> tuple[int, bool, bool]:
        protected = PROTECTED[_class_name(self.layers(model)[0], LAYERS)]
        has_cls = protected == 1
        protected += int(getattr(getattr(self.tower(model), "config", None), "num_register_tokens", 0) or 0)
        return protected, has_cls, False

    def attach(self, model: nn.Module, state: MergeState) -> None:
        tower = self.tower(model)
        layers = self.layers(model)
        original = type(tower)
        self.swap(tower, _MergeTower, state)
        _keep_output_capture(type(tower), original)
        self.attach_attr(tower, "_merge_owner", model, state)
        self.attach_attr(tower, "_merge_num_layers", len(layers), state)
        self.attach_attr(tower, "_merge_mask_pos", _positional_index(original.forward, "attention_mask"), state)
        self.attach_attr(tower, "_merge_info", state, state)
        for i, layer in enumerate(layers):
            kind = _class_name(layer, LAYERS)
            self.swap(layer, _MergeLayer, state, steps_out=True)
            self.attach_attr(layer, "_merge_info", state, state)
            self.attach_attr(layer, "_merge_layer", i, state)
            self.attach_attr(layer, "_merge_kind", kind, state)
        head = getattr(tower, "head", None)
        if head is not None and _class_name(head, {"SiglipMultiheadAttentionPoolingHead"}):
            self.swap(head, _MergeSiglipHead, state)
            self.attach_attr(head, "_merge_info", state, state)


ADAPTER = HFAdapter()


def apply_patch(
    model: nn.Module,
    trace_source: bool | str = False,
    prop_attn: bool = True,
    *,
    attn_backend: str = "auto",
    match_fn: MatchFn | None = None,
) -> nn.Module:
    """Patch a Hugging Face ViT / DINOv2 / CLIP-vision / SigLIP-vision model in place; set ``model.r`` afterwards."""
    return ADAPTER.apply(model, trace_source, prop_attn, attn_backend=attn_backend, match_fn=match_fn)
