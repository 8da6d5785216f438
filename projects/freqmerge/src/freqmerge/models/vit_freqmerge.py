"""ViT-Small (timm) with FreqMerge injected through merge-core's timm adapter.

``build_model(cfg)`` creates the timm backbone (hub weights when reachable, ``cfg.pretrained_path`` for a
local timm checkpoint, otherwise random init with a warning) and, unless ``cfg.freqmerge`` is False,
patches it with ``merge_core.patch.timm(match_fn=FreqMergeMatcher(...))`` and a keep-rate schedule:
196 spatial tokens at KEEP_RATE 0.7 on layers [4, 6, 8, 10] give 197 -> 138 -> 97 -> 68 -> 48 tokens
(class token included; kept counts round half up). The merge happens inside the block, between
attention and MLP (ToMe's placement). ``--no_freqmerge`` returns the plain, unpatched timm model.
"""

from __future__ import annotations

import os
import socket
import warnings
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from merge_core.patch import timm as patch_timm
from merge_core.schedule import keep_rate_schedule, tokens_per_layer

from .freq_merge import FreqMergeMatcher


class PretrainedWeightsError(Exception):
    """``--pretrained_path`` cannot be used (missing, unreadable, not a state dict); one-line message."""


class PretrainedWeightsWarning(UserWarning):
    """Raised (as a warning) when the backbone falls back to random initialisation."""


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f"argument --pretrained_path: {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PretrainedWeightsError(f"argument --pretrained_path: cannot read {path!r}: {first[:200]}") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"argument --pretrained_path: {path!r} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained_file(model: VisionTransformer, path: str) -> list[str]:
    """Load a local timm checkpoint into ``model`` (pos-embed resampled, mismatched head skipped).

    Returns the names of the parameters left at their initial values (normally the head).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = checkpoint_filter_fn(_read_state_dict(path), model)
    except PretrainedWeightsError:
        raise
    except Exception as exc:  # not a ViT checkpoint of a compatible shape
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        message = f"argument --pretrained_path: does not fit {type(model).__name__}: {first[:200]}"
        raise PretrainedWeightsError(message) from None
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in skipped:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        warnings.warn(f"--pretrained_path: ignored unexpected keys {unexpected[:5]}...", stacklevel=2)
    return sorted(set(missing) | set(skipped))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check before asking the hub (its client retries for ~50 s when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_backbone(cfg, pretrained: bool | None = None) -> VisionTransformer:
    """The timm model of ``cfg.backbone`` with ``cfg.num_classes`` outputs at ``cfg.image_size``."""
    kwargs: dict[str, Any] = {"num_classes": cfg.num_classes, "img_size": cfg.image_size, **cfg.model_kwargs}
    pretrained = cfg.pretrained if pretrained is None else pretrained
    if cfg.pretrained_path:
        model = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
        left = load_pretrained_file(model, cfg.pretrained_path)
        print(f"Loaded backbone weights from {cfg.pretrained_path} (newly initialised: {', '.join(left) or 'none'})")
    elif pretrained and not hub_reachable():
        warnings.warn(
            f"the timm hub is not reachable, so no pretrained {cfg.backbone} weights; training from random "
            "initialisation. Pass --pretrained_path with a local timm checkpoint to fine-tune.",
            PretrainedWeightsWarning,
            stacklevel=2,
        )
        model = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    elif pretrained:
        try:
            model = timm.create_model(cfg.backbone, pretrained=True, **kwargs)
        except Exception as exc:  # offline, no hub access, unknown tag
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(
                f"could not load pretrained {cfg.backbone} weights ({reason[:200]}); training from random "
                "initialisation. Pass --pretrained_path with a local timm checkpoint to fine-tune.",
                PretrainedWeightsWarning,
                stacklevel=2,
            )
            model = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    else:
        model = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"backbone {cfg.backbone!r} is not a timm VisionTransformer")
    return model


def num_input_tokens(model: VisionTransformer) -> int:
    return int(model.patch_embed.num_patches) + int(model.num_prefix_tokens)


def merge_schedule(model: VisionTransformer, keep_rate: float, merge_layers) -> list[int]:
    return keep_rate_schedule(
        len(model.blocks), num_input_tokens(model), keep_rate, list(merge_layers), protected=model.num_prefix_tokens
    )


def token_counts(model: VisionTransformer, schedule: list[int]) -> list[int]:
    """Tokens after each block (class token included)."""
    return tokens_per_layer(num_input_tokens(model), schedule, protected=model.num_prefix_tokens)


def make_matcher(cfg, model: VisionTransformer, scorer: str | None = None) -> FreqMergeMatcher:
    return FreqMergeMatcher(
        alpha=cfg.alpha,
        radius=cfg.hpf_radius,
        mode=cfg.penalty_mode,
        scorer=scorer or cfg.scorer,
        phi_pool=cfg.phi_pool,
        grid=tuple(model.patch_embed.grid_size),
        seed=cfg.seed,
        border=cfg.lfgm_border,
    )


def apply_freqmerge(model: VisionTransformer, cfg, scorer: str | None = None) -> VisionTransformer:
    """Patch ``model`` in place with FreqMerge (or another scorer) and the keep-rate schedule."""
    matcher = make_matcher(cfg, model, scorer)
    trace = "index" if matcher.needs_source_index else False
    patch_timm(model, trace_source=trace, prop_attn=cfg.prop_attn, match_fn=matcher)
    model.r = merge_schedule(model, cfg.keep_rate, cfg.merge_layers)
    # the method is what we evaluate: merge-core's default "auto" policy would run small GPU batches unmerged
    model.merge_policy = "force"
    model.freqmerge_matcher = matcher
    return model


def configure_model(model: VisionTransformer, cfg) -> VisionTransformer:
    """Gradient checkpointing (only without merging) and FreqMerge on an existing backbone, in place."""
    if cfg.use_grad_checkpoint:
        if cfg.freqmerge:
            warnings.warn(
                "USE_GRAD_CHECKPOINT is ignored with token merging: the merge state of a forward pass cannot "
                "be replayed by activation checkpointing",
                stacklevel=2,
            )
        else:
            model.set_grad_checkpointing(True)
    if cfg.freqmerge:
        apply_freqmerge(model, cfg)
    return model


def build_model(cfg, pretrained: bool | None = None) -> VisionTransformer:
    """Backbone plus FreqMerge (or the plain backbone with ``cfg.freqmerge=False``)."""
    return configure_model(create_backbone(cfg, pretrained), cfg)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
