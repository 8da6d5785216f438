#!/usr/bin/env bash
# Issue 9 round 2c on one GPU, from the repository root, with plain python3 (no uv), <= 6 minutes on an H200:
#   1. merge-bench --suite compile, ViT-B/16 r=16 prop_attn on: patched at batch 64 in torch.compile's default mode
#      (plain timm there is known: 10.4 s to first output, 6.46 ms; results/merge-bench-compile-NVIDIA-H200.*, so
#      the patched row gets the whole step), plain timm + patched at batch 1 in mode reduce-overhead (CUDA graphs:
#      the small-batch mode). Per row: time to first
#      compiled output (cold Inductor caches), graphs / graph breaks / recompiles on the 2nd call, compiled and
#      eager medians (target 6: patched compile <= 60 s and compiled >= eager merging).
#   2. the prop-attn micro section's end-to-end and FlexAttention parts only (target 4 rows cut last round).
#   3. the key-bias attention kernel's GPU tests (pytest -m gpu, test_attn_bias_gpu.py), stop at the first failure.
# Every step has its own time limit, so one slow step cannot eat the others' time. Results: $OUT_DIR (default
# /tmp/o): one JSON per step, a log per step, summary.txt. TINY=1 runs the same steps on CPU with tiny models
# (a check of the command, ~3 minutes on 2 cores).
set -uo pipefail
PY=${PYTHON:-python3}  # PYTHON=.venv/bin/python for the CPU check on a uv checkout
OUT_DIR=${OUT_DIR:-/tmp/o}
mkdir -p "$OUT_DIR"
export PYTHONPATH=packages/merge-core/src:packages/merge-bench/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export MERGE_CORE_CACHE_DIR="$OUT_DIR/policy-cache"
if [ "${TINY:-0}" = 1 ]; then
  dev=(--device cpu)
  # aot_eager: the command path without Inductor's CPU code generation (minutes on 2 cores)
  compile_model=(--model vit_tiny_patch16_224 --depth 2 --img-size 32 --r 2 --warmup 1 --iters 2 --compile-backend aot_eager)
  small_mode=(--compile-mode default)
  micro=(--tiny --device cpu)
  limits=(120 120 300 120)
else
  dev=(--device cuda)
  compile_model=(--model vit_base_patch16_224 --r 16 --warmup 5 --iters 20)
  small_mode=(--compile-mode reduce-overhead)
  micro=(--warmup 5 --iters 20)
  limits=(95 95 110 35)  # + 5 s kill grace each: <= 355 s
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
step compile-bs64 "${limits[0]}" "$PY" -m merge_bench --suite compile "${dev[@]}" "${compile_model[@]}" \
  --batch-size 64 --prop-attn on --compile-skip-timm --out "$OUT_DIR/compile-bs64"
step compile-bs1-reduce-overhead "${limits[1]}" "$PY" -m merge_bench --suite compile "${dev[@]}" \
  "${compile_model[@]}" --batch-size 1 --prop-attn on "${small_mode[@]}" --out "$OUT_DIR/compile-bs1"
step prop-attn-e2e-flex "${limits[2]}" "$PY" -m merge_bench.micro --section prop-attn --parts e2e,flex \
  "${micro[@]}" --out "$OUT_DIR"
step pytest-attn-bias-gpu "${limits[3]}" "$PY" -m pytest -m gpu -x -q -p no:cacheprovider \
  packages/merge-core/tests/test_attn_bias_gpu.py
echo "--- compile rows"; grep -h "first output" "$OUT_DIR"/compile-*.log
echo "--- steps"; cat "$OUT_DIR/summary.txt"
