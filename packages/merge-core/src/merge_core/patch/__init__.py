"""Model adapters: ``merge_core.patch.timm(model)`` like ``tome.patch.timm``; ``remove_patch`` undoes any of them."""

from ..adapter import remove_patch
from .timm_vit import apply_patch as timm

__all__ = ["timm", "remove_patch"]
