"""Tiny random-weight CLIP for tests and CPU smoke runs (OpenAI layout, so it goes through the real loader)."""

from __future__ import annotations

import torch

from .clip_model import CLIP, ClipSpec

TINY = ClipSpec(
    embed_dim=32,
    image_resolution=64,
    vision_layers=3,
    vision_width=64,
    vision_patch_size=16,
    context_length=77,
    vocab_size=49408,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=2,
)


def tiny_state_dict(seed: int = 0, spec: ClipSpec = TINY) -> dict[str, torch.Tensor]:
    """A random CLIP state dict (OpenAI initialisation) of the given shape."""
    torch.manual_seed(seed)
    return CLIP(spec).state_dict()
