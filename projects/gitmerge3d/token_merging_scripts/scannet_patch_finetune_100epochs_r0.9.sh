#!/bin/sh
# ScanNet full fine-tune, 100 epochs, patch merging r=0.9 (merges 90% of each patch), stride 10.
# Run from projects/gitmerge3d. Extra KEY=VALUE words are passed on as config --options.
set -e
cd "$(dirname "$0")/.."
sh scripts/train.sh \
    -m 1 -g ${NUM_GPU:-1} -d sonata \
    -c gitmerge3d-patch-0c-scannet-ft-finetune-100epochs-r0.9-s10 \
    -n gitmerge3d-patch-0c-scannet-ft-finetune-100epochs-r0.9-s10 \
    -w ${WEIGHT:-exp/sonata/semseg-sonata-v1m1-0-base-0c-scannet-ft/model/model_best.pth} "$@"
