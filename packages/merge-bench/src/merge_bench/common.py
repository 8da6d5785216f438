"""Environment record, model construction, JSON output and CUDA-graph capture shared by the suites."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merge_core import kernels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """File-name form of the device name ('NVIDIA H200' -> 'NVIDIA-H200')."""
    return device_name(device).replace(" ", "-").replace("/", "-")


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "kernels_mode": kernels.get_mode(),
    }
    if device.type == "cuda":
        info["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    for module in ("timm", "triton"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # pragma: no cover - depends on the environment
            info[module] = None
    return info


def model_name(args) -> str:
    """``--model``, else the suite's default (ViT-B for the compile suite, ViT-S otherwise)."""
    if getattr(args, "model", None):
        return args.model
    return "vit_base_patch16_224" if getattr(args, "suite", None) == "compile" else "vit_small_patch16_224"


def build_model(name: str, device: torch.device, dtype: torch.dtype, **kwargs):
    """timm model with random weights (no download), seeded, in eval mode."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return model.to(device=device, dtype=dtype).eval()


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write_json(path: str | os.PathLike, payload: dict[str, Any], log=print) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    log(f"wrote {path}")


def graphed(fn: Callable, inputs: tuple) -> Callable:
    """Capture ``fn(*inputs)`` in a CUDA graph on first call, then replay (the merge path has no host syncs)."""
    holder: dict[str, Any] = {}

    def run(*_args):
        if "graph" not in holder:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                holder["out"] = fn(*inputs)
            holder["graph"] = graph
        holder["graph"].replay()
        return holder["out"]

    return run
