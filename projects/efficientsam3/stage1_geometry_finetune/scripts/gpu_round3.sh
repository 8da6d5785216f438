#!/usr/bin/env bash
# GPU round 3 of the geometry fine-tune (issue 14; <= 4 min on an H200 incl. torch.compile), from the repo root
# with plain python3 and PYTHONPATH set to every member's src folder:
#   OUT_DIR=/tmp/o bash projects/efficientsam3/stage1_geometry_finetune/scripts/gpu_round3.sh   [TINY=1: CPU smoke]
# 1. FT bench suite, ES-RV-M batch 4, AMP, 72x72 level: stage-1 step, student fwd+bwd, then per frozen dtype
#    (fp16 = the trainer's default first, then bf16) the frozen path eager and torch.compile'd (the trainer's
#    CUDA default): frozen path for the teacher / for the student (fwd+bwd to the embedding), FT step uncached /
#    cached; EdgeSAM-style step and all-query masks (fp16 eager); compile seconds; the FLOP bound (frozen path
#    for the student vs the student's fwd+bwd). Rows are saved as they come: a cut run keeps them.
# 2. The GPU tests touching the FT (compiled == eager on CUDA, trainer on CUDA with the compiled frozen path,
#    tiny bench under AMP).
# 3. 36x36 level (the reference FT's), bf16 eager.
# Writes $OUT_DIR/{gpu.txt, bench_finetune_72.{json,log}, pytest_gpu.log, bench_finetune_36.{json,log}}.
set -uo pipefail
OUT_DIR="${OUT_DIR:-/tmp/o}"
mkdir -p "$OUT_DIR"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../../.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/packages/merge-core/src:$ROOT/packages/run-kit/src:$ROOT/projects/efficientsam3/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
COMMON=(--suite finetune --warmup 3 --iters 10)
MODES=(eager compiled)
if [ "${TINY:-0}" = 1 ]; then  # CPU smoke test of this script (inductor on CPU takes minutes: eager only)
  COMMON=(--suite finetune --tiny --device cpu --warmup 0 --iters 1 --ft-prompts 4)
  MODES=(eager)
fi
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT_DIR/gpu.txt"; fi
start=$SECONDS
timeout "${FT72_TIMEOUT:-120}" "$PY" -m efficientsam3.bench "${COMMON[@]}" --ft-levels 72 --ft-frozen-dtypes fp16 bf16 \
  --ft-modes "${MODES[@]}" --out "$OUT_DIR/bench_finetune_72.json" 2>&1 | tee "$OUT_DIR/bench_finetune_72.log"
echo "finetune 72: $((SECONDS - start)) s (exit ${PIPESTATUS[0]})"
start=$SECONDS
if [ "${TINY:-0}" != 1 ]; then
  T=projects/efficientsam3/tests
  timeout "${TEST_TIMEOUT:-95}" "$PY" -m pytest -v -m gpu -p no:cacheprovider "$T/test_bench_finetune.py" \
    "$T/test_ft_gpu.py" "$T/test_geometry_train.py" 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
  echo "gpu tests: $((SECONDS - start)) s (exit ${PIPESTATUS[0]})"
fi
start=$SECONDS
timeout "${FT36_TIMEOUT:-20}" "$PY" -m efficientsam3.bench "${COMMON[@]}" --ft-levels 36 --ft-frozen-dtypes bf16 \
  --ft-modes eager --out "$OUT_DIR/bench_finetune_36.json" 2>&1 | tee "$OUT_DIR/bench_finetune_36.log"
echo "finetune 36: $((SECONDS - start)) s (exit ${PIPESTATUS[0]})"
"$PY" - "$OUT_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("bench_finetune_72.json", "bench_finetune_36.json"):
    try:
        f = json.loads((out / name).read_text())["finetune"]
    except (OSError, KeyError, ValueError) as e:
        print(f"no {name}: {e}")
        continue
    partial = " (partial: the suite was cut off)" if f.get("partial") else ""
    print(f"\n== {name}: x stage-1 step (target <= 1.5){partial}")
    base = f["rows"][0]["ms"]
    for r in f["rows"]:
        print(f"{r['part']:<20} {r.get('frozen_dtype', '-'):>5} {r.get('frozen', '-'):>8} {r['ms']:8.2f} ms  "
              f"x{r['ms'] / base:.2f}  {r['gflop_per_img']:7.1f} GFLOP/img  {r['tflop_per_s']:6.1f} TFLOP/s")
    s = f.get("summary", {})
    for k, v in s.items():
        if k.startswith(("compile_s", "frozen_student_", "student_gflop", "target")):
            print(f"  {k}: {v}")
PYEOF
