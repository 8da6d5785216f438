"""Training and evaluation loops on run_kit (one process or torchrun DDP, AMP, atomic checkpoints, resume, logs)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from run_kit import (
    CheckpointError,
    DistEnv,
    RunLogger,
    amp_autocast,
    barrier,
    cleanup_distributed,
    grad_scaler,
    load_checkpoint,
    load_state_dict_checked,
    progress,
    reconcile_config,
    restore_resume_state,
    resume_state,
    save_checkpoint,
    seed_everything,
    set_sampler_epoch,
    setup_distributed,
    unwrap_model,
    wrap_ddp,
)

from .data import collate_skip_bad, msrvtt_test, msrvtt_train
from .fastconv import DEFAULT_MODE, get_prompter_conv, set_prompter_conv
from .merging import save_merge_visualization
from .metrics import retrieval_metrics
from .model import CLIP4Clip
from .optim import build_optimizer, warmup_cosine
from .tokenizer import ClipTokenizer
from .weights import clip_file, load_clip_state_dict

CKPT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
LOGIT_SCALE_MAX = math.log(100.0)


def _default_csv(args: argparse.Namespace) -> None:
    root = Path(args.data_path).parent
    if args.train_csv is None:
        args.train_csv = str(root / "MSRVTT_train.9k.csv")
    if args.val_csv is None:
        args.val_csv = str(root / "MSRVTT_JSFUSION_test.csv")


def build_model(args: argparse.Namespace, env: DistEnv) -> CLIP4Clip:
    clip_sd = load_clip_state_dict(clip_file(args.pretrained_clip_name, args.pretrained_dir))
    layers = len({k.split(".")[3] for k in clip_sd if k.startswith("visual.transformer.resblocks.")})
    if args.unified_transformer_layers not in (None, layers):
        raise ValueError(
            f"--unified_transformer_layers must equal the ViT depth ({layers}), got {args.unified_transformer_layers}"
        )
    model = CLIP4Clip.from_pretrained(clip_sd, args)
    if args.temperature_new > 1.0:
        model.clip.logit_scale.data.fill_(args.temperature_new)
    if args.init_model:
        ckpt = load_checkpoint(args.init_model)
        state = ckpt.get("model", ckpt)
        load_state_dict_checked(model, state, args.init_model)
    return model.to(env.device)


def _loader(dataset, batch: int, shuffle: bool, env: DistEnv, workers: int, seed: int) -> DataLoader:
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=shuffle) if env.distributed else None
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_bad,
        drop_last=shuffle,
        generator=gen if shuffle and sampler is None else None,
        persistent_workers=False,
    )


def _dataset_kwargs(args: argparse.Namespace, tokenizer: ClipTokenizer, image_size: int) -> dict[str, Any]:
    return {
        "features_path": args.features_path,
        "tokenizer": tokenizer,
        "max_words": args.max_words,
        "max_frames": args.max_frames,
        "sampling": args.frame_sampling,
        "feature_framerate": args.feature_framerate,
        "slice_framepos": args.slice_framepos,
        "image_size": image_size,
        "seed": args.seed,
    }


def _gather_cat(t: torch.Tensor, env: DistEnv, counts: list[int] | None = None) -> torch.Tensor:
    """All-gather with gradients (each rank's own slice keeps its graph). ``counts`` (rows per rank, the same list on
    every rank) allows ranks that lost different numbers of bad videos: rows are zero-padded to the largest count
    for the collective (which needs equal shapes) and the padding is dropped again."""
    from torch.distributed.nn.functional import all_gather

    if counts is None or len(set(counts)) == 1:
        return torch.cat(all_gather(t), 0)
    top = max(counts)
    padded = torch.nn.functional.pad(t, (0, 0, 0, top - t.shape[0]))
    return torch.cat([part[:n] for part, n in zip(all_gather(padded), counts, strict=True)], 0)


def _all_gather_counts(n: int, env: DistEnv) -> list[int]:
    """Every rank's number of good samples in this step (one small all-gather; gloo or NCCL)."""
    mine = torch.tensor([n], dtype=torch.long, device=env.device)
    parts = [torch.zeros_like(mine) for _ in range(env.world_size)]
    dist.all_gather(parts, mine)
    return [int(p.item()) for p in parts]


