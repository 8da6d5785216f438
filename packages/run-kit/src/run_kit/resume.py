"""The full state of a training run, and restoring it (plus the run's config) on ``--resume``.

What makes a resumed run equal an uninterrupted one: model, optimizer, LR scheduler, grad scaler, the epoch/step
counters, every RNG, the sampler epoch and the run's config. All of it is stored as plain data and tensors so
the checkpoint loads with ``weights_only=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import CheckpointError, load_state_dict_checked, unwrap_model
from .dist import DistEnv
from .rng import capture_rng_state, restore_rng_state

FORMAT = "run_kit.resume/1"
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


class ConfigMismatchWarning(UserWarning):
    """A flag given on the command line differs from the value stored in the checkpoint being resumed."""


@dataclass
class ResumeInfo:
    """Counters and metadata of the run a checkpoint came from."""

    epoch: int
    step: int
    config: dict[str, Any] = field(default_factory=dict)
    sampler_epoch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _check_plain(value: Any, where: str) -> None:
    """Refuse values that a weights-only load could not read back (fail at save time, not at resume time)."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be a str or int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where}: {type(value).__name__} is not storable in a weights-only checkpoint")


def gather_rng_states(env: DistEnv) -> list[dict[str, Any]] | dict[str, Any]:
    """COLLECTIVE (every rank must call it): all ranks' RNG states, for ``resume_state(..., rng=...)``.

    Without it a checkpoint written by rank 0 holds rank 0's RNG only, and every rank restores that one.
    """
    own = capture_rng_state()
    if not env.distributed:
        return own
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, own)
    return out


def resume_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    epoch: int,
    step: int,
    config: Mapping[str, Any],
    sampler_epoch: int | None = None,
    extra: Mapping[str, Any] | None = None,
    rng: Any = None,
) -> dict[str, Any]:
    """Everything needed to continue a run, as a dict for ``save_checkpoint``.

    Convention: ``epoch`` and ``step`` count what is *completed*; the resumed loop starts at ``epoch``.
    ``rng`` defaults to this process's RNG state; pass ``gather_rng_states(env)`` for per-rank states under DDP.
    """
    config = dict(config)
    extra = dict(extra or {})
    _check_plain(config, "config")
    _check_plain(extra, "extra")
    return {
        "format": FORMAT,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": int(epoch),
        "step": int(step),
        "config": config,
        "sampler_epoch": None if sampler_epoch is None else int(sampler_epoch),
        "rng": capture_rng_state() if rng is None else rng,
        "extra": extra,
    }


def _pick_rng(rng: Any) -> dict[str, Any] | None:
    if isinstance(rng, list):
        if not rng:
            return None
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return rng[rank] if rank < len(rng) and len(rng) == _world() else rng[0]
    return rng


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def restore_resume_state(
    ckpt: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    source: str = "checkpoint",
    restore_rng: bool = True,
) -> ResumeInfo:
    """Load what ``resume_state`` stored into the given objects; one-line ``CheckpointError`` if it does not fit.

    ``source`` (usually the file name) is named in errors. RNG is restored last, so nothing here consumes it.
    """
    for key in ("model", "epoch", "step"):
        if key not in ckpt:
            raise CheckpointError(f"{source}: not a resumable training checkpoint (no '{key}' entry)")
    load_state_dict_checked(model, ckpt["model"], source)
    if optimizer is not None:
        if not ckpt.get("optimizer"):
            raise CheckpointError(f"{source}: holds no optimizer state (not a training checkpoint)")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{source}: optimizer state does not fit ({msg[:160]})") from None
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and ckpt.get("rng") is not None:
        chosen = _pick_rng(ckpt["rng"])
        if chosen is not None:
            restore_rng_state(chosen)
    return ResumeInfo(
        epoch=int(ckpt["epoch"]),
        step=int(ckpt["step"]),
        config=dict(ckpt.get("config") or {}),
        sampler_epoch=ckpt.get("sampler_epoch"),
        extra=dict(ckpt.get("extra") or {}),
    )


def _same(a: Any, b: Any) -> bool:
    """Equality that treats lists and tuples alike (a config read back from a checkpoint may use either)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def reconcile_config(
    saved: Mapping[str, Any],
    cli: Mapping[str, Any],
    explicit: Iterable[str],
    *,
    always_cli: Iterable[str] = (),
    warn: Callable[[str], None] | None = None,
    flags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The config of a resumed run: the checkpoint's values, except for flags the user passed explicitly.

    An explicit flag whose value differs from the stored one wins and is reported once (``warn``, default
    ``warnings.warn`` with ``ConfigMismatchWarning``). Keys in ``always_cli`` (e.g. device, workers) always take
    the command line's value silently; keys unknown to the checkpoint keep the command line's value.
    ``flags`` maps config keys to the flag spelled in messages (default ``--<key>``).
    """
    explicit = set(explicit)
    always = set(always_cli)
    emit = warn or (lambda msg: warnings.warn(msg, ConfigMismatchWarning, stacklevel=3))
    out = dict(cli)
    for key, stored in saved.items():
        if key in always and key in cli:
            continue
        if key in explicit and key in cli:
            if not _same(cli[key], stored):
                flag = (flags or {}).get(key, f"--{key}")
                emit(f"{flag}: using the command line's {cli[key]!r}, the resumed run had {stored!r}")
            continue
        out[key] = stored
    return out
