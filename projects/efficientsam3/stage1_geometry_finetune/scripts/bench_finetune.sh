#!/usr/bin/env bash
# GPU benchmark of the geometry fine-tune (ES-RV-M, batch 4, AMP, random weights; ~2-3 min on an H200):
#   bash projects/efficientsam3/stage1_geometry_finetune/scripts/bench_finetune.sh [OUT=file.json] [extra bench flags]
# Needs torch + torchvision + timm + numpy only (no uv, yacs or pycocotools). Prints a table, writes JSON to OUT.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../../.." && pwd)"
OUT="$ROOT/projects/efficientsam3/results/bench_h200_finetune.json"
ARGS=()
for a in "$@"; do
  case "$a" in
    OUT=*) OUT="${a#OUT=}" ;;
    *) ARGS+=("$a") ;;
  esac
done
export PYTHONPATH="$ROOT/packages/merge-core/src:$ROOT/packages/run-kit/src:$ROOT/projects/efficientsam3/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m efficientsam3.bench --suite finetune --out "$OUT" "${ARGS[@]+"${ARGS[@]}"}"
