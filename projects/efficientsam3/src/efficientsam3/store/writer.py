"""Per-rank append-only writer: `rank{r}-values.bin` (fixed-size records) + `rank{r}-keys.txt` (one key
per line). A key line is written only after its record is flushed, so after a kill the keys file is the
truth: on reopen the values file is truncated to len(keys) records and the export skips those keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .codec import Codec, get_codec

META = "store.json"


def read_keys(path: Path) -> list[str]:
    """Complete lines only (a line without its newline was cut by a kill)."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    return [k for k in lines[:-1] if k]


def write_meta(root: Path, codec: Codec, channels: int, size: int) -> None:
    """store.json; refuses to mix formats or shapes in one folder."""
    meta = {"format": codec.name, "embed_dim": channels, "embed_size": size}
    meta["record_bytes"] = codec.record_bytes(channels, size)
    path = root / META
    if path.exists():
        old = json.loads(path.read_text())
        if old != meta:
            raise ValueError(f"{root}: store holds {old}, refusing to append {meta}")
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)


class StoreWriter:
    """Append records for one rank; resumes a killed run of the same rank."""

    def __init__(self, root: str | os.PathLike, rank: int, channels: int, size: int, fmt: str = "fp16") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.codec = get_codec(fmt)
        self.channels, self.size = channels, size
        self.item = self.codec.record_bytes(channels, size)
        if rank == 0:
            write_meta(self.root, self.codec, channels, size)
        self.keys_path = self.root / f"rank{rank}-keys.txt"
        self.values_path = self.root / f"rank{rank}-values.bin"
        keys = read_keys(self.keys_path)
        n_values = self.values_path.stat().st_size // self.item if self.values_path.exists() else 0
        keys = keys[: min(len(keys), n_values)]
        # Drop a partial record and any key whose record was not complete.
        self.keys_path.write_text("".join(k + "\n" for k in keys))
        with open(self.values_path, "ab") as f:
            f.truncate(len(keys) * self.item)
        self.done = set(keys)
        self._values = open(self.values_path, "ab")
        self._keys = open(self.keys_path, "a")

    def write(self, key: str, seed: int, emb: torch.Tensor) -> None:
        if emb.shape != (self.channels, self.size, self.size):
            raise ValueError(f"{key}: embedding shape {tuple(emb.shape)}, store expects {self.channels}x{self.size}^2")
        if "\n" in key:
            raise ValueError(f"{key!r}: keys cannot contain newlines")
        self._values.write(self.codec.encode(seed, emb))
        self._values.flush()
        self._keys.write(key + "\n")
        self._keys.flush()
        self.done.add(key)

    def close(self) -> None:
        for f in (self._values, self._keys):
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
