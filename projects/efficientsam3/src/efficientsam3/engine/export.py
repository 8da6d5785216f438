"""Teacher-embedding export: one process or torchrun over any GPU count. Each rank appends its share of the
keys not yet in the store (any rank's keys file) to its own rank{r} files, so a restarted export (even
with another GPU count) skips finished records. `--check N` re-runs the teacher on N stored keys and
reports the error instead of exporting."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from run_kit import RunLogger, barrier, cleanup_distributed, progress, setup_distributed

from ..data.sa1b import SA1BDataset, collate
from ..model.sam3_vit import compile_trunk
from ..store import EmbeddingStore, StoreWriter, read_keys
from ..store.compact import ErrorMeter
from .common import base_parser, config_from_args, run_cli, run_teacher, teacher_on, use_compile


def build_parser():
    p = base_parser("efficientsam3-save-embeddings", "Export SAM3 teacher embeddings into the stage-1 store.")
    p.add_argument("--split", default=None, help="images/<split> to export (DATA.SPLIT)")
    p.add_argument(
        "--format", default="fp16", choices=("fp16", "bf16", "uint8"), help="record format (fp16 = reference)"
    )
    p.add_argument(
        "--check", type=int, default=0, metavar="N", help="re-run the teacher on N stored keys, report error"
    )
    p.add_argument("--max-images", type=int, default=0, help="export at most this many new images (0: all)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the teacher (fullgraph, static shapes; batches padded to the batch size); "
        "default: on for a CUDA export, off on CPU and for --check",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (DATA.NUM_WORKERS)")
    return p


def done_keys(root) -> set[str]:
    """Keys already written by any rank (complete lines only)."""
    root = Path(root)
    return {k for path in root.glob("rank*-keys.txt") for k in read_keys(path)} if root.is_dir() else set()


def export(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg, _ = config_from_args(args)
    env = setup_distributed("cpu" if args.only_cpu else args.device)
    out = cfg.DISTILL.TEACHER_EMBED_PATH
    log = RunLogger(out, env.is_main, tensorboard=False, log_name="export_log_rank0.txt", history_name="export.json")
    try:
        teacher = teacher_on(cfg, env.device)
        # a --check of a few keys would spend longer compiling than checking: eager unless asked
        compiled = use_compile(False if args.check and args.compile is None else args.compile, env.device)
        if compiled:
            teacher = compile_trunk(teacher)
        pad = cfg.DATA.BATCH_SIZE if compiled else 0
        split = args.split or cfg.DATA.SPLIT
        workers = cfg.DATA.NUM_WORKERS if args.workers is None else args.workers
        if args.check:
            return _check(cfg, args, env, teacher, split, workers, log, pad)
        dataset = SA1BDataset(
            cfg.DATA.DATA_PATH, split, cfg.DATA.IMG_SIZE, cfg.DATA.PREPROCESS, aug_flip=cfg.DATA.AUG_FLIP
        )
        finished = done_keys(out)
        barrier(env)  # every rank decides on the same snapshot before anyone writes
        todo = [i for i, k in enumerate(dataset.keys) if k not in finished]
        if args.max_images:
            todo = todo[: args.max_images]
        mine = todo[env.rank :: env.world_size]
        log.info(
            f"export: {len(dataset)} images in {split}, {len(finished)} already stored, {len(todo)} to do "
            f"({len(mine)} on rank {env.rank}/{env.world_size}), teacher {cfg.TEACHER.TYPE} "
            f"r={cfg.TEACHER.MERGE_R}/{cfg.TEACHER.MERGE_GLOBAL_R}, format {args.format}, "
            f"{'compiled' if compiled else 'eager'}"
        )
        loader = DataLoader(
            Subset(dataset, mine), batch_size=cfg.DATA.BATCH_SIZE, num_workers=workers, collate_fn=collate,
            pin_memory=cfg.DATA.PIN_MEMORY and env.device.type == "cuda",
        )  # fmt: skip
        writer = StoreWriter(out, env.rank, cfg.DISTILL.EMBED_DIM, cfg.DISTILL.EMBED_SIZE, args.format)
        n = skipped = 0
        t0 = time.perf_counter()
        with writer:
            for batch in progress(loader, env.is_main, desc="export"):
                skipped += batch["skipped"]
                if not batch["key"]:
                    continue
                emb = run_teacher(teacher, batch["image"].to(env.device, non_blocking=True), pad).cpu()
                for key, seed, e in zip(batch["key"], batch["seed"].tolist(), emb, strict=True):
                    writer.write(key, seed, e)
                n += len(batch["key"])
        dt = time.perf_counter() - t0
        summary = {"written": n, "skipped_unreadable": skipped, "seconds": dt, "img_per_s": n / max(dt, 1e-9)}
        log.info(
            f"export rank {env.rank}: {n} records in {dt:.1f}s ({summary['img_per_s']:.2f} img/s), {skipped} skipped"
        )
        barrier(env)
        return summary
    finally:
        log.close()
        cleanup_distributed()


@torch.no_grad()
def _check(cfg, args, env, teacher, split, workers, log, pad: int = 0) -> dict:
    store = EmbeddingStore(cfg.DISTILL.TEACHER_EMBED_PATH, cfg.DISTILL.EMBED_DIM, cfg.DISTILL.EMBED_SIZE)
    keys = store.keys()
    random.Random(cfg.SEED).shuffle(keys)
    keys = keys[: args.check]
    dataset = SA1BDataset(
        cfg.DATA.DATA_PATH, split, cfg.DATA.IMG_SIZE, cfg.DATA.PREPROCESS, store=store, aug_flip=cfg.DATA.AUG_FLIP,
        keys=keys,
    )  # fmt: skip
    meter = ErrorMeter()
    abs_sum = count = 0.0
    loader = DataLoader(dataset, batch_size=cfg.DATA.BATCH_SIZE, num_workers=workers, collate_fn=collate)
    for batch in progress(loader, env.is_main, desc="check"):
        if not batch["key"]:
            continue
        fresh = run_teacher(teacher, batch["image"].to(env.device), pad).cpu()
        meter.add(fresh, batch["target"])
        abs_sum += (fresh - batch["target"]).abs().sum().item()
        count += fresh.numel()
    summary = meter.summary() | {
        "mean_abs_err": abs_sum / max(count, 1),
        "checked": len(dataset),
        "format": store.format,
    }
    log.info("check: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


def main(argv=None) -> None:
    run_cli("efficientsam3-save-embeddings", export, argv)


if __name__ == "__main__":
    main()
