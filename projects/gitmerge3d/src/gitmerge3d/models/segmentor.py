"""Pointcept's DefaultSegmentorV2: backbone + linear ``seg_head`` (keys ``backbone.*``, ``seg_head.*``).

For an encoder-only backbone (Sonata linear probing, 0a) features are up-cast level by level:
each pooled level's features are copied back to its parent points and concatenated, giving
48+96+192+384+512 = 1232 channels for Sonata.
"""

from __future__ import annotations

import torch
from torch import nn

from .point_transformer_v3m2 import PointTransformerV3
from .structure import Point


def upcast_features(point: Point) -> Point:
    """Walk pooling parents back to the finest level, concatenating coarse features onto fine points."""
    while "pooling_parent" in point.keys():
        if "pooling_inverse" not in point.keys():
            raise KeyError("a pooled Point needs 'pooling_inverse' to up-cast features")
        parent = point.pop("pooling_parent")
        inverse = point.pop("pooling_inverse")
        parent["feat"] = torch.cat([parent["feat"], point["feat"][inverse]], dim=-1)
        point = parent
    return point


class DefaultSegmentorV2(nn.Module):
    def __init__(
        self, num_classes: int, backbone_out_channels: int, backbone: PointTransformerV3, freeze_backbone=False
    ):
        super().__init__()
        self.backbone = backbone
        self.seg_head = nn.Linear(backbone_out_channels, num_classes) if num_classes > 0 else nn.Identity()
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad = False

    def forward(self, input_dict) -> torch.Tensor:
        """Per-point logits (N, num_classes) on the input (grid-sampled) points."""
        point = self.backbone(input_dict)
        point = upcast_features(point)
        feat = point["feat"]
        if isinstance(self.seg_head, nn.Linear) and feat.shape[-1] != self.seg_head.in_features:
            raise ValueError(
                f"backbone_out_channels={self.seg_head.in_features} but the backbone gives {feat.shape[-1]} channels"
            )
        return self.seg_head(feat)
