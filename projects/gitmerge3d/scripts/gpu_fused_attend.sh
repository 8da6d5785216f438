#!/bin/sh
# Issue 11, part 3 (one H200, about 3-4 min, at most 480 s): does merge-core's one-launch merged attend
# (kernels.patch_merge_attn, on by default in merging._merged; GITMERGE3D_FUSED_ATTEND=0 / +nofused turns it off)
# make the merged attend cheaper than plain flash attention, and merged Sonata faster than r0?
#  (a) micro (gitmerge3d.tools.fused_attend_bench): 40 x 3 x 1024 x 16 fp16 (stage 0, stride 10, r = 921) and a
#      level-3-like 1 x 24 x 1024 x 16 (one patch, 24 heads: 24 programs): plain SDPA vs the eager merged
#      attend vs the fused kernel (direct and through _merged): ms per call (CUDA events after a sync), per call in a batch of 20,
#      device ms from a CUDA graph of 10 calls; the kernel's block configs; max diff vs merge-core's torch
#      oracle; slot agreement with spread_slots and with the oracle's patch_match.
#  (b) end to end (gitmerge3d.tools.host_cost, Sonata 0c, fp16 autocast, torch sparse conv, interleaved rounds):
#      real scene rows r0, patch@0.9 (fused), patch@0.9+nofused (the eager attend), patch@0.9+graph+nofused (the
#      former best: eager attend replayed from the graph cache), weighted_patch@0.9 (fused, both patch groups);
#      then 4 tiled copies (~160k points) rows r0, patch@0.9, patch@0.9+nofused.
#  (c) PYTEST=1 (needs pytest): the fused-attend tests on CUDA, gpu-marked ones included (~40 s more).
# Expected wall time ~3-3.5 min: micro ~50 s (Triton compiles + tuning of <= 4 configs per shape), real scene
# ~90 s, tiled ~70 s (timeouts 120 + 200 + 150 [+ 110] s). Writes $OUT_DIR/fused-attend.{json,md,log},
# $OUT_DIR/real/host-cost.{json,md}, $OUT_DIR/tiled4/host-cost.{json,md} and *.log. Run from the repository
# root with plain python3.
# CPU smoke test (Triton interpreter, tiny shapes, toy model, 1 round):
#   REDUCED=1 OUT_DIR=/tmp/o sh projects/gitmerge3d/scripts/gpu_fused_attend.sh
# TILED=0 skips the tiled scene.
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
  echo "gpu_fused_attend.sh: no scene found; set SCENE or carry projects/gitmerge3d/data_src" >&2
  exit 2
fi
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT_DIR/.triton-cache}
if [ "${REDUCED:-0}" = 1 ]; then
  export TRITON_INTERPRET=1  # the micro bench runs the kernel on the interpreter (the toy model has 8-wide heads: eager)
  MICRO="--device cpu --iters 1 --shapes 2,3,128,10,115;1,6,64,10,57"
  E2E="--reduced --device cpu --normals zero --rounds 1 --iters 1 --warmup 0"
  TILED_E2E="$E2E"
  TILED=${TILED:-0}
else
  MICRO="--iters 50"
  E2E="--normals estimate --rounds 5 --iters 10 --warmup 3"
  TILED_E2E="--normals estimate --rounds 3 --iters 5 --warmup 2 --tile 4"
  TILED=${TILED:-1}
fi
rc=0
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" \
  >"$OUT_DIR/fused-attend.log" 2>&1 || rc=1
# shellcheck disable=SC2086
timeout 120 python3 -u -m gitmerge3d.tools.fused_attend_bench $MICRO --out-dir "$OUT_DIR" >>"$OUT_DIR/fused-attend.log" 2>&1 || rc=1
cat "$OUT_DIR/fused-attend.log"
# shellcheck disable=SC2086
timeout 200 python3 -u -m gitmerge3d.tools.host_cost --scene "$SCENE" $E2E --spconv torch \
  --rows r0,patch@0.9,patch@0.9+nofused,patch@0.9+graph+nofused,weighted_patch@0.9 \
  --out-dir "$OUT_DIR/real" >"$OUT_DIR/host-cost-real.log" 2>&1 || rc=1
cat "$OUT_DIR/host-cost-real.log"
if [ "$TILED" = 1 ]; then
  # shellcheck disable=SC2086
  timeout 150 python3 -u -m gitmerge3d.tools.host_cost --scene "$SCENE" $TILED_E2E --spconv torch \
    --rows r0,patch@0.9,patch@0.9+nofused --out-dir "$OUT_DIR/tiled4" >"$OUT_DIR/host-cost-tiled4.log" 2>&1 || rc=1
  cat "$OUT_DIR/host-cost-tiled4.log"
fi
if [ "${PYTEST:-0}" = 1 ]; then
  timeout 110 python3 -m pytest -q -p no:cacheprovider packages/merge-core/tests/test_patch_merge_attn.py \
    projects/gitmerge3d/tests/test_fused_attend.py >"$OUT_DIR/pytest-fused.log" 2>&1 || rc=1
  tail -15 "$OUT_DIR/pytest-fused.log"
fi
rm -rf "$OUT_DIR/.triton-cache" "$OUT_DIR/real/.scene" "$OUT_DIR/tiled4/.scene"
exit $rc
