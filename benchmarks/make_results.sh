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
# Scripts that stamp and write their own raw files (md/json/txt) are called directly.
for name in bench_limits_4 bench_limits_4_regbuf dp_step_regbuf collectives_shm_4 collectives_shm_2 collectives_tcp_4 reduce_tcp_4 compression_kernels compressed_1gbit compressed_10gbit dp_step \
            demo model_parallel convergence pipeline_balance local_sgd topology dp_step_2x2 conformance; do
  want "${ALL[@]}" || continue
  case $name in
    # README "Results": the default user path (plain dist.all_reduce loop, no environment
    # variables) vs pycomm-bench vs Gloo, against the machine's limits probed in the same run.
    bench_limits_4) run $name "$PY" benchmarks/bench_limits.py --ranks 4 --rounds 3 --json "$OUT/$name.json" ;;
    # The same with registered buffers off in the same run (before/after of issue 17 item 2)
    # and the loop on a tensor in the registered arena (as DataParallel's buckets are).
    # DataParallel (registered buckets) with registered buffers off, then on (issue 17 item 2).
    dp_step_regbuf)
      PYCOMM_REGISTERED=0 PYCOMM_REGISTERED_COPY_MAX=0 run "${name}_before" "$PY" benchmarks/bench_data_parallel.py \
          --modes dp --steps 3 --warmup 2 --json "$OUT/${name}_before.json"
      run "${name}_after" "$PY" benchmarks/bench_data_parallel.py --modes dp --steps 3 --warmup 2 \
          --json "$OUT/${name}_after.json" ;;
    bench_limits_4_regbuf) run $name "$PY" benchmarks/bench_limits.py --ranks 4 --rounds 2 \
        --baseline-env "PYCOMM_REGISTERED=0 PYCOMM_REGISTERED_COPY_MAX=0" --json "$OUT/$name.json" ;;
    collectives_shm_4) run $name "$PY" -m pycomm.bench all_reduce --ranks 4 --thp 1 --threads 1 -b 8 -e 64M -f 2 -n 20 -w 5 --compare gloo --no-progress ;;
    collectives_shm_2) run $name "$PY" -m pycomm.bench all_reduce --ranks 2 --thp 1 --threads 1 -b 8 -e 64M -f 2 -n 20 -w 5 --compare gloo --no-progress ;;
    collectives_tcp_4) run $name "$PY" -m pycomm.bench all_reduce --ranks 4 --transport tcp --thp 1 --threads 1 -b 8 -e 64M -f 2 -n 20 -w 5 --compare gloo --no-progress ;;
    reduce_tcp_4) run $name "$PY" -m pycomm.bench reduce --ranks 4 --transport tcp --thp 1 --threads 1 -b 8 -e 64M -f 8 -n 10 -w 3 --compare gloo --no-progress ;;
    compression_kernels) run $name "$PY" benchmarks/bench_compression_kernels.py ;;
    compressed_1gbit)
      for c in none fp16 onebit topk qsgd powersgd; do
        extra=(); [ "$c" != none ] && extra=(--compression "$c")
        run "${name}_$c" "$PY" -m pycomm.bench all_reduce --hosts 4 --link 1gbit --thp 1 --threads 1 -b 100M -e 100M -n 3 -w 1 "${extra[@]}" --no-progress
      done ;;
    compressed_10gbit)
      for c in none fp16 onebit topk; do
        extra=(); [ "$c" != none ] && extra=(--compression "$c")
        run "${name}_$c" "$PY" -m pycomm.bench all_reduce --hosts 4 --link 10gbit --thp 1 --threads 1 -b 100M -e 100M -n 3 -w 1 "${extra[@]}" --no-progress
      done ;;
    dp_step) run ${name}_1gbit "$PY" benchmarks/bench_data_parallel.py --hosts 4 --link 1gbit
             run ${name}_10gbit "$PY" benchmarks/bench_data_parallel.py --hosts 4 --link 10gbit ;;
    # README "The demo and the benchmarks": accuracy and bytes of DataParallel, plain and OneBit.
    demo) run $name "$PY" examples/demo.py --ranks 4 --epochs 30 --no-bench ;;
    # docs/MODEL_PARALLEL.md: pipeline bubble and tensor-parallel collective time, per backend.
    model_parallel)
      for b in gloo pycomm; do run "${name}_$b" "$PY" benchmarks/bench_model_parallel.py --backend "$b"; done ;;
    # docs/COMPRESSION.md (and the README's summary): accuracy matrix, several minutes per model.
    # These commands reproduce every cell. The committed files' PowerSGD cells were re-run after
    # PowerSGD became per-parameter with the same commands restricted to PowerSGD plus --merge
    # (each file lists its merge runs and their exact commands).
    convergence)
      "$PY" benchmarks/bench_convergence.py \
        --compressors none,OneBit,TopK,PowerSGD,OneBit-raw,TopK-raw,PowerSGD-raw,OneBit-nofreeze,TopK-nofreeze,PowerSGD-nofreeze \
        --out "$OUT/convergence_digits_mlp"
      "$PY" benchmarks/bench_convergence.py --models cnn --optimizers sgd,sgdm,nesterov,adam,adamw,1bit-adam \
        --compressors none,OneBit,TopK,PowerSGD,OneBit-raw --out "$OUT/convergence_digits_cnn"
      "$PY" benchmarks/bench_convergence.py --models charlm --optimizers sgd,sgdm,nesterov,adam,adamw \
        --compressors none,OneBit,TopK,PowerSGD --seeds 0 --epochs 8 --out "$OUT/convergence_charlm" ;;
    # docs/MODEL_PARALLEL.md: balanced vs equal pipeline split.
    pipeline_balance) "$PY" benchmarks/bench_pipeline_balance.py --out "$OUT/pipeline_balance.txt" ;;
    # docs/DATA_PARALLEL.md: local SGD / DiLoCo / async, on one host and on emulated links.
    local_sgd)
      "$PY" benchmarks/bench_local_sgd.py --out "$OUT/local_sgd"
      for l in 1gbit 10gbit; do
        "$PY" benchmarks/bench_local_sgd.py --hosts 4 --link $l --hidden 1024 --depth 2 --seeds 2 --window 0.25 \
          --modes ddp_gloo,dp,postlocalsgd_h8,localsgd_h8,diloco_h8,diloco_h8_onebit,dp_slow,balanced_dp_slow,async_slow \
          --out "$OUT/local_sgd_$l"
      done ;;
    # docs/USER_GUIDE.md (topology): hierarchical vs flat vs Gloo, 2 hosts x 2 ranks and 4 x 1.
    topology)
      for lay in "2 2" "4 1"; do
        set -- $lay
        run "topology_${1}x${2}_1gbit" "$PY" -m pycomm.bench all_reduce --hosts "$1" --ranks-per-host "$2" --link 1gbit \
          --thp 1 --threads 1 -b 16M -e 64M -f 4 -n 5 -w 1 --json "$OUT/topology_${1}x${2}_1gbit.json" --no-progress
      done ;;
    # docs/USER_GUIDE.md (topology): DataParallel step, 2 hosts x 2 ranks at 1 Gbit/s,
    # hierarchical (dp) vs the flat ring (dp_flat) vs DDP on Gloo vs OneBit.
    dp_step_2x2) run ${name}_1gbit "$PY" benchmarks/bench_data_parallel.py --hosts 2 --ranks-per-host 2 --link 1gbit \
        --steps 3 --warmup 1 --modes dp,dp_flat,ddp_gloo,dp_onebit --json "$OUT/${name}_1gbit.json" ;;
    # README / docs/USER_GUIDE.md (c10d): torch's own distributed tests on Gloo and pycomm, same
    # run (needs torch's test dependency expecttest: pip install expecttest).
    conformance) "$PY" benchmarks/conformance.py ;;
  esac
done
