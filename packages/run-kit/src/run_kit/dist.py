"""One code path for a plain process and for torchrun (DDP): environment, device, wrapping, reductions.

Under torchrun (``WORLD_SIZE`` > 1) a process group is created (NCCL on CUDA, gloo on CPU) and each process
takes GPU ``LOCAL_RANK``. As one plain process nothing is initialised and every helper is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    distributed: bool = False


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    if not text.lstrip("-").isdigit():
        raise ValueError(f"environment variable {name}: expected an integer, got {text!r}")
    return int(text)


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA exists, else CPU; a bare ``"cuda"`` gets ``local_rank``."""
    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "", "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device: unknown device {device!r} (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {str(dev)!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {str(dev)!r} but only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def setup_distributed(
    device: str | torch.device = "auto", backend: str | None = None, timeout_s: float = 1800
) -> DistEnv:
    """Describe (and under torchrun, initialise) the run. Safe to call when a group already exists."""
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistEnv(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kind = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(kind, timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    return DistEnv(rank, local_rank, dist.get_world_size(), dev, rank == 0, True)


def cleanup_distributed() -> None:
    """Destroy the process group if one exists (call once at the end of a run, on every rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, env: DistEnv, **ddp_kwargs: Any) -> nn.Module:
    """DistributedDataParallel around ``model`` (already on ``env.device``) when distributed; else ``model``."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in one process)."""
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_sum(t: torch.Tensor | float, env: DistEnv) -> torch.Tensor:
    """Sum over ranks (a new tensor on ``env.device``; float64 for Python numbers so counts stay exact)."""
    out = torch.as_tensor(t, dtype=torch.float64 if not isinstance(t, torch.Tensor) else None).to(env.device).clone()
    if env.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor | float, env: DistEnv) -> torch.Tensor:
    """Mean over ranks (equal weight per rank); for per-sample means use ``all_reduce_sum`` of sums and counts."""
    out = all_reduce_sum(t, env)
    return out / env.world_size if env.distributed else out


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. a run directory or a resolved config)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def set_sampler_epoch(loader_or_sampler: Any, epoch: int) -> None:
    """The convention for shuffling under DDP: call before each epoch with the epoch index.

    ``DistributedSampler`` shuffles with ``seed + epoch``; store the same index as ``sampler_epoch`` in the resume
    state so a resumed run draws the same order. Loaders/samplers without ``set_epoch`` are left alone.
    """
    sampler = getattr(loader_or_sampler, "sampler", loader_or_sampler)
    for candidate in (sampler, getattr(loader_or_sampler, "batch_sampler", None)):
        if candidate is not None and hasattr(candidate, "set_epoch"):
            candidate.set_epoch(epoch)
            return
