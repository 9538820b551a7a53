#!/usr/bin/env bash
# Regenerates the result files under benchmarks/results/ that the README quotes.
# Each file starts with the machine, torch version, date and the exact command.
# Usage: benchmarks/make_results.sh [name ...]   (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-${PYCOMM_VENV:-$(pwd)/.venv}/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore

run() {  # run NAME CMD...
  local name=$1; shift
  local f="$OUT/$name.txt"
  {
    echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
    echo "# torch: $("$PY" -c 'import torch; print(torch.__version__)')  date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "# command: $*"
    echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  } > "$f"
  echo "== $name: $*"
  "$@" 2>&1 | grep -v -i "warning\|return func" | tee -a "$f"
}

want() { [ $# -eq 0 ] || [[ " $* " == *" $name "* ]]; }
ALL=("$@")
for name in collectives_shm_4 collectives_shm_2 collectives_tcp_4 reduce_tcp_4 compression_kernels compressed_1gbit compressed_10gbit dp_step; do
  want "${ALL[@]}" || continue
  case $name in
    collectives_shm_4) run $name "$PY" -m pycomm.bench all_reduce --ranks 4 -b 8 -e 64M -f 2 -n 20 -w 5 --compare gloo --no-progress ;;
    collectives_shm_2) run $name "$PY" -m pycomm.bench all_reduce --ranks 2 -b 8 -e 64M -f 2 -n 20 -w 5 --compare gloo --no-progress ;;
    collectives_tcp_4) run $name "$PY" -m pycomm.bench all_reduce --ranks 4 --transport tcp -b 8 -e 64M -f 2 -n 20 -w 5 --compare gloo --no-progress ;;
    reduce_tcp_4) run $name "$PY" -m pycomm.bench reduce --ranks 4 --transport tcp -b 8 -e 64M -f 8 -n 10 -w 3 --compare gloo --no-progress ;;
    compression_kernels) run $name "$PY" benchmarks/bench_compression_kernels.py ;;
    compressed_1gbit)
      for c in none fp16 onebit topk qsgd powersgd; do
        extra=(); [ "$c" != none ] && extra=(--compression "$c")
        run "${name}_$c" "$PY" -m pycomm.bench all_reduce --hosts 4 --link 1gbit -b 100M -e 100M -n 3 -w 1 "${extra[@]}" --no-progress
      done ;;
    compressed_10gbit)
      for c in none fp16 onebit topk; do
        extra=(); [ "$c" != none ] && extra=(--compression "$c")
        run "${name}_$c" "$PY" -m pycomm.bench all_reduce --hosts 4 --link 10gbit -b 100M -e 100M -n 3 -w 1 "${extra[@]}" --no-progress
      done ;;
    dp_step) run ${name}_1gbit "$PY" benchmarks/bench_data_parallel.py --hosts 4 --link 1gbit
             run ${name}_10gbit "$PY" benchmarks/bench_data_parallel.py --hosts 4 --link 10gbit ;;
  esac
done
