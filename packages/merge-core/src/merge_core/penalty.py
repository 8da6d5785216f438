"""Per-pair score penalties for ``bipartite_soft_matching(score_mod=...)``.

A penalty built from per-token scores ``phi`` in [0, 1] lowers the similarity of pairs that
contain a token to protect (FreqMerge: high-frequency tokens). Two forms:

- ``"guide"``: cos * (1 - alpha * max(phi_i, phi_j)) as printed in the FreqMerge README. It is not
  monotone: for a negative cosine the product moves *up* toward 0, so protecting a token can make
  its pair more attractive.
- ``"shifted"`` (default): (1 + cos) / 2 * (1 - alpha * max(phi_i, phi_j)). The cosine is mapped to
  [0, 1] first, so a larger phi always lowers the score; with alpha = 0 the ranking equals ToMe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("shifted", "guide")


@dataclass(frozen=True)
class TokenPairPenalty:
    """score_mod for bipartite matching from per-token scores ``phi`` (B, N) aligned with the metric."""

    phi: torch.Tensor
    alpha: float
    mode: str = "shifted"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        phi = self.phi.reshape(-1, self.phi.shape[-1]).to(scores.dtype)
        phi_a, phi_b = phi[:, ::2], phi[:, 1::2]
        if phi_a.shape[-1] != scores.shape[-2] or phi_b.shape[-1] != scores.shape[-1]:
            raise ValueError(
                f"phi must have one score per token (N={scores.shape[-2] + scores.shape[-1]}), "
                f"got shape {tuple(self.phi.shape)}"
            )
        keep = 1.0 - self.alpha * torch.maximum(phi_a[:, :, None], phi_b[:, None, :])
        if self.mode == "shifted":
            scores = (scores + 1.0) * 0.5
        return scores * keep
