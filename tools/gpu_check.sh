#!/usr/bin/env bash
# On a GPU machine, from the repository root, without uv (torch/timm/triton/pytest preinstalled):
# every member's GPU tests, then the FreqMerge benchmark. Logs and JSON go to $OUT (default results/).
set -uo pipefail
out=${OUT:-results}
mkdir -p "$out"
export PYTHONPATH=packages/merge-core/src:projects/freqmerge/src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m pytest -q -m gpu -p no:cacheprovider \
  packages/merge-core/tests/test_gpu_adapter.py packages/merge-core/tests/test_kernels.py \
  projects/freqmerge/tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.log"
python projects/freqmerge/tools/benchmark.py --out "$out/freqmerge-benchmark.json" 2>&1 | tee "$out/freqmerge-benchmark.log"
