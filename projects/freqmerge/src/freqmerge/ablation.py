"""Ablations on one checkpoint: the alpha sweep and the token-scoring strategies.

    python ablation.py --study alpha|scoring|all --ckpt checkpoints/best_model.pth

Every variant uses the same weights and the same keep-rate budget; only the merge rule changes:
- alpha sweep: FreqMerge (LFGM scorer) with alpha in ALPHA_SWEEP (alpha = 0 is exactly ToMe);
- scoring: random pruning (r random tokens dropped), attention-based score (class-token attention
  as phi), LFGM (ours), plus the unmerged ViT for reference.
Results: ``logs/ablation_results.json`` and a printed table per study. The file holds every study run so far:
``--study alpha`` then ``--study scoring`` leaves both (each with its own entry under ``runs``).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from typing import Any

import torch

from run_kit import cleanup_distributed, parse_args_explicit, write_json_atomic

from . import config as C
from .config import Config
from .engine import (
    OneLineParser,
    add_bench_args,
    add_model_args,
    add_run_args,
    amp_enabled,
    check_merge_layers,
    cli_overrides,
    config_for_checkpoint,
    device_name,
    evaluate_model,
    explicit_fields,
    format_table,
    load_model_weights,
    open_checkpoint,
    run_main,
    setup_runtime,
    unit_float,
)
from .evaluate import DEFAULT_CKPT, bench_defaults

STUDIES = ("alpha", "scoring")

STRATEGY_NAMES = {
    "random": "Random Pruning",
    "attention": "Attention-Based Score",
    "lfgm": "LFGM (Ours)",
    "none": "ToMe (no scorer)",
}


def build_parser(prog: str | None = None) -> OneLineParser:
    p = OneLineParser(prog=prog, description="FreqMerge ablations (see README).")
    g = p.add_argument_group("ablation (guide flags)")
    g.add_argument("--study", choices=["alpha", "scoring", "all"], default="all", help="which ablation (default all)")
    g.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint (default {DEFAULT_CKPT})")
    g.add_argument("--alphas", type=unit_float, nargs="+", help=f"alpha values (default {C.ALPHA_SWEEP})")
    g.add_argument("--no_throughput", action="store_true", help="skip the img/s measurement")
    add_model_args(p)
    add_run_args(p)
    add_bench_args(p)
    return p


def variants(study: str, cfg: Config, alphas: list[float]) -> list[tuple[str, str, Config | None]]:
    """(study, display name, config or None for the unmerged model)."""
    out: list[tuple[str, str, Config | None]] = []
    if study in ("alpha", "all"):
        for a in alphas:
            label = f"{a:.2f}" + (" (= ToMe)" if a == 0 else "")
            out.append(("alpha", label, cfg.replace(alpha=float(a), scorer="lfgm", freqmerge=True)))
    if study in ("scoring", "all"):
        out.append(("scoring", "ViT-S (no merging)", None))
        for scorer in C.SCORING_STRATEGIES:
            out.append(("scoring", STRATEGY_NAMES[scorer], cfg.replace(scorer=scorer, freqmerge=True)))
    return out


def merge_results(path: str, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` on top of the studies already in ``path``: a study run now replaces only its own rows."""
    old: dict[str, Any] = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"warning: {path} is unreadable ({exc}); starting a new results file", file=sys.stderr)
        if not isinstance(old, dict):
            old = {}
    merged = {**old, **new}
    runs = dict(old.get("runs") or {})
    for study in STUDIES:
        if study in old and study not in new and study not in runs:  # a file written before "runs" existed
            runs[study] = {k: old.get(k) for k in ("checkpoint", "date", "device", "num_images")}
    runs.update(new.get("runs") or {})
    merged["runs"] = runs
    merged["studies"] = [s for s in STUDIES if s in merged]
    return merged


