"""ToMe's ``tome.utils``: ``parse_r`` and ``benchmark``, so ``import merge_core as tome`` keeps ToMe scripts working."""

from __future__ import annotations

import time

import torch

from ._checks import check_count
from .schedule import parse_r


def benchmark(
    model: torch.nn.Module,
    device: torch.device | int | str = 0,
    input_size: tuple[int, ...] = (3, 224, 224),
    batch_size: int = 64,
    runs: int = 40,
    throw_out: float = 0.25,
    use_fp16: bool = False,
    verbose: bool = False,
) -> float:
    """Images per second of ``model`` on random inputs, with ToMe's arguments and meaning.

    The first ``throw_out`` fraction of ``runs`` warms up and is not timed; CUDA is synchronised before the
    clock starts and stops. ``use_fp16`` runs fp16 inputs under autocast (bf16 autocast on CPU, which has no
    fp16 autocast). ``device=0`` is ToMe's default (the first GPU). For project benchmarks with medians and
    CUDA events, use merge-bench.
    """
    check_count(batch_size, "batch_size")
    check_count(runs, "runs")
    if not 0.0 <= float(throw_out) < 1.0:
        raise ValueError(f"throw_out must be in [0, 1), got {throw_out}")
    device = device if isinstance(device, torch.device) else torch.device(device)
    is_cuda = device.type == "cuda"
    model = model.eval().to(device)
    x = torch.rand(batch_size, *input_size, device=device)
    if use_fp16 and is_cuda:
        x = x.half()
    warm_up = int(runs * throw_out)
    amp_dtype = torch.float16 if is_cuda else torch.bfloat16
    total, start = 0, time.perf_counter()
    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_fp16), torch.no_grad():
        for i in range(runs):
            if i == warm_up:
                if is_cuda:
                    torch.cuda.synchronize(device)
                total, start = 0, time.perf_counter()
            model(x)
            total += batch_size
    if is_cuda:
        torch.cuda.synchronize(device)
    throughput = total / (time.perf_counter() - start)
    if verbose:
        print(f"Throughput: {throughput:.2f} im/s")
    return throughput


__all__ = ["benchmark", "parse_r"]
