"""Geometry-FT loss: EMBED x embedding MSE + BCE x soft-target BCE + DICE x Dice on the mask logits of the
query the teacher scores highest. Both mask terms only see the unpadded region of the 288x288 mask.

The embedding MSE is summed over channels and averaged over valid cells (the reference's normalisation:
raw values ~1000-1500 early, which is what the 0.0015 weight was tuned for), i.e. C x the stage-1 mean."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.losses import masked_mse


@dataclass(frozen=True)
class LossWeights:
    embed: float = 0.0015
    bce: float = 1.0
    dice: float = 1.0
    temperature: float = 1.0


def embedding_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Channel-summed squared error, mean over valid cells. pred/target (B, C, S, S), valid (B, S, S)."""
    return masked_mse(pred.float(), target.float(), valid) * pred.shape[1]


def soft_bce(logits: torch.Tensor, target_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BCE of student logits against sigmoid(teacher logits), mean over valid pixels. (B, H, W) each."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), torch.sigmoid(target_logits.float()), reduction="none")
    m = valid.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp(min=1)


def soft_dice(logits: torch.Tensor, target_logits: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0):
    """1 - (2 sum(p q) + s) / (sum p + sum q + s) per mask over valid pixels, mean over the batch."""
    m = valid.float()
    p = (torch.sigmoid(logits.float()) * m).flatten(1)
    q = (torch.sigmoid(target_logits.float()) * m).flatten(1)
    dice = (2 * (p * q).sum(1) + smooth) / (p.sum(1) + q.sum(1) + smooth)
    return (1 - dice).mean()


def best_query(teacher_scores: torch.Tensor) -> torch.Tensor:
    """(B,) index of the query with the highest teacher score; scores (B, Q) or (B, Q, 1)."""
    if teacher_scores.dim() == 3:
        teacher_scores = teacher_scores.squeeze(-1)
    return teacher_scores.argmax(dim=1)


def pick(masks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """masks (B, Q, H, W), index (B,) -> (B, H, W)."""
    return masks[torch.arange(masks.shape[0], device=masks.device), index]


def geometry_loss(
    student_embed: torch.Tensor,
    teacher_embed: torch.Tensor,
    embed_valid: torch.Tensor,
    student_masks: torch.Tensor,
    teacher_masks: torch.Tensor,
    teacher_scores: torch.Tensor,
    mask_valid: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts. Masks are (B, Q, H, W) logits; the teacher's best query is used for both."""
    idx = best_query(teacher_scores)
    return picked_loss(
        student_embed, teacher_embed, embed_valid, student_masks, idx, pick(teacher_masks, idx), mask_valid, weights
    )


def picked_loss(
    student_embed: torch.Tensor,
    teacher_embed: torch.Tensor,
    embed_valid: torch.Tensor,
    student_masks: torch.Tensor,
    idx: torch.Tensor,
    teacher_mask: torch.Tensor,
    mask_valid: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The same loss from the teacher's chosen query index (B,) and its mask (B, H, W), e.g. from a cache."""
    mse = embedding_mse(student_embed, teacher_embed, embed_valid)
    bce, dice = mask_terms(pick(student_masks, idx), teacher_mask, mask_valid, weights.temperature)
    total = weights.embed * mse + weights.bce * bce + weights.dice * dice
    return total, {"embed_mse": mse.item(), "mask_bce": bce.item(), "mask_dice": dice.item()}


def mask_terms(
    student_mask: torch.Tensor, teacher_mask: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft BCE, Dice) of the student's chosen mask logits against the teacher's, both (B, H, W)."""
    s = student_mask / temperature
    t = teacher_mask.detach().float() / temperature
    return soft_bce(s, t, valid), soft_dice(s, t, valid)
