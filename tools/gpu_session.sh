#!/usr/bin/env bash
# One prepared call for a lent GPU machine (a lease has about 15 minutes of device time, one
# command at most 10): everything the open GPU issues ask for, in order, each phase under its
# own time limit and all of them under one deadline, every log under $OUT.
#
#   RATTENTION_COMMIT=<sha> tools/gpu_session.sh [phase ...]      (default: check sanitize ncu)
#
# Phases:
#   check     tools/gpu_check.py: build for this GPU's arch, tests/test_*_cuda.py, the benchmark
#             (SWA vs FlexAttention, RAttention w=512 vs SWA w=2048, RLA vs flash-linear-attention
#             when its wheels were carried in .whl/: `make gpu-wheels`), the JSON into $OUT.
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck, initcheck over
#             tools/gpu_sanitize_cases.py (small cases of every op, checked against the reference).
#   ncu       Nsight Compute (--clock-control none: the clocks stay as found) on one forward +
#             backward at S1 and one decode step at D1: per kernel duration, SM / memory
#             throughput, achieved occupancy, registers, shared memory, as CSV.
# `sanitize` and `ncu` need the extension `check` built (in this same call: a fresh machine
# has nothing). Environment: RATTENTION_DEADLINE_S (default 570: seconds from the start after
# which no phase starts and a running one is cut), RATTENTION_COMMIT (the checkout's commit:
# the machine gets the tree without .git).
# Prepare here first: `make cutlass gpu-wheels`, then run it through the device tool with
# carry ["third_party/cutlass", ".whl"]; copy what comes back into benchmarks/results/.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/build/gpu-session}
# What comes back from the device machine is at most 8 files: summary.txt, the gpu_check JSON,
# ncu_details.csv, and logs.tar.gz with every log (and the ncu report) of $LOGS.
LOGS="$OUT/logs"
mkdir -p "$LOGS"
START=$(date +%s)
DEADLINE=${RATTENTION_DEADLINE_S:-570}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(check sanitize ncu)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

left() { echo $((DEADLINE - ($(date +%s) - START))); }
note() { echo "$*" >>"$SUMMARY"; }

# run NAME LIMIT_S CMD...: the command under min(LIMIT_S, time left), its log in $OUT/NAME.log
run() {
  local name=$1 limit=$2
  shift 2
  local avail
  avail=$(left)
  if [ "$avail" -lt 20 ]; then
    note "$name: skipped (${avail} s left before the deadline)"
    return 0
  fi
  [ "$limit" -gt "$avail" ] && limit=$avail
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - t0))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note "$name: cut at ${limit} s (rc $rc); tail of $name.log:"
  else
    note "$name: rc $rc in ${took} s"
  fi
  tail -n 4 "$LOGS/$name.log" | sed 's/^/    /' >>"$SUMMARY"
  return 0
}

{
  echo "gpu_session $(date -u +%Y-%m-%dT%H:%M:%SZ) commit ${RATTENTION_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  nvcc --version 2>&1 | tail -n 1
} >>"$SUMMARY" 2>&1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$LOGS/wheels.log" 2>&1 \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    && note "wheels: $(ls .whl | tr '\n' ' ')"
fi

# the extension as tools/gpu_check.py builds it (in place), with its CUDA kernels
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH}
has_cuda_build() {
  "$PY" -c "import sys, rattention_ext; sys.exit(0 if rattention_ext.build_info().get('cuda') else 1)" \
    >/dev/null 2>&1
}

for phase in "${PHASES[@]}"; do
  case $phase in
    check)
      run gpu_check 420 "$PY" tools/gpu_check.py
      cp benchmarks/results/gpu_check_*.json "$OUT/" 2>/dev/null
      ;;
    sanitize)
      if ! has_cuda_build; then
        note "sanitize: skipped (no extension with CUDA kernels importable: run check first)"
        continue
      fi
      for tool in memcheck racecheck synccheck initcheck; do
        extra=()
        # racecheck follows every shared-memory access: the RLA and SWA cases only
        [ "$tool" = racecheck ] && extra=(--only forward --only swa_rotary)
        run "sanitize_$tool" 75 compute-sanitizer --tool "$tool" --error-exitcode 9 \
          --print-limit 20 "$PY" tools/gpu_sanitize_cases.py "${extra[@]}"
      done
      ;;
    ncu)
      if ! has_cuda_build; then
        note "ncu: skipped (no extension with CUDA kernels importable: run check first)"
        continue
      fi
      # only the launches between cudaProfilerStart / Stop (the shapes' second runs)
      run ncu 100 ncu --clock-control none --profile-from-start off --target-processes all \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        -f -o "$LOGS/ncu" "$PY" tools/gpu_profile_cases.py
      if [ -f "$LOGS/ncu.ncu-rep" ]; then
        ncu --import "$LOGS/ncu.ncu-rep" --csv --page details >"$OUT/ncu_details.csv" 2>&1
        ncu --import "$LOGS/ncu.ncu-rep" --print-summary per-kernel >"$LOGS/ncu_summary.txt" 2>&1
      fi
      ;;
    *)
      note "unknown phase '$phase' (check, sanitize, ncu)"
      ;;
  esac
done
note "gpu_session: done in $(($(date +%s) - START)) s"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
echo "=== summary ($OUT/summary.txt; logs in logs.tar.gz)"
cat "$SUMMARY"
