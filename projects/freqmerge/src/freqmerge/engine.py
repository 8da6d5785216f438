"""FreqMerge's own run logic: its CLI flags and their Config fields, the classification loops, checkpoint/config
glue and tables. Generic plumbing (atomic checkpoints, resume state, DDP, logging, seeds) is ``run_kit``."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from run_kit import (
    CheckpointError,
    DistEnv,
    OneLineArgumentParser,
    all_reduce_sum,
    amp_autocast,
    load_checkpoint,
    load_state_dict_checked,
    progress,
    setup_distributed,
)

from . import config as C
from .config import Config
from .utils.metrics import AverageMeter, accuracy

OneLineParser = OneLineArgumentParser  # the name the commands used before run_kit existed


class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit status 1."""


# ---------------------------------------------------------------------------------------------- CLI
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
    x.add_argument(
        "--lfgm_border",
        choices=["wrap", "reflect"],
        help="LFGM at the image border: 'wrap' = the guide's periodic FFT (default), 'reflect' = mirror-extended",
    )
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
    g.add_argument(
        "--num_workers",
        type=non_negative_int,
        help=f"DataLoader workers (default {C.NUM_WORKERS}, capped at the CPU cores available)",
    )
    g.add_argument("--seed", type=non_negative_int, help=f"random seed (default {C.SEED})")
    g.add_argument("--batch_size", type=positive_int, help=f"mini-batch size per process (default {C.BATCH_SIZE})")
    g.add_argument("--no_amp", action="store_true", help="run in float32 (no float16 autocast)")
    g.add_argument("--max_eval_batches", type=non_negative_int, help="evaluate on at most N batches (0 = all)")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("throughput measurement")
    g.add_argument(
        "--bench_batch_size",
        type=positive_int,
        help=f"default {C.BENCHMARK_BATCH_SIZE} on GPU, {C.CPU_BENCHMARK_BATCH_SIZE} on CPU",
    )
    g.add_argument(
        "--bench_warmup",
        type=non_negative_int,
        help=f"default {C.BENCHMARK_WARMUP} / {C.CPU_BENCHMARK_WARMUP} (GPU / CPU)",
    )
    g.add_argument(
        "--bench_iters", type=positive_int, help=f"default {C.BENCHMARK_ITERS} / {C.CPU_BENCHMARK_ITERS} (GPU / CPU)"
    )


# argparse dest -> Config field, for flags whose value is copied as is.
_DIRECT = {
    "alpha": "alpha",
    "keep_rate": "keep_rate",
    "merge_layers": "merge_layers",
    "hpf_radius": "hpf_radius",
    "lfgm_border": "lfgm_border",
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
# argparse dest of a switch -> (Config field, value it sets).
_SWITCHES = {
    "no_freqmerge": ("freqmerge", False),
    "prop_attn": ("prop_attn", True),
    "no_prop_attn": ("prop_attn", False),
    "no_amp": ("use_amp", False),
    "no_multi_gpu": ("use_multi_gpu", False),
    "no_pretrained": ("pretrained", False),
    "download": ("download", True),
    "grad_checkpoint": ("use_grad_checkpoint", True),
    "deterministic": ("cudnn_deterministic", True),
}
# Config field -> the flag named in messages.
FLAG_OF = {field: f"--{dest}" for dest, field in _DIRECT.items()} | {
    field: f"--{dest}" for dest, (field, _) in _SWITCHES.items()
}


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config changes requested on the command line (flags left at None / switches left off are not overrides)."""
    out: dict[str, Any] = {}
    for dest, name in _DIRECT.items():
        value = getattr(args, dest, None)
        if value is not None:
            out[name] = list(value) if isinstance(value, list) else value
    for dest, (name, value) in _SWITCHES.items():
        if getattr(args, dest, False):
            out[name] = value
    return out


def explicit_fields(dests: Iterable[str]) -> set[str]:
    """Config fields set by the flags the user typed (``run_kit.explicit_dests``), for ``reconcile_config``."""
    out = set()
    for dest in dests:
        if dest in _DIRECT:
            out.add(_DIRECT[dest])
        elif dest in _SWITCHES:
            out.add(_SWITCHES[dest][0])
    return out


def check_merge_layers(cfg: Config, depth: int) -> None:
    bad = [layer for layer in cfg.merge_layers if not 0 <= layer < depth]
    if bad:
        raise UserError(f"argument --merge_layers: {bad} outside the model's blocks 0..{depth - 1}")


def run_main(fn: Callable[[], Any], prog: str) -> Any:
    """Run a command; user errors become one line on stderr and exit status 1."""
    from .data.cifar100 import DatasetError
    from .models.vit_freqmerge import PretrainedWeightsError

    try:
        return fn()
    except (UserError, DatasetError, PretrainedWeightsError, CheckpointError) as exc:
        sys.exit(f"{prog}: error: {exc}")
    except KeyboardInterrupt:
        sys.exit(f"{prog}: interrupted")


# ------------------------------------------------------------------------------------------ devices
def setup_runtime(cfg: Config, device_name: str | None = None) -> DistEnv:
    """run_kit's DistEnv (one process, or one per GPU under torchrun) plus FreqMerge's cuDNN/multi-GPU settings."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if launched and not cfg.use_multi_gpu:
        raise UserError("argument --no_multi_gpu: launched by torchrun with WORLD_SIZE > 1; run plain python")
    try:
        env = setup_distributed(device_name or "auto")
    except ValueError as exc:
        raise UserError(f"argument --{exc}") from None
    if not env.distributed and cfg.use_multi_gpu and torch.cuda.device_count() > 1:
        n = torch.cuda.device_count()
        print(f"{n} GPUs visible; multi-GPU training is DDP: torchrun --nproc_per_node={n} train.py ... (one GPU now)")
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark) and not cfg.cudnn_deterministic
        torch.backends.cudnn.deterministic = bool(cfg.cudnn_deterministic)
    return env


