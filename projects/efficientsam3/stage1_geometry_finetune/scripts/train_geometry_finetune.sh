#!/usr/bin/env bash
# Geometry fine-tune (auto-resumes from the newest ckpt_epoch_N.pth in OUTPUT).
#   bash stage1_geometry_finetune/scripts/train_geometry_finetune.sh CFG=stage1_geometry_finetune/configs/es_rv_m.yaml \
#        [DATA_PATH=...] [OUTPUT=...] [BATCH_SIZE=...] [GPUS=...] [PRETRAINED=...] [SAM3_CHECKPOINT=...] \
#        [TEACHER_EMBED_PATH=...] [NNODES=...] [NODE_RANK=...] [MASTER_PORT=...] [extra flags]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXTRA=()
source "$HERE/../../stage1/scripts/_launch.sh"
CFG="${CFG:-$HERE/../configs/es_rv_m.yaml}"
ARGS=(--cfg "$CFG")
[ -n "${DATA_PATH:-}" ] && ARGS+=(--data-path "$DATA_PATH")
[ -n "${OUTPUT:-}" ] && ARGS+=(--output "$OUTPUT")
[ -n "${TEACHER_EMBED_PATH:-}" ] && ARGS+=(--teacher-embed-path "$TEACHER_EMBED_PATH")
[ -n "${BATCH_SIZE:-}" ] && ARGS+=(--batch-size "$BATCH_SIZE")
[ -n "${PRETRAINED:-}" ] && ARGS+=(--pretrained "$PRETRAINED")
[ -n "${SAM3_CHECKPOINT:-}" ] && ARGS+=(--sam3-checkpoint "$SAM3_CHECKPOINT")
launch "$HERE/../train_geometry_finetune.py" "${ARGS[@]}" "${EXTRA[@]+"${EXTRA[@]}"}"
