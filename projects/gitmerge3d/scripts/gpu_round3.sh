#!/bin/bash
# Round 3 (issue 11): spconv-triton on a bare H200 with the narrowed autotune (GITMERGE3D_SPCONV_TUNE=narrow).
#  1. convert the real ScanNet scene once (project converter, estimated normals)
#  2. time gitmerge3d.tools.spconv_warmup for Sonata 0c, rows r0-flash + patch@0.9 (cold Triton cache), then
#     --verify: a fresh process on the same TRITON_CACHE_DIR (cache hit: first forward ~ second)
#  3. launch_bench on the real scene: torch (pure-torch conv) vs auto (spconv-triton), r0-flash and
#     patch@0.9, latency / peak memory, --profile 25 (top kernels + sparse-conv / attention time shares)
#  4. pytest -m gpu of the spconv backend (tests/test_gpu.py), bounded
#  5. if time is left: the same warm-up with --tune fixed on its own cold cache (seconds only)
# Every part runs under `timeout` against one deadline (<= 345 s after start). Run from the repository
# root with plain python3; writes everything under $OUT_DIR (default /tmp/o):
#   round3.log, warmup-narrow.log + warmup-narrow/spconv-warmup.json, launch-bench.{json,md},
#   profile-*.txt, bench.log, pytest-gpu.log, warmup-fixed.log (+ json), timings.txt
set -u
ROOT=$(pwd)
export PYTHONPATH="$ROOT/projects/gitmerge3d/src:$ROOT/packages/merge-core/src:$ROOT/packages/run-kit/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT_DIR:-/tmp/o}
mkdir -p "$OUT_DIR"
START=$(date +%s)
DEADLINE=$((START + ${BUDGET:-345}))
LOG="$OUT_DIR/round3.log"
TIMES="$OUT_DIR/timings.txt"
: >"$TIMES"
say() { echo "[round3 +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
left() { echo $((DEADLINE - $(date +%s))); }
# part NAME MAX_S LOGFILE CMD...: run CMD (output to LOGFILE) under timeout min(MAX_S, time left); log its
# wall seconds and exit code
part() {
  local name=$1 max=$2 out=$3 t0 rc lim
  shift 3
  lim=$(left)
  [ "$lim" -gt "$max" ] && lim=$max
  LAST_RC=skipped
  if [ "$lim" -lt 15 ]; then say "skip $name: ${lim}s left"; echo "$name skipped" >>"$TIMES"; return 0; fi
  say "start $name (limit ${lim}s)"
  t0=$(date +%s.%N)
  timeout -k 5 "$lim" "$@" >"$out" 2>&1
  rc=$?
  LAST_RC=$rc
  local dt
  dt=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  say "end $name: rc=$rc, ${dt}s"
  echo "$name rc=$rc wall_s=$dt" >>"$TIMES"
  return 0
}

SCENE=${SCENE:-}
for c in ../shared/data/pointcloud/mmdet3d-scannet-demo/scene0000_00.bin \
         shared/data/pointcloud/mmdet3d-scannet-demo/scene0000_00.bin \
         projects/gitmerge3d/data_src/scene0000_00.bin projects/gitmerge3d/scene0000_00.bin; do
  if [ -z "$SCENE" ] && [ -e "$c" ]; then SCENE=$c; fi
done
if [ -z "$SCENE" ]; then say "no scene found; set SCENE or carry projects/gitmerge3d/data_src"; exit 2; fi
if ! python3 -c "import spconv_triton" 2>/dev/null; then
  WHEEL=$(ls "$ROOT"/.whl/spconv_triton-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$WHEEL" ]; then export PYTHONPATH="$PYTHONPATH:$WHEEL"; fi  # pure python: importable from the zip
fi
# a cold cache on purpose (the machine starts bare anyway); kept for the whole script, not returned
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/gitmerge3d-triton-narrow}
export TRITON_CACHE_AUTOTUNING=1 GITMERGE3D_SPCONV_TUNE=narrow
{
  nvidia-smi -L
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import spconv_triton as s; print('spconv_triton', getattr(s, '__version__', '?'), s.__file__)"
  echo "scene $SCENE, TRITON_CACHE_DIR $TRITON_CACHE_DIR (entries: $(ls "$TRITON_CACHE_DIR" 2>/dev/null | wc -l))"
} 2>&1 | tee -a "$LOG"

SCENE_DIR="$OUT_DIR/.scene/scene0000_00"
part convert 60 "$OUT_DIR/convert.log" python3 -m gitmerge3d.tools.convert "$SCENE" "$OUT_DIR/.scene" \
  --name scene0000_00 --normals estimate
[ "$LAST_RC" = 0 ] || SCENE_DIR=$SCENE  # the tools convert a raw .bin themselves

part warmup-narrow 170 "$OUT_DIR/warmup-narrow.log" python3 -m gitmerge3d.tools.spconv_warmup --scene "$SCENE_DIR" \
  --tiles 1 --rows r0-flash,patch@0.9 --tune narrow --verify --time-budget 110 --cache-dir "$TRITON_CACHE_DIR" \
  --out-dir "$OUT_DIR/warmup-narrow"
tail -n 30 "$OUT_DIR/warmup-narrow.log" | tee -a "$LOG"
say "triton cache after warm-up: $(du -sh "$TRITON_CACHE_DIR" 2>/dev/null | cut -f1), $(ls "$TRITON_CACHE_DIR" | wc -l) entries, $(find "$TRITON_CACHE_DIR" -name '*.autotune.json' | wc -l) autotune choices"

part bench 120 "$OUT_DIR/bench.log" python3 -m gitmerge3d.tools.launch_bench --scene "$SCENE_DIR" --tiles 1 \
  --rows r0-flash,patch@0.9 --backends torch,auto --profile 25 --time-budget 100 --out-dir "$OUT_DIR"
grep -E "^real |time:" "$OUT_DIR/bench.log" | tee -a "$LOG"
[ -f "$OUT_DIR/launch-bench.md" ] && sed -n '1,12p;/time shares/,/^$/p' "$OUT_DIR/launch-bench.md" | tee -a "$LOG"

part pytest-gpu 100 "$OUT_DIR/pytest-gpu.log" python3 -m pytest -q -m gpu -p no:cacheprovider \
  projects/gitmerge3d/tests/test_gpu.py
tail -n 15 "$OUT_DIR/pytest-gpu.log" | tee -a "$LOG"

# same warm-up, one config per key (nothing timed), own cold cache: how much the timing itself costs
if [ "$(left)" -gt 60 ]; then
  TRITON_CACHE_DIR=/tmp/gitmerge3d-triton-fixed GITMERGE3D_SPCONV_TUNE=fixed \
    part warmup-fixed 90 "$OUT_DIR/warmup-fixed.log" python3 -m gitmerge3d.tools.spconv_warmup --scene "$SCENE_DIR" \
    --tiles 1 --rows r0-flash,patch@0.9 --tune fixed --time-budget 60 --cache-dir /tmp/gitmerge3d-triton-fixed \
    --out-dir "$OUT_DIR/warmup-fixed"
  tail -n 5 "$OUT_DIR/warmup-fixed.log" | tee -a "$LOG"
else
  say "skip warmup-fixed: $(left)s left"
fi
rm -rf "$OUT_DIR/.scene" "$OUT_DIR/warmup-narrow/.scene" "$OUT_DIR/warmup-narrow/verify/.scene" \
  "$OUT_DIR/warmup-fixed/.scene"
cat "$TIMES" | tee -a "$LOG"
say "done"
