#!/usr/bin/env bash
# One-command GPU check of pycomm (see docs/GPU.md): build with CUDA, the CUDA test suite,
# compute-sanitizer memcheck + racecheck over every CUDA kernel, the CUDA kernel benchmark
# and the collective benchmark. Each step writes benchmarks/results/gpu_<step>.txt (with a
# header: card, driver, torch, date, command); a failed step is recorded and the next one
# runs. Ends with a table (step, PASS/FAIL/SKIP, key number); exit code 0 iff none failed.
#
#   bash benchmarks/gpu_check.sh                      # everything, ~10 minutes at most
#   PY=/path/to/python bash benchmarks/gpu_check.sh   # use that interpreter
#   STEPS="tests memcheck" bash benchmarks/gpu_check.sh   # a subset (no build: uses the
#                                                     # pycomm._C already built in place)
# Environment: PY, STEPS (build tests memcheck racecheck bench_kernels bench_allreduce
# bench_allreduce_staged bench_collectives bench_dp),
# BUDGET_S (whole-run wall budget, default 570: each step gets at most what is left),
# CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS,
# OUT (if set to a directory, every result file is also copied there after each step).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RES="$ROOT/benchmarks/results"
mkdir -p "$RES"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
STEPS=${STEPS:-"build tests memcheck racecheck bench_kernels bench_allreduce bench_allreduce_staged bench_collectives bench_dp"}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0"}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
export PYTHONUNBUFFERED=1
export PATH="$PATH:$CUDA_HOME/bin"

# ---------------------------------------------------------------- interpreter
py_ok() { [ -n "$1" ] && "$1" -c "import torch, numpy, pytest" >/dev/null 2>&1; }
if [ -n "${PY:-}" ]; then
  py_ok "$PY" || echo "WARNING: PY=$PY cannot import torch, numpy and pytest"
else
  PY=""
  for c in python3 python "$ROOT/.venv/bin/python" /opt/torch/.venv/bin/python3; do
    if py_ok "$(command -v "$c" 2>/dev/null || echo "$c")"; then PY=$(command -v "$c" 2>/dev/null || echo "$c"); break; fi
  done
  if [ -z "$PY" ]; then
    echo "== no python with torch+numpy+pytest found: creating $ROOT/.venv (needs network)"
    python3 -m venv "$ROOT/.venv"
    PY="$ROOT/.venv/bin/python"
    "$PY" -m pip install -q torch==2.14.1 numpy pytest ninja pybind11 || echo "WARNING: pip install failed"
  fi
fi

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
GPU_NAME=${GPU_NAME:-"no GPU (nvidia-smi failed)"}
DRIVER=${DRIVER:-"?"}
TORCH_V=$("$PY" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null || echo "torch unavailable")
echo "== GPU: $GPU_NAME, driver $DRIVER"
echo "== python: $PY ($("$PY" --version 2>&1)), torch $TORCH_V"
case "$TORCH_V" in 2.14.1*) ;; *) echo "   note: CI pins torch 2.14.1; this run uses torch $TORCH_V" ;; esac

with_cuda() { "$PY" -c "import pycomm; print(bool(getattr(pycomm._C, 'with_cuda', False)))" 2>/dev/null || echo "import-failed"; }

# ---------------------------------------------------------------- step machinery
declare -a T_STEP=() T_STATUS=() T_KEY=() T_SECS=()
ANY_FAIL=0

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

header() {  # header FILE COMMAND
  {
    echo "# card:    $GPU_NAME"
    echo "# driver:  $DRIVER"
    echo "# torch:   $TORCH_V"
    echo "# python:  $PY"
    echo "# commit:  $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "# date:    $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "# command: $2"
    echo
  } >"$1"
}

copy_out() {
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp -f "$RES"/gpu_*.txt "$OUT"/ 2>/dev/null || true; fi
}

record() {  # record STEP STATUS KEY SECS
  T_STEP+=("$1"); T_STATUS+=("$2"); T_KEY+=("$3"); T_SECS+=("$4")
  if [ "$2" = FAIL ]; then ANY_FAIL=1; fi
  echo "== $1: $2 ($3) in ${4}s"
  copy_out
}

