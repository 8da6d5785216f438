"""Loop-based re-statement of ToMe's bipartite soft matching, written from the paper and code reading.

Independent of merge_core's vectorised code: used as the oracle for equality tests.
"""

from __future__ import annotations

import torch


def reference_merge(
    metric: torch.Tensor, x: torch.Tensor, r: int, class_token: bool, distill_token: bool
) -> tuple[torch.Tensor, torch.Tensor, list[list[list[int]]]]:
    """Returns (merged x by size-weighted mean, sizes, groups of original indices) for (B, N, C) inputs."""
    batch, n, _ = metric.shape
    protected = int(class_token) + int(distill_token)
    r = min(r, (n - protected) // 2)
    outs, sizes, all_groups = [], [], []
    for bi in range(batch):
        m = metric[bi] / metric[bi].norm(dim=-1, keepdim=True)
        a_ids = list(range(0, n, 2))
        b_ids = list(range(1, n, 2))
        best = []
        for ai in a_ids:
            if class_token and ai == 0:
                best.append((float("-inf"), b_ids[0], ai))
                continue
            scores = [float("-inf") if (distill_token and bj == 1) else float(m[ai] @ m[bj]) for bj in b_ids]
            top = max(range(len(b_ids)), key=lambda j: (scores[j], -j))
            best.append((scores[top], b_ids[top], ai))
        order = sorted(range(len(best)), key=lambda i: (-best[i][0], i))
        merged_src = [best[i] for i in order[:r]]
        unmerged = [best[i][2] for i in order[r:]]
        if protected:
            unmerged.sort()
        groups = {bj: [bj] for bj in b_ids}
        for _, bj, ai in merged_src:
            groups[bj].append(ai)
        ordered = [[ai] for ai in unmerged] + [sorted(groups[bj]) for bj in b_ids]
        if distill_token:
            ordered = [ordered[0], ordered[len(unmerged)]] + ordered[1 : len(unmerged)] + ordered[len(unmerged) + 1 :]
        all_groups.append(ordered)
        outs.append(torch.stack([x[bi, g].mean(0) for g in ordered]))
        sizes.append(torch.tensor([[float(len(g))] for g in ordered]))
    return torch.stack(outs), torch.stack(sizes), all_groups


def reference_groups(metric: torch.Tensor, r: int, protected: int) -> list[list[list[int]]]:
    """Groups of current-token indices per merged token, for a protected prefix of ``protected`` tokens.

    Loop form of ToMe's bipartite matching: even tokens are sources, odd tokens destinations; the first
    ``protected`` tokens are neither. Each source takes its most similar destination (first on ties); the
    ``r`` best-scoring sources merge (earlier on ties). Output order: the prefix, unmerged sources, then
    destinations, each in original order.
    """
    batch, n, _ = metric.shape
    r = min(r, (n - protected) // 2)
    result = []
    for bi in range(batch):
        m = metric[bi] / metric[bi].norm(dim=-1, keepdim=True)
        sources = [i for i in range(0, n, 2) if i >= protected]
        dests = [j for j in range(1, n, 2) if j >= protected]
        best = []
        for i in sources:
            scores = [float(m[i] @ m[j]) for j in dests]
            top = max(range(len(dests)), key=lambda k: (scores[k], -k))
            best.append((scores[top], i, dests[top]))
        order = sorted(range(len(best)), key=lambda k: (-best[k][0], k))
        merged = [best[k] for k in order[:r]]
        unmerged = sorted(best[k][1] for k in order[r:])
        groups = {j: [j] for j in dests}
        for _, i, j in merged:
            groups[j].append(i)
        result.append([[i] for i in range(protected)] + [[i] for i in unmerged] + [sorted(groups[j]) for j in dests])
    return result
