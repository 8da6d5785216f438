"""Model adapters, ToMe's names first: ``patch.timm``, ``patch.mae``, ``patch.swag`` (torchvision ViT).

Beyond ToMe: ``patch.torchvision`` (same as ``swag``), ``patch.hf`` (Hugging Face ViT / DINOv2 / CLIP vision /
SigLIP vision). ``remove_patch`` undoes any of them. The torchvision and Hugging Face adapters are loaded on
first use, so importing merge_core never imports those libraries; without timm, ``patch.timm``/``patch.mae``
raise its ImportError on use instead of at ``import merge_core``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..adapter import remove_patch

_LAZY = {"swag": "torchvision_vit", "torchvision": "torchvision_vit", "hf": "hf_vit"}
try:
    from .mae import apply_patch as mae
    from .timm_vit import apply_patch as timm
except ModuleNotFoundError:  # no timm installed: merge_core's ops still import; patch.timm/mae fail on use
    _LAZY.update(timm="timm_vit", mae="mae")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{_LAZY[name]}").apply_patch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["hf", "mae", "remove_patch", "swag", "timm", "torchvision"]
