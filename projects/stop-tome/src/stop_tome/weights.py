"""Load OpenAI CLIP weights from a local file: the TorchScript archive OpenAI ships, or a plain state dict.

No download ever: ``--pretrained_dir`` must hold ``ViT-B-32.pt`` / ``ViT-B-16.pt`` (the names OpenAI uses).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

KNOWN_NAMES = {"ViT-B/32": "ViT-B-32.pt", "ViT-B/16": "ViT-B-16.pt", "ViT-L/14": "ViT-L-14.pt"}
_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def clip_file(pretrained_clip_name: str, pretrained_dir: str | os.PathLike) -> Path:
    """Resolve ``--pretrained_clip_name`` + ``--pretrained_dir`` to an existing file, or explain what is missing."""
    name = KNOWN_NAMES.get(pretrained_clip_name, pretrained_clip_name)
    path = Path(pretrained_dir).expanduser() / name
    if Path(pretrained_clip_name).is_file():
        path = Path(pretrained_clip_name)
    if not path.is_file():
        raise FileNotFoundError(
            f"--pretrained_clip_name {pretrained_clip_name!r}: expected the local file {path} "
            f"(OpenAI's {name}; nothing is downloaded)"
        )
    return path


def load_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a CLIP state dict (fp32 copies) from a TorchScript archive or a ``torch.save``-d state dict."""
    path = Path(path)
    try:
        sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: neither a TorchScript archive nor a state dict ({type(exc).__name__})") from exc
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or "visual.conv1.weight" not in sd:
        raise ValueError(f"{path}: not an OpenAI CLIP state dict (no 'visual.conv1.weight')")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k not in _NON_WEIGHTS}
