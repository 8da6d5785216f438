"""Stage-1 students: a timm backbone (features_only, stride-32 map) + the EfficientSAM3 head
Conv1x1(C->E, no bias) -> BN -> GELU -> Conv3x3(E->E), bilinearly resized to the teacher's grid."""

from __future__ import annotations

import os
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StudentSpec:
    """One model-zoo entry: the zoo name, the timm name and its stride-32 channel count."""

    zoo: str
    timm_name: str
    channels: int


# Channel counts verified with timm 1.0.31 (research notes section 3).
STUDENTS: dict[str, StudentSpec] = {
    s.timm_name: s
    for s in (
        StudentSpec("es_rv_s", "repvit_m0_9", 384),
        StudentSpec("es_rv_m", "repvit_m1_1", 512),
        StudentSpec("es_rv_l", "repvit_m2_3", 640),
        StudentSpec("es_tv_s", "tiny_vit_5m_224", 320),
        StudentSpec("es_tv_m", "tiny_vit_11m_224", 448),
        StudentSpec("es_tv_l", "tiny_vit_21m_224", 576),
        StudentSpec("es_ev_s", "efficientvit_b0", 128),
        StudentSpec("es_ev_m", "efficientvit_b1", 256),
        StudentSpec("es_ev_l", "efficientvit_b2", 384),
    )
}
# The guide's short names (`tiny_vit_5m`) and zoo names (`es_rv_m`) resolve too.
_ALIASES = {s.zoo: s.timm_name for s in STUDENTS.values()} | {
    n.removesuffix("_224"): n for n in STUDENTS if n.endswith("_224")
}


def resolve_backbone(name: str) -> StudentSpec:
    """timm name, guide short name or zoo name -> spec; one-line error otherwise."""
    key = _ALIASES.get(name, name)
    if key not in STUDENTS:
        raise ValueError(f"MODEL.BACKBONE: unknown student {name!r}; expected one of {', '.join(STUDENTS)}")
    return STUDENTS[key]


class ProjectionHead(nn.Sequential):
    """Conv1x1 (no bias) -> BN -> GELU -> Conv3x3: 8 state-dict entries, keys head.{0,1,3}.*."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.GELU(),
            nn.Conv2d(embed_dim, embed_dim, 3, padding=1),
        )


class ImageStudentEncoder(nn.Module):
    """Image (B,3,H,W) -> embedding (B, embed_dim, embed_size, embed_size), the teacher's layout."""

    def __init__(self, backbone: nn.Module, in_channels: int, embed_dim: int = 1024, embed_size: int = 72) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(in_channels, embed_dim)
        self.embed_size = embed_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(x)[-1]
        out = self.head(feat)
        if out.shape[-1] != self.embed_size or out.shape[-2] != self.embed_size:
            out = F.interpolate(out, size=(self.embed_size, self.embed_size), mode="bilinear", align_corners=False)
        return out


def build_backbone(name: str, pretrained: str = "") -> tuple[nn.Module, int]:
    """timm features_only model with only the stride-32 stage; ImageNet weights come from a local file
    (a timm classifier state dict), never from the hub."""
    spec = resolve_backbone(name)
    kwargs: dict = dict(features_only=True, out_indices=(3,))
    if pretrained:
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"MODEL.PRETRAINED: weights file not found: {pretrained}")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=pretrained, hf_hub_id=None, url=None))
    backbone = timm.create_model(spec.timm_name, **kwargs)
    channels = backbone.feature_info.channels()[-1]
    if channels != spec.channels:
        raise RuntimeError(f"{spec.timm_name}: timm reports {channels} channels, expected {spec.channels}")
    return backbone, channels


def build_student(name: str, embed_dim: int = 1024, embed_size: int = 72, pretrained: str = "") -> ImageStudentEncoder:
    """One of the 9 students with random (or local ImageNet) backbone weights and a random head."""
    backbone, channels = build_backbone(name, pretrained)
    return ImageStudentEncoder(backbone, channels, embed_dim, embed_size)
