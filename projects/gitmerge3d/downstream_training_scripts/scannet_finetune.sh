#!/bin/sh
# Baseline Sonata 0c ScanNet fine-tune (no merging); writes exp/sonata/semseg-sonata-v1m1-0-base-0c-scannet-ft.
# Run from projects/gitmerge3d. Extra KEY=VALUE words are passed on as config --options.
set -e
cd "$(dirname "$0")/.."
sh scripts/train.sh \
    -m 1 -g ${NUM_GPU:-1} -d sonata \
    -c semseg-sonata-v1m1-0c-scannet-ft \
    -n semseg-sonata-v1m1-0-base-0c-scannet-ft \
    -w ${WEIGHT:-exp/sonata/pretrain-sonata-v1m1-0-base/model/model_last.pth} "$@"
