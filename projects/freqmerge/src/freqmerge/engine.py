"""Shared machinery of train/evaluate/ablation: CLI parsing, devices and DDP, loops, checkpoints, tables."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from . import config as C
from .config import Config
from .utils.metrics import AverageMeter, accuracy


class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit status 1."""


# ---------------------------------------------------------------------------------------------- CLI
class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors ("prog: error: argument --alpha: ...") instead of usage + error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0]}\n")


def _number(kind: type, low: float | None, high: float | None, low_open: bool = False) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            bound = f"> {low}" if low_open else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


unit_float = _number(float, 0.0, 1.0)
keep_rate_float = _number(float, 0.0, 1.0, low_open=True)
positive_int = _number(int, 1, None)
non_negative_int = _number(int, 0, None)
positive_float = _number(float, 0.0, None, low_open=True)
non_negative_float = _number(float, 0.0, None)


def json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags that change the model or the merging (the guide's, then the extra ones)."""
    g = p.add_argument_group("FreqMerge (guide flags)")
    g.add_argument("--alpha", type=unit_float, help=f"frequency penalty weight in [0, 1] (default {C.ALPHA})")
    g.add_argument(
        "--keep_rate", type=keep_rate_float, help=f"spatial tokens kept per merge layer (default {C.KEEP_RATE})"
    )
    g.add_argument(
        "--merge_layers", type=non_negative_int, nargs="+", help=f"0-indexed blocks (default {C.MERGE_LAYERS})"
    )
    g.add_argument("--no_freqmerge", action="store_true", help="plain timm ViT, no token merging")
    x = p.add_argument_group("extra model options")
    x.add_argument("--hpf_radius", type=non_negative_float, help=f"LFGM high-pass radius (default {C.HPF_RADIUS})")
    x.add_argument("--penalty_mode", choices=["shifted", "guide"], help="'guide' = the README formula as printed")
    x.add_argument("--phi_pool", choices=["mean", "amax"], help="pooling of grid scores onto merged tokens")
    x.add_argument("--scorer", choices=["lfgm", "attention", "random", "none"], help="token scorer (default lfgm)")
    x.add_argument("--prop_attn", action="store_true", help="add ToMe's proportional attention (default off)")
    x.add_argument("--no_prop_attn", action="store_true", help="no proportional attention (the default)")
    x.add_argument("--backbone", help=f"timm model name (default {C.BACKBONE})")
    x.add_argument("--image_size", type=positive_int, help=f"input resolution (default {C.IMAGE_SIZE})")
    x.add_argument(
        "--model_kwargs", type=json_dict, help="extra timm.create_model kwargs as JSON, e.g. '{\"depth\": 6}'"
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("paths and devices")
    g.add_argument("--data_root", help=f"folder containing cifar-100-python/ (default {C.DATA_ROOT!r})")
    g.add_argument("--output_dir", help="where checkpoints/, logs/, visualizations/ go (default: current folder)")
    g.add_argument("--download", action="store_true", help="download CIFAR-100 with torchvision if missing (online)")
    g.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--num_workers", type=non_negative_int, help=f"DataLoader workers (default {C.NUM_WORKERS})")
    g.add_argument("--seed", type=non_negative_int, help=f"random seed (default {C.SEED})")
    g.add_argument("--batch_size", type=positive_int, help=f"mini-batch size per process (default {C.BATCH_SIZE})")
    g.add_argument("--no_amp", action="store_true", help="run in float32 (no float16 autocast)")
    g.add_argument("--max_eval_batches", type=non_negative_int, help="evaluate on at most N batches (0 = all)")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("throughput measurement")
    g.add_argument("--bench_batch_size", type=positive_int, help=f"default {C.BENCHMARK_BATCH_SIZE}")
    g.add_argument("--bench_warmup", type=non_negative_int, help=f"default {C.BENCHMARK_WARMUP}")
    g.add_argument("--bench_iters", type=positive_int, help=f"default {C.BENCHMARK_ITERS}")


# argparse dest -> Config field, for flags whose value is copied as is.
_DIRECT = {
    "alpha": "alpha",
    "keep_rate": "keep_rate",
    "merge_layers": "merge_layers",
    "hpf_radius": "hpf_radius",
    "penalty_mode": "penalty_mode",
    "phi_pool": "phi_pool",
    "scorer": "scorer",
    "backbone": "backbone",
    "image_size": "image_size",
    "model_kwargs": "model_kwargs",
    "data_root": "data_root",
    "output_dir": "output_dir",
    "num_workers": "num_workers",
    "seed": "seed",
    "batch_size": "batch_size",
    "max_eval_batches": "max_eval_batches",
    "max_train_batches": "max_train_batches",
    "epochs": "epochs",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "label_smoothing": "label_smoothing",
    "warmup_epochs": "warmup_epochs",
    "pretrained_path": "pretrained_path",
    "bench_batch_size": "benchmark_batch_size",
    "bench_warmup": "benchmark_warmup",
    "bench_iters": "benchmark_iters",
}


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config changes requested on the command line (flags left at None are not overrides)."""
    out: dict[str, Any] = {}
    for dest, name in _DIRECT.items():
        value = getattr(args, dest, None)
        if value is not None:
            out[name] = list(value) if isinstance(value, list) else value
    if getattr(args, "no_freqmerge", False):
        out["freqmerge"] = False
    if getattr(args, "prop_attn", False):
        out["prop_attn"] = True
    if getattr(args, "no_prop_attn", False):
        out["prop_attn"] = False
    if getattr(args, "no_amp", False):
        out["use_amp"] = False
    if getattr(args, "no_multi_gpu", False):
        out["use_multi_gpu"] = False
    if getattr(args, "no_pretrained", False):
        out["pretrained"] = False
    if getattr(args, "download", False):
        out["download"] = True
    if getattr(args, "grad_checkpoint", False):
        out["use_grad_checkpoint"] = True
    return out


def check_merge_layers(cfg: Config, depth: int) -> None:
    bad = [layer for layer in cfg.merge_layers if not 0 <= layer < depth]
    if bad:
        raise UserError(f"argument --merge_layers: {bad} outside the model's blocks 0..{depth - 1}")


def run_main(fn: Callable[[], Any], prog: str) -> Any:
    """Run a command; user errors become one line on stderr and exit status 1."""
    from .data.cifar100 import DatasetNotFoundError
    from .models.vit_freqmerge import PretrainedWeightsError

    try:
        return fn()
    except (UserError, DatasetNotFoundError, PretrainedWeightsError) as exc:
        sys.exit(f"{prog}: error: {exc}")
    except KeyboardInterrupt:
        sys.exit(f"{prog}: interrupted")


# ------------------------------------------------------------------------------------ devices / DDP
@dataclass
class Runtime:
    device: torch.device
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"argument --device: unknown device {name!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"argument --device: {name!r} requested but CUDA is not available")
        return device
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def setup_runtime(cfg: Config, device_name: str | None = None) -> Runtime:
    """Single process, or one process per GPU under torchrun (DistributedDataParallel)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not cfg.use_multi_gpu:
            raise UserError("argument --no_multi_gpu: launched by torchrun with WORLD_SIZE > 1; run plain python")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name, local_rank)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        runtime = Runtime(device, True, dist.get_rank(), dist.get_world_size(), local_rank)
    else:
        runtime = Runtime(resolve_device(device_name))
        if cfg.use_multi_gpu and torch.cuda.device_count() > 1:
            print(
                f"{torch.cuda.device_count()} GPUs visible; multi-GPU training uses DDP: "
                f"torchrun --nproc_per_node={torch.cuda.device_count()} train.py ... (running on one GPU now)"
            )
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark) and not cfg.cudnn_deterministic
        torch.backends.cudnn.deterministic = bool(cfg.cudnn_deterministic)
    return runtime


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def amp_enabled(cfg: Config, device: torch.device) -> bool:
    return bool(cfg.use_amp) and device.type == "cuda"


