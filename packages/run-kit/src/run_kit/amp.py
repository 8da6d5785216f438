"""Mixed precision that is a no-op where it does not apply (CPU float16 autocast is slow and not what users want)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch


def amp_autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.float16) -> Any:
    """``torch.autocast`` on CUDA when enabled; a null context otherwise."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A GradScaler that is active only for float16 autocast on CUDA (a disabled one passes calls through)."""
    return torch.amp.GradScaler("cuda", enabled=bool(enabled) and device.type == "cuda")