def amp_enabled(cfg: Config, device: torch.device) -> bool:
    return bool(cfg.use_amp) and device.type == "cuda"


def _reduce(values: Sequence[float], env: DistEnv) -> list[float]:
    return all_reduce_sum(torch.tensor(list(values), dtype=torch.float64), env).tolist()


# -------------------------------------------------------------------------------------------- loops
def cosine_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))

    return fn


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    criterion: nn.Module,
    env: DistEnv,
    amp: bool,
    epoch: int,
    max_batches: int = 0,
) -> dict[str, float]:
    """One pass over ``loader``; loss and Top-1 averaged over every sample of every rank."""
    model.train()
    loss_m, top1_m = AverageMeter("loss"), AverageMeter("top1")
    total = len(loader) if not max_batches else min(max_batches, len(loader))
    bar = progress(loader, env.is_main, total=total, desc=f"train {epoch}", leave=False)
    for step, (images, targets) in enumerate(bar):
        if max_batches and step >= max_batches:
            break
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        with amp_autocast(env.device, amp):
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
        if env.is_main:
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss_m.avg:.3f}", top1=f"{top1_m.avg:.1f}", lr=f"{lr:.2e}")
    sums = _reduce([loss_m.sum, top1_m.sum, loss_m.count], env)
    count = max(sums[2], 1)
    return {"loss": sums[0] / count, "top1": sums[1] / count, "steps": min(total, len(loader))}


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader,
    env: DistEnv,
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
    for step, (images, targets) in enumerate(progress(loader, env.is_main, total=total, desc=desc, leave=False)):
        if max_batches and step >= max_batches:
            break
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        with amp_autocast(env.device, amp):
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
    loss_sum, top1, top5, count = _reduce([loss_sum, top1, top5, count], env)
    count = max(count, 1)
    out: dict[str, Any] = {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}
    out["num_images"] = int(count)
    if confusion is not None:
        confusion = all_reduce_sum(confusion, env).to(torch.int64)
        out["confusion"] = confusion.cpu().reshape(num_classes, num_classes).numpy()
    return out


# -------------------------------------------------------------------------------------- checkpoints
def open_checkpoint(path: str, arg: str = "--ckpt") -> dict[str, Any]:
    """A checkpoint written by train.py, or a bare state dict; errors are one line naming ``arg``."""
    if not path:
        raise UserError(f"argument {arg}: no checkpoint given")
    if not os.path.exists(path):
        raise UserError(f"argument {arg}: checkpoint '{path}' not found (train first: python train.py)")
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        raise UserError(f"argument {arg}: {exc}") from None
    if "model" not in state:
        state = {"model": state}
    return state


def config_for_checkpoint(state: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """Defaults, then the model/merging settings stored in the checkpoint, then the command line."""
    cfg = Config()
    stored = state.get("config")
    if isinstance(stored, dict):
        keep = {k: stored[k] for k in (*C.ARCH_FIELDS, *C.MERGE_FIELDS) if k in stored}
        cfg = cfg.replace(**keep)
    return cfg.replace(**overrides)


def load_model_weights(model: nn.Module, state: dict[str, Any], path: str, arg: str = "--ckpt") -> None:
    """Checkpoint weights into ``model``; a wrong architecture is one line naming the file and the first bad key."""
    try:
        load_state_dict_checked(model, state["model"], f"argument {arg}: '{path}'")
    except CheckpointError as exc:
        raise UserError(str(exc)) from None


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
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
