#!/usr/bin/env bash
# Issue 9 target 5 on one GPU: match+merge fused (sort-free plan, merge with sources ordered by destination) vs
# plain torch (score matrix + sort + scatter_reduce), fp16, at (B, N, metric C, r, x C) = (8,16384,64,4096,768),
# (8,4096,64,1024,768), (2,65536,64,16384,768), (1,1025,64,40,1024), (32,1025,64,40,1024), (256,197,64,16,768):
# eager and CUDA graph, CUDA-event medians of 30 calls after 10 warm-up calls; the merge alone on one plan
# (sorted-sources kernel vs the scan kernel vs torch); and a correctness check against the torch path on the GPU
# (plan equality, max abs diff of the output; the merge alone against torch on the torch path's plan).
# Total wall time: ~60-120 s on an H200 (first Triton compiles included; limit TIMEOUT, default 150 s; the JSON
# is rewritten after every shape, so a cut run keeps the rows done, target row first).
# Run from the repo root with PYTHONPATH set to every member's src folder:
#   OUT_DIR=/tmp/o bash packages/merge-bench/scripts/issue9_large_n.sh
# GPU_TESTS=1 also runs the GPU tests of packages/merge-core/tests/test_merge_scaling.py (needs pytest; ~30 s).
# CPU smoke test (Triton interpreter, tiny shapes, the tiled plan forced):
#   TINY=1 OUT_DIR=/tmp/o bash packages/merge-bench/scripts/issue9_large_n.sh
set -u
OUT_DIR=${OUT_DIR:-/tmp/issue9_large_n}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if [ "${TINY:-0}" = "1" ]; then
  export TRITON_INTERPRET=1
  ARGS=(--tiny --device cpu --warmup 0 --iters 1)
else
  ARGS=(--device cuda --dtype fp16 --warmup 10 --iters 30)
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT_DIR/gpu.txt" 2>&1 || true
timeout "${TIMEOUT:-150}" "$PY" -m merge_bench.micro --section large-n "${ARGS[@]}" \
  --json "$OUT_DIR/issue9_large_n.json" 2>&1 | tee "$OUT_DIR/issue9_large_n.log"
echo "exit ${PIPESTATUS[0]}"
if [ "${GPU_TESTS:-0}" = "1" ] && [ "${TINY:-0}" != "1" ]; then
  timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider packages/merge-core/tests/test_merge_scaling.py 2>&1 \
    | tee "$OUT_DIR/gpu_tests.log"
  echo "gpu tests exit ${PIPESTATUS[0]}"
fi