RC=0
SECS=0
run_step() {  # run_step STEP MAX_SECONDS COMMAND... ; output in $RES/gpu_STEP.txt, sets RC and SECS
  local step=$1 max=$2
  shift 2
  local file="$RES/gpu_$step.txt" budget
  budget=$(left)
  if [ "$budget" -lt "$max" ]; then max=$budget; fi
  header "$file" "$*"
  echo "== [$step] $* (limit ${max}s)"
  local t0
  t0=$(date +%s)
  RC=0
  if [ "$max" -lt 15 ]; then
    echo "not run: the run's time budget (BUDGET_S=$BUDGET_S) is spent" | tee -a "$file"
    RC=124
  else
    set +e
    timeout --kill-after=10 "$max" "$@" 2>&1 | tee -a "$file"
    RC=${PIPESTATUS[0]}
    set -e
    if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then echo "TIMEOUT after ${max}s" | tee -a "$file"; fi
  fi
  SECS=$(($(date +%s) - t0))
  echo "# exit code: $RC, ${SECS}s" >>"$file"
}

want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ---------------------------------------------------------------- 1. build
if want build; then
  run_step build 300 bash -c "echo 'CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS'; \
    nvcc --version | tail -2; \
    PYCOMM_CUDA=1 '$PY' -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -25; \
    rc=\${PIPESTATUS[0]}; \
    '$PY' -c \"import pycomm, torch; print('pycomm', pycomm.__version__, 'torch', torch.__version__, 'with_cuda', pycomm._C.with_cuda)\"; \
    exit \$rc"
  WC=$(with_cuda)
  if [ "$RC" -eq 0 ] && [ "$WC" = "True" ]; then record build PASS "with_cuda=True" "$SECS"
  else record build FAIL "pip rc=$RC with_cuda=$WC" "$SECS"; fi
elif [ "$(with_cuda)" != "True" ]; then
  echo "== build step not selected and pycomm._C.with_cuda is $(with_cuda): CUDA steps will fail or skip"
fi

# ---------------------------------------------------------------- 2. CUDA tests
if want tests; then
  XDIST=""
  if "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST="-n 4"; fi
  # shellcheck disable=SC2086
  run_step tests 300 "$PY" -m pytest tests/python/test_cuda.py -m cuda -q -ra $XDIST
  f="$RES/gpu_tests.txt"
  summary=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$f" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//' || true)
  passed=$(echo "$summary" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || echo 0)
  if [ "$RC" -eq 0 ] && [ "${passed:-0}" -gt 0 ] && [ "$(with_cuda)" = "True" ]; then
    record tests PASS "${summary:-?}" "$SECS"
  else record tests FAIL "rc=$RC ${summary:-no summary}" "$SECS"; fi
fi

# ---------------------------------------------------------------- 3-4. compute-sanitizer
SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
for tool in memcheck racecheck; do
  want "$tool" || continue
  if [ ! -x "$SAN" ]; then
    header "$RES/gpu_$tool.txt" "compute-sanitizer --tool $tool"
    echo "compute-sanitizer not found (looked on PATH and in $CUDA_HOME/bin)" >>"$RES/gpu_$tool.txt"
    record "$tool" FAIL "compute-sanitizer not found" 0
    continue
  fi
  extra=""
  if [ "$tool" = memcheck ]; then extra="--leak-check no"; fi
  # shellcheck disable=SC2086
  run_step "$tool" 180 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" $extra --error-exitcode 1 \
    "$PY" benchmarks/gpu_kernels_smoke.py
  f="$RES/gpu_$tool.txt"
  key=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|launched [0-9]+' "$f" | tr '\n' ' ' | sed 's/========= //g' || true)
  if [ "$RC" -eq 0 ]; then record "$tool" PASS "${key:-?}" "$SECS"
  else record "$tool" FAIL "rc=$RC ${key:-}" "$SECS"; fi
done

# ---------------------------------------------------------------- 5. kernel benchmark
if want bench_kernels; then
  run_step bench_kernels 150 "$PY" benchmarks/bench_compression_kernels_cuda.py --numel 33554432 --world-size 4 --repeat 20
  key=$(grep -E '^KEY ' "$RES/gpu_bench_kernels.txt" | sed 's/^KEY //' || true)
  if [ "$RC" -eq 0 ]; then record bench_kernels PASS "${key:-?}" "$SECS"
  else record bench_kernels FAIL "rc=$RC" "$SECS"; fi
fi

# ---------------------------------------------------------------- 6. collective benchmark
if want bench_allreduce; then
  f="$RES/gpu_bench_allreduce.txt"
  run_step bench_allreduce 150 "$PY" -m pycomm.bench all_reduce --ranks 4 -b 8 -e 64M -f 4 --compare gloo --device cuda
  bw=$(grep -iE 'avg bus bandwidth|busbw' "$f" | tail -1 | sed 's/^ *//' || true)
  if [ "$RC" -eq 0 ]; then record bench_allreduce PASS "${bw:-see file}" "$SECS"
  else record bench_allreduce FAIL "rc=$RC" "$SECS"; fi
