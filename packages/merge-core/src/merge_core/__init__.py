"""merge-core: token-merging ops with ToMe's API, CUDA-aware, plus model adapters.

Switch from ToMe by changing the import: ``import merge_core as tome`` gives ``tome.patch.timm/mae/swag``,
``tome.merge.*``, ``tome.utils.parse_r/benchmark`` and ``tome.vis.make_visualization``. Beyond ToMe:
``patch.torchvision``, ``patch.hf`` and the adapter kit ``merge_core.adapter`` for your own models.
"""

import importlib
from typing import Any

from . import adapter, merge, patch, utils
from .attention import proportional_attention
from .binned import binned_soft_matching
from .matching import (
    bipartite_soft_matching,
    do_nothing,
    kth_bipartite_soft_matching,
    random_bipartite_soft_matching,
)
from .merge import (
    merge_source,
    merge_source_index,
    merge_wavg,
    pool_by_source,
    source_index_to_dense,
    unmerge_to_source,
)
from .penalty import TokenPairPenalty
from .pruning import prune_by_score, random_pruning
from .schedule import keep_rate_schedule, parse_r, tokens_per_layer


def __getattr__(name: str) -> Any:
    """``vis`` / ``make_visualization`` load on first use, so importing merge_core needs no Pillow."""
    if name == "vis":
        return importlib.import_module(f"{__name__}.vis")
    if name == "make_visualization":
        return importlib.import_module(f"{__name__}.vis").make_visualization
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "adapter",
    "merge",
    "patch",
    "utils",
    "vis",
    "bipartite_soft_matching",
    "binned_soft_matching",
    "do_nothing",
    "keep_rate_schedule",
    "kth_bipartite_soft_matching",
    "make_visualization",
    "merge_source",
    "merge_source_index",
    "merge_wavg",
    "parse_r",
    "pool_by_source",
    "proportional_attention",
    "prune_by_score",
    "random_pruning",
    "random_bipartite_soft_matching",
    "source_index_to_dense",
    "tokens_per_layer",
    "TokenPairPenalty",
    "unmerge_to_source",
]
