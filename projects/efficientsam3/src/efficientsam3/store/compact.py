"""Re-encode a store in a compact format and measure what it costs (the fidelity is reported, not assumed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .reader import EmbeddingStore
from .writer import StoreWriter


@dataclass
class Fidelity:
    records: int
    bytes_per_record_src: int
    bytes_per_record_dst: int
    max_abs_err: float
    mse: float
    rel_mse: float  # mse / mean(x^2)
    cos_mean: float  # cosine of channel vectors per position, averaged
    cos_min: float

    def as_dict(self) -> dict:
        return asdict(self)


def embedding_error(ref: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Errors of (B?, C, S, S) approximations; cosine over channels at each position."""
    ref, approx = ref.float(), approx.float()
    diff = approx - ref
    cos = torch.nn.functional.cosine_similarity(ref, approx, dim=-3, eps=1e-12)
    return {
        "max_abs_err": diff.abs().max().item(),
        "sq_sum": diff.pow(2).sum().item(),
        "ref_sq_sum": ref.pow(2).sum().item(),
        "n": float(ref.numel()),
        "cos_sum": cos.sum().item(),
        "cos_n": float(cos.numel()),
        "cos_min": cos.min().item(),
    }


class ErrorMeter:
    """Accumulates embedding_error over many records."""

    def __init__(self) -> None:
        self.t = {"max_abs_err": 0.0, "sq_sum": 0.0, "ref_sq_sum": 0.0, "n": 0.0, "cos_sum": 0.0, "cos_n": 0.0}
        self.cos_min = 1.0

    def add(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        e = embedding_error(ref, approx)
        self.t["max_abs_err"] = max(self.t["max_abs_err"], e["max_abs_err"])
        for k in ("sq_sum", "ref_sq_sum", "n", "cos_sum", "cos_n"):
            self.t[k] += e[k]
        self.cos_min = min(self.cos_min, e["cos_min"])

    def summary(self) -> dict[str, float]:
        n = max(self.t["n"], 1.0)
        mse = self.t["sq_sum"] / n
        return {
            "max_abs_err": self.t["max_abs_err"],
            "mse": mse,
            "rel_mse": mse / max(self.t["ref_sq_sum"] / n, 1e-30),
            "cos_mean": self.t["cos_sum"] / max(self.t["cos_n"], 1.0),
            "cos_min": self.cos_min,
        }


def compact_store(src: str, dst: str, fmt: str, channels: int | None = None, size: int | None = None) -> Fidelity:
    """Copy every record of `src` into `dst` (rank0 files) in `fmt`, resumably; measure the error
    of the decoded compact records against the source records."""
    source = EmbeddingStore(src, channels, size)
    meter = ErrorMeter()
    with StoreWriter(dst, 0, source.channels, source.size, fmt) as writer:
        for key in source.keys():
            if key in writer.done:
                continue
            seed, emb = source.get(key)
            writer.write(key, seed, emb)
    out = EmbeddingStore(dst)
    for key in source.keys():
        meter.add(source.get(key)[1], out.get(key)[1])
    s = meter.summary()
    return Fidelity(len(source), source.item, out.item, **s)
