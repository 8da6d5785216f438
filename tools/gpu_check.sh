#!/usr/bin/env bash
# On a GPU machine, from the repository root, without uv (torch/timm/triton/pytest preinstalled):
# every member's GPU tests, merge-bench's issue-3 suite and issue-9 batch sweep, then the FreqMerge benchmark.
# Logs and JSON go to $OUT (default results/), one file per suite and device.
set -uo pipefail
out=${OUT:-results}
mkdir -p "$out"
export PYTHONPATH=packages/merge-core/src:packages/merge-bench/src:projects/freqmerge/src
export PYTHONUNBUFFERED=1
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# the GPU tests check merging itself, so r is forced (the default "auto" policy runs small batches unmerged);
# the policy is measured by the sweep below
MERGE_CORE_POLICY=force python3 -m pytest -q -m gpu -p no:cacheprovider packages/merge-core projects/freqmerge/tests/test_gpu.py 2>&1 \
  | tee "$out/pytest-gpu-$dev.log"
python3 -m merge_bench --suite gpu --out "$out" 2>&1 | tee "$out/merge-bench-gpu-$dev.log"
python3 -m merge_bench --suite sweep --warmup 5 --iters 20 --out "$out" 2>&1 | tee "$out/merge-bench-sweep-$dev.log"
python3 projects/freqmerge/tools/benchmark.py --out "$out/freqmerge-benchmark.json" 2>&1 | tee "$out/freqmerge-benchmark.log"
