#!/bin/sh
# Multi-process run of the guide's pipeline, for 2 GPUs (NCCL), self-contained (no ../shared, no uv, no network).
# Run from the repository root with plain python:
#   OUT=/path/for/results sh projects/gitmerge3d/scripts/ddp_gpu_run.sh
# Steps: (1) tiny Pointcept dataset from projects/gitmerge3d/data_src through the converter; (2) scripts/train.sh
# -g $GPUS with configs/demo/ddp-demo.py, stopped after 2 of 3 epochs (max_train_iters); (3) train.sh -r true
# resumes and runs the 3rd epoch; (4) tools/test.py under torchrun over $GPUS processes (fragment voting +
# SphereCrop 'all'), and once in one process; the pooled confusions must be equal; (5) $OUT/summary.json.
# Needs: torch, numpy, tqdm, addict (PYTHONPATH). data_src/: scene0000_00.bin, points/scene0000_00.bin,
# semantic_mask/scene0000_00.bin (copies of ../shared/data/pointcloud/mmdet3d-*; see README).
# Env: OUT (required), GPUS (2; 0 = CPU with NPROC gloo processes, for a check without GPUs), NPROC (2),
#      PYTHON (python3), DATA_SRC, WORK (scratch, default $OUT/work), COLUMNS (2), MAX_POINTS (none),
#      MASTER_PORT (29561), EXTRA (more config --options words for training, e.g. "num_worker=0").
set -eu
: "${OUT:?set OUT to a folder for the logs and JSON}"
ROOT=$(pwd)
P=projects/gitmerge3d
[ -d "$P/configs/demo" ] || { echo "ddp_gpu_run.sh: error: run from the repository root" >&2; exit 2; }
PY=${PYTHON:-python3}
GPUS=${GPUS:-2}
NPROC=${NPROC:-2}
DATA_SRC=${DATA_SRC:-$P/data_src}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$OUT/work}
DATA=$WORK/data
NAME=ddp-gpu-run
EXP=exp/demo/$NAME
export PYTHONPATH="$ROOT/$P/src:$ROOT/packages/merge-core/src:$ROOT/packages/run-kit/src${PYTHONPATH:+:$PYTHONPATH}"
export MASTER_PORT=${MASTER_PORT:-29561}
if [ "$GPUS" = 0 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  if [ -d /sys/class/net/lo ]; then export GLOO_SOCKET_IFNAME=lo; fi
  N=$NPROC
else
  N=$GPUS
fi
START=$(date +%s)
# run "$@" with its output shown and saved to log $1; stop the script when the command fails (sh has no pipefail)
logged() {
  log=$1
  shift
  { "$@" 2>&1 && echo 0 >"$log.rc" || echo $? >"$log.rc"; } | tee "$log"
  rc=$(cat "$log.rc")
  rm -f "$log.rc"
  [ "$rc" = 0 ] || { echo "ddp_gpu_run.sh: error: '$*' failed (rc $rc), see $log" >&2; exit 1; }
}
$PY - "$GPUS" <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "numpy", "tqdm", "addict") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"ddp_gpu_run.sh: error: missing python modules {missing} (put their wheels on PYTHONPATH)")
import torch
gpus = int(sys.argv[1])
if gpus and torch.cuda.device_count() < gpus:
    sys.exit(f"ddp_gpu_run.sh: error: GPUS={gpus} but {torch.cuda.device_count()} CUDA device(s) visible")
print("torch", torch.__version__, "cuda devices", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
EOF
MAXP=""
if [ -n "${MAX_POINTS:-}" ]; then MAXP="--max-points $MAX_POINTS"; fi
logged "$OUT/data.log" $PY -m gitmerge3d.tools.demo_data "$DATA_SRC" "$DATA" --columns "${COLUMNS:-2}" $MAXP

cd "$P"
rm -rf "$EXP"
ROOTS="data.train.data_root=$DATA data.val.data_root=$DATA data.test.data_root=$DATA"
# 8 train scenes, batch 4 over 2 processes: 2 iterations per epoch; stop after 2 epochs (4 iterations)
T0=$(date +%s)
logged "$OUT/train.log" sh scripts/train.sh -p "$PY" -m 1 -g "$N" -d demo -c ddp-demo -n "$NAME" $ROOTS \
  max_train_iters=4 ${EXTRA:-}
T1=$(date +%s)
logged "$OUT/resume.log" sh scripts/train.sh -p "$PY" -m 1 -g "$N" -d demo -n "$NAME" -r true \
  max_train_iters=None ${EXTRA:-}
T2=$(date +%s)
W="weight=$EXP/model/model_best.pth"
logged "$OUT/test-$N.log" $PY -m torch.distributed.run --standalone --nproc_per_node="$N" tools/test.py \
  --config-file "$EXP/config/config.py" --options "$W" "save_path=$OUT/test-$N"
T3=$(date +%s)
logged "$OUT/test-1.log" $PY tools/test.py --config-file "$EXP/config/config.py" --options "$W" \
  "save_path=$OUT/test-1"
T4=$(date +%s)
mkdir -p "$OUT/exp"
cp -r "$EXP/log" "$EXP/config" "$OUT/exp/"
$PY - "$OUT" "$EXP" "$N" "$GPUS" "$DATA" $((T1 - T0)) $((T2 - T1)) $((T3 - T2)) $((T4 - T3)) $((T4 - START)) <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
import torch
out, exp, n, gpus, data = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
secs = dict(zip(("train_s", "resume_s", "test_multi_s", "test_single_s", "total_s"), map(int, sys.argv[6:11])))
ckpt = torch.load(exp / "model" / "model_last.pth", map_location="cpu", weights_only=True)
multi = json.loads((out / f"test-{n}" / "result" / "metrics.json").read_text())
single = json.loads((out / "test-1" / "result" / "metrics.json").read_text())
labelled = sum(int((np.load(f) != -1).sum()) for f in (data / "val").glob("*/segment20.npy"))
history = json.loads((exp / "log" / "history.json").read_text())
checks = {
    "resumed_to_epoch_3_step_6": (ckpt["epoch"], ckpt["step"]) == (3, 6),
    "rng_states_per_rank": isinstance(ckpt.get("rng"), list) and len(ckpt["rng"]) == n,
    "test_world_size": multi.get("world_size") == n,
    "multi_equals_single_confusion": multi["confusion"] == single["confusion"],
    "each_val_point_counted_once": int(np.sum(multi["confusion"])) == labelled,
    "all_val_scenes": len(multi["scenes"]) == len(list((data / "val").iterdir())),
}
summary = {
    "device": "cuda" if gpus else "cpu", "processes": n, "epoch": ckpt["epoch"], "step": ckpt["step"],
    "test_mIoU": multi["mIoU"], "test_allAcc": multi["allAcc"], "labelled_val_points": labelled,
    "history": history, "checks": checks, **secs,
}
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
print(f"{'check':<34} ok")
for k, v in checks.items():
    print(f"{k:<34} {v}")
print(" ".join(f"{k}={v}" for k, v in secs.items()))
print(f"wrote {out / 'summary.json'}")
sys.exit(0 if all(checks.values()) else 1)
EOF
