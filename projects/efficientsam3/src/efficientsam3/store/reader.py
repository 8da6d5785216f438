"""Memory-mapped reader over all `rank{r}-*` pairs in a folder: key -> (rank, index), one np.memmap per
rank, so a lookup is one seek and one contiguous read of record_bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .codec import get_codec
from .writer import META, read_keys


class MissingEmbeddingError(KeyError):
    """No record for a key; str() is one line."""

    def __str__(self) -> str:
        return str(self.args[0])


class EmbeddingStore:
    """Read-only store. Without store.json (a reference-written store) the format is fp16 and the shape
    comes from the arguments (DISTILL.EMBED_DIM / EMBED_SIZE)."""

    def __init__(self, root: str, channels: int | None = None, size: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"DISTILL.TEACHER_EMBED_PATH: not a folder: {root}")
        meta_path = self.root / META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            fmt, c, s = meta["format"], meta["embed_dim"], meta["embed_size"]
            if (channels, size) != (None, None) and (channels, size) != (c, s):
                raise ValueError(
                    f"{root}: store holds {c}x{s}x{s} embeddings, the config expects {channels}x{size}x{size}"
                )
        else:
            if channels is None or size is None:
                raise ValueError(f"{root}: no {META}; pass the embedding shape (DISTILL.EMBED_DIM, EMBED_SIZE)")
            fmt, c, s = "fp16", channels, size
        self.codec = get_codec(fmt)
        self.channels, self.size = c, s
        self.item = self.codec.record_bytes(c, s)
        self.index: dict[str, tuple[int, int]] = {}
        self._counts: dict[int, int] = {}
        self._maps: dict[int, np.memmap] = {}
        for keys_path in sorted(self.root.glob("rank*-keys.txt")):
            rank = int(keys_path.name[4 : -len("-keys.txt")])
            values = keys_path.with_name(f"rank{rank}-values.bin")
            keys = read_keys(keys_path)
            if not values.exists():
                raise FileNotFoundError(f"{root}: {keys_path.name} has no {values.name}")
            n = min(len(keys), values.stat().st_size // self.item)
            self._counts[rank] = n
            for i, key in enumerate(keys[:n]):
                self.index[key] = (rank, i)

    @property
    def format(self) -> str:
        return self.codec.name

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def keys(self) -> list[str]:
        return list(self.index)

    def get(self, key: str) -> tuple[int, torch.Tensor]:
        """(seed, float32 (C, S, S)); a missing key is a one-line MissingEmbeddingError."""
        try:
            rank, i = self.index[key]
        except KeyError:
            raise MissingEmbeddingError(f"teacher embedding for {key!r} not found in {self.root}") from None
        return self.codec.decode(np.asarray(self._map(rank)[i]), self.channels, self.size)

    def _map(self, rank: int) -> np.memmap:
        """Opened lazily, so DataLoader workers each map the file instead of pickling its contents."""
        if rank not in self._maps:
            path = self.root / f"rank{rank}-values.bin"
            self._maps[rank] = np.memmap(path, dtype=np.uint8, mode="r", shape=(self._counts[rank], self.item))
        return self._maps[rank]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def bytes_per_record(self) -> int:
        return self.item
