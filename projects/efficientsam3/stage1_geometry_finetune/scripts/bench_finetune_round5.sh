#!/usr/bin/env bash
# GPU round 5 of the geometry-FT benchmark (issue 14; one H200, <= 7 min wall incl. every compile), from the repo
# root with plain python3 (torch, torchvision, timm, numpy; no uv / pytest / yacs needed):
#   OUT_DIR=/tmp/o bash projects/efficientsam3/stage1_geometry_finetune/scripts/bench_finetune_round5.sh
#   TINY=1 OUT_DIR=/tmp/o bash ...   CPU smoke run (tiny stand-in; aot_eager instead of inductor, no CUDA graphs)
# One process: ES-RV-M batch 4, fp16 AMP, 16 boxes + 16 points, level 72, fp16 frozen path. Rows in this order
# (the suite saves its JSON after every row, so a timeout keeps what ran):
#   stage-1 step (the trainer's, and without its loss-part reads), student fwd+bwd, profile of the stage-1 step;
#   then per frozen-path mode - eager, graphed (MODEL.COMPILE_FROZEN reduce-overhead: inductor + CUDA graphs),
#   compiled (torch.compile default, round 4's mode) - frozen path for teacher / student, FT step cached (host
#   cache = the trainer's default; device cache = DISTILL.CACHE_TEACHER_DEVICE_GB), uncached, and one profiled
#   cached step (top kernels / CPU ops, cudaStreamSynchronize / cudaMemcpy* counts, GPU busy vs wall).
# The compiles are the slow part (round 4: 193 s for "compiled"); graphed runs before compiled because compiled
# was measured in round 4 (148.1 ms cached) and graphed is new; compiled reuses the Triton kernels graphed built.
# Writes $OUT_DIR/finetune.json, $OUT_DIR/finetune.log, $OUT_DIR/gpu.txt.
set -uo pipefail
OUT_DIR="${OUT_DIR:-/tmp/o}"
mkdir -p "$OUT_DIR"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../../.." && pwd)"
cd "$ROOT"
SRC=""
for d in "$ROOT"/packages/*/src "$ROOT"/projects/*/src; do SRC="$SRC${SRC:+:}$d"; done
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
ARGS=(--suite finetune --warmup 3 --iters 15 --ft-levels 72 --ft-frozen-dtypes fp16 --ft-modes eager graphed compiled
      --ft-profile)
LIMIT="${FT_TIMEOUT:-390}"
if [ "${TINY:-0}" = 1 ]; then
  ARGS=(--suite finetune --tiny --device cpu --warmup 0 --iters 1 --ft-prompts 4 --ft-levels 72
        --ft-modes eager graphed compiled --ft-compile-backend aot_eager --ft-profile --ft-profile-top 8)
  LIMIT="${FT_TIMEOUT:-300}"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
fi
start=$SECONDS
timeout -k 10 "$LIMIT" "$PY" -m efficientsam3.bench "${ARGS[@]}" --out "$OUT_DIR/finetune.json" 2>&1 \
  | tee "$OUT_DIR/finetune.log"
echo "finetune suite: $((SECONDS - start)) s (exit ${PIPESTATUS[0]}; 124 = cut by the ${LIMIT} s timeout)" \
  | tee -a "$OUT_DIR/finetune.log"
timeout 60 "$PY" - "$OUT_DIR/finetune.json" <<'PYEOF' 2>&1 | tee -a "$OUT_DIR/finetune.log"
import json, sys
try:
    f = json.loads(open(sys.argv[1]).read())["finetune"]
except (OSError, KeyError, ValueError) as e:
    sys.exit(f"no finetune.json: {e}")
rows, s = f["rows"], f.get("summary", {})
print(f"\n== x stage-1 step (target <= 1.5){' (partial: cut off)' if f.get('partial') else ''}")
base, nosync = rows[0]["ms"], rows[1]["ms"]
print(f"stage-1 step {base:.2f} ms, without its loss-part reads {nosync:.2f} ms")
for r in rows:
    print(f"{r['part']:<22} {r.get('frozen', '-'):>8} {r['ms']:8.2f} ms (min {r['ms_min']:7.2f})  x{r['ms'] / base:.2f}"
          f"  x{r['ms'] / nosync:.2f} nosync  {r['tflop_per_s']:6.1f} TFLOP/s")
for k, v in s.items():
    if k.startswith(("compile_s", "best_cached", "target")):
        print(f"  {k}: {v}")
for mode, p in s.get("profile", {}).items():
    print(f"  profile {mode}: wall {p['wall_ms']:.1f} ms, GPU busy {p['gpu_busy_ms']:.1f} ms, "
          f"{p['kernels']} kernels, syncs/copies {p['sync_calls']}")
PYEOF
