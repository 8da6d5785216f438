"""EdgeSAM-style refinement points for the geometry fine-tune's decode iterations.

After a decode iteration, the teacher's and the student's chosen masks are binarised (logit > threshold,
inside the unpadded region). A pixel is drawn uniformly from their disagreement (false negative: teacher
on, student off; false positive: student on, teacher off); it becomes a positive point (label 1) when it
is a false negative and a negative point (label 0, SAM3's geometry-encoder label for background) when it
is a false positive. An image with fewer than 10 x n disagreeing pixels gets no point (padding). This is
the reference's rule (`sample_refinement_points` in its `train_geometry_finetune.py`); the point sits at
the pixel's centre ((x + 0.5) / W), where the reference uses the pixel's corner (x / W).

The draws are given as uniforms in [0, 1) so the caller decides the randomness (seeded per image and
epoch in the trainer: the same points on every rank, run and resume), and the sampling is vectorised
(no per-image loop or host sync)."""

from __future__ import annotations

import torch

MIN_ERROR_PIXELS_PER_POINT = 10
NEGATIVE, POSITIVE = 0, 1


def sample_refinement_points(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    uniforms: torch.Tensor,
    threshold: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask logits (B, H, W), valid (B, H, W) bool, uniforms (B, n) in [0, 1): n points per image.
    -> points (B, n, 2) normalised xy, labels (B, n) long (1 = positive, 0 = negative), pad (B, n) True =
    no point (fewer than 10 x n disagreeing pixels)."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise ValueError(
            f"mask logits: expected two equal (B, H, W) shapes, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    b, h, w = student_logits.shape
    if uniforms.dim() != 2 or uniforms.shape[0] != b:
        raise ValueError(f"uniforms: expected (B={b}, n), got {tuple(uniforms.shape)}")
    n = uniforms.shape[1]
    s = (student_logits > threshold) & valid
    t = (teacher_logits > threshold) & valid
    fn = (t & ~s).flatten(1)
    err = fn | (s & ~t).flatten(1)
    count = err.sum(1)  # (B,)
    pad = count < MIN_ERROR_PIXELS_PER_POINT * n
    # the k-th disagreeing pixel (k = floor(u x count)) is the first index whose running count exceeds k
    k = (uniforms.to(err.device).double() * count[:, None].double()).floor().long()
    k = torch.minimum(k, (count[:, None] - 1).clamp(min=0))
    running = err.long().cumsum(1)  # (B, HW)
    flat = torch.searchsorted(running, k + 1).clamp(max=h * w - 1)  # (B, n)
    y, x = flat // w, flat % w
    points = torch.stack([(x.float() + 0.5) / w, (y.float() + 0.5) / h], dim=-1)
    labels = torch.where(fn.gather(1, flat), POSITIVE, NEGATIVE)
    points = points.masked_fill(pad[:, None, None], 0.0)
    labels = labels.masked_fill(pad[:, None], 0)
    return points, labels.long(), pad[:, None].expand(b, n).clone()


def append_points(
    points: torch.Tensor,
    labels: torch.Tensor,
    pad: torch.Tensor,
    new_points: torch.Tensor,
    new_labels: torch.Tensor,
    new_pad: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate two point sets per image, valid points first (SAM3's geometry encoder needs right padding:
    a box-only image has only padded points, so a plain concatenation would put a valid point after padding).
    points (B, N, 2) / (B, M, 2), labels (B, N) / (B, M), pad True = padding -> (B, N + M, ...)."""
    p = torch.cat([points, new_points.to(points.dtype)], 1)
    lab = torch.cat([labels, new_labels.to(labels.dtype)], 1)
    pd = torch.cat([pad, new_pad], 1)
    order = torch.sort(pd.to(torch.int32), dim=1, stable=True).indices
    return p.gather(1, order[..., None].expand(-1, -1, 2)), lab.gather(1, order), pd.gather(1, order)
