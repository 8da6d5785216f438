#!/bin/bash
# Round 3 on one H200 (<= 5 min wall in all, each part under `timeout`): STOP's prompter convolutions with the fft
# path. From the repository root, outputs under $OUT_DIR:
#   OUT_DIR=/tmp/o bash projects/stop-tome/scripts/gpu_round3.sh
# (1) prompter_bench: each conv layer alone (forward ms per path, fft included) and the whole prompter forward and
#     forward + backward at 16 videos for fft / auto / fold2d / native (cuDNN autotuning on)
#     -> $OUT_DIR/prompter/prompter_bench.{log,json}
# (2) stop-tome-benchmark STOP group2-2 ViT-B/32 r=0..4, --prompter_conv auto (fft among the timed paths), forced
#     merging: videos/s, x vs r=0, block / visual FLOP cut -> $OUT_DIR/stop-tome-benchmark-auto-force.json
# (3) the CUDA tests: python3 -m pytest -m gpu projects/stop-tome/tests/test_gpu.py
# (4) only if time is left: the same rows with --prompter_conv fft at r=0,2 (-> ...-fft-force.json)
# Everything printed also goes to $OUT_DIR/gpu_round3.log.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "${ROOT}"
export PYTHONPATH="${ROOT}/projects/stop-tome/src:${ROOT}/packages/merge-core/src:${ROOT}/packages/run-kit/src${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT_DIR:?set OUT_DIR to the output folder}"
PY="${PYTHON:-python3}"
mkdir -p "${OUT_DIR}/prompter"
LOG="${OUT_DIR}/gpu_round3.log"
TOTAL=285  # seconds for all parts together

cap() {  # the smaller of $1 and the seconds left
    local want=$1 left=$((TOTAL - SECONDS))
    ((left < want)) && want=$left
    ((want < 1)) && want=1
    echo "$want"
}

part() {  # part <timeout s> <command...>
    local secs=$1
    shift
    echo "## [${SECONDS} s] timeout ${secs} $*" | tee -a "${LOG}"
    timeout "${secs}" "$@" 2>&1 | tee -a "${LOG}"
    echo "## exit ${PIPESTATUS[0]} after ${SECONDS} s" | tee -a "${LOG}"
}

BENCH=(-m stop_tome.benchmark --models ViT-B/32 --modes group2-2 --batch 16 --frames 12 --dtype fp16 --device cuda
    --warmup 3 --iters 10 --policy force)

part "$(cap 135)" "${PY}" -m stop_tome.prompter_bench --out_dir "${OUT_DIR}/prompter" --batches 16 \
    --modes fft,auto,fold2d,native --cudnn_benchmark on --no_full --budget_s 125
part "$(cap 75)" "${PY}" "${BENCH[@]}" --r_b32 0,1,2,3,4 --prompter_conv auto \
    --out "${OUT_DIR}/stop-tome-benchmark-auto-force.json"
part "$(cap 120)" "${PY}" -m pytest -v -m gpu projects/stop-tome/tests/test_gpu.py -p no:cacheprovider
if ((TOTAL - SECONDS >= 40)); then
    part "$(cap 60)" "${PY}" "${BENCH[@]}" --r_b32 0,2 --prompter_conv fft \
        --out "${OUT_DIR}/stop-tome-benchmark-fft-force.json"
fi
echo "## done after ${SECONDS} s" | tee -a "${LOG}"
