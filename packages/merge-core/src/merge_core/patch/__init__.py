"""Model adapters: ``merge_core.patch.timm(model)`` like ``tome.patch.timm``; ``remove_patch`` undoes it."""

from .timm_vit import apply_patch as timm
from .timm_vit import remove_patch

__all__ = ["timm", "remove_patch"]
