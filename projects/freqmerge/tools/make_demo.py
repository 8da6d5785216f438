"""Write assets/lfgm_heatmap_demo.png: LFGM of real photos bundled with scikit-image (no download).

    uv run python projects/freqmerge/tools/make_demo.py [--out PATH] [--border wrap|reflect]

``--border reflect`` (the border-safe LFGM) writes assets/lfgm_heatmap_demo_reflect.png by default.

LFGM here runs on raw pixel patches (16 x 16 px on a 14 x 14 grid), so the figure shows the module
itself, independent of any trained weights. Needs scikit-image (a dev dependency of this project).
"""

import argparse
import sys
from pathlib import Path

_project = Path(__file__).resolve().parents[1]
for _path in (_project / "src", _project.parents[1] / "packages" / "merge-core" / "src"):
    if _path.is_dir() and str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from freqmerge.models.lfgm import lfgm_from_pixels  # noqa: E402
from freqmerge.utils.visualize import plot_lfgm_heatmaps  # noqa: E402

PHOTOS = ("rocket", "astronaut", "coffee", "chelsea")


def main(argv=None) -> None:
    from skimage import data, transform

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="default assets/lfgm_heatmap_demo.png (wrap) or ..._reflect.png (reflect)")
    p.add_argument("--radius", type=float, default=2.0)
    p.add_argument("--border", choices=["wrap", "reflect"], default="wrap", help="LFGM border handling")
    args = p.parse_args(argv)
    suffix = "" if args.border == "wrap" else f"_{args.border}"
    out = args.out or str(_project / "assets" / f"lfgm_heatmap_demo{suffix}.png")
    images = []
    for name in PHOTOS:
        img = transform.resize(getattr(data, name)(), (224, 224), anti_aliasing=True).astype(np.float32)
        images.append(torch.from_numpy(img).permute(2, 0, 1))
    batch = torch.stack(images)
    scores = lfgm_from_pixels(batch, (14, 14), args.radius, border=args.border)
    print(plot_lfgm_heatmaps(batch, scores, out, titles=[f"skimage {n} ({args.border})" for n in PHOTOS], dpi=70))


if __name__ == "__main__":
    main()
