"""Train FreqMerge (or the plain ViT-Small with --no_freqmerge) on CIFAR-100.

Outputs (under --output_dir, default the current folder): ``checkpoints/best_model.pth`` (best val Top-1),
``checkpoints/last_model.pth`` (every epoch; both resumable), ``logs/training_history.json`` and
``visualizations/training_curves.png``. Multi-GPU: ``torchrun --nproc_per_node=N train.py ...`` (DDP).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone

import torch
from torch import nn

from run_kit import (
    RunLogger,
    barrier,
    cleanup_distributed,
    gather_rng_states,
    grad_scaler,
    parse_args_explicit,
    progress,
    reconcile_config,
    restore_resume_state,
    resume_state,
    save_checkpoint,
    seed_everything,
    set_sampler_epoch,
    wrap_ddp,
)

from . import config as C
from .config import Config
from .engine import (
    FLAG_OF,
    OneLineParser,
    UserError,
    add_model_args,
    add_run_args,
    amp_enabled,
    check_merge_layers,
    cli_overrides,
    cosine_lambda,
    evaluate_model,
    explicit_fields,
    format_table,
    non_negative_float,
    non_negative_int,
    open_checkpoint,
    positive_float,
    positive_int,
    run_main,
    setup_runtime,
    train_one_epoch,
)

# On --resume these always come from the command line (they describe this machine, not the run).
ALWAYS_FROM_CLI = ("output_dir", "download")


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
    x.add_argument(
        "--deterministic", action="store_true", help="CUDNN_DETERMINISTIC: deterministic kernels (bit-exact resume)"
    )
    return p


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _resume_config(cfg: Config, state: dict, explicit: set[str], path: str, is_main: bool) -> Config:
    """The resumed run's config: the checkpoint's, except for flags typed now (each differing one is reported)."""

    def warn(msg: str) -> None:
        if is_main:
            print(f"warning: {msg}", file=sys.stderr)

    stored = state.get("config")
    if not isinstance(stored, dict):
        raise UserError(f"argument --resume: '{path}' holds no run config (not written by train.py)")
    known = Config.from_dict(stored).to_dict()
    merged = reconcile_config(known, cfg.to_dict(), explicit, always_cli=ALWAYS_FROM_CLI, warn=warn, flags=FLAG_OF)
    return Config.from_dict(merged)


def train(cfg: Config, resume: str | None = None, device: str | None = None, explicit: set[str] | None = None) -> dict:
    """Full training run; returns {"best_top1", "history", "best_path", ...} on every rank.

    ``resume``: a checkpoint path, or "" for ``checkpoints/last_model.pth``. ``explicit``: the Config fields the
    user set on the command line; on resume every other field comes from the checkpoint.
    """
    from .data.cifar100 import build_loaders, find_cifar_dir
    from .models.vit_freqmerge import configure_model, create_backbone, merge_schedule, token_counts, unwrap
    from .utils.metrics import count_gmacs, count_params
    from .utils.visualize import plot_training_curves

    env = setup_runtime(cfg, device)
    state = None
    resume_path = ""
    if resume is not None:
        last = os.path.join(cfg.checkpoint_dir, C.LAST_CHECKPOINT)
        resume_path = resume or (last if os.path.isfile(last) else os.path.join(cfg.checkpoint_dir, C.BEST_CHECKPOINT))
        state = open_checkpoint(resume_path, "--resume")
        if "optimizer" not in state or "epoch" not in state:
            raise UserError(f"argument --resume: '{resume_path}' is not a training checkpoint (no optimizer/epoch)")
        cfg = _resume_config(cfg, state, set(explicit or ()), resume_path, env.is_main)
    seed_everything(cfg.seed + env.rank, deterministic=cfg.cudnn_deterministic)
    best_path = os.path.join(cfg.checkpoint_dir, C.BEST_CHECKPOINT)
    last_path = os.path.join(cfg.checkpoint_dir, C.LAST_CHECKPOINT)

    if not cfg.download:  # fail fast on missing data, before the (possibly slow) backbone set-up
        find_cifar_dir(cfg.data_root)
    # Only rank 0 asks the hub; DDP broadcasts rank 0's weights to the others.
    model = create_backbone(cfg, pretrained=cfg.pretrained and env.is_main and state is None)
    check_merge_layers(cfg, len(model.blocks))
    configure_model(model, cfg)
    model.to(env.device)
    mean = model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))
    std = model.pretrained_cfg.get("std", (0.229, 0.224, 0.225))
    train_loader, val_loader, classes = build_loaders(cfg, mean, std, distributed=env.distributed)
    if len(classes) != cfg.num_classes:
        raise UserError(f"argument --data_root: found {len(classes)} classes, expected {cfg.num_classes}")

    optimizer = _optimizer(model, cfg)
    steps_per_epoch = len(train_loader) if not cfg.max_train_batches else min(cfg.max_train_batches, len(train_loader))
    total_steps = max(cfg.epochs * steps_per_epoch, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_lambda(total_steps, cfg.warmup_epochs * steps_per_epoch)
    )
    amp = amp_enabled(cfg, env.device)
    scaler = grad_scaler(env.device, amp)
    history: list[dict] = []
    best_top1, start_epoch, step = -1.0, 1, 0
    if state is not None:
        state.setdefault("step", (int(state["epoch"])) * steps_per_epoch)  # checkpoints from before run_kit
        info = restore_resume_state(state, model, optimizer, scheduler, scaler, source=resume_path)  # + RNG
        history = list(state.get("history", []))
        best_top1 = float(state.get("best_top1", -1.0))
        start_epoch, step = info.epoch + 1, info.step
    net = wrap_ddp(model, env)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    log = RunLogger(
        cfg.log_dir,
        env.is_main,
        tensorboard=True,
        history_name=C.HISTORY_FILE,
        log_name=C.TRAIN_LOG_FILE,
        resume_step=start_epoch - 1 if state is not None else None,
    )
    if state is not None:
        log.history = [dict(row) for row in history]  # the checkpoint's history is the truth
        shown = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("epochs", "batch_size", "lr", "alpha", "keep_rate"))
        log.info(f"Resumed {resume_path} after epoch {start_epoch - 1} (best val Top-1 {best_top1:.2f}%); {shown}")
    mode = "plain ViT (no merging)" if not cfg.freqmerge else f"FreqMerge scorer={cfg.scorer} alpha={cfg.alpha}"
    log.info(
        f"{cfg.backbone} | {mode} | device {env.device} x{env.world_size} | AMP {amp} | "
        f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val images"
    )

    bar = progress(range(start_epoch, cfg.epochs + 1), env.is_main, desc="epochs")
    for epoch in bar:
        set_sampler_epoch(train_loader, epoch)
        t0 = time.time()
        tr = train_one_epoch(
            net, train_loader, optimizer, scheduler, scaler, criterion, env, amp, epoch, cfg.max_train_batches
        )
        step += tr["steps"]
        va = evaluate_model(net, val_loader, env, amp, cfg.max_eval_batches, desc=f"val {epoch}")
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
        history.append({"step": epoch, **row})
        log.log_scalars(epoch, **row)
        improved = va["top1"] > best_top1
        best_top1 = max(best_top1, va["top1"])
        rng = gather_rng_states(env)  # collective: every rank's RNG goes into rank 0's checkpoint
        if env.is_main:
            ckpt = resume_state(
                net, optimizer, scheduler, scaler, epoch=epoch, step=step, config=cfg.to_dict(), sampler_epoch=epoch,
                rng=rng,
            )  # fmt: skip
            ckpt.update(history=history, best_top1=best_top1)
            save_checkpoint(last_path, ckpt)
            if improved:
                save_checkpoint(best_path, ckpt)
            plot_training_curves(history, os.path.join(cfg.vis_dir, "training_curves.png"))
            bar.set_postfix(val_top1=f"{va['top1']:.2f}", best=f"{best_top1:.2f}")
            log.info(
                f"epoch {epoch}/{cfg.epochs}: train loss {tr['loss']:.4f} top1 {tr['top1']:.2f}% | "
                f"val loss {va['loss']:.4f} top1 {va['top1']:.2f}% top5 {va['top5']:.2f}%"
                + (" (best, saved)" if improved else "")
            )
        barrier(env)
        every = cfg.empty_cache_every_n_epochs
        if env.device.type == "cuda" and every and epoch % every == 0:
            torch.cuda.empty_cache()
    log.close()

    result = {"best_top1": best_top1, "history": history, "best_path": best_path, "last_path": last_path}
    if env.is_main and history:
        base = unwrap(net)
        schedule = merge_schedule(base, cfg.keep_rate, cfg.merge_layers) if cfg.freqmerge else [0] * len(base.blocks)
        best = max(history, key=lambda h: h["val_top1"])
        summary = {
            "method": "FreqMerge" if cfg.freqmerge else "ViT (baseline)",
            "params_m": count_params(base),
            "gmacs": count_gmacs(base, cfg.image_size, env.device),
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
    cleanup_distributed()
    return result


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args, dests = parse_args_explicit(parser, argv)
    cfg = Config().replace(**cli_overrides(args))
    return run_main(
        lambda: train(cfg, resume=args.resume, device=args.device, explicit=explicit_fields(dests)), parser.prog
    )


if __name__ == "__main__":
    main()
