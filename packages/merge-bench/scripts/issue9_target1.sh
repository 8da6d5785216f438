#!/usr/bin/env bash
# Issue 9 target 1 on one GPU: plain timm vs automatic (default policy) vs forced merging, fp16 eager, random
# weights, ViT-S/B/L@224 and ViT-L/16@512 at batches $BATCHES (default 1,8; the issue's sweep: BATCHES=1,8,64,256);
# 8 interleaved rounds x 12 CUDA-event-timed forwards after one untimed call (round orders: a Williams design, each
# variant in each position and after each other variant equally often; 8 = two full cycles).
# Total wall time: ~60-100 s on an H200 at batches 1,8 (limit TIMEOUT, default 150 s; batches 64,256 need ~300 s). Run from the repo root with PYTHONPATH set to every
# member's src folder:  OUT_DIR=/tmp/o bash packages/merge-bench/scripts/issue9_target1.sh
# CPU smoke test:        TINY=1 OUT_DIR=/tmp/o bash packages/merge-bench/scripts/issue9_target1.sh
set -u
OUT_DIR=${OUT_DIR:-/tmp/issue9_target1}
mkdir -p "$OUT_DIR"
export MERGE_CORE_CACHE_DIR="$OUT_DIR/policy-cache"  # fresh calibration, no decision from earlier runs
PY=${PYTHON:-python3}
if [ "${TINY:-0}" = "1" ]; then
  ARGS=(--models tiny --batches 1,2 --rounds 3 --iters 5 --warmup 2 --device cpu --pin-zero)
else
  ARGS=(--models vit_s_224,vit_b_224,vit_l_224,vit_l_512 --batches "${BATCHES:-1,8}" --rounds 8 --iters 12 --warmup 5)
fi
timeout "${TIMEOUT:-150}" "$PY" -m merge_bench.interleaved "${ARGS[@]}" --out "$OUT_DIR/issue9_target1.json" 2>&1 \
  | tee "$OUT_DIR/issue9_target1.log"
echo "exit ${PIPESTATUS[0]}"
