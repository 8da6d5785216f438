#!/usr/bin/env bash
# Export teacher embeddings (resumable; re-run to continue). OUTPUT= and TEACHER_EMBED_PATH= both name the store.
#   bash stage1/scripts/save_image_embeddings.sh [CFG=...] [DATA_PATH=...] [OUTPUT=<store folder>] \
#        [SAM3_CHECKPOINT=...] [BATCH_SIZE=...] [GPUS=...] [FORMAT=fp16|bf16|uint8] [CHECK=N] [extra flags]
# On CUDA the teacher is torch.compiled by default (~30 s once per process; 1.28x on an H200); --no-compile: eager.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXTRA=()
source "$HERE/_launch.sh"
CFG="${CFG:-$HERE/../configs/teacher/sam_vit_huge_sa1b.yaml}"
ARGS=(--cfg "$CFG")
[ -n "${DATA_PATH:-}" ] && ARGS+=(--data-path "$DATA_PATH")
[ -n "${OUTPUT:-}" ] && ARGS+=(--teacher-embed-path "$OUTPUT")
[ -n "${TEACHER_EMBED_PATH:-}" ] && ARGS+=(--teacher-embed-path "$TEACHER_EMBED_PATH")
[ -n "${SAM3_CHECKPOINT:-}" ] && ARGS+=(--sam3-checkpoint "$SAM3_CHECKPOINT")
[ -n "${BATCH_SIZE:-}" ] && ARGS+=(--batch-size "$BATCH_SIZE")
[ -n "${FORMAT:-}" ] && ARGS+=(--format "$FORMAT")
[ -n "${CHECK:-}" ] && ARGS+=(--check "$CHECK")
launch "$HERE/../save_embedding_image_stage1.py" "${ARGS[@]}" "${EXTRA[@]}"