def all_reduce_sum(values: Sequence[float], runtime: Runtime) -> list[float]:
    if not runtime.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return t.tolist()


# -------------------------------------------------------------------------------------------- loops
def cosine_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return fn


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    criterion: nn.Module,
    runtime: Runtime,
    amp: bool,
    epoch: int,
    max_batches: int = 0,
) -> dict[str, float]:
    model.train()
    loss_m, top1_m = AverageMeter("loss"), AverageMeter("top1")
    total = len(loader) if not max_batches else min(max_batches, len(loader))
    bar = tqdm(loader, total=total, desc=f"train {epoch}", leave=False, disable=not runtime.is_main, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        if max_batches and step >= max_batches:
            break
        images = images.to(runtime.device, non_blocking=True)
        targets = targets.to(runtime.device, non_blocking=True)
        with autocast(runtime.device, amp):
            logits = model(images)
            loss = criterion(logits, targets)
        if not torch.isfinite(loss):
            raise UserError(f"training diverged: loss is {loss.item()} at epoch {epoch} step {step} (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = targets.shape[0]
        loss_m.update(loss.item(), n)
        top1_m.update(accuracy(logits.float(), targets, (1,))[0], n)
        bar.set_postfix(loss=f"{loss_m.avg:.3f}", top1=f"{top1_m.avg:.1f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    sums = all_reduce_sum([loss_m.sum, top1_m.sum, loss_m.count], runtime)
    count = max(sums[2], 1)
    return {"loss": sums[0] / count, "top1": sums[1] / count}


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader,
    runtime: Runtime,
    amp: bool,
    max_batches: int = 0,
    num_classes: int | None = None,
    desc: str = "val",
) -> dict[str, Any]:
    """Loss, Top-1, Top-5 (percent) over the loader; with ``num_classes`` also the confusion matrix."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = top1 = top5 = count = 0.0
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64) if num_classes else None
    total = len(loader) if not max_batches else min(max_batches, len(loader))
    bar = tqdm(loader, total=total, desc=desc, leave=False, disable=not runtime.is_main, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        if max_batches and step >= max_batches:
            break
        images = images.to(runtime.device, non_blocking=True)
        targets = targets.to(runtime.device, non_blocking=True)
        with autocast(runtime.device, amp):
            logits = model(images)
        logits = logits.float()
        n = targets.shape[0]
        loss_sum += criterion(logits, targets).item()
        a1, a5 = accuracy(logits, targets, (1, 5))
        top1 += a1 * n / 100.0
        top5 += a5 * n / 100.0
        count += n
        if confusion is not None:
            idx = targets.cpu() * num_classes + logits.argmax(1).cpu()
            confusion += torch.bincount(idx, minlength=num_classes * num_classes)
    loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], runtime)
    count = max(count, 1)
    out: dict[str, Any] = {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}
    out["num_images"] = int(count)
    if confusion is not None:
        if runtime.distributed:
            confusion = confusion.to(runtime.device)
            dist.all_reduce(confusion)
        out["confusion"] = confusion.cpu().reshape(num_classes, num_classes).numpy()
    return out


# -------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(state: dict[str, Any], path: str) -> str:
    """Atomic: write a temporary file in the same folder, then ``os.replace`` it into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: str, arg: str = "--ckpt") -> dict[str, Any]:
    """A checkpoint written by train.py (or a bare state dict), loaded with ``weights_only=True``."""
    if not path:
        raise UserError(f"argument {arg}: no checkpoint given")
    if not os.path.isfile(path):
        raise UserError(f"argument {arg}: checkpoint {path!r} not found (train first: python train.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file
        raise UserError(f"argument {arg}: cannot read {path!r}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise UserError(f"argument {arg}: {path!r} does not hold a checkpoint dict")
    if "model" not in state:
        state = {"model": state}
    return state


def write_json(data: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: Any):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def config_for_checkpoint(state: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """Defaults, then the model/merging settings stored in the checkpoint, then the command line."""
    cfg = Config()
    stored = state.get("config")
    if isinstance(stored, dict):
        keep = {k: stored[k] for k in (*C.ARCH_FIELDS, *C.MERGE_FIELDS) if k in stored}
        cfg = cfg.replace(**keep)
    return cfg.replace(**overrides)


def load_model_weights(model: nn.Module, state: dict[str, Any], arg: str = "--ckpt") -> None:
    weights = {k.removeprefix("module."): v for k, v in state["model"].items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"argument {arg}: weights do not fit the model ({first[:200]})") from None


# --------------------------------------------------------------------------------------------- text
def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` = (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for i, r in enumerate(cells):
        out.append(
            "| "
            + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
            + " |"
        )
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
