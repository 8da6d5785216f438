"""Patch grouping of GitMerge3D's ``weighted_patch`` mode: which serialized patches merge harder.

Two rules over the value metric ``v`` (B patches, H heads, K tokens, D):

- ``"code"`` (the official implementation): a patch's score is the mean cosine between its 32-token
  sub-centroids (head-averaged, L2-normalised) and each head's mean of normalised tokens. With p =
  share of patches scoring below ``threshold`` (0.2, hard-coded there), nothing changes when B <=
  ``min_patches`` or p >= 0.5; otherwise the ceil(B*(1-p)) - 1 highest-scoring (most homogeneous)
  patches form the "low" group that keeps only ``low_r`` tokens.
- ``"paper"`` (Algorithm 1 as described by the paper and GitMerge3D issue #3): every point's energy
  is minus its mean cosine to *all* patch centroids; a patch's energy is the mean over its points;
  patches with energy <= -``threshold`` (similarity >= threshold) form the low group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RULES = ("code", "paper")


def code_scores(v: torch.Tensor, sub: int = 32) -> torch.Tensor:
    """Official homogeneity score per patch, (B,): mean cos(sub-centroid, per-head patch mean)."""
    b, h, k, d = v.shape
    pooled = F.avg_pool1d(v.float().mean(1).transpose(1, 2), kernel_size=sub, stride=sub).transpose(1, 2)
    centroids = F.normalize(pooled, dim=-1)  # (B, K//sub, D), shared by all heads
    mean_dir = F.normalize(v.float(), dim=-1).mean(-2)  # (B, H, D), not renormalised
    sim = torch.einsum("bjd,bhd->bhj", centroids, mean_dir)
    return sim.mean(dim=(1, 2))


def paper_scores(v: torch.Tensor) -> torch.Tensor:
    """Patch similarity (= minus the paper's energy) per patch, (B,): points against all patch centroids."""
    x = F.normalize(v.float().mean(1), dim=-1)  # (B, K, D)
    centroids = F.normalize(x.mean(1), dim=-1)  # (B, D)
    point_sim = torch.einsum("bkd,pd->bkp", x, centroids).mean(-1)  # mean over all centroids
    return point_sim.mean(-1)


def weighted_patch_groups(
    v: torch.Tensor,
    threshold: float = 0.2,
    rule: str = "code",
    min_patches: int = 10,
    sub: int = 32,
) -> torch.Tensor | None:
    """Boolean (B,) mask of the "low" patches (merged down to ``low_r`` tokens), or None for none.

    ``v`` (B, H, K, D). None also when K < ``sub`` (no sub-centroid fits; the official code fails there).
    """
    if v.dim() != 4:
        raise ValueError(f"v must have shape (B, H, K, D), got {tuple(v.shape)}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    b, _, k, _ = v.shape
    with torch.no_grad():
        if rule == "paper":
            low = paper_scores(v) >= threshold
            return low if bool(low.any()) else None
        if b <= min_patches or k < sub:
            return None
        score = code_scores(v, sub)
        p = float((score < threshold).float().mean())
        if p >= 0.5:
            return None
        num_low = math.ceil(b - b * p) - 1
        if num_low <= 0:
            return None
        order = torch.sort(score, stable=True).indices
        low = torch.zeros(b, dtype=torch.bool, device=v.device)
        low[order[b - num_low :]] = True
        return low
