#!/bin/sh
# Pointcept-style launcher, run from projects/gitmerge3d:
#   sh scripts/train.sh -m 1 -g 1 -d sonata -c <config> -n <name> -w <weight> [-r true] [-p python]
# -g GPUs per machine (torchrun DDP when > 1 or -m > 1), -m machines (set MASTER_ADDR/MASTER_PORT/NODE_RANK),
# -r true resumes exp/<d>/<name>/model/model_last.pth with the run's saved config.
# Extra KEY=VALUE words after the flags are passed on as config --options.
set -e
PYTHON=${PYTHON:-python}
DATASET=scannet
CONFIG=None
EXP_NAME=debug
WEIGHT=None
RESUME=false
NUM_GPU=1
NUM_MACHINE=1
while getopts "p:d:c:n:w:g:m:r:" opt; do
  case $opt in
    p) PYTHON=$OPTARG ;;
    d) DATASET=$OPTARG ;;
    c) CONFIG=$OPTARG ;;
    n) EXP_NAME=$OPTARG ;;
    w) WEIGHT=$OPTARG ;;
    g) NUM_GPU=$OPTARG ;;
    m) NUM_MACHINE=$OPTARG ;;
    r) RESUME=$OPTARG ;;
    *) echo "train.sh: error: unknown flag (use -p -d -c -n -w -g -m -r)" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
case $NUM_GPU in ''|*[!0-9]*|0) echo "train.sh: error: -g must be a positive int, got '$NUM_GPU'" >&2; exit 2 ;; esac
case $NUM_MACHINE in ''|*[!0-9]*|0) echo "train.sh: error: -m must be a positive int, got '$NUM_MACHINE'" >&2; exit 2 ;; esac
case $RESUME in true|false) ;; *) echo "train.sh: error: -r must be true or false, got '$RESUME'" >&2; exit 2 ;; esac

EXP_DIR=exp/${DATASET}/${EXP_NAME}
if [ "$RESUME" = "true" ]; then
  CONFIG_FILE=${EXP_DIR}/config/config.py
  [ -f "$CONFIG_FILE" ] || { echo "train.sh: error: -r true but '$CONFIG_FILE' does not exist" >&2; exit 2; }
  OPTS="save_path=${EXP_DIR} resume=True"
else
  [ "$CONFIG" != "None" ] || { echo "train.sh: error: -c <config name> is required" >&2; exit 2; }
  CONFIG_FILE=configs/${DATASET}/${CONFIG}.py
  [ -f "$CONFIG_FILE" ] || { echo "train.sh: error: -c: '$CONFIG_FILE' does not exist" >&2; exit 2; }
  OPTS="save_path=${EXP_DIR}"
  if [ "$WEIGHT" != "None" ]; then OPTS="$OPTS weight=${WEIGHT}"; fi
fi
echo "Experiment dir: ${EXP_DIR}  config: ${CONFIG_FILE}  GPUs: ${NUM_GPU} x ${NUM_MACHINE}"
export PYTHONPATH=./src:${PYTHONPATH}
if [ "$NUM_GPU" -eq 1 ] && [ "$NUM_MACHINE" -eq 1 ]; then
  exec $PYTHON tools/train.py --config-file "$CONFIG_FILE" --options $OPTS "$@"
fi
exec $PYTHON -m torch.distributed.run --nnodes="$NUM_MACHINE" --nproc_per_node="$NUM_GPU" \
  --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29511}" \
  tools/train.py --config-file "$CONFIG_FILE" --options $OPTS "$@"
