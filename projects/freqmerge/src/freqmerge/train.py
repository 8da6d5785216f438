"""Train FreqMerge (or the plain ViT-Small with --no_freqmerge) on CIFAR-100.

Outputs (under --output_dir, default the current folder): ``checkpoints/best_model.pth`` (best val Top-1),
``checkpoints/last_model.pth`` (every epoch; both resumable), ``logs/training_history.json`` and
``visualizations/training_curves.png``. Multi-GPU: ``torchrun --nproc_per_node=N train.py ...`` (DDP).
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone

import torch
from torch import nn
from tqdm.auto import tqdm

from . import config as C
from .config import Config
from .engine import (
    OneLineParser,
    UserError,
    add_model_args,
    add_run_args,
    amp_enabled,
    check_merge_layers,
    cli_overrides,
    cosine_lambda,
    evaluate_model,
    format_table,
    load_checkpoint,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_main,
    save_checkpoint,
    set_seed,
    setup_runtime,
    train_one_epoch,
    write_json,
)


def build_parser(prog: str | None = None) -> OneLineParser:
    p = OneLineParser(prog=prog, description="Train FreqMerge ViT-Small on CIFAR-100 (see README).")
    add_model_args(p)
    add_run_args(p)
    g = p.add_argument_group("training (guide flags)")
    g.add_argument("--epochs", type=positive_int, help=f"default {C.NUM_EPOCHS}")
    g.add_argument("--lr", type=positive_float, help=f"AdamW learning rate (default {C.LR})")
    g.add_argument("--weight_decay", type=non_negative_float, help=f"default {C.WEIGHT_DECAY}")
    g.add_argument("--no_multi_gpu", action="store_true", help="refuse multi-process (DDP) runs; use one device")
    x = p.add_argument_group("extra training options")
    x.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="resume from CKPT (default: checkpoints/last_model.pth)")  # fmt: skip
    x.add_argument("--pretrained_path", help="local timm checkpoint for the backbone (weights_only load)")
    x.add_argument("--no_pretrained", action="store_true", help="do not try the timm hub; random init")
    x.add_argument("--label_smoothing", type=non_negative_float, help=f"default {C.LABEL_SMOOTHING}")
    x.add_argument("--warmup_epochs", type=non_negative_int, help=f"linear warm-up epochs (default {C.WARMUP_EPOCHS})")
    x.add_argument("--grad_checkpoint", action="store_true", help="USE_GRAD_CHECKPOINT (only without merging)")
    x.add_argument("--max_train_batches", type=non_negative_int, help="stop each epoch after N batches (smoke runs)")
    return p


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def train(cfg: Config, resume: str | None = None, device: str | None = None) -> dict:
    """Full training run; returns {"best_top1", "history", "best_path", ...}."""
    from .data.cifar100 import build_loaders, find_cifar_dir
    from .models.vit_freqmerge import configure_model, create_backbone, merge_schedule, token_counts, unwrap
    from .utils.metrics import count_gmacs, count_params
    from .utils.visualize import plot_training_curves

    runtime = setup_runtime(cfg, device)
    set_seed(cfg.seed + runtime.rank)
    if cfg.cudnn_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    best_path = os.path.join(cfg.checkpoint_dir, C.BEST_CHECKPOINT)
    last_path = os.path.join(cfg.checkpoint_dir, C.LAST_CHECKPOINT)
    state = None
    if resume is not None:
        resume = resume or (last_path if os.path.isfile(last_path) else best_path)
        state = load_checkpoint(resume, "--resume")
        if "optimizer" not in state or "epoch" not in state:
            raise UserError(f"argument --resume: {resume!r} is not a training checkpoint (no optimizer/epoch)")
        stored = Config.from_dict(state.get("config", {}))
        keep = {k: getattr(stored, k) for k in (*C.ARCH_FIELDS, *C.MERGE_FIELDS)}
        cfg = cfg.replace(**keep)

    if not cfg.download:  # fail fast on missing data, before the (possibly slow) backbone set-up
        find_cifar_dir(cfg.data_root)
    # Only rank 0 asks the hub; DDP broadcasts rank 0's weights to the others.
    model = create_backbone(cfg, pretrained=cfg.pretrained and runtime.is_main and state is None)
    check_merge_layers(cfg, len(model.blocks))
    configure_model(model, cfg)
    model.to(runtime.device)
    mean = model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))
    std = model.pretrained_cfg.get("std", (0.229, 0.224, 0.225))
    train_loader, val_loader, classes = build_loaders(cfg, mean, std, distributed=runtime.distributed)
    if len(classes) != cfg.num_classes:
        raise UserError(f"argument --data_root: found {len(classes)} classes, expected {cfg.num_classes}")

    optimizer = _optimizer(model, cfg)
    steps_per_epoch = len(train_loader) if not cfg.max_train_batches else min(cfg.max_train_batches, len(train_loader))
    total_steps = max(cfg.epochs * steps_per_epoch, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_lambda(total_steps, cfg.warmup_epochs * steps_per_epoch)
    )
    amp = amp_enabled(cfg, runtime.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history: list[dict] = []
    best_top1, start_epoch = -1.0, 1
    if state is not None:
        model.load_state_dict({k.removeprefix("module."): v for k, v in state["model"].items()})
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and amp:
            scaler.load_state_dict(state["scaler"])
        history = list(state.get("history", []))
        best_top1 = float(state.get("best_top1", -1.0))
        start_epoch = int(state["epoch"]) + 1
        if runtime.is_main:
            print(f"Resumed from {resume} at epoch {start_epoch - 1} (best val Top-1 {best_top1:.2f}%)")

    net: nn.Module = model
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if runtime.is_main:
        mode = "plain ViT (no merging)" if not cfg.freqmerge else f"FreqMerge scorer={cfg.scorer} alpha={cfg.alpha}"
        print(
            f"{cfg.backbone} | {mode} | device {runtime.device} x{runtime.world_size} | AMP {amp} | "
            f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val images"
        )

    epochs = range(start_epoch, cfg.epochs + 1)
    bar = tqdm(epochs, desc="epochs", disable=not runtime.is_main, dynamic_ncols=True)
    for epoch in bar:
        if runtime.distributed and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        t0 = time.time()
        tr = train_one_epoch(
            net, train_loader, optimizer, scheduler, scaler, criterion, runtime, amp, epoch, cfg.max_train_batches
        )
        va = evaluate_model(net, val_loader, runtime, amp, cfg.max_eval_batches, desc=f"val {epoch}")
        row = {
            "epoch": epoch,
            "train_loss": tr["loss"],
            "train_top1": tr["top1"],
            "val_loss": va["loss"],
            "val_top1": va["top1"],
            "val_top5": va["top5"],
            "lr": float(optimizer.param_groups[0]["lr"]),
            "epoch_time_s": time.time() - t0,
        }
        history.append(row)
        improved = va["top1"] > best_top1
        best_top1 = max(best_top1, va["top1"])
        if runtime.is_main:
            ckpt = {
                "model": unwrap(net).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "history": history,
                "best_top1": best_top1,
                "config": cfg.to_dict(),
            }
            save_checkpoint(ckpt, last_path)
            if improved:
                save_checkpoint(ckpt, best_path)
            write_json(history, os.path.join(cfg.log_dir, C.HISTORY_FILE))
            plot_training_curves(history, os.path.join(cfg.vis_dir, "training_curves.png"))
            bar.set_postfix(val_top1=f"{va['top1']:.2f}", best=f"{best_top1:.2f}")
            tqdm.write(
                f"epoch {epoch}/{cfg.epochs}: train loss {tr['loss']:.4f} top1 {tr['top1']:.2f}% | "
                f"val loss {va['loss']:.4f} top1 {va['top1']:.2f}% top5 {va['top5']:.2f}%"
                + (" (best, saved)" if improved else "")
            )
        every = cfg.empty_cache_every_n_epochs
        if runtime.device.type == "cuda" and every and epoch % every == 0:
            torch.cuda.empty_cache()

    result = {"best_top1": best_top1, "history": history, "best_path": best_path, "last_path": last_path}
    if runtime.is_main and history:
        base = unwrap(net)
        schedule = merge_schedule(base, cfg.keep_rate, cfg.merge_layers) if cfg.freqmerge else [0] * len(base.blocks)
        best = max(history, key=lambda h: h["val_top1"])
        summary = {
            "method": "FreqMerge" if cfg.freqmerge else "ViT (baseline)",
            "params_m": count_params(base),
            "gmacs": count_gmacs(base, cfg.image_size, runtime.device),
            "best_epoch": best["epoch"],
            "top1": best["val_top1"],
            "top5": best["val_top5"],
            "tokens": "->".join(str(t) for t in sorted(set(token_counts(base, schedule)), reverse=True)),
        }
        print("\nSummary (GFLOPs = GMACs per image, as in the guide)")
        cols = [
            ("method", "Method", ""),
            ("params_m", "Params (M)", ".2f"),
            ("gmacs", "GFLOPs", ".2f"),
            ("best_epoch", "Best epoch", "d"),
            ("top1", "Top-1 (%)", ".2f"),
            ("top5", "Top-5 (%)", ".2f"),
            ("tokens", "Tokens", ""),
        ]
        print(format_table([summary], cols))
        curves = os.path.join(cfg.vis_dir, "training_curves.png")
        stamp = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
        print(f"Saved {best_path}, {os.path.join(cfg.log_dir, C.HISTORY_FILE)}, {curves} ({stamp})")
        result["summary"] = summary
    if runtime.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = Config().replace(**cli_overrides(args))
    run_main(lambda: train(cfg, resume=args.resume, device=args.device), parser.prog)


if __name__ == "__main__":
    main()
