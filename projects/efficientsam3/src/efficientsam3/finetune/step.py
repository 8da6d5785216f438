"""The geometry-FT loss of one batch with DECODE_ITERS decode iterations (the trainer's and the benchmark's one home):
the embedding MSE once, the FPN features once per embedding, then per iteration the teacher path (no gradient;
iteration 0 may come from the teacher cache) and the student path through the frozen SAM3 with the same prompt, BCE
+ Dice on the teacher's best query of that iteration, and (before the next iteration) one refinement point per image
from their disagreement appended to the geometric prompt. The mask terms are averaged over iterations."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ..model.sam3_frozen import frozen_step_begin
from .cache import TeacherCache
from .losses import LossWeights, embedding_mse, mask_terms
from .refine import append_points, sample_refinement_points

PromptArgs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # points, point_pad, boxes, box_pad


@dataclass(frozen=True)
class DecodeSettings:
    weights: LossWeights = LossWeights()
    decode_iters: int = 1
    iter_on_box: bool = False  # box-only images get refinement points too (EdgeSAM's ITER_ON_BOX)
    refine_points: int = 1  # points added per image and refinement iteration
    threshold: float = 0.0  # mask logit threshold for the disagreement


@torch.no_grad()
def teacher_pass(frozen, target: torch.Tensor, args: PromptArgs, labels: torch.Tensor | None, features=None):
    """(best query (B,), its mask logits (B, H, W)) of the teacher embedding; only that query's mask is
    computed (equal to picking it from all masks). features: frozen.image_features(target) computed before."""
    out = frozen(target, *args, point_labels=labels, mask_query="best", features=features)
    return out["query"], out["pred_masks"][:, 0]


def teacher_targets(frozen, target, args_p, keys, cache: TeacherCache | None):
    """(best query (B,), its mask logits (B, H, W)) from the teacher embedding; from `cache` when every image
    of the batch is in it (prompts fixed per image; no host sync: see finetune.cache), else computed and, with
    a cache, stored."""
    if cache is not None and cache.has_all(keys):
        return cache.get(keys, target.device)
    idx, mask = teacher_pass(frozen, target, args_p, None)
    if cache is not None:
        cache.put(keys, idx, mask)
    return idx, mask


def ft_loss(
    frozen,
    pred: torch.Tensor,
    target: torch.Tensor,
    prompts: dict[str, torch.Tensor],
    embed_valid: torch.Tensor,
    mask_valid: torch.Tensor,
    settings: DecodeSettings = DecodeSettings(),
    first_teacher: Callable[[PromptArgs], tuple[torch.Tensor, torch.Tensor]] | None = None,
    uniforms: Callable[[int], torch.Tensor] | None = None,
    frozen_ctx: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (embed_mse, mask_bce / mask_dice averaged over iterations, refine_points =
    refinement points added per image), the parts as detached 0-dim tensors: reading them (`float`) waits
    for the GPU, so the caller does it only when it logs (a read here would stall the host before the
    backward is queued). pred: the student embedding (with gradient); target: the teacher's;
    prompts: points / point_pad / boxes / box_pad; first_teacher(args) may serve iteration 0 (the cache);
    uniforms(it) -> (B, refine_points) in [0, 1) drives the refinement draws (default: torch.rand);
    frozen_ctx: the autocast the frozen path runs under."""
    frozen_step_begin(frozen)  # CUDA-graph trees (reduce-overhead): a new step, the last one's outputs are free
    w = settings.weights
    points, point_pad = prompts["points"], prompts["point_pad"]
    boxes, box_pad = prompts["boxes"], prompts["box_pad"]
    b = pred.shape[0]
    labels = torch.ones(points.shape[:2], dtype=torch.long, device=points.device)
    # the reference refines only when the prompt has points, or from a box with ITER_ON_BOX
    refinable = (~point_pad).any(1) | settings.iter_on_box
    mse = embedding_mse(pred, target, embed_valid)
    bces, dices = [], []
    added = torch.zeros(b, device=pred.device)
    # the FPN part is prompt-independent: with several iterations it runs once per embedding (student: one
    # graph whose gradient sums over the iterations, as recomputing it would give)
    reuse = settings.decode_iters > 1
    s_feats = t_feats = None
    for it in range(settings.decode_iters):
        args = (points, point_pad, boxes, box_pad)
        with frozen_ctx():
            if it == 0 and first_teacher is not None:
                idx, t_mask = first_teacher(args)
            else:
                if reuse and t_feats is None:
                    with torch.no_grad():
                        t_feats = frozen.image_features(target)
                idx, t_mask = teacher_pass(frozen, target, args, labels, t_feats)
            if reuse and s_feats is None:
                s_feats = frozen.image_features(pred)
            s_mask = frozen(pred, *args, point_labels=labels, mask_query=idx, features=s_feats)["pred_masks"][:, 0]
        bce, dice = mask_terms(s_mask, t_mask, mask_valid, w.temperature)
        bces.append(bce)
        dices.append(dice)
        if it + 1 == settings.decode_iters:
            break
        u = uniforms(it) if uniforms is not None else torch.rand(b, settings.refine_points)
        new_p, new_l, new_pad = sample_refinement_points(s_mask.detach(), t_mask, mask_valid, u, settings.threshold)
        new_pad = new_pad | ~refinable[:, None]
        if bool(new_pad.all()):  # no image got a point: every later iteration decodes the same prompt again
            bces += [bce] * (settings.decode_iters - it - 1)
            dices += [dice] * (settings.decode_iters - it - 1)
            break
        added += (~new_pad).sum(1)
        points, labels, point_pad = append_points(points, labels, point_pad, new_p, new_l, new_pad)
    bce, dice = torch.stack(bces).mean(), torch.stack(dices).mean()
    total = w.embed * mse + w.bce * bce + w.dice * dice
    parts = {"embed_mse": mse.detach(), "mask_bce": bce.detach(), "mask_dice": dice.detach()}
    if settings.decode_iters > 1:
        parts["refine_points"] = added.mean()
    return total, parts
