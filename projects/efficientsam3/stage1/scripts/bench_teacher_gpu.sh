#!/usr/bin/env bash
# GPU round for issues 13/14 (~5-6 min on an H200 incl. torch.compile), from anywhere, plain python3:
#   OUT_DIR=/tmp/o bash projects/efficientsam3/stage1/scripts/bench_teacher_gpu.sh [TINY=1 DEVICE=cpu]
# 1. exact SAM3 trunk export, bf16 batch 8, random weights: reference path eager (the former code), fast path
#    eager, fast path torch.compile (fullgraph); img/s and MFU against 989 TFLOPS (H200 dense bf16; FLOPs = 2 x
#    MACs); merged teacher (attn and block at 192:1728) compiled while the time budget lasts.
# 2. geometry-FT step suite (ES-RV-M batch 4, AMP) with the frozen SAM3 path in bf16 and fp16, 72x72 level.
# Writes $OUT_DIR/bench_teacher.{json,log}, $OUT_DIR/bench_finetune.{json,log}; prints both tables.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../../.." && pwd)"
OUT_DIR="${OUT_DIR:-/tmp/o}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT/packages/merge-core/src:$ROOT/packages/run-kit/src:$ROOT/projects/efficientsam3/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
T_BUDGET="${TEACHER_BUDGET:-230}"   # seconds before merged rows are skipped; hard limits below
EXTRA=()
MERGE="${MERGE:-192:1728}"
if [ "${TINY:-0}" = 1 ]; then  # CPU smoke test of this script: tiny trunk, r scaled down, generous limits
  EXTRA=(--tiny --device "${DEVICE:-cpu}" --warmup 0 --iters 1)
  MERGE=2:8 TEACHER_TIMEOUT="${TEACHER_TIMEOUT:-900}" FT_TIMEOUT="${FT_TIMEOUT:-900}"
fi
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee "$OUT_DIR/gpu.txt"; fi
start=$SECONDS
timeout "${TEACHER_TIMEOUT:-250}" "$PY" -m efficientsam3.bench --suite teacher --compile --peak-tflops 989 \
  --merge "$MERGE" --merge-modes attn block --time-budget "$T_BUDGET" \
  --out "$OUT_DIR/bench_teacher.json" "${EXTRA[@]+"${EXTRA[@]}"}" 2>&1 | tee "$OUT_DIR/bench_teacher.log"
echo "teacher suite: $((SECONDS - start)) s (exit ${PIPESTATUS[0]})"
start=$SECONDS
FT=(--ft-levels 72 --ft-frozen-dtypes bf16 fp16)
if [ "${TINY:-0}" = 1 ]; then FT+=(--ft-prompts 4); fi
timeout "${FT_TIMEOUT:-105}" "$PY" -m efficientsam3.bench --suite finetune "${FT[@]}" \
  --out "$OUT_DIR/bench_finetune.json" "${EXTRA[@]+"${EXTRA[@]}"}" 2>&1 | tee "$OUT_DIR/bench_finetune.log"
echo "finetune suite: $((SECONDS - start)) s (exit ${PIPESTATUS[0]})"
"$PY" - "$OUT_DIR" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    t = json.loads((out / "bench_teacher.json").read_text())
    print(f"\n== teacher ({t['device']}, {t['date']}, torch {t['torch']}); MFU vs 989 TFLOPS dense bf16, FLOPs = 2 x MACs")
    for r in t["teacher"]:
        if "skipped" in r:
            print(f"{r['teacher']:<24} skipped ({r['skipped']})")
        else:
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            print(f"{r['teacher']:<24} {r['window_r']}:{r['global_r']:<5} {r['img_per_s']:7.1f} img/s  "
                  f"x{r.get('speedup', float('nan')):.2f}  MFU {mfu:>6}  {r['tmac_per_img']:.3f} TMAC/img  cos {r['cos_mean']:.5f}")
except (OSError, KeyError, ValueError) as e:
    print("no teacher results:", e)
try:
    f = json.loads((out / "bench_finetune.json").read_text())["finetune"]
    partial = " (partial: the suite was cut off)" if f.get("partial") else ""
    print(f"\n== finetune: ES-RV-M batch 4, x stage-1 step (target <= 1.5){partial}")
    base = f["rows"][0]["ms"]
    for r in f["rows"]:
        print(f"{r['part']:<20} {r.get('frozen_dtype', '-'):>5} {r['ms']:8.2f} ms  x{r['ms'] / base:.2f}")
except (OSError, KeyError, ValueError) as e:
    print("no finetune results:", e)
PYEOF
