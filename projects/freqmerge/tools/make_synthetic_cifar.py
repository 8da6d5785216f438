"""Write a *synthetic*, learnable CIFAR-100 look-alike in the official pickle layout (no download).

    uv run python projects/freqmerge/tools/make_synthetic_cifar.py --out /tmp/syn_cifar [--train 5000 --test 1000]

For smoke runs of train.py where real CIFAR-100 is not available (e.g. a fresh GPU machine with no internet):
class c is a fixed random colour, a blob at a fixed position and a bar at a fixed column, plus noise, so the
loss falls within an epoch. It measures nothing about CIFAR-100 accuracy; never report numbers from it as such.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_project = Path(__file__).resolve().parents[1]
for _path in (_project / "src", _project.parents[1] / "packages" / "merge-core" / "src"):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

from freqmerge.data.cifar100 import write_cifar100  # noqa: E402


def class_templates(num_classes: int, seed: int = 0) -> np.ndarray:
    """(num_classes, 32, 32, 3) float images in [0, 255], one per class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    out = np.empty((num_classes, 32, 32, 3))
    for c in range(num_classes):
        cy, cx = rng.integers(6, 26, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
        colour, background = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
        img = background[None, None] * (1 - blob[..., None]) + colour[None, None] * blob[..., None]
        img[:, rng.integers(2, 30)] = 255 - background
        out[c] = img
    return out


def synthesize(n: int, templates: np.ndarray, rng: np.random.Generator, noise: float = 25.0):
    labels = np.arange(n) % len(templates)
    rng.shuffle(labels)
    images = templates[labels] + rng.normal(0, noise, (n, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder that will contain cifar-100-python/ (pass it as --data_root)")
    p.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    p.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.train < 1 or args.test < 1:
        p.error("argument --train/--test: expected >= 1 images")
    templates = class_templates(100, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    train, test = synthesize(args.train, templates, rng), synthesize(args.test, templates, rng)
    names = [f"synthetic_{i:02d}" for i in range(100)]
    folder = write_cifar100(args.out, train, test, names)
    print(f"wrote {args.train} + {args.test} synthetic images to {folder} (not CIFAR-100; smoke runs only)")
    return folder


if __name__ == "__main__":
    main()
