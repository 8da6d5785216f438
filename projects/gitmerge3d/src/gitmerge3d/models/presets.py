"""Reduced Sonata configurations: the real structure (5 stages, 4 orders, decoder) at toy widths.

Used by CPU tests and by the benchmark's ``--reduced`` mode, where the full 124M-parameter model
would take minutes per forward on a shared CPU.
"""

from __future__ import annotations

from .point_transformer_v3m2 import sonata_config


def reduced_config(variant: str = "0c", patch: int = 64, **overrides) -> dict:
    """One block per stage, widths 16/16/32/32/32, ``patch`` tokens per serialized patch."""
    cfg = sonata_config(
        variant,
        enc_depths=(1, 1, 1, 1, 1),
        enc_channels=(16, 16, 32, 32, 32),
        enc_num_head=(2, 2, 4, 4, 4),
        enc_patch_size=(patch,) * 5,
        drop_path=0.0,
    )
    if variant in ("0b", "0c"):
        cfg.update(dec_depths=(1, 1, 1, 1), dec_channels=(16, 16, 32, 32), dec_num_head=(2, 2, 4, 4))
        cfg.update(dec_patch_size=(patch,) * 4)
    cfg.update(overrides)
    return cfg
