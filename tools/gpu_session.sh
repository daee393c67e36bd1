#!/usr/bin/env bash
# One prepared call for a lent GPU machine (a lease has about 15 minutes of device time, one
# command at most 10): the GPU build, tests, benchmarks, sanitizers and profiles, in order, each
# phase under its own time limit and all of them under one deadline, every log under $OUT.
#
#   RATTENTION_COMMIT=<sha> tools/gpu_session.sh [phase ...]   (default: check sanitize ncu)
#
# Phases (tools/gpu_check.py does build, tests and bench; each is a phase of its own so that a
# hanging test cannot cost the benchmark, and a later call on a warm machine skips the build):
#   build     the extension for this GPU's arch, in place (python/rattention_ext/_C*.so);
#   tests     tests/test_*_cuda.py;
#   bench     SWA vs FlexAttention, RAttention w=512 vs SWA w=2048, RLA vs flash-linear-attention
#             (when its wheels were carried in .whl/: `make gpu-wheels`); the JSON into $OUT;
#   check     build, tests, bench;
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck, initcheck over
#             tools/gpu_sanitize_cases.py (small cases of every op, checked against the reference);
#   ncu       Nsight Compute (--clock-control none: the clocks stay as found) over
#             tools/gpu_profile_cases.py (S1 forward + backward, D1 and D2 decode steps): per
#             kernel duration, SM / memory throughput, occupancy, registers, shared memory (CSV).
# Every phase after `build` builds first where no extension with CUDA kernels imports (a fresh
# machine has nothing). Environment: RATTENTION_DEADLINE_S (default 570: seconds from the start
# after which no phase starts and a running one is cut), RATTENTION_COMMIT (the checkout's
# commit: the machine gets the tree without .git).
# Prepare here first: `make cutlass gpu-wheels`, then run it through the device tool with
# carry ["third_party/cutlass", ".whl"]; copy what comes back into benchmarks/results/.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/build/gpu-session}
# What comes back from the device machine is at most 8 files: summary.txt, the gpu_check JSON,
# ncu_details.csv, and logs.tar.gz with every log (and the ncu report) of $LOGS, which lives
# outside $OUT and is archived after every phase, so that a call cut by the device tool still
# returns few files, all current.
LOGS="$ROOT/build/gpu-session-logs"
rm -rf "$LOGS"
mkdir -p "$LOGS" "$OUT"
touch "$LOGS/.start"
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
pack() {
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" \
    && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

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
  pack
  return 0
}

{
  echo "gpu_session $(date -u +%Y-%m-%dT%H:%M:%SZ) commit ${RATTENTION_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  nvcc --version 2>&1 | tail -n 1
  # what the build and tests need (a missing one fails the build in seconds)
  echo "preflight: $(for c in cmake ninja gcc nvcc compute-sanitizer ncu; do
    command -v "$c" >/dev/null && printf '%s ' "$c" || printf 'NO-%s ' "$c"; done)"
  "$PY" -c "import os, sysconfig, importlib.util as u
print('python:', ' '.join(m if u.find_spec(m) else 'NO-' + m for m in ('pybind11', 'pytest', 'triton')),
      'Python.h' if os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')) else 'NO-Python.h')"
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

built=no  # yes, or failed: a build that failed is not tried again in this call
do_build() {  # incremental where a build is there
  run build 300 "$PY" tools/gpu_check.py --skip-tests --skip-bench
  if has_cuda_build; then
    built=yes
    return 0
  fi
  built=failed
  note "no extension with CUDA kernels after the build (build.log): the GPU phases are skipped"
  return 1
}
need_build() {  # a build that imports, else one try
  [ $built = yes ] && return 0
  [ $built = failed ] && return 1
  if has_cuda_build; then
    built=yes
    return 0
  fi
  do_build
}

expanded=()
for phase in "${PHASES[@]}"; do
  if [ "$phase" = check ]; then expanded+=(build tests bench); else expanded+=("$phase"); fi
done

for phase in "${expanded[@]}"; do
  case $phase in
    build)  # asked for: always
      do_build
      ;;
    tests)
      need_build || continue
      run tests 300 "$PY" tools/gpu_check.py --skip-build --skip-bench
      ;;
    bench)
      need_build || continue
      run bench 200 "$PY" tools/gpu_check.py --skip-build --skip-tests
      # this call's JSON only (a warm machine keeps earlier calls' files)
      find benchmarks/results -name 'gpu_check_*.json' -newer "$LOGS/.start" -exec cp {} "$OUT/" \;
      ;;
    sanitize)
      need_build || continue
      for tool in memcheck racecheck synccheck initcheck; do
        extra=()
        # racecheck follows every shared-memory access: the RLA and SWA cases only
        [ "$tool" = racecheck ] && extra=(--only forward --only swa_rotary)
        # no caching allocator: memcheck then sees accesses past a tensor inside torch's pools,
        # initcheck reads of memory nothing wrote; no expandable segments (false reports)
        run "sanitize_$tool" 75 env -u PYTORCH_CUDA_ALLOC_CONF -u PYTORCH_ALLOC_CONF \
          PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
          --launch-timeout 120 --print-limit 20 "$PY" tools/gpu_sanitize_cases.py \
          ${extra[@]+"${extra[@]}"}
        # rc 9 also means a CUDA API error: the kind of report goes into the summary
        grep -m 4 -E "ERROR SUMMARY|Invalid __|Hazard|Uninitialized|Program hit|barrier" \
          "$LOGS/sanitize_$tool.log" | sed 's/^/    /' >>"$SUMMARY"
        grep -q "ERROR SUMMARY" "$LOGS/sanitize_$tool.log" \
          || note "    sanitize_$tool: no ERROR SUMMARY line: the process was not checked"
      done
      ;;
    ncu)
      need_build || continue
      # only the launches between cudaProfilerStart / Stop (the shapes' second runs)
      run ncu 100 ncu --clock-control none --profile-from-start off --target-processes all \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        -f -o "$LOGS/ncu" "$PY" tools/gpu_profile_cases.py
      if [ -f "$LOGS/ncu.ncu-rep" ]; then
        ncu --import "$LOGS/ncu.ncu-rep" --csv --page details >"$OUT/ncu_details.csv" 2>>"$LOGS/ncu.log"
        ncu --import "$LOGS/ncu.ncu-rep" --print-summary per-kernel >"$LOGS/ncu_summary.txt" 2>&1
      fi
      ;;
    *)
      note "unknown phase '$phase' (build, tests, bench, check, sanitize, ncu)"
      ;;
  esac
done
note "gpu_session: done in $(($(date +%s) - START)) s"
pack
echo "=== summary ($OUT/summary.txt; logs in logs.tar.gz)"
cat "$SUMMARY"
