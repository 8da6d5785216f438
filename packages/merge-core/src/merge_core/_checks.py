"""Argument checks shared by every op: one-line errors that name the argument and what was expected."""

from __future__ import annotations

import numbers

import torch


def as_int(value: object, name: str) -> int:
    """An integer from what ToMe users pass: int, numpy integer, integral float (8.0) or 0-d tensor.

    Bools and non-integral values (2.5) are rejected: ToMe would truncate 2.5 silently.
    """
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise TypeError(
        f"{name} must be a non-negative int (or numpy integer, integral float, 0-d tensor), "
        f"got {type(value).__name__} {value!r}"
    )


def check_count(value: object, name: str) -> int:
    """Validate and return a non-negative integer count such as ``r`` (see ``as_int`` for accepted forms)."""
    value = as_int(value, name)
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


def check_merged_tokens(x: torch.Tensor, ref_shape: torch.Size, n_merged: int, name: str) -> None:
    """``unmerge`` takes the merged tokens: the metric's leading dims and ``n_merged`` tokens."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(ref_shape) or tuple(x.shape[:-1]) != (*ref_shape[:-2], n_merged):
        raise ValueError(
            f"{name} must have shape {(*ref_shape[:-2], n_merged)} + (C,) (the merged tokens), got {tuple(x.shape)}"
        )
