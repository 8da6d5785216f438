#!/bin/sh
# Issue 11, host cost of the merged forward (one H200, about 6-8 min): Sonata 0c, fp16 autocast, torch sparse conv,
# the real ScanNet scene.
#  1. host_cost: rows r0 / patch@0.9 timed interleaved (5 rounds x 10 calls), with ablations (+torchmatch: merge-core's
#     torch matcher instead of its Triton kernel; +nogc: Python GC off; +skipattn: attend returns v), host enqueue
#     time, host time per attend call, syncs, aten ops, Triton launches, the same timing again after one
#     torch.profiler session (--profiler-check), and a CUDA-graph capture of one merged attend (--graph-check).
#  2. launch_bench (real scene, rows r0-flash,patch@0.9, --profile 25): every case is now timed before any profiler
#     session; latency_after_profiler_ms re-times each case after its profiler sessions.
# Writes $OUT_DIR/host-cost.{json,md}, $OUT_DIR/launch-bench.{json,md}, $OUT_DIR/profile-*.txt, $OUT_DIR/*.log.
# Run from the repository root with plain python (no uv).
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
  echo "gpu_host_cost.sh: no scene found; set SCENE or carry projects/gitmerge3d/data_src" >&2
  exit 2
fi
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT_DIR/.triton-cache}
rc=0
timeout 330 python3 -m gitmerge3d.tools.host_cost --scene "$SCENE" --normals estimate \
  --rows r0,patch@0.9,patch@0.9+torchmatch,patch@0.9+nogc,r0+skipattn,patch@0.9+skipattn \
  --profiler-check --graph-check --out-dir "$OUT_DIR" 2>&1 | tee "$OUT_DIR/host-cost.log" || rc=1
timeout 240 python3 -m gitmerge3d.tools.launch_bench --scene "$SCENE" --tiles 1 --rows r0-flash,patch@0.9 \
  --backends torch --profile 25 --time-budget 200 --out-dir "$OUT_DIR" 2>&1 | tee "$OUT_DIR/launch-bench.log" || rc=1
rm -rf "$OUT_DIR/.scene" "$OUT_DIR/.triton-cache"
exit $rc
