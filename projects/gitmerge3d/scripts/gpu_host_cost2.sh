#!/bin/sh
# Issue 11, part 2 (one H200, about 2 min, at most 200 s): does the opt-in CUDA-graph cache of the merged attend
# (merging.attend_graphs / GITMERGE3D_ATTEND_GRAPHS=1) bring patch@0.9 under the r0 flash baseline?
# Sonata 0c, fp16 autocast, torch sparse conv (no spconv-triton), the real ScanNet scene.
#  host_cost rows r0 / patch@0.9 (eager merged attend) / patch@0.9+srmean (one scatter_reduce_ for the group
#  means) / patch@0.9+graph (graph cache), timed interleaved (7 rounds x 10 calls, CUDA events, medians): host
#  enqueue time, host us per attend call, syncs, aten ops, Triton launches, output max diff vs patch@0.9;
#  --graph-check: eager vs eager and replay vs eager (bitwise, max diff), the matching's slot map replayed vs
#  eager, the same under deterministic algorithms, eager vs raw replay ms, the graph cache's host us per call.
# Expected wall time: ~100 s (model + scene ~30 s, 4 rows x 7 rounds x 13 forwards ~30 s, counting ~20 s).
# Writes $OUT_DIR/host-cost.{json,md} and $OUT_DIR/host-cost2.log. Run from the repository root with plain python3.
# CPU smoke test: REDUCED=1 SCENE=../shared/data/pointcloud/mmdet3d-tests/scannet/points/scene0000_00.bin \
#   OUT_DIR=/tmp/o sh projects/gitmerge3d/scripts/gpu_host_cost2.sh   (toy model, 1 round, eager rows)
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
  echo "gpu_host_cost2.sh: no scene found; set SCENE or carry projects/gitmerge3d/data_src" >&2
  exit 2
fi
if [ "${REDUCED:-0}" = 1 ]; then
  EXTRA="--reduced --device cpu --normals zero --rounds 1 --iters 1 --warmup 0"
else
  EXTRA="--normals estimate --rounds 7 --iters 10 --warmup 3"
fi
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT_DIR/.triton-cache}
rc=0
# shellcheck disable=SC2086
timeout 190 python3 -m gitmerge3d.tools.host_cost --scene "$SCENE" $EXTRA --spconv torch \
  --rows r0,patch@0.9,patch@0.9+srmean,patch@0.9+graph --graph-check --out-dir "$OUT_DIR" >"$OUT_DIR/host-cost2.log" 2>&1 || rc=1
cat "$OUT_DIR/host-cost2.log"
rm -rf "$OUT_DIR/.scene" "$OUT_DIR/.triton-cache"
exit $rc
