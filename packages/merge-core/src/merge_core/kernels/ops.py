"""The fused matcher and merge as ``torch.library`` custom ops, so ``torch.compile`` sees each as one opaque call.

Why: when the kernels stepped aside under ``torch.compile``, Inductor traced the torch reference (normalise,
matmul, max, two sorts, gathers, a scatter) and, because every merging layer has its own token count, generated
a separate set of kernels for each layer: a patched ViT-B took > 95 s to its first compiled output on an H200
where plain timm takes 10 s. As custom ops the matching and merging of a layer are one graph node each; the
shapes are runtime arguments of one Triton program (a handful of block-size variants serve all layers) and
Inductor generates nothing for them.

- ``merge_core::best_destinations(a, b, protected_a, protected_b, phi, alpha, score_mode) -> (best, index)``
- ``merge_core::match_plan(metric, protected_a, protected_b, r, phi, alpha, score_mode, sort_unm) -> plan``:
  bipartite matching of (B, N, C) ``metric``'s even tokens onto its odd ones (the op slices them, so Inductor
  lays out no strided views), one (B, Na + r) int64 tensor ``[unm | src | dst]`` with Na = ceil(N / 2)
  (``split_plan`` gives the three (B, n, 1) views).
- ``merge_core::merge_wavg(x, size, unm, src, dst, protected_a, protected_b) -> (x', size')``: (n, T, C) in,
  (n, T - r, C) and (n, T - r, 1) out.

``phi``/``alpha``/``score_mode`` carry a ``TokenPairPenalty`` (``phi=None``, ``score_mode=""``: no penalty).
CUDA: the Triton kernels (``_triton``); every other device: the torch reference of ``matching``/``merge``
(so ``opcheck`` and CPU compile tests run them). No autograd formula: the plan ops return indices (no gradient)
and ``merge_wavg``'s dispatch rule sends autograd-recording calls down the differentiable torch path, as in eager.
``register_fake`` gives Inductor shapes and dtypes only.
"""

import torch

from ..matching import apply_plan, best_destinations_reference, plan_from_scores
from ..penalty import TokenPairPenalty

NAMESPACE = "merge_core"


def penalty_parts(score_mod: TokenPairPenalty | None) -> tuple[torch.Tensor | None, float, str]:
    """(phi, alpha, score_mode) of a penalty, as the ops take it."""
    if score_mod is None:
        return None, 0.0, ""
    return score_mod.phi, float(score_mod.alpha), score_mod.mode


def _penalty(phi: torch.Tensor | None, alpha: float, score_mode: str) -> TokenPairPenalty | None:
    return None if phi is None else TokenPairPenalty(phi, alpha, score_mode)


def split_plan(plan: torch.Tensor, na: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unm_idx, src_idx, dst_idx) views, each (B, n, 1), of a ``match_plan`` tensor."""
    return plan[:, : na - r, None], plan[:, na - r : na, None], plan[:, na:, None]


def _plan_reference(a, b, protected_a, protected_b, r, score_mod, sort_unm, best_fn) -> torch.Tensor:
    node_max, node_idx = best_fn(a, b, protected_a, protected_b, score_mod)
    return torch.cat([t[..., 0] for t in plan_from_scores(node_max, node_idx, r, sort_unm)], dim=-1)


# ---------------------------------------------------------------------------------------------- best_destinations
@torch.library.custom_op(f"{NAMESPACE}::best_destinations", mutates_args=())
def best_destinations(
    a: torch.Tensor,
    b: torch.Tensor,
    protected_a: int,
    protected_b: int,
    phi: torch.Tensor | None,
    alpha: float,
    score_mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(best_score (B, Na), best_index (B, Na) int64) of every ``a`` row over ``b`` rows (torch reference)."""
    best, idx = best_destinations_reference(a, b, protected_a, protected_b, _penalty(phi, alpha, score_mode))
    return best.contiguous(), idx.contiguous()


@best_destinations.register_kernel("cuda")
def _best_destinations_cuda(a, b, protected_a, protected_b, phi, alpha, score_mode):
    from . import _triton

    return _triton.best_destinations(a, b, protected_a, protected_b, _penalty(phi, alpha, score_mode))


@best_destinations.register_fake
def _best_destinations_fake(a, b, protected_a, protected_b, phi, alpha, score_mode):
    shape = (a.shape[0], a.shape[1])
    return a.new_empty(shape), a.new_empty(shape, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------- match_plan
@torch.library.custom_op(f"{NAMESPACE}::match_plan", mutates_args=())
def match_plan(
    metric: torch.Tensor,
    protected_a: int,
    protected_b: int,
    r: int,
    phi: torch.Tensor | None,
    alpha: float,
    score_mode: str,
    sort_unm: bool,
) -> torch.Tensor:
    """Bipartite matching plan (B, Na + r) int64 ``[unm | src | dst]`` of (B, N, C) ``metric`` (torch reference)."""
    a, b = metric[:, ::2], metric[:, 1::2]
    score_mod = _penalty(phi, alpha, score_mode)
    return _plan_reference(a, b, protected_a, protected_b, r, score_mod, sort_unm, best_destinations_reference)


@match_plan.register_kernel("cuda")
def _match_plan_cuda(metric, protected_a, protected_b, r, phi, alpha, score_mode, sort_unm):
    from . import MAX_PLAN_ROWS, _rank_large, _triton

    a, b = metric[:, ::2], metric[:, 1::2]
    score_mod = _penalty(phi, alpha, score_mode)
    if a.shape[1] <= MAX_PLAN_ROWS:  # sort-free: matcher + one-tile ranking (eager's rule)
        return _triton.match_plan_buffer(a, b, protected_a, protected_b, r, score_mod, sort_unm)
    return _rank_large.match_plan_large_buffer(a, b, protected_a, protected_b, r, score_mod, sort_unm)


@match_plan.register_fake
def _match_plan_fake(metric, protected_a, protected_b, r, phi, alpha, score_mode, sort_unm):
    return metric.new_empty((metric.shape[0], (metric.shape[1] + 1) // 2 + r), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------- merge_wavg
@torch.library.custom_op(f"{NAMESPACE}::merge_wavg", mutates_args=())
def merge_wavg(
    x: torch.Tensor,
    size: torch.Tensor | None,
    unm: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    protected_a: int,
    protected_b: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of (n, T, C) ``x`` with a plan: (merged x (n, T - r, C), merged size (n, T - r, 1))."""
    size = torch.ones_like(x[..., :1]) if size is None else size
    merged = apply_plan(torch.cat([x * size, size], dim=-1), unm, src, dst, protected_a, protected_b, "sum")
    x_sum, size_sum = merged[..., :-1], merged[..., -1:]
    return x_sum / size_sum, size_sum.contiguous()


@merge_wavg.register_kernel("cuda")
def _merge_wavg_cuda(x, size, unm, src, dst, protected_a, protected_b):
    from . import _merge

    return _merge.merge_wavg_indices(x, size, unm, src, dst, protected_b)


@merge_wavg.register_fake
def _merge_wavg_fake(x, size, unm, src, dst, protected_a, protected_b):
    n, t, c = x.shape
    r = src.shape[-2]
    return x.new_empty((n, t - r, c)), x.new_empty((n, t - r, 1))


__all__ = ["NAMESPACE", "best_destinations", "match_plan", "merge_wavg", "penalty_parts", "split_plan"]