fi

# ---------------------------------------------------------------- 7. the same, staged
# The ranks above share one host, so their CUDA all_reduce runs over CUDA IPC; this is
# the path a multi-host group takes (pinned-host staging in overlapped chunks), on the
# same ranks, for the IPC-vs-staged comparison.
if want bench_allreduce_staged; then
  f="$RES/gpu_bench_allreduce_staged.txt"
  run_step bench_allreduce_staged 120 env PYCOMM_CUDA_IPC=0 "$PY" -m pycomm.bench all_reduce --ranks 4 -b 8 -e 64M -f 4 \
    --compare gloo --device cuda
  bw=$(grep -iE 'avg bus bandwidth|busbw' "$f" | tail -1 | sed 's/^ *//' || true)
  if [ "$RC" -eq 0 ]; then record bench_allreduce_staged PASS "${bw:-see file}" "$SECS"
  else record bench_allreduce_staged FAIL "rc=$RC" "$SECS"; fi
fi

# ---------------------------------------------------------------- 8. the other IPC collectives
# all_gather, reduce_scatter and all_to_all on CUDA tensors, each over CUDA IPC and then
# staged (PYCOMM_CUDA_IPC=0) on the same ranks; key: the three IPC/staged busbw ratios.
if want bench_collectives; then
  f="$RES/gpu_bench_collectives.txt"
  run_step bench_collectives 150 bash -c "for c in all_gather reduce_scatter all_to_all; do \
      for ipc in 1 0; do echo \"## \$c PYCOMM_CUDA_IPC=\$ipc\"; \
        PYCOMM_CUDA_IPC=\$ipc '$PY' -m pycomm.bench \$c --ranks 4 -b 1K -e 16M -f 4 --device cuda || exit 1; \
      done; done"
  key=$(awk '/^## /{name=$2; ipc=$3} /Avg bus bandwidth/{bw[name, ipc]=$NF}
             END{n=split("all_gather reduce_scatter all_to_all", cs, " ");
                 for (i=1;i<=n;i++){a=bw[cs[i],"PYCOMM_CUDA_IPC=1"]; b=bw[cs[i],"PYCOMM_CUDA_IPC=0"];
                   printf "%s %s/%s%s", cs[i], a, b, (b>0 ? sprintf(" (%.1fx)", a/b) : ""); if (i<n) printf "; "}}' "$f" || true)
  if [ "$RC" -eq 0 ]; then record bench_collectives PASS "${key:-see file}" "$SECS"
  else record bench_collectives FAIL "rc=$RC" "$SECS"; fi
fi

# ---------------------------------------------------------------- 9. data-parallel step on CUDA
# DataParallel (exact, FP16, OneBit) and torch DDP (Gloo; pycomm) on a CUDA MLP, 4 ranks on
# this host's GPUs, step vs compute-only and comm-only in the same run (overlap column).
if want bench_dp; then
  f="$RES/gpu_bench_dp.txt"
  run_step bench_dp 150 "$PY" benchmarks/bench_data_parallel.py --device cuda --ranks 4 \
    --modes ddp_gloo,dp,dp_fp16,dp_onebit,ddp_pycomm --steps 5 --warmup 2
  dp=$(grep -E '^\| dp \|' "$f" | head -1 | sed 's/^ *//' || true)
  if [ "$RC" -eq 0 ]; then record bench_dp PASS "${dp:-see file}" "$SECS"
  else record bench_dp FAIL "rc=$RC" "$SECS"; fi
fi

# ---------------------------------------------------------------- summary
SUM="$RES/gpu_summary.txt"
header "$SUM" "bash benchmarks/gpu_check.sh (STEPS=\"$STEPS\")"
{
  printf '%-16s %-6s %6s  %s\n' step result secs "key number"
  printf '%-16s %-6s %6s  %s\n' ---- ------ ---- ----------
  for i in "${!T_STEP[@]}"; do
    printf '%-16s %-6s %6s  %s\n' "${T_STEP[$i]}" "${T_STATUS[$i]}" "${T_SECS[$i]}" "${T_KEY[$i]}"
  done
  echo
  echo "total $(($(date +%s) - START))s; overall: $([ "$ANY_FAIL" -eq 0 ] && echo PASS || echo FAIL)"
} >>"$SUM"
echo
cat "$SUM"
copy_out
exit "$ANY_FAIL"
