"""``gitmerge3d-convert``: raw scene (.ply / mmdetection3d .bin) -> Pointcept scene folder."""

from __future__ import annotations

import argparse
import sys

from ..datasets.convert import LABEL_MAPS, NORMAL_MODES, convert_scene


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gitmerge3d-convert", description=__doc__)
    p.add_argument("input", help="scene file: .ply or mmdetection3d float32 .bin")
    p.add_argument("out_dir", help="dataset split folder; the scene goes to <out_dir>/<name>/")
    p.add_argument("--name", help="scene folder name (default: the input file's stem)")
    p.add_argument("--semantic-mask", help="mmdetection3d int64 semantic mask .bin")
    p.add_argument("--instance-mask", help="mmdetection3d int64 instance mask .bin")
    p.add_argument("--label-map", choices=LABEL_MAPS, default="scannet20")
    p.add_argument("--normals", choices=NORMAL_MODES, default="estimate")
    p.add_argument("--bin-dims", type=int, default=6, help="float32 values per point in a .bin (default 6)")
    args = p.parse_args(argv)
    try:
        scene = convert_scene(
            args.input,
            args.out_dir,
            args.name,
            args.semantic_mask,
            args.instance_mask,
            args.label_map,
            args.normals,
            args.bin_dims,
        )
    except (OSError, ValueError) as exc:
        print(f"gitmerge3d-convert: error: {exc}", file=sys.stderr)
        return 2
    print(scene)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
