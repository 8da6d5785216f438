"""Fused CUDA (Triton) kernels for the hot path; the torch ops in ``matching``/``merge`` are the reference.

Kernels (``_triton``: matcher and plan up to ``MAX_PLAN_ROWS`` rows; ``_rank_large``: plan beyond; ``_merge``):

- ``fused_best_destinations``: normalise + cosine similarity + per-row max/argmax in one pass, tiled over
  the destination tokens, so the (Na x Nb) score matrix is never written to memory. Protected rows/columns
  and ``TokenPairPenalty`` score mods are applied inside the kernel. Tie-break: the *first* destination
  index with the maximal score (what ``torch.max(dim=-1)`` documents). The kernel rounds the normalised
  metric and the score to the input dtype at the same points as the torch path, so in practice it picks
  the same pairs; on exact near-ties (a difference in the last fp16/bf16 bit caused by a different
  accumulation order) the two paths may pick different but equally scored destinations.
- ``fused_merge_wavg`` (``_merge``): the gather/scatter of ToMe's size-weighted merge: unmerged tokens are
  copied to their output slot, each destination sums its own and its sources' ``size * x`` (fp32
  accumulation) and divides once; one launch at ViT sizes, two at large ``r`` (sources ordered by
  destination first, so each source row is read once). Outputs equal the torch path within the input dtype's
  rounding (the torch path rounds ``x * size`` and the partial sums to fp16/bf16; the kernel accumulates in fp32).

Dispatch: ``auto`` (default) uses the kernels for CUDA tensors when Triton imports. ``set_mode("never")`` or
``MERGE_CORE_KERNELS=never`` forces the torch path; ``"always"`` also runs them on CPU tensors, which needs
``TRITON_INTERPRET=1`` (set before the first kernel call) and is how the CPU tests exercise the kernels.
The merge kernel has no backward: with autograd recording (training), ``merge_wavg`` takes the torch path.

Under ``torch.compile`` tracing the same rules pick the ``merge_core::*`` custom ops (``kernels.ops``) instead
of calling Triton directly: one opaque graph node per match / merge (CUDA: the kernels; CPU under ``always``:
the torch reference), so Inductor generates no per-layer kernels for them. Eager calls skip the op dispatcher
(a few microseconds per call, which small batches feel).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

MODES = ("auto", "always", "never")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_METRIC_DIM = 512
MAX_PLAN_ROWS = 2048  # Na above this: the tiled ranking of ``_rank_large`` (the one-tile ranking holds all Na)

_mode = os.environ.get("MERGE_CORE_KERNELS", "auto")
if _mode not in MODES:  # pragma: no cover - configuration error
    raise ValueError(f"MERGE_CORE_KERNELS must be one of {MODES}, got {_mode!r}")


def set_mode(mode: str) -> None:
    """Choose when kernels run: ``auto`` (CUDA tensors), ``always`` (any device), ``never`` (torch only)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Context manager form of ``set_mode`` (restores the previous mode)."""
    previous = _mode
    set_mode(mode)
    try:
        yield
    finally:
        set_mode(previous)


_triton_ok: bool | None = None


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether Triton imports (checked once; ``torch.compile`` takes the answer as a constant instead of tracing
    the import)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_ok = True
        except Exception:  # pragma: no cover - depends on the environment
            _triton_ok = False
    return _triton_ok


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _device_ok(t: torch.Tensor) -> bool:
    if _mode == "never" or _compiling():
        return False
    if _mode == "auto" and not t.is_cuda:
        return False
    return triton_available()


def _fused_ok(t: torch.Tensor) -> bool:
    """Device rule of the matcher / merge: ``_device_ok`` in eager; under tracing the custom ops, which run
    the kernels on CUDA (Triton needed) and the torch reference elsewhere (``always`` only)."""
    if not _compiling():
        return _device_ok(t)
    if _mode == "never" or (_mode == "auto" and not t.is_cuda):
        return False
    return not t.is_cuda or triton_available()


def use_fused_match(a: torch.Tensor, score_mod: object | None) -> bool:
    """Whether ``best_destinations`` should take the fused kernel for these inputs."""
    if not _fused_ok(a) or a.dtype not in _FLOAT_DTYPES or a.shape[-1] > MAX_METRIC_DIM:
        return False
    if score_mod is None:
        return True
    from ..penalty import TokenPairPenalty

    return isinstance(score_mod, TokenPairPenalty) and score_mod.phi.device == a.device


def fused_best_destinations(a, b, protected_a=0, protected_b=0, score_mod=None):
    """(best_score, best_index) of every ``a`` row over ``b`` rows, without the score matrix in memory."""
    if _compiling():
        return ops.best_destinations(a, b, protected_a, protected_b, *ops.penalty_parts(score_mod))
    from ._triton import best_destinations

    return best_destinations(a, b, protected_a, protected_b, score_mod)


def use_fused_plan(a: torch.Tensor, score_mod: object | None) -> bool:
    """Whether ``bipartite_soft_matching`` should compute its whole plan with the sort-free kernels
    (``fused_match_plan``): whenever the fused matcher applies, at any length (Na <= ``MAX_PLAN_ROWS``: one
    ranking tile per batch row; longer: ``_rank_large``'s tiled ranking)."""
    return use_fused_match(a, score_mod)


def fused_match_plan(metric, protected_a: int, protected_b: int, r: int, score_mod=None, sort_unm: bool = True):
    """(unm_idx, src_idx, dst_idx) of bipartite matching of (B, N, C) ``metric`` (even tokens onto odd ones),
    equal to the torch path's (see ``_triton.match_plan`` and ``_rank_large``)."""
    if _compiling():  # the op takes the whole metric: no strided views for Inductor to lay out
        plan = ops.match_plan(metric, protected_a, protected_b, r, *ops.penalty_parts(score_mod), sort_unm)
        return ops.split_plan(plan, (metric.shape[-2] + 1) // 2, r)
    a, b = metric[:, ::2], metric[:, 1::2]
    if a.shape[-2] <= MAX_PLAN_ROWS:
        from ._triton import match_plan

        return match_plan(a, b, protected_a, protected_b, r, score_mod, sort_unm)
    from ._rank_large import match_plan_large

    return match_plan_large(a, b, protected_a, protected_b, r, score_mod, sort_unm)


def use_fused_merge(x: torch.Tensor, size: torch.Tensor | None) -> bool:
    """Whether ``merge_wavg`` should take the fused gather/scatter kernel for these inputs.

    The kernel has no backward, so whenever autograd would record the merge (training) the torch
    path runs instead; otherwise gradients would stop at the first merged layer.
    """
    if not _fused_ok(x) or x.dtype not in _FLOAT_DTYPES:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (size is not None and size.requires_grad)):
        return False
    if size is None:
        return True
    return size.dtype == x.dtype and size.device == x.device and size.shape == x.shape[:-1] + (1,)


def fused_merge_wavg(plan, x: torch.Tensor, size: torch.Tensor | None):
    """Size-weighted merge of ``x`` (and ``size``) with a bipartite ``MergePlan`` in one kernel launch."""
    if _compiling():
        t, c = x.shape[-2:]
        s3 = None if size is None else size.reshape(-1, t, 1)
        unm, src, dst = plan.unm_idx, plan.src_idx, plan.dst_idx
        out, out_size = ops.merge_wavg(x.reshape(-1, t, c), s3, unm, src, dst, plan.protected_a, plan.protected_b)
        return out.reshape(*x.shape[:-2], t - plan.r, c), out_size.reshape(*x.shape[:-2], t - plan.r, 1)
    from ._merge import merge_wavg

    return merge_wavg(plan, x, size)


from . import ops  # noqa: E402  (registers the merge_core::* custom ops; needs MAX_PLAN_ROWS above)

__all__ = [
    "MAX_PLAN_ROWS",
    "MODES",
    "fused_best_destinations",
    "fused_match_plan",
    "fused_merge_wavg",
    "get_mode",
    "kernel_mode",
    "set_mode",
    "triton_available",
    "use_fused_match",
    "use_fused_merge",
    "use_fused_plan",
]
