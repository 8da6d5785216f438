"""Optimisers and the schedule of STOP/CLIP4Clip: parameter groups with ``coef_lr``, warm-up cosine, BertAdam."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .model import NEW_MODULE_KEYS


def param_groups(model: nn.Module, lr: float, coef_lr: float, weight_decay: float) -> list[dict]:
    """Pretrained CLIP parameters train at ``lr * coef_lr``, new modules (prompts, prompter, LoRA) at ``lr``;
    1-D tensors (biases, norms, class embedding), scalars and tensors named ``*embedding*`` (positional embedding,
    global prompts) get no weight decay."""
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        new = not name.startswith("clip.") or any(k in name for k in NEW_MODULE_KEYS)
        decay = param.ndim >= 2 and "embedding" not in name.split(".")[-1]
        groups.setdefault((new, decay), []).append(param)
    out = []
    for (new, decay), params in sorted(groups.items()):
        out.append(
            {"params": params, "lr": lr if new else lr * coef_lr, "weight_decay": weight_decay if decay else 0.0}
        )
    if not out:
        raise ValueError("no trainable parameters (check --freeze_clip)")
    return out


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction and with decoupled weight decay, as BERT's (and CLIP4Clip's) BertAdam.

    The warm-up schedule BertAdam carried internally is the separate LambdaLR here, so both optimisers share it.
    """

    def __init__(self, params: Iterable, lr: float, betas=(0.9, 0.98), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update = update + group["weight_decay"] * p
                p.add_(update, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    groups = param_groups(model, args.lr, args.coef_lr, args.wd)
    betas = (args.beta1, args.beta2)
    if args.optim == "BertAdam":
        return BertAdam(groups, lr=args.lr, betas=betas, eps=args.eps)
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas, eps=args.eps)


def warmup_cosine(total_steps: int, warmup_proportion: float):
    """LR multiplier: linear warm-up over ``warmup_proportion`` of the steps, then half a cosine to 0."""
    warm = int(total_steps * warmup_proportion)

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn
