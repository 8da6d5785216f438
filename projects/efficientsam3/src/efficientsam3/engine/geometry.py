"""Geometry fine-tune: the stage-1 student's embedding and the teacher embedding (stored, or from the trunk
run in the loop with --online-teacher) both go through the same frozen SAM3 path with the same SA-1B
box/point prompts; loss = 0.0015 x embedding MSE + BCE + Dice on the teacher's best query, the mask terms
averaged over DECODE_ITERS decode iterations (EdgeSAM-style refinement points in between). AdamW, warm-up +
cosine per step (not batch-scaled), AMP, accumulation, clip, DDP, atomic `ckpt_epoch_{N}.pth` holding only the
trainable student (`student_trunk.*`) and optimizer state, auto-resume from the newest one. The frozen SAM3
weights are never saved."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from run_kit import (
    CheckpointError,
    all_reduce_mean,
    amp_autocast,
    barrier,
    gather_rng_states,
    grad_scaler,
    load_checkpoint,
    load_state_dict_checked,
    progress,
    restore_resume_state,
    resume_state,
    save_checkpoint,
    seed_everything,
    wrap_ddp,
    write_json_atomic,
)

from ..config import ConfigError, from_dict, to_dict
from ..convert import TARGET, student_state
from ..data.sa1b import SA1BDataset, augmentation_seed, collate
from ..data.transforms import valid_mask
from ..finetune.cache import build_teacher_cache, host_to_device
from ..finetune.config import FT_CHOICES, ft_defaults, load_ft_config
from ..finetune.losses import LossWeights
from ..finetune.prompts import collate_prompts, pad_prompts, sample_prompts
from ..finetune.step import DecodeSettings, ft_loss, teacher_targets
from ..model.sam3_frozen import SAM3_DIMS, TINY_DIMS, build_frozen_sam3, compile_frozen
from ..model.students import build_student
from ..store import EmbeddingStore
from .common import DTYPES, FLAG_KEYS, base_parser, run_cli, run_teacher, run_training, teacher_on
from .schedule import lr_at, param_groups, scaled_lr
from .stage1 import ALWAYS_CLI

PROG = "efficientsam3-train-geometry-finetune"
FT_FLAG_KEYS = {**FLAG_KEYS, "sam3_checkpoint": "MODEL.SAM3_CHECKPOINT"}
FT_ALWAYS_CLI = ALWAYS_CLI | {"MODEL.SAM3_CHECKPOINT", "MODEL.PRETRAINED", "MODEL.COMPILE_FROZEN"}


class FTStudent(nn.Module):
    """Holds the student under `student_trunk.` so checkpoints carry the converter's key names."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student_trunk = student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student_trunk(images)


def build_parser():
    p = base_parser(PROG, "Geometry-aware fine-tune of a stage-1 student through frozen SAM3.")
    p.add_argument("--pretrained", help="stage-1 student: merged model or ckpt_epoch_N.pth (MODEL.PRETRAINED)")
    p.add_argument("--resume", help="checkpoint to resume (default: newest ckpt_epoch_N.pth in OUTPUT)")
    p.add_argument("--accumulation-steps", type=int, help="TRAIN.ACCUMULATION_STEPS")
    p.add_argument("--eval", action="store_true", help="only report the loss over DATA.SPLIT (no training)")
    p.add_argument("--online-teacher", action="store_true", help="run the teacher trunk in the loop (no store)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the frozen SAM3 path (MODEL.COMPILE_FROZEN on; --no-compile = off; "
        "default auto = CUDA graphs on CUDA, eager on CPU)",
    )  # fmt: skip
    p.add_argument("--stop-after-epochs", type=int, default=0, help="leave after this many epochs (time-limited jobs)")
    return p


def load_stage1_student(student: nn.Module, path: str) -> int:
    """Stage-1 weights from a merged EfficientSAM3 model (trunk prefix) or a stage-1 checkpoint."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"MODEL.PRETRAINED: stage-1 student not found: {path}")
    ckpt = load_checkpoint(path)
    sd = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    merged = {k[len(TARGET) :]: v for k, v in sd.items() if k.startswith(TARGET)}
    state = merged or student_state(ckpt)
    load_state_dict_checked(student, state, f"MODEL.PRETRAINED: {path}")
    return len(state)


def _config(args):
    overrides = {
        key: getattr(args, dest) for dest, key in FT_FLAG_KEYS.items() if getattr(args, dest, None) is not None
    }
    if args.disable_amp or args.only_cpu:
        overrides["AMP_ENABLE"] = False
    if args.online_teacher:
        overrides["DISTILL.ONLINE_TEACHER"] = True
    if args.compile is not None:
        overrides["MODEL.COMPILE_FROZEN"] = "on" if args.compile else "off"
    cfg = load_ft_config(args.cfg, args.opts, overrides)
    return cfg, set(overrides) | set(args.opts[0::2])


def batch_prompts(batch: dict, cfg, epoch: int) -> dict[str, torch.Tensor]:
    """Prompts per image, seeded by (image, epoch): the same on every rank, run and resume."""
    d, data = cfg.DISTILL, cfg.DATA
    out = []
    for key, anns, hw, seed in zip(batch["key"], batch["annotations"], batch["orig_hw"], batch["seed"].tolist(),
                                   strict=True):  # fmt: skip
        g = torch.Generator().manual_seed(augmentation_seed(key, 0 if d.FIXED_PROMPTS else epoch))
        p = sample_prompts(
            anns, hw, data.IMG_SIZE, data.PREPROCESS, d.MAX_PROMPTS, data.BOX_JITTER,
            flip=data.AUG_FLIP and bool(seed & 1), single=d.PROMPT_MIX, generator=g,
        )  # fmt: skip
        out.append(p)
    prompts = collate_prompts(out)
    if not d.USE_BOX_PROMPTS:
        prompts["box_pad"][:] = True
    if not d.USE_POINT_PROMPTS:
        prompts["point_pad"][:] = True
    return prompts


def frozen_compile_mode(mode: str, device: torch.device) -> str | None:
    """MODEL.COMPILE_FROZEN -> torch.compile mode of the frozen path, None = eager: "on" -> "default",
    "reduce-overhead" (CUDA graphs; on the CPU torch skips the graphs, i.e. "on"), "auto" (the default) =
    "reduce-overhead" on CUDA and eager on the CPU. Why: at the FT batch (4) the frozen path is launch-bound;
    under CUDA graphs it ran at 160 TFLOP/s vs 33-49 eager and 85-102 compiled without graphs (H200, round 5),
    which is what brings the FT step to 1.29x a stage-1 step; CPU compiles take minutes and gain little."""
    if mode == "reduce-overhead" or (mode == "auto" and device.type == "cuda"):
        return "reduce-overhead"
    return "default" if mode == "on" else None


def frozen_compiled(mode: str, device: torch.device) -> bool:
    """Whether MODEL.COMPILE_FROZEN compiles the frozen path on `device`."""
    return frozen_compile_mode(mode, device) is not None


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors built per step (prompts) to the device without a host sync (pinned, non-blocking)."""
    return {k: host_to_device(v, device) for k, v in batch.items()}


def refine_uniforms(keys: list[str], epoch: int, n: int) -> Callable[[int], torch.Tensor]:
    """uniforms(it) -> (B, n): the refinement draws, seeded per (image, epoch) like the prompts, so every rank,
    run and resume places the same points given the same masks."""
    gens = [torch.Generator().manual_seed(augmentation_seed(f"{k}/refine", epoch)) for k in keys]
    return lambda it: torch.stack([torch.rand(n, generator=g) for g in gens])


