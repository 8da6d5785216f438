"""``python -m gitmerge3d.tools.count_ops``: aten ops (kernel launches) and host syncs of one forward, per source.

Why: the GPU forward is host-bound, so launches per forward is the number to cut. Counts come from
``gitmerge3d.opcount`` (a dispatch mode, any device). ``--width-div`` narrows every stage (heads kept) so
the full-depth Sonata runs in seconds on a CPU; the op structure is the same, except that the torch
sparse conv's gather is chunked by a memory budget (N x Cin), so narrow widths give fewer gather chunks.

    python -m gitmerge3d.tools.count_ops --scene ../shared/data/pointcloud/mmdet3d-scannet-demo/scene0000_00.bin
    python -m gitmerge3d.tools.count_ops --synthetic 20000 --width-div 8 --rows r0,patch@0.9
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from .. import merging
from ..legacy import legacy_paths
from ..models import PointTransformerV3, sonata_config
from ..models import sparse_conv as sc
from ..models.presets import reduced_config
from ..opcount import OpCount, count_ops, format_counts
from .bench import load_inputs


def narrow_config(variant: str, div: int) -> dict:
    """Sonata's config with every channel count divided by ``div`` (rounded to a multiple of the heads)."""
    cfg = sonata_config(variant)
    if div == 1:
        return cfg

    def scale(chs, heads):
        return tuple(max(h, (c // div) // h * h) for c, h in zip(chs, heads, strict=True))

    cfg["enc_channels"] = scale(cfg["enc_channels"], cfg["enc_num_head"])
    if "dec_channels" in cfg:
        cfg["dec_channels"] = scale(cfg["dec_channels"], cfg["dec_num_head"])
    return cfg


def synthetic_scene(n: int, seed: int = 0, device="cpu") -> dict:
    """``n`` points on the surfaces of a 4 x 4 x 2.5 m room (floor, walls), 2 cm grid: a scan-like density."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 3, generator=g) * torch.tensor([4.0, 4.0, 2.5])
    face = torch.randint(0, 5, (n,), generator=g)
    u[face == 0, 2] = 0.0
    u[face == 1, 0] = 0.0
    u[face == 2, 0] = 4.0
    u[face == 3, 1] = 0.0
    u[face == 4, 1] = 4.0
    grid = torch.div(u, 0.02, rounding_mode="floor").long()
    _, keep = torch.unique(grid, dim=0, return_inverse=True)
    first = torch.full((int(keep.max()) + 1,), n, dtype=torch.long).scatter_reduce_(0, keep, torch.arange(n), "amin")
    first = first.sort().values
    coord = u[first]
    feat = torch.cat([coord, torch.rand(len(first), 3, generator=g), torch.randn(len(first), 3, generator=g)], 1)
    return {
        "coord": coord.to(device),
        "grid_coord": grid[first].int().to(device),
        "feat": feat.to(device),
        "offset": torch.tensor([len(first)], device=device),
    }


def parse_rows(text: str) -> list[tuple[str, str | None, float]]:
    rows = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item == "r0":
            rows.append((item, None, 0.0))
            continue
        mode, _, r = item.partition("@")
        try:
            rate = float(r)
        except ValueError:
            rate = -1.0
        if mode not in merging.MODES or not 0.0 < rate < 1.0:
            raise ValueError(f"--rows entry {item!r}: expected r0 or <patch|weighted_patch>@<r in (0,1)>")
        rows.append((item, mode, rate))
    return rows


def count_row(model, inputs, mode, r, amp: bool, device) -> OpCount:
    """One warm-up forward (fills per-device tables), then one counted no-grad forward."""
    merging.remove_patch(model)
    if mode is not None:
        merging.patch(model, {"tome": mode, "r": r, "no_rand": True})
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            return model(dict(inputs))

    torch.manual_seed(0)
    forward()
    torch.manual_seed(0)
    counts, _ = count_ops(forward)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gitmerge3d-count-ops", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scene", help="Pointcept scene folder, or a raw .bin/.ply (converted, normals zero)")
    src.add_argument("--synthetic", type=int, help="a synthetic room of about this many raw points")
    p.add_argument("--tile", type=int, default=1)
    p.add_argument("--variant", default="0c", choices=("0a", "0b", "0c", "pretrain"))
    p.add_argument("--reduced", action="store_true", help="one block per stage (fewer ops than Sonata)")
    p.add_argument("--width-div", type=int, default=1, help="divide channel widths (heads kept): faster on CPU")
    p.add_argument("--rows", default="r0,patch@0.9")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 CUDA / bf16 CPU): adds cast ops")
    p.add_argument("--device", default="cpu")
    p.add_argument("--spconv", default="torch", choices=sc.BACKENDS)
    p.add_argument("--legacy", action="store_true", help="count the former launch-heavy paths (gitmerge3d.legacy)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", help="write per-source counts as JSON here (and the tables as .md)")
    args = p.parse_args(argv)
    try:
        if args.width_div < 1:
            raise ValueError(f"--width-div must be >= 1, got {args.width_div}")
        rows = parse_rows(args.rows)
        device = torch.device(args.device)
        sc.set_backend(args.spconv)
        torch.manual_seed(0)
        if args.scene:
            inputs, _ = load_inputs(args.scene, args.tile, 0.02, device, Path("/tmp/.gitmerge3d-count-scene"), "zero")
        else:
            if args.synthetic < 100:
                raise ValueError(f"--synthetic must be >= 100 points, got {args.synthetic}")
            inputs = synthetic_scene(args.synthetic, device=device)
        cfg = reduced_config(args.variant) if args.reduced else narrow_config(args.variant, args.width_div)
        model = PointTransformerV3(**cfg).to(device).eval()
        with legacy_paths() if args.legacy else contextlib.nullcontext():
            counts = {name: count_row(model, inputs, mode, r, args.amp, device) for name, mode, r in rows}
    except (OSError, ValueError) as exc:
        print(f"gitmerge3d-count-ops: error: {exc}", file=sys.stderr)
        return 2
    n = int(inputs["coord"].shape[0])
    head = f"{n} grid points, sonata-{args.variant}{' reduced' if args.reduced else ''}, width/{args.width_div}, "
    head += f"spconv={args.spconv}, amp={args.amp}, device={device}, paths={'legacy' if args.legacy else 'current'}"
    table = head + "\n\n" + format_counts(counts, args.top)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "points": n,
            "config": head,
            "rows": {
                k: {
                    "launches": oc.total_launches,
                    "syncs": oc.total_syncs,
                    "by_category": dict(oc.by_category()),
                    "by_source": dict(oc.launches),
                    "syncs_by_source": dict(oc.syncs),
                }  # fmt: skip
                for k, oc in counts.items()
            },
        }
        out.write_text(json.dumps(data, indent=2))
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
