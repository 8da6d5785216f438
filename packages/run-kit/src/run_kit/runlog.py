"""Rank-0-only run logging: a JSON history of scalars, TensorBoard, a text log, tqdm bars.

Every method is a no-op when ``enabled`` is False, so trainers call them unconditionally on all ranks
(``RunLogger(out_dir, enabled=env.is_main)``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON through a temp file + ``os.replace`` so readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=_jsonable)
            f.write("\n")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


class RunLogger:
    """Scalars to ``<out_dir>/history.json`` (a list of ``{"step": s, ...}``) and TensorBoard; text to stdout + log.

    ``resume_step``: keep the rows of an existing history with ``step <= resume_step`` (rows logged after the
    checkpoint by the interrupted run are dropped) and continue after them; ``None`` starts a fresh history.
    ``write_every_s``: 0 rewrites the JSON on every call (right for per-epoch rows); for per-step logging pass e.g.
    30 so the file (and TensorBoard) is flushed at most that often, and always on ``flush()`` / ``close()``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        enabled: bool,
        tensorboard: bool = True,
        *,
        history_name: str = "history.json",
        log_name: str = "log.txt",
        resume_step: int | None = None,
        write_every_s: float = 0.0,
    ) -> None:
        self.enabled = bool(enabled)
        self.out_dir = Path(out_dir)
        self.history_path = self.out_dir / history_name
        self.log_path = self.out_dir / log_name
        self.history: list[dict[str, Any]] = []
        self._writer = None
        self.write_every_s = float(write_every_s)
        self._last_write: float | None = None  # never written yet: the first row is written at once
        self._dirty = False
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.history_path.is_file():
            old = json.loads(self.history_path.read_text())
            self.history = [row for row in old if row.get("step", -1) <= resume_step]
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy import, only where TensorBoard is wanted

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge)

    def log_scalars(self, step: int, **values: float) -> None:
        """Append one row (``step`` plus the values) to the history and to TensorBoard."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step)}
        for key, value in values.items():
            v = value.item() if isinstance(value, torch.Tensor) else value
            row[key] = v
            if self._writer is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self._writer.add_scalar(key, v, int(step))
        self.history.append(row)
        self._dirty = True
        if self._last_write is None or time.monotonic() - self._last_write >= self.write_every_s:
            self.flush()

    def flush(self) -> None:
        """Write the JSON history and flush TensorBoard now."""
        if not self.enabled or not self._dirty:
            return
        write_json_atomic(self.history_path, self.history)
        if self._writer is not None:
            self._writer.flush()
        self._dirty = False
        self._last_write = time.monotonic()

    def info(self, msg: str) -> None:
        """A line to stdout (tqdm-safe) and to the text log."""
        if not self.enabled:
            return
        tqdm.write(msg, file=sys.stdout)
        with open(self.log_path, "a") as f:
            f.write(msg + "\n")

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable, enabled: bool, **tqdm_kwargs: Any) -> Iterable:
    """A tqdm bar on the main rank; the bare iterable elsewhere (no bar, no overhead)."""
    if not enabled:
        return iterable
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **tqdm_kwargs)
