"""Training loop: exp/<d>/<name>/{model,log,config}, model_last/model_best through run_kit, resumable, DDP.

Convention (run_kit): ``epoch``/``step`` in a checkpoint count what is completed. ``max_train_iters`` stops a
run early (quick runs, tests); if that cuts an epoch short, a resumed run restarts that epoch's data.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from run_kit import (
    DistEnv,
    RunLogger,
    all_reduce_sum,
    amp_autocast,
    barrier,
    gather_rng_states,
    grad_scaler,
    load_checkpoint,
    progress,
    reconcile_config,
    restore_resume_state,
    resume_state,
    save_checkpoint,
    seed_everything,
    set_sampler_epoch,
    unwrap_model,
    wrap_ddp,
)

from ..datasets.pointcept import build_dataset, collate_fn, point_collate_fn
from .build import Criteria, apply_finetuning_filter, build_model, build_optimizer, build_scheduler, load_weight
from .config import Config, _plain, _wrap
from .metrics import confusion, summarize
from .tester import to_device

RUNTIME_KEYS = ("resume", "weight", "save_path", "num_worker", "max_train_iters", "max_val_scenes")


def _worker_init(worker_id: int) -> None:
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` takes items ``r, r + w, ...``: every item exactly once over the ranks, no padding
    (DistributedSampler repeats items to even the ranks out, which would count a scene twice in metrics)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _loader(ds, batch: int, workers: int, env: DistEnv, shuffle: bool, mix_prob: float = 0.0) -> DataLoader:
    """Train (``shuffle``): DistributedSampler under DDP, Mix3D collate. Eval: each rank its own shard."""
    if shuffle:
        sampler = DistributedSampler(ds, shuffle=True) if env.distributed else None
    else:
        sampler = ShardSampler(len(ds), env.rank, env.world_size) if env.distributed else None
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=partial(point_collate_fn, mix_prob=mix_prob) if shuffle else collate_fn,
        worker_init_fn=_worker_init,
        drop_last=shuffle and len(ds) >= batch * env.world_size,
        persistent_workers=False,
    )


@torch.no_grad()
def validate(model, loader, cfg: Mapping, env: DistEnv) -> dict:
    """Single pass over the val split (val transform, no voting); each rank its own scenes (no repeats), the
    confusion summed over ranks. ``model`` is the bare module: ranks may run different numbers of batches."""
    model.eval()
    c = cfg["data"]["num_classes"]
    conf = torch.zeros(c, c, dtype=torch.long, device=env.device)
    if env.distributed:  # BatchNorm running stats: rank 0's, as DDP's forward would broadcast them
        for buf in model.buffers():
            dist.broadcast(buf, 0)
    for batch in loader:
        batch = to_device(batch, env.device)
        with amp_autocast(env.device, cfg.get("enable_amp", False), getattr(torch, cfg.get("amp_dtype") or "float16")):
            pred = model(batch).argmax(-1)
        conf += confusion(pred, batch["segment"], c, cfg["data"].get("ignore_index", -1))
    conf = all_reduce_sum(conf.double(), env)
    model.train()
    return summarize(conf.cpu().numpy())


def train(cfg: Config, env: DistEnv, explicit: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or resume) the training of ``cfg`` into ``cfg.save_path``; returns the last epoch's row."""
    exp = Path(cfg["save_path"])
    model_dir, log_dir, cfg_dir = exp / "model", exp / "log", exp / "config"
    last, best = model_dir / "model_last.pth", model_dir / "model_best.pth"
    ckpt = None
    if cfg.get("resume"):
        if not last.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at '{last}' (train without -r first)")
        ckpt = load_checkpoint(last)
        merged = reconcile_config(ckpt.get("config") or {}, _plain(cfg), explicit, always_cli=RUNTIME_KEYS)
        cfg = _wrap(merged)
    seed_everything(int(cfg["seed"]) + env.rank)
    if env.is_main:
        for d in (model_dir, log_dir, cfg_dir):
            d.mkdir(parents=True, exist_ok=True)
        (cfg_dir / "config.py").write_text(cfg.pretty())
    barrier(env)
    logger = RunLogger(log_dir, env.is_main, tensorboard=False, resume_step=ckpt["step"] if ckpt else None)

    model = build_model(cfg["model"]).to(env.device)
    if cfg.get("weight") and ckpt is None:
        kind = load_weight(model, cfg["weight"])
        logger.info(f"loaded {kind} weights from {cfg['weight']}")
    trainable = apply_finetuning_filter(model, cfg.get("finetuning_param_list"))
    logger.info(
        f"trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad)} "
        f"in {len(trainable)} tensors"
    )
    ddp = wrap_ddp(model, env, find_unused_parameters=bool(cfg.get("find_unused_parameters", False)))

    per_gpu = max(1, cfg["batch_size"] // env.world_size)
    train_ds = build_dataset(cfg["data"]["train"])
    # Pointcept's eval_epoch: `eval_epoch` rounds, each `epoch // eval_epoch` passes over the data (one loader)
    rounds = cfg.get("eval_epoch") or cfg["epoch"]
    train_ds.loop *= cfg["epoch"] // rounds
    mix = float(cfg.get("mix_prob") or 0.0)
    train_loader = _loader(train_ds, per_gpu, cfg.get("num_worker", 0), env, shuffle=True, mix_prob=mix)
    val_loader = None
    if cfg.get("evaluate", True):
        val_ds = build_dataset(cfg["data"]["val"], max_scenes=cfg.get("max_val_scenes"))
        val_loader = _loader(val_ds, cfg.get("batch_size_val", 1), cfg.get("num_worker", 0), env, shuffle=False)
    optimizer = build_optimizer(model, cfg["optimizer"], cfg.get("param_dicts"))
    scheduler = build_scheduler(optimizer, cfg["scheduler"], rounds * len(train_loader))
    scaler = grad_scaler(env.device, cfg.get("enable_amp", False))
    criteria = Criteria(cfg["model"].get("criteria", [dict(type="CrossEntropyLoss", ignore_index=-1)]))

    start_epoch, step, best_miou = 0, 0, -1.0
    if ckpt is not None:
        info = restore_resume_state(ckpt, model, optimizer, scheduler, scaler, source=str(last))
        start_epoch, step = info.epoch, info.step
        best_miou = float(info.extra.get("best_metric_value", -1.0))
        logger.info(f"resumed from {last}: epoch {start_epoch}, iteration {step}")
    max_iters = cfg.get("max_train_iters")
    row: dict[str, Any] = {}
    amp_dtype = getattr(torch, cfg.get("amp_dtype") or "float16")
    for epoch in range(start_epoch, rounds):
        if max_iters is not None and step >= max_iters:
            break
        set_sampler_epoch(train_loader, epoch)
        ddp.train()
        completed = True
        losses = []
        bar = progress(train_loader, env.is_main, desc=f"epoch {epoch + 1}/{rounds}", leave=False)
        for batch in bar:
            batch = to_device(batch, env.device)
            with amp_autocast(env.device, cfg.get("enable_amp", False), amp_dtype):
                logits = ddp(batch)
            loss = criteria(logits, batch["segment"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.get("clip_grad"):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg["clip_grad"])
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            if cfg.get("empty_cache") and env.device.type == "cuda":
                torch.cuda.empty_cache()
            if max_iters is not None and step >= max_iters and step % len(train_loader) != 0:
                completed = False
                break
        done_epochs = epoch + 1 if completed else epoch
        row = {
            "epoch": done_epochs,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "lr": scheduler.get_last_lr()[-1],
        }
        if val_loader is not None:
            m = validate(model, val_loader, cfg, env)
            row.update(val_mIoU=m["mIoU"], val_mAcc=m["mAcc"], val_allAcc=m["allAcc"])
        logger.log_scalars(step, **row)
        logger.info(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        miou = row.get("val_mIoU", float("nan"))
        is_best = np.isfinite(miou) and miou > best_miou
        best_miou = float(miou) if is_best else best_miou
        state = resume_state(
            unwrap_model(ddp),
            optimizer,
            scheduler,
            scaler,
            epoch=done_epochs,
            step=step,
            config=_plain(cfg),
            sampler_epoch=epoch,
            rng=gather_rng_states(env),
            extra={"best_metric_value": best_miou},
        )
        if env.is_main:
            save_checkpoint(last, state)
            if is_best or not best.is_file():
                tmp = best.with_suffix(".tmp")
                shutil.copyfile(last, tmp)
                tmp.replace(best)
                logger.info(f"best val mIoU {best_miou:.4f}: wrote {best}")
        barrier(env)
    logger.close()
    return {"step": step, **row}
