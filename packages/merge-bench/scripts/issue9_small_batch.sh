#!/usr/bin/env bash
# Issue 9 target 2 on one GPU: the per-layer matching cost at batch 1-8 under CUDA graphs. Graphed plain timm vs
# graphed forced merging (merge_core.kernels.graph.cuda_graph) in four plan variants: old (torch k.mean(1) +
# matcher + rank + unm kernels), new (defaults: head mean inside the plan, rank + unm in one launch), fused /
# onestep (the head mean forced into the matcher / the merge scanning r <= 64 sources in one step). fp16, random weights, prop_attn off and
# on, ViT-L/16@512 bs1 r=40, ViT-B/16 bs8 r=16, ViT-L/16@224 bs8 r=8; 5 interleaved rounds (Williams orders) x 16
# CUDA-event-timed replays, medians. Also: plans/head mean vs the torch path on the GPU (check), one layer's plan
# per variant (micro), a torch.profiler table of one eager forward per variant (profile), and the GPU tests of
# packages/merge-core/tests/test_small_batch_plan.py (gputests: compiled kernels, CUDA-graph replays, timm path).
# Everything lands in $OUT_DIR (issue9_small_batch_<step>.json/.log). Each step runs under its own timeout;
# Triton compiles on first use and later steps reuse the cache.
# Total wall time: ~100-150 s on an H200 (step limits 70 + 15 + 15 + 15 + 35 s = 150 s).
# Run from the repo root with PYTHONPATH set to every member's src folder:
#   OUT_DIR=/tmp/o bash packages/merge-bench/scripts/issue9_small_batch.sh
# CPU smoke test (kernels under Triton's interpreter, tiny ViT):
#   TINY=1 OUT_DIR=/tmp/o bash packages/merge-bench/scripts/issue9_small_batch.sh
set -u
OUT_DIR=${OUT_DIR:-/tmp/issue9_small_batch}
mkdir -p "$OUT_DIR"
export MERGE_CORE_CACHE_DIR="$OUT_DIR/policy-cache"  # no policy decision from earlier runs
PY=${PYTHON:-python3}
if [ "${TINY:-0}" = "1" ]; then
  export TRITON_INTERPRET=1
  COMMON=(--device cpu --rows tiny:2:2 --rounds 1 --iters 1 --warmup 0 --profile-rows 12)
  LIMITS=(e2e:240 check:120 micro:120 profile:120)
else
  COMMON=(--rows "${ROWS:-vit_l_512:1:40,vit_b_224:8:16,vit_l_224:8:8}" --rounds "${ROUNDS:-5}" --iters 16 --warmup 3)
  # e2e first (the issue's numbers; it pays most Triton compiles, later steps reuse the cache)
  LIMITS=(e2e:${E2E_TIMEOUT:-70} check:15 micro:15 profile:${PROFILE_TIMEOUT:-40} gputests:35)
fi
status=0
for item in "${LIMITS[@]}"; do
  step=${item%%:*}
  limit=${item##*:}
  echo "=== step $step (timeout ${limit}s) $(date -u +%H:%M:%S)"
  if [ "$step" = "gputests" ]; then  # compiled kernels vs the torch path, CUDA-graph replays, timm keys path
    timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider -m gpu packages/merge-core/tests/test_small_batch_plan.py \
      2>&1 | tee "$OUT_DIR/issue9_small_batch_$step.log"
  else
    timeout "$limit" "$PY" -m merge_bench.small_batch --steps "$step" "${COMMON[@]}" \
      --out "$OUT_DIR/issue9_small_batch_$step.json" 2>&1 | tee "$OUT_DIR/issue9_small_batch_$step.log"
  fi
  rc=${PIPESTATUS[0]}
  echo "step $step exit $rc"
  [ "$rc" = "0" ] || status=$rc
done
echo "exit $status"
exit "$status"
