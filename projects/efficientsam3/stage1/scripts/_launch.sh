# Shared by the stage-1 scripts: KEY=VALUE arguments, then torchrun over GPUS processes (or one plain
# process with GPUS=0 / no CUDA). Sourced, not run.
for arg in "$@"; do
  case "$arg" in
    *=*) export "${arg%%=*}"="${arg#*=}" ;;
    *) EXTRA+=("$arg") ;;
  esac
done
PY="${PYTHON:-python}"
if [ -z "${GPUS:-}" ]; then
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
launch() {
  if [ "${GPUS}" -gt 0 ] 2>/dev/null; then
    "$PY" -m torch.distributed.run --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
      --nproc_per_node="${GPUS}" --master_port="${MASTER_PORT:-29501}" "$@"
  else
    "$PY" "$@" --device cpu
  fi
}
