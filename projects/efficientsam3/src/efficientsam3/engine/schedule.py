"""Per-step learning rate: linear warm-up from WARMUP_LR, then cosine from the (batch-scaled) base LR to MIN_LR.
Stateless (a function of the optimizer step), so resume needs only the step count."""

from __future__ import annotations

import math

import torch


def scaled_lr(base_lr: float, batch: int, world: int, accumulation: int, scale: bool = True) -> float:
    """The reference's linear rule: lr x total batch / 512."""
    return base_lr * batch * world * accumulation / 512.0 if scale else base_lr


def lr_at(step: int, total_steps: int, warmup_steps: int, base: float, warmup_lr: float, min_lr: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_lr + (base - warmup_lr) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters (norms, biases), as in the reference."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
