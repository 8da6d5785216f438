#!/bin/bash
# GPU benchmark of the issue (random weights; no data or weight files). From the repository root, without uv:
#   bash projects/stop-tome/scripts/benchmark_gpu.sh
# Needs torch (+ timm, whose dependencies bring tqdm, pillow, numpy); no PyAV. Writes results/stop-tome-benchmark-*.json.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "${ROOT}"
export PYTHONPATH="${ROOT}/projects/stop-tome/src:${ROOT}/packages/merge-core/src:${ROOT}/packages/run-kit/src${PYTHONPATH:+:$PYTHONPATH}"
"${PYTHON:-python3}" -m stop_tome.benchmark --models ViT-B/32,ViT-B/16 --modes group2-2,DGL,none,cross \
    --r_b32 0,1,2,3,4 --r_b16 0,2,4,8,12,16 --batch 16 --frames 12 --dtype fp16 --device cuda \
    --warmup 3 --iters 10 --policy force "$@"
"${PYTHON:-python3}" -m stop_tome.benchmark --models ViT-B/32,ViT-B/16 --modes group2-2,DGL,none,cross \
    --r_b32 0,2,4 --r_b16 0,8,16 --batch 16 --frames 12 --dtype fp16 --device cuda \
    --warmup 3 --iters 10 --policy auto --out results/stop-tome-benchmark-auto.json "$@"
# plain CLIP4Clip without proportional attention (FlashAttention path; ToMe's advice for trained models)
"${PYTHON:-python3}" -m stop_tome.benchmark --models ViT-B/16,ViT-B/32 --modes none,cross --batch 16 --frames 12 --dtype fp16 \
    --device cuda --warmup 3 --iters 10 --policy force --no_prop_attn \
    --out results/stop-tome-benchmark-noprop.json "$@"
