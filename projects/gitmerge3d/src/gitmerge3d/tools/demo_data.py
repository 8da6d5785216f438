"""``python -m gitmerge3d.tools.demo_data SRC OUT``: a tiny Pointcept ScanNet root from the real samples, through
the converter, for quick multi-process runs (``scripts/ddp_gpu_run.sh``) without ``../shared``.

SRC holds ``scene0000_00.bin`` (mmdetection3d's 40,684-point ScanNet demo scene, no labels), and
``points/scene0000_00.bin`` + ``semantic_mask/scene0000_00.bin`` (mmdetection3d's labelled 100-point sample).
OUT gets ``train/`` (the demo scene cut into ``columns x columns`` xy columns, labels -1, plus the labelled
sample and its three quarter-turn rotations) and ``val/`` (the labelled sample, its quarter turn, and one demo
column). Normals are estimated by the converter (``--normals``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..datasets.convert import NORMAL_MODES, convert_scene

NEED = ("scene0000_00.bin", "points/scene0000_00.bin", "semantic_mask/scene0000_00.bin")


def _turn(folder: Path, quarter_turns: int, shift: float) -> None:
    """Rotate a converted scene about z by quarter turns and shift it (coord and normal)."""
    rot = np.linalg.matrix_power(np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32), quarter_turns)
    for name in ("coord", "normal"):
        arr = np.load(folder / f"{name}.npy") @ rot.T
        np.save(folder / f"{name}.npy", (arr + shift if name == "coord" else arr).astype(np.float32))


def _columns(demo: Path, tmp: Path, columns: int, max_points: int | None, seed: int) -> list[Path]:
    """The demo scene split into columns x columns xy cells (each a .bin), optionally subsampled."""
    pts = np.fromfile(demo, dtype=np.float32).reshape(-1, 6)
    edges = [np.quantile(pts[:, a], np.linspace(0, 1, columns + 1)) for a in (0, 1)]
    ix = np.clip(np.searchsorted(edges[0], pts[:, 0], side="right") - 1, 0, columns - 1)
    iy = np.clip(np.searchsorted(edges[1], pts[:, 1], side="right") - 1, 0, columns - 1)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(columns):
        for j in range(columns):
            cell = pts[(ix == i) & (iy == j)]
            if max_points is not None and len(cell) > max_points:
                cell = cell[np.sort(rng.choice(len(cell), max_points, replace=False))]
            path = tmp / f"column_{i}{j}.bin"
            cell.tofile(path)
            out.append(path)
    return out


def build(src: Path, out: Path, columns: int = 2, max_points: int | None = None, normals: str = "estimate") -> dict:
    """Write the dataset; returns the scene counts per split."""
    missing = [p for p in NEED if not (src / p).is_file()]
    if missing:
        raise FileNotFoundError(f"demo data: '{src / missing[0]}' not found (copy ../shared/data/pointcloud files)")
    if columns < 1:
        raise ValueError(f"--columns must be >= 1, got {columns}")
    pts, sem = src / "points" / "scene0000_00.bin", src / "semantic_mask" / "scene0000_00.bin"
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        cells = _columns(src / "scene0000_00.bin", Path(tmp), columns, max_points, seed=0)
        for k, cell in enumerate(cells):
            convert_scene(cell, out / "train", name=f"scene{100 + k:04d}_00", normals=normals)
        convert_scene(cells[-1], out / "val", name="scene0200_00", normals=normals)
    for turn in range(4):
        folder = convert_scene(pts, out / "train", name=f"scene{turn:04d}_00", semantic_mask=sem, normals=normals)
        _turn(folder, turn, 0.3 * turn)
    convert_scene(pts, out / "val", name="scene0000_00", semantic_mask=sem, normals=normals)
    _turn(convert_scene(pts, out / "val", name="scene0001_00", semantic_mask=sem, normals=normals), 1, 0.3)
    return {split: len(list((out / split).iterdir())) for split in ("train", "val")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gitmerge3d-demo-data", description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="folder with scene0000_00.bin, points/, semantic_mask/")
    p.add_argument("out", type=Path, help="dataset root to (re)create")
    p.add_argument("--columns", type=int, default=2, help="split the demo scene into N x N xy columns")
    p.add_argument("--max-points", type=int, default=None, help="subsample each column (CPU runs)")
    p.add_argument("--normals", choices=NORMAL_MODES, default="estimate")
    args = p.parse_args(argv)
    try:
        counts = build(args.src, args.out, args.columns, args.max_points, args.normals)
    except (OSError, ValueError) as exc:
        print(f"gitmerge3d-demo-data: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {counts['train']} train scenes, {counts['val']} val scenes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
