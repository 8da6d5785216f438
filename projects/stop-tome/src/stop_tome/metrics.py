"""Retrieval metrics (R@1/5/10, median and mean rank) on a similarity matrix computed in row blocks.

Only features are held (N x D); the similarity is built ``block`` rows at a time, so a 10k x 10k evaluation needs
block x 10k floats, never N x N x D. Pair i of the text list matches video i (MSR-VTT 1k-A). A rank counts the
candidates scoring strictly higher than the true one, plus one (ties resolve in the model's favour).
"""

from __future__ import annotations

import torch


def ranks_blocked(queries: torch.Tensor, candidates: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """1-based rank of candidate i for query i, for (N, D) queries and (N, D) candidates."""
    if queries.shape[0] != candidates.shape[0]:
        raise ValueError(f"queries and candidates must pair up, got {queries.shape[0]} and {candidates.shape[0]}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    out = []
    for start in range(0, queries.shape[0], block):
        q = queries[start : start + block]
        sim = q @ candidates.t()
        true = sim.gather(1, torch.arange(start, start + q.shape[0], device=sim.device)[:, None])
        out.append((sim > true).sum(1) + 1)
    return torch.cat(out).cpu()


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    r = ranks.double()
    return {
        "R1": float((r <= 1).double().mean() * 100),
        "R5": float((r <= 5).double().mean() * 100),
        "R10": float((r <= 10).double().mean() * 100),
        "MdR": float(torch.quantile(r, 0.5)),  # numpy's median: the mean of the two middle ranks for even N
        "MnR": float(r.mean()),
    }


def retrieval_metrics(text: torch.Tensor, video: torch.Tensor, block: int = 1024) -> dict[str, dict[str, float]]:
    """t2v and v2t metrics for paired, L2-normalised features (cosine similarity)."""
    return {
        "t2v": rank_metrics(ranks_blocked(text, video, block)),
        "v2t": rank_metrics(ranks_blocked(video, text, block)),
    }
