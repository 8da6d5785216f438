#!/bin/sh
# Issue 11, kernel v2 (one H200, about 3.5 min, at most 240 s): merge-core's fused merged attend with the split
# variant (kernels.patch_merge_attn: S programs per (patch, head) group, two launches) next to the one-program
# kernel, and the leaner launch (one stride set, workspace offsets derived in the kernel, one workspace).
#  (a) micro (gitmerge3d.tools.fused_attend_bench): 40 x 3, 1 x 24, 10 x 6 and 3 x 12 patches x heads of
#      1024 x 16 fp16 (stride 10, r = 921): SDPA vs the tuned kernel vs forced single vs forced split
#      (MERGE_CORE_PMA_VARIANT's values): call ms, CUDA-graph ms, host us per call; the tuner's picks; every
#      candidate config graph-timed; max diff and slot agreement vs merge-core's torch oracle.
#  (b) end to end (gitmerge3d.tools.host_cost, Sonata 0c, fp16 autocast, torch sparse conv, interleaved rounds):
#      real scene rows r0, patch@0.9, patch@0.9+graph (5 rounds x 10 iters); then 4 tiled copies (~160k points)
#      rows r0, patch@0.9 (3 x 5). The tuner picks the variant per shape class in each process.
# Expected wall time ~3-3.5 min: micro ~70 s (Triton compiles: 3 one-program + 2 split configs per shape
# class), real scene ~65 s, tiled ~50 s; timeouts 85 + 95 + 60 = 240 s (TILED=0 skips the tiled scene).
# Writes $OUT_DIR/fused-attend.{json,md,log}, $OUT_DIR/real/host-cost.{json,md},
# $OUT_DIR/tiled4/host-cost.{json,md} and *.log. Run from the repository root with plain python3:
#   OUT_DIR=/tmp/o sh projects/gitmerge3d/scripts/gpu_fused_attend_v2.sh
# CPU smoke test (Triton interpreter, tiny shapes, toy model, 1 round, no tiled scene):
#   REDUCED=1 OUT_DIR=/tmp/o sh projects/gitmerge3d/scripts/gpu_fused_attend_v2.sh
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
  echo "gpu_fused_attend_v2.sh: no scene found; set SCENE or carry projects/gitmerge3d/data_src" >&2
  exit 2
fi
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT_DIR/.triton-cache}
unset MERGE_CORE_PMA_VARIANT MERGE_CORE_PMA_CONFIG 2>/dev/null || true
if [ "${REDUCED:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  MICRO="--device cpu --iters 1 --shapes 2,3,128,10,115;1,6,64,10,57"
  E2E="--reduced --device cpu --normals zero --rounds 1 --iters 1 --warmup 0"
  TILED=${TILED:-0}
else
  MICRO="--iters 30"
  E2E="--normals estimate --rounds 5 --iters 10 --warmup 3"
  TILED=${TILED:-1}
fi
rc=0
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" \
  >"$OUT_DIR/fused-attend.log" 2>&1 || rc=1
# shellcheck disable=SC2086
timeout 85 python3 -u -m gitmerge3d.tools.fused_attend_bench $MICRO --out-dir "$OUT_DIR" >>"$OUT_DIR/fused-attend.log" 2>&1 || rc=1
cat "$OUT_DIR/fused-attend.log"
# shellcheck disable=SC2086
timeout 95 python3 -u -m gitmerge3d.tools.host_cost --scene "$SCENE" $E2E --spconv torch \
  --rows r0,patch@0.9,patch@0.9+graph --out-dir "$OUT_DIR/real" >"$OUT_DIR/host-cost-real.log" 2>&1 || rc=1
cat "$OUT_DIR/host-cost-real.log"
if [ "$TILED" = 1 ]; then
  timeout 60 python3 -u -m gitmerge3d.tools.host_cost --scene "$SCENE" --normals estimate --rounds 3 --iters 5 \
    --warmup 2 --tile 4 --spconv torch --rows r0,patch@0.9 --out-dir "$OUT_DIR/tiled4" \
    >"$OUT_DIR/host-cost-tiled4.log" 2>&1 || rc=1
  cat "$OUT_DIR/host-cost-tiled4.log"
fi
rm -rf "$OUT_DIR/.triton-cache" "$OUT_DIR/real/.scene" "$OUT_DIR/tiled4/.scene"
exit $rc
