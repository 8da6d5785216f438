"""ToMe's MAE patch for timm ViTs: proportional attention off by default, size-weighted average pooling.

MAE fine-tuned checkpoints in timm >= 1.0 are ``VisionTransformer(global_pool="avg", fc_norm=True)``; the
timm adapter already averages merged tokens by size (ToMe's MAE change), so this is the timm adapter
with ToMe's MAE default ``prop_attn=False`` (MAE models are trained without it). Models from the MAE
repository that override ``forward_features`` with their own unweighted pooling are rejected.
"""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

from ..adapter import MatchFn
from .timm_vit import apply_patch as _timm_patch


def apply_patch(
    model: VisionTransformer,
    trace_source: bool | str = False,
    prop_attn: bool = False,
    *,
    attn_backend: str = "auto",
    match_fn: MatchFn | None = None,
) -> VisionTransformer:
    """Patch an MAE-style timm ViT (``tome.patch.mae``); set ``model.r`` afterwards."""
    if isinstance(model, VisionTransformer) and type(model).forward_features is not VisionTransformer.forward_features:
        raise TypeError(
            f"model ({type(model).__name__}) overrides forward_features (MAE repository class?); load the "
            "checkpoint into timm's VisionTransformer(global_pool='avg', fc_norm=True) instead"
        )
    return _timm_patch(model, trace_source, prop_attn, attn_backend=attn_backend, match_fn=match_fn)
