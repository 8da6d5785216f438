#!/usr/bin/env bash
# Issue 9 round 3 (target 6: torch.compile of a patched ViT-B in <= 60 s, compiled >= eager merging) on one GPU,
# from the repository root, with plain python3 (no uv), <= 6 minutes on an H200. New since round 2c: the fused
# matcher and merge are torch.library custom ops (merge_core::match_plan / merge_wavg / best_destinations), so
# Inductor sees one opaque node per layer for each instead of tracing (and generating per-layer kernels for) the
# torch reference. Round 2c: the patched ViT-B/16 bs64 had no first output after 95 s; plain timm took 10.4 s.
#   1. merge-bench --suite compile, ViT-B/16 r=16 prop_attn on, batch 64, default mode: plain timm + patched.
#      Per row: time to first compiled output (cold Inductor caches), graphs / breaks / recompiles on the 2nd call,
#      eager and compiled medians, Inductor kernels generated, compile phases (dynamo's compile_times, seconds).
#   2. the same at batch 1 with mode reduce-overhead (CUDA graphs: the small-batch mode).
#   3. the GPU tests of the new ops and of the Triton entry points they wrap (pytest -m gpu, test_custom_ops.py +
#      test_kernels.py), stop at the first failure.
# Every step has its own time limit. Results: $OUT_DIR (default /tmp/o): one JSON per compile step, a log per step,
# summary.txt. TINY=1 runs the same steps on CPU with tiny models and aot_eager (a check of the command, ~2 min).
set -uo pipefail
PY=${PYTHON:-python3}  # PYTHON=.venv/bin/python for the CPU check on a uv checkout
OUT_DIR=${OUT_DIR:-/tmp/o}
mkdir -p "$OUT_DIR"
export PYTHONPATH=packages/merge-core/src:packages/merge-bench/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export MERGE_CORE_CACHE_DIR="$OUT_DIR/policy-cache"
if [ "${TINY:-0}" = 1 ]; then
  dev=(--device cpu)
  compile_model=(--model vit_tiny_patch16_224 --depth 2 --img-size 32 --r 2 --warmup 1 --iters 2 --compile-backend aot_eager)
  small_mode=(--compile-mode default)
  limits=(120 120 120)
else
  dev=(--device cuda)
  compile_model=(--model vit_base_patch16_224 --r 16 --warmup 5 --iters 20)
  small_mode=(--compile-mode reduce-overhead)
  limits=(140 120 80)  # + 5 s kill grace each: <= 355 s
fi
step() {  # step <name> <seconds> <command...>: run with a time limit, log to $OUT_DIR/<name>.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit} s): $*" | tee "$OUT_DIR/$name.log"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT_DIR/$name.log" "$OUT_DIR/summary.txt"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/summary.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/summary.txt"
step compile-bs64 "${limits[0]}" "$PY" -m merge_bench --suite compile "${dev[@]}" "${compile_model[@]}" \
  --batch-size 64 --prop-attn on --out "$OUT_DIR/compile-bs64"
step compile-bs1-reduce-overhead "${limits[1]}" "$PY" -m merge_bench --suite compile "${dev[@]}" \
  "${compile_model[@]}" --batch-size 1 --prop-attn on "${small_mode[@]}" --out "$OUT_DIR/compile-bs1"
if [ "${TINY:-0}" = 1 ]; then
  gpu_tests=(-m "not gpu and not slow" packages/merge-core/tests/test_custom_ops.py)
else
  gpu_tests=(-m gpu packages/merge-core/tests/test_custom_ops.py packages/merge-core/tests/test_kernels.py)
fi
step pytest-ops-gpu "${limits[2]}" "$PY" -m pytest -x -q -p no:cacheprovider "${gpu_tests[@]}"
echo "--- compile rows (first output, Inductor kernels, phases)"
grep -h -A1 "first output" "$OUT_DIR"/compile-*.log
echo "--- steps"; cat "$OUT_DIR/summary.txt"
