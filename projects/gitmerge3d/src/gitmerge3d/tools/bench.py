"""``gitmerge3d-bench``: attention-only MACs (the paper's GFLOPs), whole-model MACs, latency and peak memory.

Rows: ``r0-flash`` (no merging, SDPA free to pick FlashAttention: the fair baseline), ``r0-noflash``
(no merging, SDPA's math kernel: the dense softmax the official non-flash path computes) and
``<patch|weighted_patch>@<r>`` (GitMerge3D, attention on the merged set through SDPA). Latency: median of
``--iters`` timed forwards after ``--warmup`` (CUDA events on GPU). Peak memory: CUDA max allocated
(weights included, as the official tool). "attend share": time of matching + merge + attention + unmerge,
from a second timing with that step skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from merge_core.bench import time_calls

from .. import merging
from ..datasets.convert import NORMAL_MODES, convert_scene
from ..datasets.scene import load_scene, prepare_input, tile_scene
from ..models import PointTransformerV3, load_backbone, sonata_config
from ..models import sparse_conv as sc
from ..models.presets import reduced_config
from ..profiling import attention_skipped, count_macs

DEFAULT_ROWS = "r0-flash,r0-noflash," + ",".join(
    f"{m}@{r}" for m in ("patch", "weighted_patch") for r in ("0.7", "0.8", "0.9", "0.95")
)


def parse_rows(text: str) -> list[tuple[str, str | None, float]]:
    rows = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item in ("r0-flash", "r0-noflash"):
            rows.append((item, None, 0.0))
            continue
        mode, _, r = item.partition("@")
        try:
            rate = float(r)
        except ValueError:
            rate = -1.0
        if mode not in merging.MODES or not 0.0 < rate < 1.0:
            raise ValueError(
                f"--rows entry {item!r}: expected r0-flash, r0-noflash or <patch|weighted_patch>@<r in (0,1)>"
            )
        rows.append((item, mode, rate))
    return rows


def load_inputs(path: str, tile: int, grid: float, device, tmp: Path, normals: str = "estimate") -> tuple[dict, int]:
    src = Path(path)
    if src.is_dir():
        scene = load_scene(src)
    elif src.is_file():
        scene = load_scene(convert_scene(src, tmp, name="scene", normals=normals))
    else:
        raise FileNotFoundError(f"--scene '{src}' not found (a Pointcept scene folder, .bin or .ply)")
    if tile > 1:
        scene = tile_scene(scene, tile)
    return prepare_input(scene, grid, device), len(scene["coord"])


def build_model(args, device) -> PointTransformerV3:
    cfg = reduced_config(args.variant) if args.reduced else sonata_config(args.variant)
    model = PointTransformerV3(**cfg)
    if args.weights:
        load_backbone(model, args.weights)
    return model.to(device).eval()


def run_row(model, inputs, name, mode, r, args, device) -> dict:
    merging.remove_patch(model)
    if mode is not None:
        merging.patch(model, {"tome": mode, "r": r, "no_rand": True, "prop_attn": args.prop_attn})
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def kernels():
        # r0-noflash: SDPA's math kernel, the dense (N', H, K, K) softmax of the official non-flash path
        return sdpa_kernel([SDPBackend.MATH]) if name == "r0-noflash" else contextlib.nullcontext()

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp), kernels():
            return model(inputs)

    torch.manual_seed(0)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp), kernels():
        macs = count_macs(model, inputs)  # same dtype as the timed runs: no extra autotuning on first use
    row = {
        "row": name,
        "attention_gmacs": macs.attention / 1e9,
        "attention_linear_gmacs": macs.attention_linear / 1e9,
        "attention_matmul_gmacs": macs.attention_matmul / 1e9,
        "similarity_gmacs": macs.similarity / 1e9,
        "whole_model_gmacs": macs.whole_model / 1e9,
        "latency_ms": None,
        "peak_mem_gib": None,
        "attend_share": None,
    }
    if args.macs_only:
        return row
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = time_calls(forward, device, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    with attention_skipped():
        skipped = time_calls(forward, device, min(args.warmup, 1), args.iters)
    ms = sorted(times)[len(times) // 2]
    ms_skip = sorted(skipped)[len(skipped) // 2]
    row.update(latency_ms=ms, peak_mem_gib=peak, attend_share=max(0.0, (ms - ms_skip) / ms) if ms > 0 else None)
    return row


def markdown(result: dict) -> str:
    head = "| row | attention GMACs (qkv+proj / QK,AV / match) | whole-model GMACs | latency ms | peak GiB | attend |"
    lines = [
        f"device: {result['device']}, torch {result['torch']}, {result['date']}, AMP={result['amp']}, "
        f"{result['points_raw']} raw / {result['points_grid']} grid points, weights: {result['weights']}",
        "",
        head,
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        latency = "n/a" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}"
        share = "n/a" if r["attend_share"] is None else f"{100 * r['attend_share']:.0f}%"
        parts = f"{r['attention_linear_gmacs']:.1f} / {r['attention_matmul_gmacs']:.1f} / {r['similarity_gmacs']:.1f}"
        lines.append(
            f"| {r['row']} | {r['attention_gmacs']:.2f} ({parts}) | {r['whole_model_gmacs']:.2f} "
            f"| {latency} | {peak} | {share} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gitmerge3d-bench", description=__doc__)
    p.add_argument("--scene", required=True, help="Pointcept scene folder, or a raw .bin/.ply (converted)")
    p.add_argument("--tile", type=int, default=1, help="side-by-side copies of the scene (4 -> ~160k points)")
    p.add_argument("--grid-size", type=float, default=0.02)
    p.add_argument("--normals", default="estimate", choices=NORMAL_MODES, help="for a raw --scene file")
    p.add_argument("--variant", default="0c", choices=("0a", "0b", "0c", "pretrain"))
    p.add_argument("--reduced", action="store_true", help="toy-width, one-block-per-stage model (CPU checks)")
    p.add_argument("--weights", help="checkpoint to load (default: random weights, as the issue's figures)")
    p.add_argument("--rows", default=DEFAULT_ROWS)
    p.add_argument("--prop-attn", default="off", choices=("off", "faithful", "key"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 instead of autocast (fp16 CUDA / bf16 CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--spconv",
        default=None,
        choices=sc.BACKENDS,
        help="sparse-conv backend (default: GITMERGE3D_SPCONV, else torch)",
    )
    p.add_argument("--macs-only", action="store_true", help="count MACs (one forward per row), no timing")
    p.add_argument("--out", help="write the results as JSON here (and a .md table next to it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.warmup < 0 or args.iters < 1:
            raise ValueError(f"--warmup must be >= 0 and --iters >= 1, got {args.warmup} and {args.iters}")
        rows = parse_rows(args.rows)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        if args.spconv is not None:
            sc.set_backend(args.spconv)
        torch.manual_seed(args.seed)
        tmp = Path(args.out).parent if args.out else Path(".")
        scratch = tmp / ".gitmerge3d-bench-scene"
        inputs, n_raw = load_inputs(args.scene, args.tile, args.grid_size, device, scratch, args.normals)
        model = build_model(args, device)
        results = [run_row(model, inputs, name, mode, r, args, device) for name, mode, r in rows]
    except (OSError, ValueError) as exc:
        print(f"gitmerge3d-bench: error: {exc}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86'})"
    result = {
        "device": name,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "amp": args.amp,
        "model": f"sonata-{args.variant}" + (" reduced" if args.reduced else ""),
        "weights": args.weights or "random",
        "points_raw": n_raw,
        "points_grid": int(inputs["coord"].shape[0]),
        "spconv": sc.get_backend(),
        "rows": results,
    }
    table = markdown(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
