"""Models in Pointcept's layout: PT-v3m2 (Sonata), PT-v3m1 (PTv3 base), the segmentor."""

from .checkpoint import build_from_sonata, load_backbone, load_segmentor
from .point_transformer_v3m1 import PTV3_BASE, PointTransformerV3M1
from .point_transformer_v3m2 import PointTransformerV3, SerializedAttention, sonata_config
from .segmentor import DefaultSegmentorV2
from .structure import Point

__all__ = [
    "DefaultSegmentorV2",
    "Point",
    "PTV3_BASE",
    "PointTransformerV3",
    "PointTransformerV3M1",
    "SerializedAttention",
    "build_from_sonata",
    "load_backbone",
    "load_segmentor",
    "sonata_config",
]
