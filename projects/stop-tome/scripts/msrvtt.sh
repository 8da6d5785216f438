#!/bin/bash
# STOP's MSR-VTT recipe (their scripts/msrvtt.sh at 52ed2f5: 4 GPUs x 32, AdamW lr 1e-3, coef_lr 5e-4, AMP, frozen
# CLIP, group2-2, 12 frames, 32 words, 3-fps compressed videos) with data_path defined (STOP's script never set it)
# and merging: TOME_R=2 bash scripts/msrvtt.sh. One GPU: NPROC=1 (no process group is created then).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/msrvtt}                     # MSRVTT_data.json + the three CSVs (../shared/data/msrvtt has the CSVs)
VIDEOS=${VIDEOS:-${DATA}/videos_compressed}   # <video_id>.mp4, e.g. after ffmpeg -r 3 -vf scale=-2:224
PRETRAINED=${PRETRAINED:-$HOME/models/pretrained}
NPROC=${NPROC:-4}
TOME_R=${TOME_R:-0}
OUT=${OUT:-output/msrvtt_stop_r${TOME_R}}

torchrun --standalone --nproc_per_node "${NPROC}" main.py \
    --do_train 1 \
    --num_thread_reader 8 \
    --epochs 5 \
    --batch_size 128 \
    --batch_size_val 16 \
    --n_display 50 \
    --data_path "${DATA}/MSRVTT_data.json" \
    --train_csv "${DATA}/MSRVTT_train.9k.csv" \
    --val_csv "${DATA}/MSRVTT_JSFUSION_test.csv" \
    --features_path "${VIDEOS}" \
    --output_dir "${OUT}" \
    --optim AdamW \
    --lr 1e-3 \
    --coef_lr 5e-4 \
    --wd 0.2 \
    --warmup_proportion 0.1 \
    --max_words 32 \
    --max_frames 12 \
    --expand_msrvtt_sentences \
    --slice_framepos 2 \
    --linear_patch 2d \
    --sim_header meanP \
    --loose_type \
    --freeze_clip 1 \
    --precision amp \
    --pretrained_clip_name ViT-B/32 \
    --pretrained_dir "${PRETRAINED}" \
    --shared_latent_space transformer \
    --temporal_prompt group2-2 \
    --tome_r "${TOME_R}" \
    "$@"
