#!/bin/bash
# The guide's "Example Training Script", runnable as written from projects/stop-tome
# (data/MSRVTT_data.json + data/MSRVTT_Videos/, CLIP weights in --pretrained_dir, default ~/models/pretrained).
# Note: --temporal_prompt DGL builds the DGL baseline; STOP itself is group2-2 (see scripts/msrvtt.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

python main.py \
    --do_train 1 \
    --data_path data/MSRVTT_data.json \
    --features_path data/MSRVTT_Videos \
    --output_dir output/tome_msrvtt \
    --max_words 32 \
    --max_frames 12 \
    --batch_size 128 \
    --lr 1e-4 \
    --epochs 5 \
    --tome_r 2 \
    --tome_prop_attn \
    --pretrained_clip_name "ViT-B/32" \
    --sim_header "meanP" \
    --temporal_prompt "DGL" \
    "$@"