def step_counts(n_good: int, env: DistEnv, gather_counts=_all_gather_counts) -> list[int] | None:
    """Good samples of every rank for this training step, or None when the step must be skipped.

    The decision is collective so that all ranks skip together: a rank whose whole batch failed to decode cannot
    run the forward (nothing to stack) and the others would then wait forever in DDP's gradient all-reduce and the
    feature all-gather. Skipped when any rank has no sample, or when fewer than 2 pairs exist in all (a contrastive
    batch needs two). ``gather_counts(n, env)`` is the collective (swappable for tests).
    """
    counts = gather_counts(n_good, env) if env.distributed else [n_good]
    if min(counts) < 1 or sum(counts) < 2:
        return None
    return counts


def _autocast(args: argparse.Namespace, env: DistEnv):
    """``amp``: fp16 autocast on CUDA. ``fp16``: the model itself in half precision for evaluation; in training
    (where half-precision weights would underflow in the optimiser) it means the same as ``amp``."""
    return amp_autocast(env.device, args.precision == "amp" or (args.precision == "fp16" and args.do_train))


@torch.no_grad()
def evaluate(model: CLIP4Clip, loader: DataLoader, args, env: DistEnv, logger: RunLogger, tag: str) -> dict[str, Any]:
    """Encode all (text, video) pairs, drop pairs whose video failed, compute t2v / v2t metrics on the main rank."""
    model.eval()
    texts, videos, indices, bad = [], [], [], []
    saved_pictures = 0
    start = time.perf_counter()
    text_prompts, local_prompts = model.encode_prompts()
    for batch in progress(loader, env.is_main, desc=f"eval {tag}", leave=False):
        bad.extend(batch["bad"])
        for vid, err in batch["bad"]:
            logger.info(f"warning: skipped video {vid}: {err}")
        if not batch["video_id"]:
            continue
        ids = batch["input_ids"].to(env.device)
        video = batch["video"].to(env.device)
        if args.precision == "fp16" and not args.do_train:
            video = video.half()
        with _autocast(args, env):
            texts.append(model.get_text_features(ids, text_prompts).float().cpu())
            videos.append(
                model.get_video_features(video, batch["video_mask"].to(env.device), local_prompts).float().cpu()
            )
        indices.append(batch["index"])
        if args.tome_trace_source and env.is_main and saved_pictures < args.tome_vis_count:
            for i in range(min(len(batch["video_id"]), args.tome_vis_count - saved_pictures)):
                path = Path(args.output_dir) / "merge_vis" / f"{tag}_{batch['video_id'][i]}.png"
                save_merge_visualization(model, batch["video"], path, index=i)
                saved_pictures += 1
    elapsed = time.perf_counter() - start
    local = {
        "text": torch.cat(texts) if texts else torch.zeros(0),
        "video": torch.cat(videos) if videos else torch.zeros(0),
        "index": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        "bad": bad,
    }
    parts = [local]
    if env.distributed:
        parts = [None] * env.world_size
        dist.all_gather_object(parts, local)
    result: dict[str, Any] = {}
    if env.is_main:
        parts = [p for p in parts if p["index"].numel()]
        if not parts:
            raise RuntimeError(f"evaluation {tag}: every video failed to decode ({len(bad)} bad)")
        index = torch.cat([p["index"] for p in parts])
        order = torch.argsort(index)
        keep = torch.ones(len(order), dtype=torch.bool)
        keep[1:] = index[order][1:] != index[order][:-1]  # DistributedSampler pads with repeats
        order = order[keep]
        text = torch.cat([p["text"] for p in parts])[order]
        video = torch.cat([p["video"] for p in parts])[order]
        n_bad = len({v for p in parts for v, _ in p["bad"]})
        result = retrieval_metrics(text, video, args.eval_block)
        result.update(pairs=int(len(order)), bad_videos=n_bad, seconds=elapsed)
        text_line = " | ".join(
            f"{d} R@1 {m['R1']:.1f} R@5 {m['R5']:.1f} R@10 {m['R10']:.1f} MdR {m['MdR']:.1f} MnR {m['MnR']:.1f}"
            for d, m in (("t2v", result["t2v"]), ("v2t", result["v2t"]))
        )
        logger.info(f"[{tag}] {text_line} | {len(order)} pairs, {n_bad} bad videos skipped")
    return result


