"""Atomic checkpoint files and loading with one-line errors.

A checkpoint is written to ``<name>.tmp.<pid>`` in the same folder, fsynced and renamed over the target,
so a crash at any moment leaves either the old or the new file, never half of one. Reads use
``torch.load(weights_only=True)``: a checkpoint can never execute code.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model; the message is one line."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temp_files(path: PathLike) -> list[Path]:
    """Leftover ``<name>.tmp.<pid>`` files of ``path`` whose writer is gone (killed mid-save)."""
    target = Path(path)
    out = []
    if not target.parent.is_dir():
        return out
    prefix = target.name + ".tmp."
    for p in target.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid_text = p.name[len(prefix) :].split(".")[0]
        pid = int(pid_text) if pid_text.isdigit() else -1
        if pid == os.getpid() or not _pid_alive(pid):
            out.append(p)
    return out


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` atomically: temp file in the same folder, fsync, ``os.replace``.

    Temp files left by earlier saves that were killed (their process is gone) are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_files(target):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    tmp = target.with_name(f"{target.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(target.parent)


def _why_unreadable(path: Path, exc: BaseException) -> str:
    """A short, user-facing reason for a failed ``torch.load`` (never the multi-line torch text)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.\-]+)", text)
    if found:
        return f"it holds a Python object ({found.group(1)}) that a weights-only load refuses; not a plain checkpoint"
    if head.startswith(b"PK"):
        return "the zip archive is truncated or corrupt (an interrupted copy or save?)"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head) / len(head)
    if printable > 0.9:
        return f"it is a text file (starts with {head[:24].decode('ascii', 'replace')!r}), not a PyTorch checkpoint"
    if head[:1] == b"\x80":
        return "the legacy pickle stream is truncated or corrupt"
    return f"not a PyTorch checkpoint ({type(exc).__name__})"


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` returning a dict; any failure is one ``CheckpointError`` line."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' not found")
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{p}' is not a file")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises anything from KeyError to UnpicklingError on garbage input
        raise CheckpointError(f"cannot read checkpoint '{p}': {_why_unreadable(p, exc)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{p}' holds a {type(state).__name__}, expected a dict")
    return state


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` / ``_orig_mod.`` prefixes that wrappers add to every key."""
    out = dict(state_dict)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, Any], source: str, strict: bool = True):
    """``module.load_state_dict`` whose failure is one ``CheckpointError`` line naming ``source`` and the first bad key.

    Wrapper prefixes (``module.``, ``_orig_mod.``) on the stored keys and wrappers around ``module`` are handled.
    Shape mismatches are errors even with ``strict=False`` (as in torch). Returns torch's incompatible-keys result.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, got {type(state_dict).__name__}")
    target = unwrap_model(module)
    given = _strip_prefixes(state_dict)
    own = target.state_dict()
    for key, value in given.items():
        if key in own and _shape(value) is not None and _shape(value) != _shape(own[key]):
            raise CheckpointError(
                f"{source}: weights do not fit the model: shape mismatch at '{key}': "
                f"checkpoint {list(_shape(value))} vs model {list(_shape(own[key]))}"
            )
    if strict:
        missing = [k for k in own if k not in given]
        unexpected = [k for k in given if k not in own]
        if missing or unexpected:
            first = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
            raise CheckpointError(
                f"{source}: weights do not fit the model: {first} "
                f"({len(missing)} missing, {len(unexpected)} unexpected in total)"
            )
    return target.load_state_dict(given, strict=strict)
