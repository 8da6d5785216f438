#!/bin/bash
# Evaluate a trained model on MSR-VTT 1k-A with and without merging (same weights):
#   CKPT=output/msrvtt_stop_r0/best.pt bash scripts/eval_msrvtt.sh 0 2 4
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/msrvtt}
VIDEOS=${VIDEOS:-${DATA}/videos_compressed}
PRETRAINED=${PRETRAINED:-$HOME/models/pretrained}
CKPT=${CKPT:?set CKPT to a best.pt written by training}
for R in "${@:-0 2}"; do
    python main.py --do_eval 1 --init_model "${CKPT}" --tome_r "${R}" --tome_trace_source \
        --data_path "${DATA}/MSRVTT_data.json" --val_csv "${DATA}/MSRVTT_JSFUSION_test.csv" \
        --features_path "${VIDEOS}" --pretrained_dir "${PRETRAINED}" --output_dir "output/eval_r${R}" \
        --max_words 32 --max_frames 12 --batch_size_val 16 --precision amp --freeze_clip 1 \
        --temporal_prompt group2-2
done
