#!/bin/sh
# ScanNet200 linear probing, patch merging r=0.8.
# Run from projects/gitmerge3d. Extra KEY=VALUE words are passed on as config --options.
set -e
cd "$(dirname "$0")/.."
sh scripts/train.sh \
    -m 1 -g ${NUM_GPU:-1} -d sonata \
    -c gitmerge3d-patch-r80-scannet200-lin \
    -n gitmerge3d-patch-r80-scannet200-lin \
    -w ${WEIGHT:-exp/sonata/pretrain-sonata-v1m1-0-base/model/model_last.pth} "$@"