def _checkpoint_path(path: str) -> Path:
    p = Path(path)
    return p / CKPT_NAME if p.is_dir() else p


def run(args: argparse.Namespace, explicit: set[str]) -> dict[str, Any]:
    """The whole command: train (with per-epoch eval) and/or eval. Returns the last metrics (main rank)."""
    resume_ckpt = None
    if args.resume:
        resume_path = _checkpoint_path(args.resume)
        resume_ckpt = load_checkpoint(resume_path)
        if "config" not in resume_ckpt:
            raise CheckpointError(f"{resume_path}: not a training checkpoint of this project (no 'config')")
        # never taken from the checkpoint: where and how this run executes
        keep = {"resume", "output_dir", "device", "local_rank", "num_thread_reader", "prompter_conv"}
        merged = reconcile_config(resume_ckpt["config"], vars(args), explicit - keep)
        merged.update({k: getattr(args, k) for k in keep})  # where this run writes and runs, silently
        args = argparse.Namespace(**merged)
    _default_csv(args)
    env = setup_distributed(args.device)
    old_conv = get_prompter_conv()
    set_prompter_conv(getattr(args, "prompter_conv", DEFAULT_MODE))
    try:
        return _run(args, env, resume_ckpt)
    finally:
        set_prompter_conv(old_conv)
        cleanup_distributed()


