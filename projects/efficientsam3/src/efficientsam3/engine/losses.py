"""Stage-1 loss: masked MSE + COSINE x masked (1 - cosine), both over the unpadded embedding cells."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of (pred - target)^2 over valid cells and all channels. pred/target (B, C, S, S), valid (B, S, S)."""
    m = valid[:, None].to(pred.dtype)
    denom = m.sum() * pred.shape[1]
    return ((pred - target).pow(2) * m).sum() / denom.clamp(min=1)


def masked_cosine(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid cells of 1 - cos(pred, target) taken across channels."""
    cos = F.cosine_similarity(pred, target, dim=1, eps=1e-8)
    m = valid.to(cos.dtype)
    return ((1 - cos) * m).sum() / m.sum().clamp(min=1)


def stage1_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, pixel_wise: float = 1.0, cosine: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss (float32) and its parts."""
    pred, target = pred.float(), target.float()
    mse = masked_mse(pred, target, valid)
    cos = masked_cosine(pred, target, valid)
    total = pixel_wise * mse + cosine * cos
    return total, {"mse": mse.item(), "cos": cos.item()}
