"""``python -m gitmerge3d.tools.spconv_warmup``: fill spconv-triton's Triton autotune cache once, on disk.

Why: spconv-triton autotunes its fp16 sparse-conv kernels on first use, per input shape (minutes for Sonata
on one scene), so a benchmark that starts cold spends its budget autotuning. This runs the forwards a later
benchmark will run (same scenes, tiles, rows, fp16 autocast, ``SPCONV=auto``) with ``TRITON_CACHE_DIR`` on a
kept directory and ``TRITON_CACHE_AUTOTUNING=1`` (Triton then stores the autotune choices next to the
compiled kernels), and with ``--verify`` times a first forward in a fresh process to show whether the cache
is hit. ``--tune`` (default ``$GITMERGE3D_SPCONV_TUNE`` or ``narrow``; see ``models.spconv_tune``) narrows
spconv-triton's autotune space: ~4 GEMM configs per channel band instead of 37, so Sonata's 6 widths warm up
in well under 2 minutes; the chosen config per tuning key lands in ``spconv-warmup.json``. Keep
``--cache-dir`` (default ``projects/gitmerge3d/.triton-cache``, git-ignored) between runs, and give ``launch_bench`` /
``gpu_launch_bench.sh`` the same ``TRITON_CACHE_DIR``.

    python3 -m gitmerge3d.tools.spconv_warmup --scene projects/gitmerge3d/data_src/scene0000_00.bin --verify
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CACHE = "projects/gitmerge3d/.triton-cache"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gitmerge3d-spconv-warmup", description=__doc__.split("\n")[0])
    p.add_argument("--scene", required=True, help="Pointcept scene folder, or a raw .bin/.ply (converted)")
    p.add_argument("--tiles", default="1,4", help="comma list of tilings the benchmark will run (1 = real scene)")
    p.add_argument("--rows", default="r0-flash,patch@0.9")
    p.add_argument("--normals", default="estimate", choices=("estimate", "zero"))
    p.add_argument("--cache-dir", default=os.environ.get("TRITON_CACHE_DIR", DEFAULT_CACHE))
    p.add_argument("--time-budget", type=float, default=540.0, help="seconds; later cases are skipped after it")
    p.add_argument(
        "--tune",
        default=os.environ.get("GITMERGE3D_SPCONV_TUNE", "narrow"),
        help="spconv-triton autotune space: narrow (default), fixed (no timing) or full (upstream)",
    )
    p.add_argument("--verify", action="store_true", help="then time a first forward in a fresh process")
    p.add_argument("--out-dir", default=os.environ.get("OUT_DIR", "/tmp/o"))
    args = p.parse_args(argv)
    cache = Path(args.cache_dir).resolve()
    # before spconv-triton (and its autotuners) are imported: Triton reads these when it builds them
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
    import torch

    from .. import merging
    from ..models import PointTransformerV3, sonata_config, spconv_tune
    from ..models import sparse_conv as sc
    from .bench import load_inputs
    from .launch_bench import ROWS

    start = time.perf_counter()
    try:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        bad = [r for r in rows if r not in ROWS]
        if bad:
            raise ValueError(f"--rows entry {bad[0]!r}: expected one of {', '.join(ROWS)}")
        tiles = [int(t) for t in args.tiles.split(",")]
        spconv_tune.set_tune_mode(args.tune)
        if not torch.cuda.is_available():
            raise RuntimeError("spconv-triton runs on CUDA only: no CUDA device here, nothing to warm up")
        if sc.spconv_api(cuda=True) is None or "triton" not in sc.spconv_api(cuda=True).__name__:
            raise RuntimeError("spconv_triton does not import (put it on PYTHONPATH; see gpu_launch_bench.sh)")
        cache.mkdir(parents=True, exist_ok=True)
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        device = torch.device("cuda")
        sc.set_backend("auto")
        torch.manual_seed(0)
        model = PointTransformerV3(**sonata_config("0c")).to(device).eval()
        cases, notes = [], []
        for t in tiles:
            inputs, _ = load_inputs(args.scene, t, 0.02, device, out_dir / ".scene", args.normals)
            for row in rows:
                if time.perf_counter() - start > args.time_budget:
                    notes.append(f"skipped tiles={t} {row}: time budget {args.time_budget:.0f} s spent")
                    continue
                merging.remove_patch(model)
                if ROWS[row] is not None:
                    merging.patch(model, {"tome": ROWS[row][0], "r": ROWS[row][1], "no_rand": True})
                times = []
                for _ in range(2):  # first: autotune (or cache hit), second: the tuned kernels
                    t0 = time.perf_counter()
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                        model(dict(inputs))
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                cases.append({"tiles": t, "row": row, "first_s": times[0], "second_s": times[1]})
                print(f"tiles={t} {row}: first forward {times[0]:.1f} s, second {times[1]:.3f} s", flush=True)
        choices = {f"{rule.module.rsplit('.', 1)[-1]}.{tuner.base_fn.__name__} {key}": str(cfg)
                   for rule, tuner in spconv_tune.kernels() for key, cfg in tuner.cache.items()}  # fmt: skip
        warm_s = time.perf_counter() - start
        print(f"warm-up ({args.tune}): {warm_s:.1f} s, {len(choices)} tuned kernel keys", flush=True)
        result = {"cache_dir": str(cache), "tune": args.tune, "warmup_s": warm_s, "cases": cases,
                  "choices": choices, "notes": notes}  # fmt: skip
        if args.verify:
            cmd = [sys.executable, "-m", "gitmerge3d.tools.spconv_warmup", "--scene", args.scene, "--tiles",
                   args.tiles, "--rows", args.rows, "--normals", args.normals, "--cache-dir", str(cache),
                   "--tune", args.tune,
                   "--out-dir", str(out_dir / "verify"), "--time-budget", str(args.time_budget)]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            result["verify"] = {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "stdout": proc.stdout}
            print(f"fresh process (cache hit expected: first forward close to second):\n{proc.stdout}", flush=True)
        result["wall_s"] = time.perf_counter() - start
        (out_dir / "spconv-warmup.json").write_text(json.dumps(result, indent=2))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"gitmerge3d-spconv-warmup: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