def _run(args: argparse.Namespace, env: DistEnv, resume_ckpt: dict | None) -> dict[str, Any]:
    out = Path(args.output_dir)
    seed_everything(args.seed + env.rank)
    logger = RunLogger(
        out,
        env.is_main,
        tensorboard=not args.no_tensorboard,
        resume_step=None if resume_ckpt is None else int(resume_ckpt["step"]),
    )
    logger.info(f"stop-tome: {vars(args)}")
    model = build_model(args, env)
    if args.precision == "fp16" and not args.do_train:
        model.half()
    tokenizer = ClipTokenizer()
    kw = _dataset_kwargs(args, tokenizer, model.clip.spec.image_resolution)
    test_set = msrvtt_test(args.val_csv, **kw)
    test_batch = max(1, args.batch_size_val // env.world_size)
    test_loader = _loader(test_set, test_batch, False, env, args.num_thread_reader, args.seed)
    result: dict[str, Any] = {}
    if not args.do_train:
        result = evaluate(model, test_loader, args, env, logger, "eval")
        logger.log_scalars(0, **_flat(result))
        logger.close()
        return result

    if args.batch_size % env.world_size:
        raise ValueError(f"--batch_size {args.batch_size} must be divisible by the {env.world_size} processes")
    train_set = msrvtt_train(args.data_path, args.train_csv, args.expand_msrvtt_sentences, **kw)
    per_rank = args.batch_size // env.world_size // args.gradient_accumulation_steps
    if per_rank < 1:
        raise ValueError("--batch_size too small for the number of processes and --gradient_accumulation_steps")
    train_loader = _loader(train_set, per_rank, True, env, args.num_thread_reader, args.seed)
    steps_per_epoch = len(train_loader) // args.gradient_accumulation_steps
    if args.max_train_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_train_steps)
    if steps_per_epoch < 1:
        raise ValueError(f"training set has {len(train_set)} pairs: fewer than one batch of {args.batch_size}")
    total = steps_per_epoch * args.epochs
    ddp = wrap_ddp(model, env)
    optimizer = build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, args.warmup_proportion))
    scaler = grad_scaler(env.device, args.precision in ("amp", "fp16"))
    start_epoch, step, best = 0, 0, -1.0
    if resume_ckpt is not None:
        info = restore_resume_state(resume_ckpt, model, optimizer, scheduler, scaler, source=str(args.resume))
        start_epoch, step = info.epoch, info.step
        best = float(info.extra.get("best_r1", -1.0))
        logger.info(f"resumed from {args.resume}: epoch {start_epoch}, step {step}")
    bad_total, skipped = 0, 0
    for epoch in range(start_epoch, args.epochs):
        ddp.train()
        set_sampler_epoch(train_loader, epoch)
        train_set.set_epoch(epoch)
        if train_loader.generator is not None:
            train_loader.generator.manual_seed(args.seed + epoch)
        done, micro = 0, 0
        for batch in progress(train_loader, env.is_main, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            for vid, err in batch["bad"]:
                logger.info(f"warning: skipped video {vid}: {err}")
            bad_total += len(batch["bad"])
            counts = step_counts(len(batch["video_id"]), env)
            if counts is None:  # all ranks agree: an empty rank, or < 2 pairs in all
                skipped += 1
                logger.info(f"warning: skipped a training step ({len(batch['video_id'])} good pairs on this rank)")
                continue
            gather = (lambda t, c=counts: _gather_cat(t, env, c)) if env.distributed else None
            ids, video = batch["input_ids"].to(env.device), batch["video"].to(env.device)
            with _autocast(args, env):
                outputs = ddp(
                    ids,
                    video,
                    batch["attention_mask"].to(env.device),
                    batch["video_mask"].to(env.device),
                    gather=gather,
                )
            loss = outputs["loss"] / args.gradient_accumulation_steps
            scaler.scale(loss).backward()
            micro += 1
            if micro % args.gradient_accumulation_steps:
                continue
            scaler.unscale_(optimizer)
            if args.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            with torch.no_grad():
                model.clip.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
            step += 1
            done += 1
            if step % args.n_display == 0 or done == steps_per_epoch:
                logger.log_scalars(
                    step,
                    loss=float(loss.detach()) * args.gradient_accumulation_steps,
                    lr=scheduler.get_last_lr()[0],
                    logit_scale=float(model.clip.logit_scale.detach().exp()),
                    bad_videos=bad_total,
                    skipped_steps=skipped,
                )
                logger.info(f"epoch {epoch + 1} step {step}/{total} loss {float(loss.detach()):.4f}")
            if done >= steps_per_epoch:
                break
        result = evaluate(model, test_loader, args, env, logger, f"epoch{epoch + 1}")
        if env.is_main:
            logger.log_scalars(step, epoch=epoch + 1, **_flat(result))
            r1 = result["t2v"]["R1"]
            if r1 > best:
                best = r1
                save_checkpoint(
                    out / BEST_NAME,
                    {
                        "model": unwrap_model(model).state_dict(),
                        "epoch": epoch + 1,
                        "metrics": _flat(result),
                        "config": _plain(vars(args)),
                    },
                )
            state = resume_state(
                model,
                optimizer,
                scheduler,
                scaler,
                epoch=epoch + 1,
                step=step,
                config=_plain(vars(args)),
                sampler_epoch=epoch + 1,
                extra={"best_r1": best, "bad_videos": bad_total},
            )
            save_checkpoint(out / CKPT_NAME, state)
        barrier(env)
    logger.close()
    return result


def _flat(result: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update({f"{key}_{k}": float(v) for k, v in value.items()})
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool, type(None)))}
