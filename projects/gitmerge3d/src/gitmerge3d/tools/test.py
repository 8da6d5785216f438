"""Pointcept-style ``tools/test.py``: fragment-voting test of ``weight`` on ``data.test``; prints mIoU.

``--config-file configs/sonata/<cfg>.py --options weight=exp/.../model/model_best.pth`` (a ``weighted_patch``
config evaluates ``patch``-trained weights: the weights are the same, only the merging differs).
Results go to ``<save_path>/result/`` (default: the run folder of the weight, else ``exp/test``).
Under torchrun (``--nproc_per_node N``) rank r tests scenes r, r + N, ...; rank 0 gathers every scene's
confusion and writes the pooled metrics once (each scene counted once).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from run_kit import (
    CheckpointError,
    DistEnv,
    OneLineArgumentParser,
    cleanup_distributed,
    seed_everything,
    setup_distributed,
    write_json_atomic,
)

from ..datasets.pointcept import build_dataset
from ..engine.build import build_model, load_weight
from ..engine.config import ConfigError, load_config
from ..engine.metrics import format_table
from ..engine.tester import pool_scenes, test_scenes


def parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="gitmerge3d-test", description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-scenes", type=int, default=None, help="test only the first N scenes (quick runs)")
    p.add_argument("--save-pred", action="store_true", help="also write <scene>_pred.npy per scene")
    return p


def _save_dir(cfg) -> Path:
    if cfg.get("save_path"):
        return Path(cfg.save_path)
    w = Path(cfg.weight)
    return w.parent.parent if w.parent.name == "model" else Path("exp/test")


def _gather(scenes: list[dict], env: DistEnv) -> list[dict]:
    """Every rank's per-scene results, on rank 0 (other ranks get [])."""
    if not env.distributed:
        return scenes
    box: list | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(scenes, box, dst=0)
    return [s for part in box for s in part] if env.is_main else []


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    env = None
    try:
        if args.max_scenes is not None and args.max_scenes < 1:
            raise ValueError(f"--max-scenes must be >= 1, got {args.max_scenes}")
        cfg = load_config(args.config_file, args.options)
        if not cfg.get("weight"):
            raise ConfigError("weight is not set (pass --options weight=exp/<d>/<name>/model/model_best.pth)")
        env = setup_distributed(args.device)
        seed_everything(int(cfg.get("seed") or 0) + env.rank)
        model = build_model(cfg.model).to(env.device)
        load_weight(model, cfg.weight)
        ds = build_dataset(cfg.data.test, max_scenes=args.max_scenes)
        out = _save_dir(cfg) / "result"
        out.mkdir(parents=True, exist_ok=True)
        tag = f"[rank {env.rank}] " if env.distributed else ""

        def on_scene(name: str, pred: np.ndarray, s: dict) -> None:
            print(f"{tag}{name}: mIoU {s['mIoU']:.4f} mAcc {s['mAcc']:.4f} allAcc {s['allAcc']:.4f}", flush=True)
            if args.save_pred:
                np.save(out / f"{name}_pred.npy", pred)

        mine = range(env.rank, len(ds), env.world_size)
        c = cfg.data.num_classes
        ignore = cfg.data.get("ignore_index", -1)
        scenes = test_scenes(model, ds, mine, c, env.device, ignore, on_scene, seed=int(cfg.get("seed") or 0))
        scenes = _gather(scenes, env)
        if env.is_main:
            res = pool_scenes(scenes, c)
            if len(scenes) != len(ds):
                raise ValueError(f"gathered {len(scenes)} scenes, expected {len(ds)}")
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"gitmerge3d-test: error: {exc}", file=sys.stderr)
        cleanup_distributed()
        return 2
    if env.is_main:
        table = format_table(res, cfg.data.names)
        print(table)
        print(f"scenes: {len(scenes)} over {env.world_size} process(es)")
        (out / "metrics.txt").write_text(table + "\n")
        meta = {"names": list(cfg.data.names), "weight": str(cfg.weight), "world_size": env.world_size}
        write_json_atomic(out / "metrics.json", {**res, **meta})
        print(f"wrote {out / 'metrics.json'}")
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