def online_teacher(cfg, device: torch.device) -> nn.Module:
    """Stage 1's teacher (exact or merged trunk, one home: `engine.common.teacher_on`); a sam3 teacher without
    TEACHER.CHECKPOINT reads its trunk from MODEL.SAM3_CHECKPOINT (sam3.pt holds both)."""
    c = cfg.clone()
    c.defrost()
    if c.TEACHER.TYPE == "sam3" and not c.TEACHER.CHECKPOINT:
        c.TEACHER.CHECKPOINT = c.MODEL.SAM3_CHECKPOINT
    return teacher_on(c, device)


@torch.no_grad()
def evaluate(model, loader, batch_loss, epoch: int, env, log) -> dict:
    """--eval: the loss and its parts averaged over DATA.SPLIT (full batches), no update."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        if not batch["key"]:
            continue
        loss, parts = batch_loss(batch, epoch)
        for k, v in {"loss": loss, **parts}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    if not n:
        raise ValueError("--eval: no full batch to evaluate")
    result = {k: float(all_reduce_mean(torch.tensor(v / n, device=env.device), env)) for k, v in sums.items()}
    log.info("eval: " + ", ".join(f"{k} {v:.5f}" for k, v in result.items()))
    return {"eval": result}


def train(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg, explicit = _config(args)
    return run_training(
        args, cfg, explicit, _train, always_cli=FT_ALWAYS_CLI, rebuild=lambda d: from_dict(d, ft_defaults(), FT_CHOICES)
    )


def _train(cfg, args, env, log, ckpt, ckpt_path) -> dict:
    seed_everything(cfg.SEED + env.rank)
    out = Path(cfg.OUTPUT)
    if env.is_main:
        write_json_atomic(out / "config.json", to_dict(cfg))
    d, data, t = cfg.DISTILL, cfg.DATA, cfg.TRAIN
    dims = TINY_DIMS if cfg.MODEL.SAM3_TYPE == "tiny" else SAM3_DIMS
    if d.EMBED_DIM != dims.embed_dim:
        raise ConfigError(f"DISTILL.EMBED_DIM: {d.EMBED_DIM} does not fit MODEL.SAM3_TYPE {cfg.MODEL.SAM3_TYPE}")
    if cfg.MODEL.SAM3_TYPE == "sam3" and not cfg.MODEL.SAM3_CHECKPOINT:
        raise ConfigError("MODEL.SAM3_CHECKPOINT: required (a local sam3.pt) for MODEL.SAM3_TYPE sam3")
    checkpoint = cfg.MODEL.SAM3_CHECKPOINT if cfg.MODEL.SAM3_TYPE == "sam3" else ""
    with torch.random.fork_rng(devices=[]):  # the tiny stand-in's random weights: the same on every rank
        torch.manual_seed(cfg.SEED)
        frozen = build_frozen_sam3(checkpoint, dims, cfg.MODEL.FEATURE_SIZE).to(env.device)
    for name, n in frozen.component_sizes().items():
        log.info(f"frozen SAM3 {name}: {n / 1e6:.2f}M parameters")
    compile_mode = frozen_compile_mode(cfg.MODEL.COMPILE_FROZEN, env.device)
    compiled = compile_mode is not None
    if compiled:
        compile_frozen(frozen, mode=compile_mode)
    prompt_slots = 1 if d.PROMPT_MIX else d.MAX_PROMPTS  # compiled: one static prompt shape
    student = build_student(cfg.MODEL.BACKBONE, d.EMBED_DIM, d.EMBED_SIZE)
    if cfg.MODEL.PRETRAINED:
        n = load_stage1_student(student, cfg.MODEL.PRETRAINED)
        log.info(f"stage-1 student from {cfg.MODEL.PRETRAINED}: {n} keys")
    wrapper = FTStudent(student).to(env.device)
    log.info(f"student {cfg.MODEL.BACKBONE}: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M trainable")
    teacher, store = None, None
    if d.ONLINE_TEACHER:
        teacher = online_teacher(cfg, env.device)
        log.info(f"online teacher {cfg.TEACHER.TYPE} (merge r={cfg.TEACHER.MERGE_R}/{cfg.TEACHER.MERGE_GLOBAL_R})")
    else:
        store = EmbeddingStore(d.TEACHER_EMBED_PATH, d.EMBED_DIM, d.EMBED_SIZE)
    dataset = SA1BDataset(
        data.DATA_PATH, data.SPLIT, data.IMG_SIZE, data.PREPROCESS, store=store, num_samples=data.NUM_SAMPLES,
        aug_flip=data.AUG_FLIP, with_annotations=True,
    )  # fmt: skip
    sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True, seed=cfg.SEED, drop_last=True)
    loader = DataLoader(
        dataset, batch_size=data.BATCH_SIZE, sampler=sampler, num_workers=data.NUM_WORKERS, collate_fn=collate,
        pin_memory=data.PIN_MEMORY and env.device.type == "cuda", drop_last=True,
        persistent_workers=data.NUM_WORKERS > 0,
    )  # fmt: skip
    accum = t.ACCUMULATION_STEPS
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"DATA.BATCH_SIZE: {len(dataset)} images on {env.world_size} process(es) give no full batch of "
            f"{data.BATCH_SIZE} x {accum} accumulation steps"
        )
    lrs = [scaled_lr(v, data.BATCH_SIZE, env.world_size, accum, t.SCALE_LR) for v in (t.BASE_LR, t.WARMUP_LR, t.MIN_LR)]
    total_steps, warmup_steps = t.EPOCHS * steps_per_epoch, t.WARMUP_EPOCHS * steps_per_epoch
    optimizer = torch.optim.AdamW(
        param_groups(wrapper, t.WEIGHT_DECAY), lr=lrs[0], betas=tuple(t.OPTIMIZER.BETAS), eps=t.OPTIMIZER.EPS
    )
    amp_dtype = DTYPES[cfg.AMP_DTYPE]
    frozen_dtype = DTYPES[cfg.MODEL.SAM3_DTYPE or cfg.AMP_DTYPE]
    use_amp = cfg.AMP_ENABLE and env.device.type == "cuda"
    scaler = grad_scaler(env.device, use_amp and amp_dtype == torch.float16)
    model = wrap_ddp(wrapper, env)
    weights = LossWeights(d.EMBEDDING_LOSS_WEIGHT, d.MASK_BCE_WEIGHT, d.MASK_DICE_WEIGHT, d.TEMPERATURE)
    decode = DecodeSettings(weights, d.DECODE_ITERS, d.ITER_ON_BOX, d.REFINE_POINTS, d.TEACHER_MASK_THRESHOLD)
    start_epoch, step = t.START_EPOCH, 0
    if ckpt is not None:
        if not any(k.startswith("student_trunk.") for k in ckpt.get("model", {})):
            raise CheckpointError(f"{ckpt_path}: no student_trunk.* weights (not a geometry fine-tune checkpoint)")
        info = restore_resume_state(ckpt, wrapper, optimizer, None, scaler, source=str(ckpt_path))
        start_epoch, step = info.epoch, info.step
        log.info(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}")
    log.info(
        f"{len(dataset)} images, {steps_per_epoch} steps/epoch x {t.EPOCHS} epochs, lr {lrs[0]:.3g} "
        f"(batch {data.BATCH_SIZE} x {env.world_size} x {accum}), AMP {use_amp} {cfg.AMP_DTYPE}, "
        f"FPN level {cfg.MODEL.FEATURE_SIZE}, frozen path {cfg.MODEL.SAM3_DTYPE or cfg.AMP_DTYPE}, "
        f"decode iterations {d.DECODE_ITERS}, frozen path {compile_mode or 'eager'}"
    )
    mask_size = 4 * d.EMBED_SIZE
    # key -> (teacher's best query, its mask logits fp16), on the CPU or up to CACHE_TEACHER_DEVICE_GB on the GPU
    cache = None
    if d.CACHE_TEACHER:
        cache = build_teacher_cache(d.CACHE_TEACHER_DEVICE_GB, len(sampler), (mask_size, mask_size), env.device)

    def batch_loss(batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher targets (cached or not), student embedding through the frozen path, the FT loss."""
        images = batch["image"].to(env.device, non_blocking=True)
        if teacher is not None:
            target = run_teacher(teacher, images)
        else:
            target = batch["target"].to(env.device, non_blocking=True)
        hw = batch["hw"].to(env.device, non_blocking=True)
        pr = batch_prompts(batch, cfg, epoch)
        if compiled:
            pr = pad_prompts(pr, prompt_slots)
        pr = to_device(pr, env.device)
        keys = batch["key"]
        with amp_autocast(env.device, use_amp, amp_dtype):
            pred = model(images)
        return ft_loss(
            frozen, pred, target, pr, valid_mask(hw, data.IMG_SIZE, d.EMBED_SIZE),
            valid_mask(hw, data.IMG_SIZE, mask_size), decode,
            first_teacher=lambda a: teacher_targets(frozen, target, a, keys, cache),
            uniforms=refine_uniforms(keys, 0 if d.FIXED_PROMPTS else epoch, d.REFINE_POINTS),
            frozen_ctx=lambda: amp_autocast(env.device, use_amp, frozen_dtype),
        )  # fmt: skip

    if args.eval:
        return evaluate(model, loader, batch_loss, start_epoch, env, log)
    result: dict = {"epochs_run": 0, "final_loss": float("nan"), "step": step}
    for epoch in range(start_epoch, t.EPOCHS):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        model.train()
        seen, micro, n_loss, t0 = 0, 0, 0, time.perf_counter()
        loss_sum = torch.zeros((), device=env.device)
        for i, batch in enumerate(progress(loader, env.is_main, desc=f"epoch {epoch}", total=steps_per_epoch * accum)):
            if i >= steps_per_epoch * accum:
                break
            if not batch["key"]:
                continue
            micro += 1
            last_micro = micro % accum == 0
            with model.no_sync() if (env.distributed and not last_micro) else nullcontext():
                loss, parts = batch_loss(batch, epoch)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
            n_loss += 1
            seen += len(batch["key"])
            if not last_micro:
                continue
            lr = lr_at(step, total_steps, warmup_steps, *lrs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapper.parameters(), t.CLIP_GRAD if t.CLIP_GRAD > 0 else 1e30)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.PRINT_FREQ == 0 or step == total_steps:
                log.log_scalars(step, loss=loss.item(), **parts, lr=lr, grad_norm=float(grad_norm), epoch=epoch)
        mean_loss = float(all_reduce_mean(loss_sum / max(n_loss, 1), env))
        dt = time.perf_counter() - t0
        log.info(f"epoch {epoch}: loss {mean_loss:.5f}, {seen * env.world_size / max(dt, 1e-9):.2f} img/s")
        rng = gather_rng_states(env)
        if env.is_main and ((epoch + 1) % cfg.SAVE_FREQ == 0 or epoch + 1 == t.EPOCHS):
            state = resume_state(
                wrapper, optimizer, None, scaler, epoch=epoch + 1, step=step, config=to_dict(cfg),
                sampler_epoch=epoch + 1, extra={"loss": mean_loss}, rng=rng,
            )  # fmt: skip
            save_checkpoint(out / f"ckpt_epoch_{epoch}.pth", state)
        barrier(env)
        result.update(epochs_run=result["epochs_run"] + 1, final_loss=mean_loss, step=step)
        if args.stop_after_epochs and result["epochs_run"] >= args.stop_after_epochs:
            break
    return result


def main(argv=None) -> None:
    run_cli(PROG, train, argv)


if __name__ == "__main__":
    main()
