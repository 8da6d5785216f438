#!/usr/bin/env bash
# Stage-1 student training (auto-resumes from the newest ckpt_epoch_N.pth in OUTPUT).
#   bash stage1/scripts/train_image_student.sh CFG=stage1/configs/es_rv_m.yaml [DATA_PATH=...] [OUTPUT=...] \
#        [TEACHER_EMBED_PATH=...] [BATCH_SIZE=...] [GPUS=...] [PRETRAINED=...] [extra flags, e.g. --online-teacher]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXTRA=()
source "$HERE/_launch.sh"
CFG="${CFG:-$HERE/../configs/es_rv_m.yaml}"
ARGS=(--cfg "$CFG")
[ -n "${DATA_PATH:-}" ] && ARGS+=(--data-path "$DATA_PATH")
[ -n "${OUTPUT:-}" ] && ARGS+=(--output "$OUTPUT")
[ -n "${TEACHER_EMBED_PATH:-}" ] && ARGS+=(--teacher-embed-path "$TEACHER_EMBED_PATH")
[ -n "${BATCH_SIZE:-}" ] && ARGS+=(--batch-size "$BATCH_SIZE")
[ -n "${PRETRAINED:-}" ] && ARGS+=(--pretrained "$PRETRAINED")
[ -n "${SAM3_CHECKPOINT:-}" ] && ARGS+=(--sam3-checkpoint "$SAM3_CHECKPOINT")
launch "$HERE/../train_image_encoder_stage1.py" "${ARGS[@]}" "${EXTRA[@]}"
