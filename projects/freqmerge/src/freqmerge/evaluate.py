"""Evaluate a checkpoint: Top-1/Top-5, GFLOPs (GMACs), params; optional throughput, heatmaps, confusion matrix.

    python evaluate.py --ckpt checkpoints/best_model.pth [--benchmark] [--visualize] [--confusion] [--no_freqmerge]

The model and merging settings stored in the checkpoint are used unless overridden on the command line.
Writes ``logs/eval_results.json``; ``--visualize`` -> ``visualizations/lfgm_heatmaps.png``;
``--confusion`` -> ``visualizations/confusion_matrix.png``.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

import torch

from run_kit import DistEnv, cleanup_distributed, parse_args_explicit, write_json_atomic

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
    positive_int,
    run_main,
    setup_runtime,
)

DEFAULT_CKPT = os.path.join(C.CHECKPOINT_DIR, C.BEST_CHECKPOINT)


def build_parser(prog: str | None = None) -> OneLineParser:
    p = OneLineParser(prog=prog, description="Evaluate a FreqMerge checkpoint on CIFAR-100 (see README).")
    g = p.add_argument_group("evaluation (guide flags)")
    g.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint (default {DEFAULT_CKPT})")
    g.add_argument("--benchmark", action="store_true", help="measure images/s (and speedup over the plain ViT)")
    g.add_argument("--visualize", action="store_true", help="write visualizations/lfgm_heatmaps.png")
    g.add_argument("--confusion", action="store_true", help="write visualizations/confusion_matrix.png")
    g.add_argument("--num_vis", type=positive_int, default=4, help="images in the heatmap figure (default 4)")
    add_model_args(p)
    add_run_args(p)
    add_bench_args(p)
    return p


def model_from_checkpoint(
    cfg: Config, state: dict, runtime_device: torch.device, freqmerge: bool | None = None, path: str = "checkpoint"
):
    from .models.vit_freqmerge import apply_freqmerge, create_backbone

    model = create_backbone(cfg, pretrained=False)
    check_merge_layers(cfg, len(model.blocks))
    load_model_weights(model, state, path)
    use = cfg.freqmerge if freqmerge is None else freqmerge
    if use:
        apply_freqmerge(model, cfg)
    return model.to(runtime_device).eval()


@torch.no_grad()
def heatmap_scores(model, images: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, str]:
    """LFGM score maps (B, gh, gw) for the figure and a description of where they come from.

    With FreqMerge (LFGM scorer): the grid scores at the first merge layer, exactly what the matching
    used. Otherwise: LFGM of the model's patch-embedding tokens (before position embeddings).
    """
    from .models.lfgm import lfgm_scores

    matcher = getattr(model, "freqmerge_matcher", None)
    if matcher is not None and matcher.needs_source_index and cfg.merge_layers:
        matcher.clear()
        matcher.record = True
        try:
            model(images)
        finally:
            matcher.record = False
        layer = min(cfg.merge_layers)
        if layer in matcher.records and "phi_grid" in matcher.records[layer]:
            return matcher.records[layer]["phi_grid"], f"block {layer} tokens (first merge layer)"
    tokens = model.patch_embed(images)
    grid = tuple(model.patch_embed.grid_size)
    flat = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
    return lfgm_scores(flat, grid, cfg.hpf_radius, cfg.lfgm_border).reshape(-1, *grid), "patch-embedding tokens"


def pick_images(dataset, count: int) -> tuple[torch.Tensor, list[int]]:
    """The first ``count`` validation images of distinct classes (falls back to the first ones)."""
    chosen, seen = [], set()
    for i in range(len(dataset)):
        label = int(dataset.targets[i])
        if label not in seen:
            seen.add(label)
            chosen.append(i)
        if len(chosen) == count:
            break
    chosen += [i for i in range(len(dataset)) if i not in chosen][: count - len(chosen)]
    items = [dataset[i] for i in chosen]
    return torch.stack([img for img, _ in items]), [lbl for _, lbl in items]


def bench_defaults(cfg: Config, device: torch.device, explicit: set[str] | None) -> Config:
    """On a CPU, the guide's GPU benchmark sizes take minutes per model: use small ones unless the user set them.

    ``explicit`` = Config fields set on the command line (None: keep ``cfg`` as given).
    """
    if device.type != "cpu" or explicit is None:
        return cfg
    cpu = {
        "benchmark_batch_size": C.CPU_BENCHMARK_BATCH_SIZE,
        "benchmark_warmup": C.CPU_BENCHMARK_WARMUP,
        "benchmark_iters": C.CPU_BENCHMARK_ITERS,
    }
    return cfg.replace(**{k: v for k, v in cpu.items() if k not in explicit})


def evaluate(
    cfg: Config,
    ckpt: str,
    benchmark=False,
    visualize=False,
    confusion=False,
    num_vis=4,
    device=None,
    state=None,
    explicit: set[str] | None = None,
):
    from .data.cifar100 import build_loaders
    from .models.vit_freqmerge import merge_schedule, token_counts
    from .utils.metrics import compute_throughput, count_gmacs, count_params
    from .utils.visualize import denormalize, plot_confusion_matrix, plot_lfgm_heatmaps

    state = open_checkpoint(ckpt) if state is None else state
    runtime: DistEnv = setup_runtime(cfg, device)
    cfg = bench_defaults(cfg, runtime.device, explicit)
    model = model_from_checkpoint(cfg, state, runtime.device, path=ckpt)
    mean = model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))
    std = model.pretrained_cfg.get("std", (0.229, 0.224, 0.225))
    _, val_loader, classes = build_loaders(cfg, mean, std, distributed=runtime.distributed, train=False)
    amp = amp_enabled(cfg, runtime.device)
    metrics = evaluate_model(
        model, val_loader, runtime, amp, cfg.max_eval_batches, num_classes=len(classes) if confusion else None
    )
    schedule = merge_schedule(model, cfg.keep_rate, cfg.merge_layers) if cfg.freqmerge else [0] * len(model.blocks)
    name = "ViT (no merging)" if not cfg.freqmerge else f"FreqMerge ({cfg.scorer}, alpha={cfg.alpha:g})"
    row = {
        "method": name,
        "params_m": count_params(model),
        "gmacs": count_gmacs(model, cfg.image_size, runtime.device),
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "num_images": metrics["num_images"],
        "tokens_per_block": token_counts(model, schedule),
    }
    rows = [row]
    outputs: dict[str, str] = {}
    if benchmark and runtime.is_main:
        bench = dict(
            batch_size=cfg.benchmark_batch_size,
            image_size=cfg.image_size,
            device=runtime.device,
            warmup=cfg.benchmark_warmup,
            iters=cfg.benchmark_iters,
            amp=amp,
            log=print,
        )
        row.update(compute_throughput(model, **bench))
        if cfg.freqmerge:
            plain = model_from_checkpoint(cfg, state, runtime.device, freqmerge=False, path=ckpt)
            base = {"method": "ViT (no merging, same weights)", "params_m": count_params(plain)}
            base["gmacs"] = count_gmacs(plain, cfg.image_size, runtime.device)
            base.update(compute_throughput(plain, **bench))
            base["speedup"] = 1.0
            row["speedup"] = row["img_s"] / base["img_s"]
            rows.insert(0, base)
            del plain
    if visualize and runtime.is_main:
        images, labels = pick_images(val_loader.dataset, num_vis)
        scores, source = heatmap_scores(model, images.to(runtime.device), cfg)
        path = os.path.join(cfg.vis_dir, "lfgm_heatmaps.png")
        titles = [classes[i] for i in labels]
        outputs["lfgm_heatmaps"] = plot_lfgm_heatmaps(denormalize(images, mean, std), scores, path, titles)
        row["heatmap_source"] = source
    if confusion and runtime.is_main:
        path = os.path.join(cfg.vis_dir, "confusion_matrix.png")
        outputs["confusion_matrix"] = plot_confusion_matrix(metrics["confusion"], path, classes)
    if runtime.is_main:
        result = {
            "checkpoint": ckpt,
            "device": device_name(runtime.device),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "amp": amp,
            "gflops_note": "GFLOPs = GMACs per image (torch.utils.flop_counter FLOPs / 2), as the guide reports",
            "results": rows,
            "outputs": outputs,
            "config": cfg.to_dict(),
        }
        outputs["results"] = str(write_json_atomic(os.path.join(cfg.log_dir, "eval_results.json"), result))
        cols = [
            ("method", "Method", ""),
            ("params_m", "Params (M)", ".2f"),
            ("gmacs", "GFLOPs", ".2f"),
            ("img_s", "Throughput (img/s)", ".1f"),
            ("img_s_range", "img/s min-max", ""),
            ("speedup", "Speedup", ".2f"),
            ("top1", "Top-1 (%)", ".2f"),
            ("top5", "Top-5 (%)", ".2f"),
        ]
        print(f"\nEvaluation of {ckpt} on {metrics['num_images']} images, {device_name(runtime.device)}")
        print("(GFLOPs = GMACs per image, as in the guide)")
        print(format_table(rows, cols))
        for key, path in outputs.items():
            print(f"Saved {key}: {path}")
    cleanup_distributed()
    return result if runtime.is_main else None


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args, dests = parse_args_explicit(parser, argv)

    def run():
        state = open_checkpoint(args.ckpt)
        cfg = config_for_checkpoint(state, cli_overrides(args))
        opts = (args.benchmark, args.visualize, args.confusion, args.num_vis, args.device, state)
        return evaluate(cfg, args.ckpt, *opts, explicit=explicit_fields(dests))

    return run_main(run, parser.prog)


if __name__ == "__main__":
    main()
