"""Models in Pointcept's layout: PT-v3m2 (Sonata), the segmentor, sparse conv, serialization."""

from .checkpoint import build_from_sonata, load_backbone, load_segmentor
from .point_transformer_v3m2 import PointTransformerV3, SerializedAttention, sonata_config
from .segmentor import DefaultSegmentorV2
from .structure import Point

__all__ = [
    "DefaultSegmentorV2",
    "Point",
    "PointTransformerV3",
    "SerializedAttention",
    "build_from_sonata",
    "load_backbone",
    "load_segmentor",
    "sonata_config",
]
