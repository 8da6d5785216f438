"""SAM3's SimpleFPN neck (`detector.backbone.vision_backbone.convs.*`) and its sine position encoding,
own code in SAM3's key layout, for the frozen path of the geometry fine-tune.

The neck turns the 72x72x1024 trunk (or student) embedding into four 256-channel levels at scales
4, 2, 1, 0.5 (288, 144, 72, 36). SAM3 inference drops the 0.5 level (scalp=1) and runs the encoder and
geometry pooling on 72x72; the reference FT used the 36x36 level. `select_level` keeps that choice
explicit (MODEL.FEATURE_SIZE)."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from run_kit import CheckpointError, load_state_dict_checked

NECK_PREFIX = "detector.backbone.vision_backbone.convs."


class SinePositionEncoding(nn.Module):
    """DETR-style 2-D sine encoding: per axis, positions 1..N scaled to (0, 2 pi], frequencies
    temperature^(2 floor(i/2) / F) with F = d/2, sin on even and cos on odd channels; y channels first."""

    def __init__(self, d_model: int = 256, temperature: float = 10000.0) -> None:
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model: expected an even width, got {d_model}")
        self.half, self.temperature, self.scale = d_model // 2, temperature, 2 * math.pi

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        """(n,) coordinates normalised to [0, 1] -> (n, half): sin/cos of t * 2 pi / frequency."""
        i = torch.arange(self.half, dtype=torch.float32, device=t.device)
        freq = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.half)
        angle = (t.float() * self.scale)[:, None] / freq
        out = torch.empty_like(angle)
        out[:, 0::2], out[:, 1::2] = angle[:, 0::2].sin(), angle[:, 1::2].cos()
        return out

    def _axis(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, half) encoding of pixel positions 1..n (normalised by n)."""
        return self.encode(torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1e-6))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, d_model, H, W) in x's dtype."""
        b, _, h, w = x.shape
        ey, ex = self._axis(h, x.device), self._axis(w, x.device)
        pos = torch.cat([ey[:, None, :].expand(h, w, -1), ex[None, :, :].expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1).to(x.dtype)


def _level(scale: float, dim: int, d_model: int) -> nn.Sequential:
    """One SimpleFPN branch with SAM3's child names (dconv_2x2[_0/_1], maxpool_2x2, conv_1x1, conv_3x3)."""
    seq = nn.Sequential()
    if scale == 4.0:
        seq.add_module("dconv_2x2_0", nn.ConvTranspose2d(dim, dim // 2, 2, stride=2))
        seq.add_module("gelu", nn.GELU())
        seq.add_module("dconv_2x2_1", nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
        width = dim // 4
    elif scale == 2.0:
        seq.add_module("dconv_2x2", nn.ConvTranspose2d(dim, dim // 2, 2, stride=2))
        width = dim // 2
    elif scale == 1.0:
        width = dim
    elif scale == 0.5:
        seq.add_module("maxpool_2x2", nn.MaxPool2d(2, stride=2))
        width = dim
    else:
        raise ValueError(f"scale: expected one of 4, 2, 1, 0.5, got {scale}")
    seq.add_module("conv_1x1", nn.Conv2d(width, d_model, 1))
    seq.add_module("conv_3x3", nn.Conv2d(d_model, d_model, 3, padding=1))
    return seq


class SimpleFPN(nn.Module):
    """`convs.{0..3}` exactly as in SAM3's checkpoint (7.80M parameters at dim 1024, d_model 256)."""

    def __init__(self, dim: int = 1024, d_model: int = 256, scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)) -> None:
        super().__init__()
        self.scales = scales
        self.convs = nn.ModuleList(_level(s, dim, d_model) for s in scales)
        self.position_encoding = SinePositionEncoding(d_model)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, dim, S, S) -> (features, position encodings), one per scale, largest first."""
        feats = [conv(x) for conv in self.convs]
        return feats, [self.position_encoding(f) for f in feats]


def select_level(feats: list[torch.Tensor], size: int) -> int:
    """Index of the level with spatial size `size` (72: SAM3 inference; 36: the reference FT)."""
    for i, f in enumerate(feats):
        if f.shape[-1] == size:
            return i
    raise ValueError(f"MODEL.FEATURE_SIZE: no FPN level of size {size} (have {[f.shape[-1] for f in feats]})")


def read_sam3_state(path: str, flag: str = "MODEL.SAM3_CHECKPOINT") -> dict:
    """The flat state dict of a local sam3.pt (memory-mapped; `{"model": ...}` unwrapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (pickle/zip errors have many types)
        raise CheckpointError(f"{flag}: {path} is not a torch checkpoint ({type(e).__name__})") from None
    return sd["model"] if isinstance(sd.get("model"), dict) else sd


def load_part(module: nn.Module, sd: dict, prefix: str, source: str) -> None:
    """Load the `prefix`* tensors of a SAM3 state dict into `module` (strict, one-line errors)."""
    part = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not part:
        raise CheckpointError(f"{source} has no {prefix}* keys (not a SAM3 checkpoint?)")
    load_state_dict_checked(module, part, f"{source} [{prefix}]")


def load_sam3_part(module: nn.Module, path: str, prefix: str, flag: str = "MODEL.SAM3_CHECKPOINT") -> None:
    """Load the `prefix`* tensors of a local sam3.pt into `module`."""
    load_part(module, read_sam3_state(path, flag), prefix, f"{flag}: {path}")


def load_neck(neck: SimpleFPN, path: str) -> None:
    """`detector.backbone.vision_backbone.convs.*` -> neck.convs."""
    load_sam3_part(neck.convs, path, NECK_PREFIX)
