"""Stage-1 training: student embedding vs teacher embedding (store, compact store or online teacher),
masked MSE + cosine, AdamW, warm-up + cosine per step, AMP, gradient accumulation, clip, DDP, atomic
per-epoch `ckpt_epoch_{N}.pth` and auto-resume from the newest one (the reference's never fires)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from run_kit import (
    all_reduce_mean,
    amp_autocast,
    barrier,
    gather_rng_states,
    grad_scaler,
    progress,
    restore_resume_state,
    resume_state,
    save_checkpoint,
    seed_everything,
    wrap_ddp,
    write_json_atomic,
)

from ..config import from_dict, to_dict
from ..data.sa1b import SA1BDataset, collate
from ..data.transforms import valid_mask
from ..model.students import build_student
from ..store import EmbeddingStore
from .common import (
    DTYPES,
    base_parser,
    config_from_args,
    run_cli,
    run_teacher,
    run_training,
    teacher_on,
)
from .losses import stage1_loss
from .schedule import lr_at, param_groups, scaled_lr

# Keys that always follow the command line on resume (paths and machine settings, not the recipe).
ALWAYS_CLI = {
    "OUTPUT",
    "MODEL.RESUME",
    "DATA.DATA_PATH",
    "DATA.NUM_WORKERS",
    "DATA.PIN_MEMORY",
    "DISTILL.TEACHER_EMBED_PATH",
    "TEACHER.CHECKPOINT",
    "PRINT_FREQ",
}


def build_parser():
    p = base_parser("efficientsam3-train-stage1", "Stage-1 distillation of a student from SAM3 trunk embeddings.")
    p.add_argument("--pretrained", help="local timm ImageNet weights for the backbone (MODEL.PRETRAINED)")
    p.add_argument("--resume", help="checkpoint to resume (default: newest ckpt_epoch_N.pth in OUTPUT)")
    p.add_argument("--accumulation-steps", type=int, help="TRAIN.ACCUMULATION_STEPS")
    p.add_argument("--online-teacher", action="store_true", help="run the teacher in the loop (no store)")
    p.add_argument("--use-sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    p.add_argument("--stop-after-epochs", type=int, default=0, help="leave after this many epochs (time-limited jobs)")
    return p


def train(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg, explicit = config_from_args(args)
    return run_training(args, cfg, explicit, _train, always_cli=ALWAYS_CLI, rebuild=from_dict)


def _train(cfg, args, env, log, ckpt, ckpt_path) -> dict:
    seed_everything(cfg.SEED + env.rank)
    out = Path(cfg.OUTPUT)
    if env.is_main:
        write_json_atomic(out / "config.json", to_dict(cfg))
    d = cfg.DISTILL
    student = build_student(cfg.MODEL.BACKBONE, d.EMBED_DIM, d.EMBED_SIZE, cfg.MODEL.PRETRAINED)
    if env.distributed and (args.use_sync_bn or cfg.TRAIN.USE_SYNC_BN):
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student = student.to(env.device)
    n_params = sum(p.numel() for p in student.parameters())
    log.info(f"student {cfg.MODEL.BACKBONE}: {n_params / 1e6:.2f}M parameters, {len(student.state_dict())} keys")

    teacher = None
    store = None
    if d.ONLINE_TEACHER:
        teacher = teacher_on(cfg, env.device)
        log.info(f"online teacher {cfg.TEACHER.TYPE} (merge r={cfg.TEACHER.MERGE_R}/{cfg.TEACHER.MERGE_GLOBAL_R})")
    else:
        store = EmbeddingStore(d.TEACHER_EMBED_PATH, d.EMBED_DIM, d.EMBED_SIZE)
        log.info(f"store {d.TEACHER_EMBED_PATH}: {len(store)} records, format {store.format}")
    data = cfg.DATA
    dataset = SA1BDataset(
        data.DATA_PATH, data.SPLIT, data.IMG_SIZE, data.PREPROCESS, store=store, num_samples=data.NUM_SAMPLES,
        aug_flip=data.AUG_FLIP,
        target_dtype=torch.float16 if store is not None and store.format == "fp16" else torch.float32,
    )  # fmt: skip
    if dataset.skips["no_embedding"]:
        log.info(f"skipping {dataset.skips['no_embedding']} images without a teacher record")
    sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True, seed=cfg.SEED, drop_last=True)
    loader = DataLoader(
        dataset, batch_size=data.BATCH_SIZE, sampler=sampler, num_workers=data.NUM_WORKERS, collate_fn=collate,
        pin_memory=data.PIN_MEMORY and env.device.type == "cuda", drop_last=True,
        persistent_workers=data.NUM_WORKERS > 0,
    )  # fmt: skip
    accum = cfg.TRAIN.ACCUMULATION_STEPS
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"DATA.BATCH_SIZE: {len(dataset)} images on {env.world_size} process(es) give no full batch of "
            f"{data.BATCH_SIZE} x {accum} accumulation steps"
        )
    t = cfg.TRAIN
    base_lr = scaled_lr(t.BASE_LR, data.BATCH_SIZE, env.world_size, accum, t.SCALE_LR)
    warmup_lr = scaled_lr(t.WARMUP_LR, data.BATCH_SIZE, env.world_size, accum, t.SCALE_LR)
    min_lr = scaled_lr(t.MIN_LR, data.BATCH_SIZE, env.world_size, accum, t.SCALE_LR)
    total_steps, warmup_steps = t.EPOCHS * steps_per_epoch, t.WARMUP_EPOCHS * steps_per_epoch
    optimizer = torch.optim.AdamW(
        param_groups(student, t.WEIGHT_DECAY), lr=base_lr, betas=tuple(t.OPTIMIZER.BETAS), eps=t.OPTIMIZER.EPS
    )
    amp_dtype = DTYPES[cfg.AMP_DTYPE]
    use_amp = cfg.AMP_ENABLE and env.device.type == "cuda"
    scaler = grad_scaler(env.device, use_amp and amp_dtype == torch.float16)
    model = wrap_ddp(student, env)

    start_epoch, step = t.START_EPOCH, 0
    if ckpt is not None:
        info = restore_resume_state(ckpt, student, optimizer, None, scaler, source=str(ckpt_path))
        start_epoch, step = info.epoch, info.step
        log.info(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}")
    log.info(
        f"{len(dataset)} images, {steps_per_epoch} steps/epoch x {t.EPOCHS} epochs, lr {base_lr:.3g} "
        f"(batch {data.BATCH_SIZE} x {env.world_size} x {accum}), AMP {use_amp} {cfg.AMP_DTYPE}"
    )
    result: dict = {"epochs_run": 0, "final_loss": float("nan"), "step": step}
    for epoch in range(start_epoch, t.EPOCHS):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        model.train()
        skipped, seen, t0 = 0, 0, time.perf_counter()
        loss_sum = torch.zeros((), device=env.device)
        n_loss = 0
        micro = 0
        batches = progress(loader, env.is_main, desc=f"epoch {epoch}", total=steps_per_epoch * accum)
        for i, batch in enumerate(batches):
            if i >= steps_per_epoch * accum:
                break
            skipped += batch["skipped"]
            if not batch["key"]:
                continue
            images = batch["image"].to(env.device, non_blocking=True)
            if teacher is not None:
                target = run_teacher(teacher, images)
            else:
                target = batch["target"].to(env.device, non_blocking=True).float()
            valid = valid_mask(batch["hw"].to(env.device), data.IMG_SIZE, d.EMBED_SIZE)
            micro += 1
            last_micro = micro % accum == 0
            sync = model.no_sync() if (env.distributed and not last_micro) else nullcontext()
            with sync:
                with amp_autocast(env.device, use_amp, amp_dtype):
                    pred = model(images)
                loss, parts = stage1_loss(pred, target, valid, d.PIXEL_WISE, d.COSINE)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
            n_loss += 1
            seen += len(batch["key"])
            if not last_micro:
                continue
            lr = lr_at(step, total_steps, warmup_steps, base_lr, warmup_lr, min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), t.CLIP_GRAD if t.CLIP_GRAD > 0 else 1e30)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.PRINT_FREQ == 0 or step == total_steps:
                dt = time.perf_counter() - t0
                log.log_scalars(
                    step, loss=loss.item(), mse=parts["mse"], cos=parts["cos"], lr=lr, grad_norm=float(grad_norm),
                    img_per_s=seen * env.world_size / max(dt, 1e-9), epoch=epoch,
                )  # fmt: skip
        mean_loss = float(all_reduce_mean(loss_sum / max(n_loss, 1), env))
        dt = time.perf_counter() - t0
        log.info(
            f"epoch {epoch}: loss {mean_loss:.5f}, {seen * env.world_size / max(dt, 1e-9):.1f} img/s, "
            f"{skipped} unreadable images skipped"
        )
        rng = gather_rng_states(env)
        if env.is_main and ((epoch + 1) % cfg.SAVE_FREQ == 0 or epoch + 1 == t.EPOCHS):
            state = resume_state(
                student, optimizer, None, scaler, epoch=epoch + 1, step=step, config=to_dict(cfg),
                sampler_epoch=epoch + 1, extra={"loss": mean_loss, "skipped": skipped}, rng=rng,
            )  # fmt: skip
            save_checkpoint(out / f"ckpt_epoch_{epoch}.pth", state)
        barrier(env)
        result.update(epochs_run=result["epochs_run"] + 1, final_loss=mean_loss, step=step)
        if args.stop_after_epochs and result["epochs_run"] >= args.stop_after_epochs:
            break
    return result


def main(argv=None) -> None:
    run_cli("efficientsam3-train-stage1", train, argv)


if __name__ == "__main__":
    main()
