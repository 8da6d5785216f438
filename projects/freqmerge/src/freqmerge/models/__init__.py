"""Models: LFGM, the FreqMerge matcher and the ViT-Small builder (guide: models/)."""

from .freq_merge import SCORERS, FreqMergeMatcher
from .lfgm import LFGM, lfgm_from_channel_mean, lfgm_from_pixels, lfgm_scores
from .vit_freqmerge import apply_freqmerge, build_model, create_backbone, merge_schedule, token_counts

__all__ = [
    "LFGM",
    "SCORERS",
    "FreqMergeMatcher",
    "apply_freqmerge",
    "build_model",
    "create_backbone",
    "lfgm_from_channel_mean",
    "lfgm_from_pixels",
    "lfgm_scores",
    "merge_schedule",
    "token_counts",
]
