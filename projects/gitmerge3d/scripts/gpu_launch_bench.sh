#!/bin/sh
# Launch-count benchmark (issue 11, host-bound forward): Sonata 0c, rows r0-flash and patch@0.9, on the real
# ScanNet scene and on 4 tiled copies (~161k points), fp16 autocast; backends: the pure-torch sparse conv, the
# former launch-heavy paths (gitmerge3d.legacy, torch conv; LEGACY=0 skips them) and, only when BACKENDS names
# it, SPCONV=auto (spconv-triton; fill its autotune cache first: gitmerge3d.tools.spconv_warmup).
# PROFILE=25: also the 25 kernels with the most self CUDA time per case (profile-*.txt).
# Prints ms, peak GiB, GPU kernels / aten ops / host syncs per forward; writes $OUT_DIR/launch-bench.{json,md}.
# Run from the repository root with plain python (no uv).
# spconv-triton: importable already, or unpacked from .whl/spconv_triton-*.whl (pure python over triton).
# Env: OUT_DIR (default /tmp/o), SCENE, TILES (default 1,4), BACKENDS (default torch), BUDGET (s, 270),
#      REDUCED=1 (toy model, 1 timed run, zero normals: a CPU check).
set -eu
ROOT=$(pwd)
export PYTHONPATH="$ROOT/projects/gitmerge3d/src:$ROOT/packages/merge-core/src:$ROOT/packages/run-kit/src${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR=${OUT_DIR:-/tmp/o}
mkdir -p "$OUT_DIR"
SCENE=${SCENE:-}
if [ -z "$SCENE" ]; then
  for c in projects/gitmerge3d/scene0000_00.bin projects/gitmerge3d/data_src/scene0000_00.bin \
           shared/data/pointcloud/mmdet3d-scannet-demo/scene0000_00.bin \
           ../shared/data/pointcloud/mmdet3d-scannet-demo/scene0000_00.bin; do
    if [ -e "$c" ]; then SCENE=$c; break; fi
  done
fi
if [ -z "$SCENE" ]; then
  echo "gpu_launch_bench.sh: no scene found; set SCENE or carry projects/gitmerge3d/data_src" >&2
  exit 2
fi
if ! python3 -c "import spconv_triton" 2>/dev/null; then
  WHEEL=$(ls "$ROOT"/.whl/spconv_triton-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$WHEEL" ]; then
    python3 -m zipfile -e "$WHEEL" "$OUT_DIR/.spconv_triton"
    export PYTHONPATH="$PYTHONPATH:$OUT_DIR/.spconv_triton"
  fi
fi
# the autotune cache spconv_warmup fills (kept between runs; git-ignored)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$ROOT/projects/gitmerge3d/.triton-cache}
EXTRA=""
NORMALS=estimate
if [ "${REDUCED:-0}" = 1 ]; then EXTRA="--reduced --warmup 0 --iters 1 --device cpu"; NORMALS=zero; fi
if [ "${LEGACY:-1}" = 1 ]; then EXTRA="$EXTRA --legacy"; fi
python3 -m gitmerge3d.tools.launch_bench --scene "$SCENE" --tiles "${TILES:-1,4}" --backends "${BACKENDS:-torch}" \
  --time-budget "${BUDGET:-270}" --profile "${PROFILE:-0}" --normals "$NORMALS" --out-dir "$OUT_DIR" $EXTRA
rm -rf "$OUT_DIR/.scene" "$OUT_DIR/.spconv_triton"
case "$TRITON_CACHE_DIR" in "$OUT_DIR"/*) rm -rf "$TRITON_CACHE_DIR" ;; esac