def run_ablation(
    cfg: Config,
    ckpt: str,
    study: str,
    alphas=None,
    throughput=True,
    device=None,
    state=None,
    explicit: set[str] | None = None,
) -> dict:
    from .data.cifar100 import build_loaders
    from .models.vit_freqmerge import apply_freqmerge, create_backbone, merge_schedule, token_counts
    from .utils.metrics import compute_throughput, count_gmacs, count_params

    state = open_checkpoint(ckpt) if state is None else state
    runtime = setup_runtime(cfg, device)
    cfg = bench_defaults(cfg, runtime.device, explicit)
    amp = amp_enabled(cfg, runtime.device)
    alphas = list(alphas) if alphas else list(C.ALPHA_SWEEP)
    results: dict[str, list[dict]] = {}
    loader = mean = std = None
    baseline_img_s = None
    bench = dict(
        batch_size=cfg.benchmark_batch_size,
        image_size=cfg.image_size,
        device=runtime.device,
        warmup=cfg.benchmark_warmup,
        iters=cfg.benchmark_iters,
        amp=amp,
        log=print if runtime.device.type == "cpu" else None,
    )
    for group, label, vcfg in variants(study, cfg, alphas):
        model = create_backbone(cfg, pretrained=False)
        check_merge_layers(cfg, len(model.blocks))
        load_model_weights(model, state, ckpt)
        schedule = [0] * len(model.blocks)
        if vcfg is not None:
            apply_freqmerge(model, vcfg)
            schedule = merge_schedule(model, vcfg.keep_rate, vcfg.merge_layers)
        model.to(runtime.device).eval()
        if loader is None:
            mean = model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))
            std = model.pretrained_cfg.get("std", (0.229, 0.224, 0.225))
            _, loader, _ = build_loaders(cfg, mean, std, distributed=runtime.distributed, train=False)
        if vcfg is not None and vcfg.scorer == "random":
            model.freqmerge_matcher.seed = cfg.seed  # same random drops on every run
            model.freqmerge_matcher._generators.clear()
        metrics = evaluate_model(model, loader, runtime, amp, cfg.max_eval_batches, desc=label)
        row = {
            "name": label,
            "alpha": None if vcfg is None else vcfg.alpha,
            "scorer": None if vcfg is None else vcfg.scorer,
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "params_m": count_params(model),
            "gmacs": count_gmacs(model, cfg.image_size, runtime.device),
            "tokens_per_block": token_counts(model, schedule),
        }
        if throughput and runtime.is_main:
            row.update(compute_throughput(model, **bench))
            if vcfg is None:
                baseline_img_s = row["img_s"]
        results.setdefault(group, []).append(row)
        del model
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
    if throughput and runtime.is_main and baseline_img_s is None:  # alpha study alone: time the unmerged model too
        plain = create_backbone(cfg, pretrained=False)
        load_model_weights(plain, state, ckpt)
        baseline_img_s = compute_throughput(plain.to(runtime.device).eval(), **bench)["img_s"]
        del plain
    if baseline_img_s:
        for rows in results.values():
            for row in rows:
                row["speedup"] = row["img_s"] / baseline_img_s
    run = {
        "checkpoint": ckpt,
        "device": device_name(runtime.device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_images": metrics["num_images"],
        "baseline_img_s": baseline_img_s,
    }
    out = {
        **run,
        "study": study,
        "gflops_note": "GFLOPs = GMACs per image (torch.utils.flop_counter FLOPs / 2), as the guide reports",
        "config": cfg.to_dict(),
        **results,
        "runs": {group: dict(run) for group in results},
    }
    if runtime.is_main:
        path = os.path.join(cfg.log_dir, C.ABLATION_FILE)
        out = merge_results(path, out)
        write_json_atomic(path, out)
        cols = [
            ("name", "", ""),
            ("gmacs", "GFLOPs", ".2f"),
            ("top1", "Top-1 (%)", ".2f"),
            ("top5", "Top-5 (%)", ".2f"),
            ("img_s", "Throughput (img/s)", ".1f"),
            ("img_s_range", "img/s min-max", ""),
        ]
        headers = {"alpha": "alpha", "scoring": "Strategy"}
        for group, rows in results.items():
            print(f"\n{group} study on {out['num_images']} images, {out['device']} (GFLOPs = GMACs)")
            print(format_table(rows, [("name", headers[group], ""), *cols[1:]]))
        kept = [s for s in out["studies"] if s not in results]
        print(f"\nSaved {path}" + (f" (kept the earlier {', '.join(kept)} study)" if kept else ""))
    cleanup_distributed()
    return out


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args, dests = parse_args_explicit(parser, argv)

    def run():
        state = open_checkpoint(args.ckpt)
        cfg = config_for_checkpoint(state, cli_overrides(args))
        opts = (args.alphas, not args.no_throughput, args.device, state)
        return run_ablation(cfg, args.ckpt, args.study, *opts, explicit=explicit_fields(dests))

    return run_main(run, parser.prog)


if __name__ == "__main__":
    main()
