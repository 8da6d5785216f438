"""Teachers behind one interface: `teacher(images) -> (B, embed_dim, embed_size, embed_size)` with
`.embed_dim`, `.embed_size`, `.img_size`. The real one is SAM3's ViT trunk loaded from a local
`sam3.pt`; `sam3_tiny` is the same module at reduced size; `standin` is a tiny conv net for fast tests."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .sam3_vit import SAM3_VIT, TINY_VIT, SAM3ViT

TRUNK_PREFIXES = ("detector.backbone.vision_backbone.trunk.", "backbone.vision_backbone.trunk.")


class CheckpointKeyError(ValueError):
    """A checkpoint that does not fit the module; the message is one line naming file and key."""


class StandInTeacher(nn.Module):
    """Patchify conv -> GELU -> 1x1 conv, pooled to the embedding grid. Deterministic given its seed."""

    def __init__(self, embed_dim: int = 16, embed_size: int = 8, img_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.embed_dim, self.embed_size, self.img_size = embed_dim, embed_size, img_size
        patch = max(img_size // embed_size, 1)
        self.patch = nn.Conv2d(3, embed_dim, patch, stride=patch)
        self.mix = nn.Conv2d(embed_dim, embed_dim, 1)
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(F.gelu(self.patch(x)))
        if y.shape[-1] != self.embed_size:
            y = F.adaptive_avg_pool2d(y, self.embed_size)
        return y


def extract_trunk_state(sd: dict, source: str) -> dict:
    """The trunk's entries of a SAM3 checkpoint (flat or under "model"), prefix stripped."""
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    for prefix in TRUNK_PREFIXES:
        out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if out:
            return out
    raise CheckpointKeyError(f"{source}: no keys under {TRUNK_PREFIXES[0]}* (not a SAM3 checkpoint?)")


def load_trunk(model: SAM3ViT, path: str) -> None:
    """Load `detector.backbone.vision_backbone.trunk.*` from a local sam3.pt; strict, one-line errors.
    Missing `freqs_cis` buffers are fine (they are recomputed, identical by construction)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TEACHER.CHECKPOINT: file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (pickle/zip errors have many types)
        raise CheckpointKeyError(f"{path}: not a torch checkpoint ({type(e).__name__})") from None
    trunk = extract_trunk_state(sd, path)
    own = model.state_dict()
    for key, value in trunk.items():
        if key not in own:
            raise CheckpointKeyError(f"{path}: unexpected trunk key {key}")
        if own[key].shape != value.shape:
            raise CheckpointKeyError(
                f"{path}: shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in trunk and not k.endswith("freqs_cis")]
    if missing:
        raise CheckpointKeyError(f"{path}: missing trunk key {missing[0]} ({len(missing)} missing)")
    model.load_state_dict(trunk, strict=False)


def build_teacher(
    kind: str = "sam3", checkpoint: str = "", embed_dim: int = 16, embed_size: int = 8, img_size: int = 64
) -> nn.Module:
    """sam3 / sam3_tiny / standin, in eval mode with frozen parameters. The stand-in's sizes come from
    the arguments (the config's DISTILL.EMBED_DIM/EMBED_SIZE, DATA.IMG_SIZE)."""
    if checkpoint and not os.path.isfile(checkpoint):  # before building a 446M trunk that could not be loaded
        raise FileNotFoundError(f"TEACHER.CHECKPOINT: file not found: {checkpoint}")
    if kind == "sam3":
        model = SAM3ViT(SAM3_VIT)
    elif kind == "sam3_tiny":
        model = SAM3ViT(TINY_VIT)
    elif kind == "standin":
        model = StandInTeacher(embed_dim, embed_size, img_size)
    else:
        raise ValueError(f"TEACHER.TYPE: expected sam3, sam3_tiny or standin, got {kind!r}")
    if checkpoint:
        if not isinstance(model, SAM3ViT):
            raise ValueError("TEACHER.CHECKPOINT: only the sam3 / sam3_tiny teachers load a checkpoint")
        load_trunk(model, checkpoint)
    model.eval().requires_grad_(False)
    return model


def check_teacher_shape(teacher: nn.Module, embed_dim: int, embed_size: int, img_size: int) -> None:
    """The config and the teacher must agree, or every stored record would have the wrong size."""
    got = (teacher.embed_dim, teacher.embed_size, teacher.img_size)
    want = (embed_dim, embed_size, img_size)
    if got != want:
        raise ValueError(
            f"teacher gives (embed_dim, embed_size, img_size) = {got} but the config says {want} "
            "(DISTILL.EMBED_DIM, DISTILL.EMBED_SIZE, DATA.IMG_SIZE)"
        )
