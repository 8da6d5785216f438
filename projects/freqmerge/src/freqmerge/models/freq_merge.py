"""FreqMerge DTM: bipartite soft matching (merge-core) with the LFGM frequency penalty on pair similarities.

At a merge layer with ``r`` tokens to remove, ``FreqMergeMatcher`` is merge-core's ``match_fn`` hook:

1. score every current token: ``phi`` in [0, 1] (class/prefix tokens get 0; they are protected anyway);
2. penalise the cosine similarity of each (source, destination) pair with
   ``merge_core.penalty.TokenPairPenalty(phi, alpha, mode)``;
3. run merge-core's ``bipartite_soft_matching`` with that ``score_mod`` (no matching code here).

Guide defects and how they are resolved (see README):

- The guide's ``cos * (1 - alpha * max(phi))`` raises negative similarities toward 0, so a pair with a
  high-frequency token can become *more* attractive. Default ``mode="shifted"`` uses
  ``(1 + cos) / 2 * (1 - alpha * max(phi))`` (monotone in phi; alpha = 0 ranks exactly as ToMe);
  ``mode="guide"`` keeps the printed formula.
- After the first merge the tokens are no longer a 14 x 14 grid. LFGM is therefore always computed on
  the patch grid: every patch takes the features of the token that now holds it (merge-core's integer
  source map, ``unmerge_to_source``), LFGM runs on that grid, and the per-patch scores are pooled back
  onto tokens with ``pool_by_source`` (``phi_pool="mean"`` by default, ``"amax"`` optional). The channel
  mean is linear, so it is taken per token *before* the gather (identical result, B x N work instead of
  B x 196 x D). At the first merge layer the source map is the identity and this is exactly the guide.

Scorers (for the ablation): ``lfgm`` (FreqMerge), ``attention`` (phi = class-token attention of the
block, min-max normalised per image: attentive tokens are protected from merging), ``random``
(random pruning: ``r`` random tokens are dropped, merge-core ``pruning.random_pruning``) and ``none``
(plain ToMe; also what ``alpha = 0`` reduces to).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from merge_core.matching import bipartite_soft_matching
from merge_core.merge import pool_by_source, unmerge_to_source
from merge_core.penalty import MODES, TokenPairPenalty
from merge_core.pruning import random_pruning

from .lfgm import BORDERS, lfgm_from_channel_mean

SCORERS = ("lfgm", "attention", "random", "none")
PHI_POOLS = ("mean", "amax")


class FreqMergeMatcher:
    """``match_fn`` for ``merge_core.patch.timm``; needs ``trace_source="index"`` for the ``lfgm`` scorer.

    ``record=True`` keeps, per merge layer, the grid scores (B, gh, gw) and the token count, for the
    heatmaps and the tests (``records`` is cleared with ``clear()``).
    """

    def __init__(
        self,
        alpha: float = 0.7,
        radius: float = 2.0,
        mode: str = "shifted",
        scorer: str = "lfgm",
        phi_pool: str = "mean",
        grid: tuple[int, int] = (14, 14),
        seed: int | None = None,
        border: str = "wrap",
    ) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if phi_pool not in PHI_POOLS:
            raise ValueError(f"phi_pool must be one of {PHI_POOLS}, got {phi_pool!r}")
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        if border not in BORDERS:
            raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
        self.border = border
        self.alpha = float(alpha)
        self.radius = float(radius)
        self.mode = mode
        self.scorer = scorer
        self.phi_pool = phi_pool
        self.grid = (int(grid[0]), int(grid[1]))
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self.record = False
        self.records: dict[int, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return (
            f"FreqMergeMatcher(scorer={self.scorer!r}, alpha={self.alpha}, mode={self.mode!r}, "
            f"radius={self.radius}, border={self.border!r}, phi_pool={self.phi_pool!r}, grid={self.grid})"
        )

    @property
    def needs_source_index(self) -> bool:
        return self.scorer == "lfgm" and self.alpha > 0

    def clear(self) -> None:
        self.records = {}

    # ------------------------------------------------------------------ scores
    def lfgm_token_scores(self, x: torch.Tensor, info: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi per current token (B, N), phi on the patch grid (B, gh*gw)) for tokens ``x`` (B, N, C)."""
        protected = int(info["protected"])
        n_patches = self.grid[0] * self.grid[1]
        n_tokens = x.shape[1]
        channel_mean = x.mean(dim=-1, dtype=torch.float32)  # step 2 per token (commutes with the gather below)
        source_index = info.get("source_index")
        if source_index is None:
            if n_tokens != protected + n_patches:
                raise ValueError(
                    f"{n_tokens} tokens are not {protected} prefix tokens + a {self.grid} grid and no source "
                    "map is traced: patch the model with merge_core.patch.timm(..., trace_source='index')"
                )
            grid_mean = channel_mean[:, protected:]
        else:
            grid_mean = unmerge_to_source(channel_mean[..., None], source_index[:, protected:])[..., 0]
        phi_grid = lfgm_from_channel_mean(grid_mean, self.grid, self.radius, self.border)
        if source_index is None:
            phi = F.pad(phi_grid, (protected, 0))  # prefix tokens score 0 (they are protected anyway)
        else:
            # patches pooled onto the tokens holding them; prefix tokens receive no patch and stay 0
            phi = pool_by_source(phi_grid, source_index[:, protected:], n_tokens, self.phi_pool)
        return phi, phi_grid

    @staticmethod
    def attention_token_scores(block: torch.nn.Module, attn_input: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        """Class-token attention of ``block`` over the current tokens, head-averaged, min-max per image."""
        attn = block.attn
        protected = int(info["protected"])
        batch, n_tokens, _ = attn_input.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        dim = heads * head_dim
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q_bias = bias[:dim] if bias is not None else None
        k_bias = bias[dim : 2 * dim] if bias is not None else None
        q = F.linear(attn_input[:, :1], weight[:dim], q_bias).reshape(batch, 1, heads, head_dim).transpose(1, 2)
        k = F.linear(attn_input, weight[dim : 2 * dim], k_bias).reshape(batch, n_tokens, heads, head_dim)
        q, k = attn.q_norm(q), attn.k_norm(k.transpose(1, 2))
        logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, H, 1, N)
        size = info.get("size")
        if info.get("prop_attn") and size is not None:
            logits = logits + size[..., 0].float().log()[:, None, None, :]
        score = logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, N)
        spatial = score[:, protected:]
        lo = spatial.amin(dim=1, keepdim=True)
        hi = spatial.amax(dim=1, keepdim=True)
        spatial = (spatial - lo) / (hi - lo).clamp_min(1e-12)  # attention values are small: no additive eps
        return torch.cat([spatial.new_zeros(batch, protected), spatial], dim=1)

    # ------------------------------------------------------------------ hook
    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def __call__(self, *, block, layer: int, x, attn_input, metric, r: int, info: dict[str, Any]):
        protected = int(info["protected"])
        if self.record:
            self.records.setdefault(layer, {})["tokens_in"] = x.shape[1]
        if self.scorer == "random":
            return random_pruning(metric, r, protected=protected, generator=self._generator(metric.device))
        if self.scorer == "none" or self.alpha == 0.0:
            return bipartite_soft_matching(metric, r, protected=protected)
        with torch.no_grad():
            if self.scorer == "lfgm":
                phi, phi_grid = self.lfgm_token_scores(x, info)
                if self.record:
                    self.records[layer]["phi_grid"] = phi_grid.reshape(-1, *self.grid).detach().cpu()
            else:
                phi = self.attention_token_scores(block, attn_input, info)
            if self.record:
                self.records[layer]["phi_tokens"] = phi.detach().cpu()
        penalty = TokenPairPenalty(phi, self.alpha, self.mode)
        return bipartite_soft_matching(metric, r, protected=protected, score_mod=penalty)
