"""Narrow spconv-triton's Triton autotune space (``GITMERGE3D_SPCONV_TUNE``) so a bare GPU warms up in seconds.

Why: spconv-triton 1.0.0 wraps each kernel in ``triton.autotune``; on the first call per tuning key it
compiles *and* times (``do_bench``, ~0.1 s) every config. Its gather-GEMM (forward and input-grad) has 37
configs keyed on (kv, C_out, C_in, IEEE, TF32, FP16_ACC, USE_MASK, dtypes); the pair-generation kernels
8-10 BLOCK x num_warps configs keyed on (KV, NDIM) / KV / NEED_BWD / nothing; the weight-grad 21, pooling 11.
Sonata 0c has 6 conv widths (48, 64, 96, 192, 384, 512; all k=3 submanifold), so a cold forward compiles
~250 kernels: the issue measured 280 s on a fresh H100.

This module installs an ``early_config_prune`` hook (Triton's own pruning interface, called with the full
config list and the kernel's arguments) on those autotuners:

- ``full``: spconv-triton's lists, untouched.
- ``narrow`` (default): the gather-GEMM / weight-grad keep <= 4 of spconv-triton's own configs, chosen by
  the channel band of max(C_out, C_in) (tiles that fit the width, wide tiles for wide layers); the
  memory-bound pair kernels keep one config (BLOCK=1024, 4 warps) and pooling one per band.
- ``fixed``: one config per kernel and key (the first of each narrow list): nothing is timed.

Exactness: every kept config is one spconv-triton ships. The pair and pooling kernels are byte-identical
for any config (masked element-wise work); in the GEMMs only BLOCK_R changes results, by reordering the
fp32 accumulation (rounding-level, the same freedom the full autotune has). Triton's on-disk autotune key
includes the pruned list, so caches of different modes never mix. Should spconv-triton change its lists
so that no listed config matches, the full list is used (slow, never wrong).
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

TUNE_MODES = ("full", "narrow", "fixed")
_mode = os.environ.get("GITMERGE3D_SPCONV_TUNE", "narrow")
_installed: str | None = None  # mode whose hooks are on the autotuners now

# A spec matches a config when its leading fields equal (*kwargs in Rule.params order, num_warps, num_stages).
Spec = tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    """Which configs to keep for one group of spconv-triton kernels."""

    module: str
    kernels: tuple[str, ...]
    params: tuple[str, ...]  # config kwargs, in spec order
    dims: tuple[str, ...]  # kernel args whose max picks the band; () = one band
    bands: tuple[tuple[int, tuple[Spec, ...]], ...]  # (max width, specs best-first)


_BIG = 1 << 30
_IMPL = "spconv_triton.pytorch._impl"
RULES = (
    # (BLOCK_M, BLOCK_N, BLOCK_R, GROUP_SIZE_M, num_warps, num_stages)
    Rule(
        f"{_IMPL}.gemm",
        ("_gather_gemm_kernel",),
        ("BLOCK_M", "BLOCK_N", "BLOCK_R", "GROUP_SIZE_M"),
        ("N_dim", "R_dim"),
        (
            (32, ((128, 32, 16, 8, 4, 3), (64, 16, 16, 8, 2, 4), (128, 16, 32, 8, 4, 3), (64, 32, 32, 8, 2, 4))),
            (64, ((128, 64, 32, 8, 4, 3), (64, 64, 32, 8, 4, 3), (128, 64, 64, 8, 4, 3), (64, 64, 64, 8, 4, 4))),
            (128, ((128, 128, 32, 8, 8, 3), (128, 64, 32, 8, 4, 3), (128, 128, 64, 8, 8, 4), (128, 64, 64, 8, 4, 3))),
            (
                _BIG,
                ((128, 128, 32, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (256, 128, 32, 8, 8, 3)),
            ),
        ),
    ),
    # (BLOCK_P, BLOCK_K, BLOCK_C, num_warps, num_stages): training backward only
    Rule(
        f"{_IMPL}.gemm",
        ("_dweight_masked_kernel",),
        ("BLOCK_P", "BLOCK_K", "BLOCK_C"),
        ("K_dim", "C_dim"),
        (
            (32, ((128, 32, 16, 4, 3), (128, 16, 16, 2, 4), (64, 32, 32, 2, 5))),
            (64, ((64, 64, 64, 4, 3), (64, 64, 32, 4, 4), (128, 64, 64, 4, 3))),
            (_BIG, ((128, 128, 64, 8, 3), (64, 128, 128, 8, 3), (128, 64, 64, 8, 4))),
        ),
    ),
    # (BLOCK, num_warps): element-wise pair generation, byte-identical for any BLOCK
    Rule(
        f"{_IMPL}.pair_kernels",
        (
            "_candidates_kernel",
            "_mask_pack_kernel",
            "_scatter_igemm_kernel",
            "_lower_bound_rows_kernel",
            "_subm_membership_kernel",
        ),
        ("BLOCK",),
        (),
        ((_BIG, ((1024, 4),)),),
    ),
    # (BLOCK_M, BLOCK_C, num_warps, num_stages): pooling reductions, exact for any tile
    Rule(
        f"{_IMPL}.pool",
        ("_maxpool_fwd_kernel", "_maxpool_bwd_kernel", "_avgpool_fwd_kernel", "_avgpool_bwd_kernel"),
        ("BLOCK_M", "BLOCK_C"),
        ("C",),
        ((16, ((128, 16, 2, 2),)), (_BIG, ((128, 64, 4, 3),))),
    ),
)


def set_tune_mode(name: str) -> None:
    """Select the autotune narrowing for this process (see module docstring); applied at the next conv."""
    global _mode
    if name not in TUNE_MODES:
        raise ValueError(f"GITMERGE3D_SPCONV_TUNE / tune mode must be one of {TUNE_MODES}, got {name!r}")
    _mode = name


def get_tune_mode() -> str:
    return _mode


def signature(config, params: tuple[str, ...]) -> Spec:
    """(*kwargs in ``params`` order, num_warps, num_stages) of a ``triton.Config``; missing kwargs read 8
    (spconv-triton's GROUP_SIZE_M default)."""
    return tuple(config.kwargs.get(p, 8) for p in params) + (config.num_warps, config.num_stages)


def select_configs(configs: list, rule: Rule, args: dict, mode: str) -> list:
    """The configs of ``configs`` kept for a call with kernel arguments ``args`` (pure: testable on CPU)."""
    if mode not in TUNE_MODES:
        raise ValueError(f"mode must be one of {TUNE_MODES}, got {mode!r}")
    if mode == "full":
        return list(configs)
    missing = [d for d in rule.dims if d not in args]
    if missing:
        raise ValueError(f"kernel args lack {missing[0]!r}, needed to pick a config band for {rule.kernels[0]}")
    width = max((int(args[d]) for d in rule.dims), default=0)
    specs = next(specs for bound, specs in rule.bands if width <= bound)
    kept = []
    for spec in specs:
        kept += [c for c in configs if signature(c, rule.params)[: len(spec)] == spec and c not in kept][:1]
    if not kept:  # spconv-triton changed its lists: fall back to them
        return list(configs)
    return kept[:1] if mode == "fixed" else kept


def _prune(rule: Rule, configs: list, named_args: dict, **kwargs) -> list:
    return select_configs(configs, rule, {**named_args, **kwargs}, _mode)


def kernels() -> list[tuple[Rule, object]]:
    """(rule, autotuner) of every narrowed spconv-triton kernel that imports here."""
    found = []
    for rule in RULES:
        mod = importlib.import_module(rule.module)
        found += [(rule, getattr(mod, name)) for name in rule.kernels if hasattr(mod, name)]
    return found


def install() -> None:
    """Put the prune hooks of the current mode on spconv-triton's autotuners (once per mode change).

    A mode change also drops the autotuners' in-memory choices, so the next call re-tunes (or reads the
    disk cache of that mode)."""
    global _installed
    if _installed == _mode:
        return
    for rule, tuner in kernels():
        if not hasattr(tuner, "early_config_prune") or not hasattr(tuner, "cache"):
            raise RuntimeError(f"{rule.module}.{rule.kernels[0]} is not a triton Autotuner; cannot narrow it")
        tuner.early_config_prune = None if _mode == "full" else functools.partial(_prune, rule)
        tuner.cache.clear()
    _installed = _mode
