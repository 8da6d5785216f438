"""SAM3's query scoring (`detector.dot_prod_scoring.*`), own code in SAM3's key layout, for the frozen path
of the geometry fine-tune: the teacher's per-query scores pick the query whose mask is distilled.

score(query) = <hs_proj(h), prompt_proj(mean of valid prompt_mlp(prompt tokens))> / sqrt(d_proj), clamped
to +-12. prompt_mlp is Linear-ReLU-Linear with a residual and a LayerNorm on the output."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCORING_PREFIX = "detector.dot_prod_scoring."


class PromptMLP(nn.Module):
    """`layers.{0,1}` + `out_norm`: x + L2(relu(L1(x))), then LayerNorm (dropout is off in eval)."""

    def __init__(self, dim: int = 256, hidden: int = 2048) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, dim)])
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(x + self.layers[1](F.relu(self.layers[0](x))))


class DotProductScoring(nn.Module):
    """1,182,976 parameters at d_model = d_proj = 256 (the notes' 1.18M)."""

    def __init__(self, d_model: int = 256, d_proj: int = 256, hidden: int = 2048, clamp: float = 12.0) -> None:
        super().__init__()
        self.prompt_mlp = PromptMLP(d_model, hidden)
        self.prompt_proj = nn.Linear(d_model, d_proj)
        self.hs_proj = nn.Linear(d_model, d_proj)
        self.scale, self.clamp = 1.0 / math.sqrt(d_proj), clamp

    def forward(self, hs: torch.Tensor, prompt: torch.Tensor, prompt_pad: torch.Tensor) -> torch.Tensor:
        """hs (L, B, Q, d), prompt (S, B, d) sequence-first, prompt_pad (B, S) True = padding -> (L, B, Q, 1)."""
        p = self.prompt_mlp(prompt)
        valid = (~prompt_pad).to(p.dtype).transpose(0, 1)[..., None]  # (S, B, 1)
        pooled = (p * valid).sum(0) / valid.sum(0).clamp(min=1.0)
        scores = self.hs_proj(hs) @ self.prompt_proj(pooled)[:, :, None] * self.scale
        return scores.clamp(-self.clamp, self.clamp)
