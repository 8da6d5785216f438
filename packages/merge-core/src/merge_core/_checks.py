"""Argument checks shared by every op: one-line errors that name the argument and what was expected."""

from __future__ import annotations

import torch


def check_count(value: object, name: str) -> int:
    """Validate a non-negative integer count such as ``r`` (bools and floats are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_tokens(tensor: torch.Tensor, name: str, min_dim: int = 3) -> None:
    """Require a tensor shaped (..., N, C) with at least ``min_dim`` dims."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() < min_dim:
        raise ValueError(
            f"{name} must have shape (batch..., tokens, channels) with >= {min_dim} dims, "
            f"got shape {tuple(tensor.shape)}"
        )


def check_same_tokens(x: torch.Tensor, ref_shape: torch.Size, ref_device: torch.device, name: str) -> None:
    """A closure built from ``metric`` may only be applied to tensors with the same leading dims and N."""
    if x.dim() != len(ref_shape) or tuple(x.shape[:-1]) != tuple(ref_shape[:-1]):
        raise ValueError(
            f"{name} must have shape {tuple(ref_shape[:-1])} + (C,) like the metric it was matched on, "
            f"got {tuple(x.shape)}"
        )
    if x.device != ref_device:
        raise ValueError(f"{name} is on {x.device} but the matching was computed on {ref_device}")
