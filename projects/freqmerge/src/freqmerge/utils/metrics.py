"""AverageMeter, accuracy(), compute_throughput(), GFLOPs and parameter counts.

GFLOPs follow the guide's convention, which is really GMACs: ViT-S/16 at 224 is "4.61 GFLOPs" there,
i.e. 4.6 G multiply-accumulates. ``count_gmacs`` uses ``torch.utils.flop_counter.FlopCounterMode``
(which counts 2 FLOPs per MAC for matmuls/convolutions/attention) and divides by 2. Element-wise ops,
softmax, norms, the FFTs of LFGM and the gathers/scatters of merging are not counted by torch's counter.

Throughput: warm-up iterations first, then per-iteration timing (CUDA events on GPU, perf_counter on
CPU) and the median iteration time; img/s = batch / median seconds. The fastest and slowest passes are
reported too: on a shared CPU one pass can take several times another, and a single number hides that.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from merge_core.bench import time_calls


class AverageMeter:
    """Running average of a scalar (weighted by batch size)."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / max(self.count, 1)

    def __repr__(self) -> str:
        return f"AverageMeter({self.name}: avg={self.avg:.4f}, n={self.count})"


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """Top-k accuracies in percent for logits (B, C) and labels (B,)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices.t()
    correct = pred.eq(target.reshape(1, -1).expand_as(pred))
    batch = max(target.shape[0], 1)
    return [float(correct[: min(k, maxk)].reshape(-1).float().sum()) * 100.0 / batch for k in topk]


def count_params(model: nn.Module) -> float:
    """Parameters in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def count_flops(model: nn.Module, image_size: int, device: torch.device | str = "cpu", dtype=None) -> float:
    """FLOPs (torch's counter, 2 per MAC) of one image's forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.randn(1, 3, image_size, image_size, device=device, dtype=dtype or param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())


def count_gmacs(model: nn.Module, image_size: int, device: torch.device | str = "cpu", dtype=None) -> float:
    """The guide's "GFLOPs": giga multiply-accumulates per image (= torch FLOPs / 2 / 1e9)."""
    return count_flops(model, image_size, device, dtype) / 2.0 / 1e9


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


@torch.no_grad()
def time_forward(
    model: nn.Module,
    batch: torch.Tensor,
    warmup: int = 10,
    iters: int = 30,
    amp: bool = False,
) -> list[float]:
    """Seconds per forward pass for ``iters`` timed iterations after ``warmup`` untimed ones.

    merge-core's timing loop (CUDA events on GPU, perf_counter on CPU), under fp16 autocast when ``amp``.
    """
    model.eval()
    with _autocast(batch.device, amp):
        return [ms / 1e3 for ms in time_calls(lambda: model(batch), batch.device, max(warmup, 0), iters)]


def compute_throughput(
    model: nn.Module,
    batch_size: int = 64,
    image_size: int = 224,
    device: torch.device | str = "cpu",
    warmup: int = 10,
    iters: int = 30,
    amp: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, float | str]:
    """Images per second of ``model`` on random inputs.

    Returns {"img_s" (median pass), "img_s_min", "img_s_max", "img_s_range" (text), "median_ms", "batch_size",
    "warmup", "iters", "threads"}. ``log`` gets one line before the timing starts (it can take a while on CPU).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    device = torch.device(device)
    if log is not None:
        where = "GPU" if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        log(f"timing {iters} passes of {batch_size} images at {image_size} px after {warmup} warm-up ({where}) ...")
    batch = torch.randn(batch_size, 3, image_size, image_size, device=device)
    times = time_forward(model, batch, warmup=warmup, iters=iters, amp=amp)
    median = statistics.median(times)
    slowest, fastest = batch_size / max(times), batch_size / min(times)
    return {
        "img_s": batch_size / median,
        "img_s_min": slowest,
        "img_s_max": fastest,
        "img_s_range": f"{slowest:.1f}-{fastest:.1f}",
        "median_ms": median * 1000.0,
        "batch_size": batch_size,
        "warmup": warmup,
        "iters": iters,
        "threads": torch.get_num_threads(),
    }
