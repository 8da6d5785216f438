#!/bin/sh
# Issue 11's benchmark: Sonata 0c on the real ScanNet scene and on 4 tiled copies (~160k points), AMP,
# rows r0-flash, r0-noflash, patch / weighted_patch at r = 0.7/0.8/0.9/0.95.
# Run from the repository root with plain python (no uv): needs torch, numpy, plyfile, addict, tqdm;
# spconv-triton only with SPCONV=auto (default torch: the pure-torch sparse conv, no autotuning).
# Env: SCENE (raw .bin/.ply or Pointcept folder), OUT (results folder), SPCONV (torch|auto|spconv),
#      REDUCED=1 (toy model, 1 timed run, for a CPU check), NORMALS (estimate|zero),
#      TILES (default "1 4": the real scene and 4 tiled copies; one value to split the work over two runs).
set -eu
ROOT=$(pwd)
export PYTHONPATH="$ROOT/projects/gitmerge3d/src:$ROOT/packages/merge-core/src:$ROOT/packages/run-kit/src${PYTHONPATH:+:$PYTHONPATH}"
SCENE=${SCENE:-}
if [ -z "$SCENE" ]; then
  for c in projects/gitmerge3d/scene0000_00.bin shared/data/pointcloud/mmdet3d-scannet-demo/scene0000_00.bin \
           ../shared/data/pointcloud/mmdet3d-scannet-demo/scene0000_00.bin; do
    if [ -e "$c" ]; then SCENE=$c; break; fi
  done
fi
if [ -z "$SCENE" ]; then
  echo "gpu_bench.sh: no scene found; set SCENE or copy scene0000_00.bin to projects/gitmerge3d/" >&2
  exit 2
fi
OUT=${OUT:-projects/gitmerge3d/results}
SPCONV=${SPCONV:-torch}
NORMALS=${NORMALS:-estimate}
EXTRA=""
if [ "${REDUCED:-0}" = 1 ]; then EXTRA="--reduced --warmup 0 --iters 1 --rows r0-flash,patch@0.9"; fi
mkdir -p "$OUT"
TMP=${TMPDIR:-/tmp}/gitmerge3d-scene
python -m gitmerge3d.tools.convert "$SCENE" "$TMP" --name scene0000_00 --normals "$NORMALS"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
for t in ${TILES:-1 4}; do
  name=bench-tiled$t
  if [ "$t" = 1 ]; then name=bench-real; fi
  python -m gitmerge3d.tools.bench --scene "$TMP/scene0000_00" --tile "$t" --spconv "$SPCONV" --out "$OUT/$name.json" $EXTRA
done
