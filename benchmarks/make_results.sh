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
for name in bench_limits_4 bench_limits_4_fresh bench_limits_4_oop spin_sweep_4 spin_dp_4 bench_limits_4_regbuf bench_limits_4_bind bench_limits_4_bind_rerun bind_dp_4 dp_step_regbuf collectives_shm_4 collectives_shm_2 collectives_tcp_4 reduce_tcp_4 compression_kernels compressed_1gbit compressed_10gbit dp_step \
            demo model_parallel convergence pipeline_balance local_sgd topology topology_10gbit topology_latency \
            topology_bcast_reduce topology_bcast_tree topology_allgather_bruck topology_3p2 dp_step_2x2 dp_step_4x1_onebit dp_step_4x1_onebit_heap0 bench_limits_4_heap tcp_streams topology_onebit dp_step_2x2_onebit conformance; do
  want "${ALL[@]}" || continue
  case $name in
    # README "Results": the default user path (plain dist.all_reduce loop, no environment
    # variables) vs pycomm-bench vs Gloo, against the machine's limits probed in the same run.
    bench_limits_4) run $name "$PY" benchmarks/bench_limits.py --ranks 4 --rounds 3 --json "$OUT/$name.json" ;;
    # Issue 17's "same ratios on a fresh machine of the kind": the same command on another
    # machine of the CI kind (bench_limits_4.txt was an Intel Xeon VM; this one says which it was).
    bench_limits_4_fresh) run $name "$PY" benchmarks/bench_limits.py --ranks 4 --rounds 3 --json "$OUT/$name.json" ;;
    # The same after pycomm-bench's out-of-place pycomm call became pycomm.all_reduce(x, out=y)
    # (one native call; before, a copy into the output and an in-place call, as Gloo's still is).
    bench_limits_4_oop) run $name "$PY" benchmarks/bench_limits.py --ranks 4 --rounds 3 --json "$OUT/$name.json" ;;
    # README (issue 17 item 3): 8 B all_reduce, 4 ranks on the host, for several lengths of the
    # oversubscribed spin (PYCOMM_SPIN; default 64, yielding every step), Gloo in each round.
    spin_sweep_4)
      run $name bash -c "for r in 1 2; do for s in 64 400 2000 8000; do echo \"# round \$r PYCOMM_SPIN=\$s\"; \
        PYCOMM_SPIN=\$s \"$PY\" -m pycomm.bench all_reduce --ranks 4 -b 8 -e 8 -n 3000 -w 200 --limits 0 --no-progress; done; \
        echo \"# round \$r gloo\"; \"$PY\" -m pycomm.bench all_reduce --ranks 4 -b 8 -e 8 -n 3000 -w 200 --limits 0 \
        --backend gloo --no-progress; done" ;;
    # Issue 17 item 3, what a longer oversubscribed spin costs: per PYCOMM_SPIN, the 8 B latency
    # and the DataParallel step (4 ranks on this host, exact, overlapped with backward), 3 rounds.
    spin_dp_4)
      run $name bash -c "echo '# 8 B lines: size count type redop root, out of place: time algbw busbw #wrong, in place: the same, then p50 p99 %lim out of place and in place (us)'; \
        for r in 1 2 3; do for s in 64 2000 8000; do echo \"# round \$r PYCOMM_SPIN=\$s\"; \
        PYCOMM_SPIN=\$s \"$PY\" -m pycomm.bench all_reduce --ranks 4 -b 8 -e 8 -n 3000 -w 200 --limits 0 --no-progress \
        | grep -E '^ +8 '; PYCOMM_SPIN=\$s \"$PY\" benchmarks/bench_data_parallel.py --modes dp --steps 8 \
        | grep -E '^dp |CPU per step'; done; done" ;;
    # The same with registered buffers off in the same run (before/after of issue 17 item 2)
    # and the loop on a tensor in the registered arena (as DataParallel's buckets are).
    # DataParallel (registered buckets) with registered buffers off, then on (issue 17 item 2).
    dp_step_regbuf)
      PYCOMM_REGISTERED=0 PYCOMM_REGISTERED_COPY_MAX=0 run "${name}_before" "$PY" benchmarks/bench_data_parallel.py \
          --modes dp --steps 3 --warmup 2 --json "$OUT/${name}_before.json"
      run "${name}_after" "$PY" benchmarks/bench_data_parallel.py --modes dp --steps 3 --warmup 2 \
          --json "$OUT/${name}_after.json" ;;
    # Ranks bound to cores on an oversubscribed host (PYCOMM_BIND, the default since issue 17's
    # 8-byte work) vs the OS's placement (PYCOMM_BIND=0) in the same rounds, Gloo next to both.
    bench_limits_4_bind) run $name "$PY" benchmarks/bench_limits.py --ranks 4 --rounds 3 \
        --baseline-env "PYCOMM_BIND=0" --json "$OUT/$name.json" ;;
    # The same command rerun later (issue 17: "the same ratios when rerun later"; keep both runs).
    bench_limits_4_bind_rerun) run $name "$PY" benchmarks/bench_limits.py --ranks 4 --rounds 3 \
        --baseline-env "PYCOMM_BIND=0" --json "$OUT/$name.json" ;;
    # What binding does to a training step: DataParallel (exact) and torch DDP on pycomm, 4 ranks
    # on this host, bound (default) and PYCOMM_BIND=0 alternating, 3 rounds.
    bind_dp_4)
      run $name bash -c "for r in 1 2 3; do for b in auto 0; do echo \"# round \$r PYCOMM_BIND=\$b\"; \
        PYCOMM_BIND=\$b \"$PY\" benchmarks/bench_data_parallel.py --modes dp,ddp_pycomm --steps 8 \
        | grep -E '^(dp|ddp_pycomm) |CPU per step'; done; done" ;;
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
    # PowerSGD became per-parameter with the same commands restricted to PowerSGD plus --merge,
    # the OneBit cells after its warm-up became 5 QSGD-8 steps (restricted to OneBit[-nofreeze])
    # (each file lists its merge runs and their exact commands). The 3-seed charlm file holds
    # the SGD and SGD momentum rows only (the run was stopped there for time).
    convergence)
      "$PY" benchmarks/bench_convergence.py \
        --compressors none,OneBit,TopK,PowerSGD,OneBit-raw,TopK-raw,PowerSGD-raw,OneBit-nofreeze,TopK-nofreeze,PowerSGD-nofreeze \
        --out "$OUT/convergence_digits_mlp"
      "$PY" benchmarks/bench_convergence.py --models cnn --optimizers sgd,sgdm,nesterov,adam,adamw,1bit-adam \
        --compressors none,OneBit,TopK,PowerSGD,OneBit-raw --out "$OUT/convergence_digits_cnn"
      "$PY" benchmarks/bench_convergence.py --models charlm --optimizers sgd,sgdm,nesterov,adam,adamw \
        --compressors none,OneBit,TopK,PowerSGD --seeds 0 --epochs 8 --out "$OUT/convergence_charlm"
      "$PY" benchmarks/bench_convergence.py --models charlm --optimizers sgd,sgdm,nesterov,adam,adamw \
        --compressors none,OneBit,TopK,PowerSGD --seeds 0,1,2 --epochs 8 --out "$OUT/convergence_charlm_3seeds"
      # The LM run until the uncompressed baseline's held-out loss has flattened (64 epochs,
      # 1024 steps, held-out loss after every epoch; ~1 min a cell, ~1 h on the 2-core VM),
      # same recipe otherwise.
      "$PY" benchmarks/bench_convergence.py --models charlm --optimizers sgd,sgdm,nesterov,adam,adamw \
        --compressors none,OneBit,TopK,PowerSGD --seeds 0,1,2 --epochs 64 --out "$OUT/convergence_charlm_64ep" ;;
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
    # docs/USER_GUIDE.md (topology): hierarchical vs flat vs Gloo, 2 hosts x 2 ranks and 4 x 1, 3
    # interleaved rounds, default settings (no THP), the frames' link time next to each.
    topology)
      for lay in "2 2" "4 1"; do
        set -- $lay
        run "topology_${1}x${2}_1gbit" "$PY" -m pycomm.bench all_reduce --hosts "$1" --ranks-per-host "$2" --link 1gbit \
          --threads 1 -b 16M -e 64M -f 4 -n 5 -w 1 --rounds 3 --json "$OUT/topology_${1}x${2}_1gbit.json" --no-progress
      done ;;
    # docs/USER_GUIDE.md (topology): the same at 10 Gbit/s (where the 2-core VM's CPU, not the
    # link, may be the limit).
    topology_10gbit)
      for lay in "2 2" "4 1"; do
        set -- $lay
        run "topology_${1}x${2}_10gbit" "$PY" -m pycomm.bench all_reduce --hosts "$1" --ranks-per-host "$2" --link 10gbit \
          --thp 1 --threads 1 -b 16M -e 64M -f 2 -n 5 -w 1 --json "$OUT/topology_${1}x${2}_10gbit.json" --no-progress
      done ;;
    # docs/USER_GUIDE.md (topology): 8-byte all_reduce latency (p50/p99 of 300 calls),
    # pycomm (recursive doubling among host leaders) vs flat recursive doubling vs Gloo;
    # 2 hosts x 2 ranks, the 4 x 1 control (no host holds two ranks: flat there too) and
    # 2 x 3 (6 ranks: flat recursive doubling folds two ranks in across the host link).
    topology_latency)
      for lay in "2 2" "4 1" "2 3"; do
        set -- $lay
        run "topology_${1}x${2}_latency" "$PY" -m pycomm.bench all_reduce --hosts "$1" --ranks-per-host "$2" \
          --link 10gbit --flat-algo rd --threads 1 -b 8 -e 8 -n 300 -w 30 \
          --json "$OUT/topology_${1}x${2}_latency.json" --no-progress
      done ;;
    # docs/USER_GUIDE.md (topology): broadcast and reduce (root 0), 2 hosts x 2 ranks at
    # 1 Gbit/s, hierarchical vs the flat chain vs Gloo; one raw file, a json per collective.
    topology_bcast_reduce)
      f=topology_2x2_1gbit_bcast_reduce
      run "$f" bash -c "for c in broadcast reduce; do \"$PY\" -m pycomm.bench \$c --hosts 2 --ranks-per-host 2 \
        --link 1gbit --thp 1 --threads 1 -b 16M -e 64M -f 4 -n 5 -w 1 --json $OUT/${f}_\$c.json --no-progress; done" ;;
    # docs/USER_GUIDE.md (topology, issue 18 item 4): small broadcasts on 4 and 8 hosts x 1 rank,
    # one call at a time (--isolated), the binomial tree (pycomm) vs the chain (PYCOMM_ALGO=ring)
    # vs Gloo, 3 interleaved rounds.
    topology_bcast_tree)
      for h in 4 8; do
        run "topology_${h}x1_bcast_tree" "$PY" -m pycomm.bench broadcast --hosts "$h" --ranks-per-host 1 \
          --link 1gbit --threads 1 -b 8 -e 32K -f 8 -n 300 -w 30 --isolated --rounds 3 \
          --json "$OUT/topology_${h}x1_bcast_tree.json" --no-progress
      done
      # and back to back (no barrier between calls: throughput, where the chain pipelines)
      run "topology_8x1_bcast_tree_b2b" "$PY" -m pycomm.bench broadcast --hosts 8 --ranks-per-host 1 \
        --link 1gbit --threads 1 -b 8 -e 32K -f 8 -n 300 -w 30 --rounds 3 \
        --json "$OUT/topology_8x1_bcast_tree_b2b.json" --no-progress ;;
    # docs/USER_GUIDE.md (topology, issue 18 item 4): small all_gathers (size = the gathered result)
    # on 4 and 8 hosts x 1 rank, one call at a time, Bruck (pycomm) vs the ring (PYCOMM_ALGO=ring) vs Gloo.
    topology_allgather_bruck)
      for h in 4 8; do
        run "topology_${h}x1_allgather_bruck" "$PY" -m pycomm.bench all_gather --hosts "$h" --ranks-per-host 1 \
          --link 1gbit --threads 1 -b 64 -e 64K -f 8 -n 300 -w 30 --isolated --rounds 3 \
          --json "$OUT/topology_${h}x1_allgather_bruck.json" --no-progress
      done ;;
    # docs/USER_GUIDE.md (topology): reduce_scatter and all_gather on uneven hosts (3 + 2 ranks) at
    # 1 Gbit/s: the hierarchical form ((n-L)/n * S per host link) vs the flat ring vs Gloo, 3 rounds.
    topology_3p2)
      for c in reduce_scatter all_gather; do
        run "topology_3p2_1gbit_$c" "$PY" -m pycomm.bench $c --hosts 2 --ranks-per-host 3,2 --link 1gbit \
          --thp 1 --threads 1 -b 64M -e 64M -n 3 -w 1 --rounds 3 --json "$OUT/topology_3p2_1gbit_$c.json" --no-progress
      done ;;
    # docs/USER_GUIDE.md (topology): DataParallel + OneBit step, 4 hosts x 1 rank at 1 Gbit/s, next to
    # DDP on Gloo and uncompressed dp (MomentumCorrection's reused buffers; the _before file
    # is the same command at commit d21aefe, before them).
    # (dp_step_4x1_onebit_split_index.txt: the same command with commit 31263cd's data_parallel.py and
    # compression/momentum.py over the build, from a copy of the tree; USER_GUIDE says so.)
    dp_step_4x1_onebit) run $name "$PY" benchmarks/bench_data_parallel.py --hosts 4 --link 1gbit \
        --modes dp_onebit,ddp_gloo,dp --steps 5 --warmup 3 --json "$OUT/$name.json" ;;
    # The same with the heap policy off (PYCOMM_HEAP=0: glibc's own thresholds), right after
    # it, so the two runs share the machine's state (docs/USER_GUIDE.md, "The heap").
    dp_step_4x1_onebit_heap0) run $name env PYCOMM_HEAP=0 "$PY" benchmarks/bench_data_parallel.py --hosts 4 \
        --link 1gbit --modes dp_onebit,ddp_gloo,dp --steps 5 --warmup 3 --json "$OUT/$name.json" ;;
    # bench_limits after the heap policy and the bare in-place call in pycomm-bench's loop
    # (issue 17; kept next to the earlier runs).
    bench_limits_4_heap) run $name "$PY" benchmarks/bench_limits.py --ranks 4 --rounds 3 \
        --baseline-env "PYCOMM_BIND=0" --json "$OUT/$name.json" ;;
    # docs/USER_GUIDE.md (topology): DataParallel step, 2 hosts x 2 ranks at 1 Gbit/s,
    # hierarchical (dp) vs the flat ring (dp_flat) vs DDP on Gloo vs OneBit.
    dp_step_2x2) run ${name}_1gbit "$PY" benchmarks/bench_data_parallel.py --hosts 2 --ranks-per-host 2 --link 1gbit \
        --steps 3 --warmup 1 --modes dp,dp_flat,ddp_gloo,dp_onebit --json "$OUT/${name}_1gbit.json" ;;
    # docs/USER_GUIDE.md (TCP streams): 64 MiB all_reduce, 2 hosts x 1 rank, PYCOMM_TCP_STREAMS
    # auto vs one stream vs Gloo in one run, at 10 and 1 Gbit/s, next to the link's wire-time limit.
    tcp_streams)
      for l in 10gbit 1gbit; do
        run "${name}_$l" "$PY" -m pycomm.bench all_reduce --hosts 2 --ranks-per-host 1 --link $l --tcp-streams-compare \
          --rounds 5 --thp 1 --threads 1 -b 64M -e 64M -n 3 -w 2 --json "$OUT/${name}_$l.json" --no-progress
      done
      # 2 hosts x 2 ranks: "auto" opens one socket per pair there (the host's two ranks
      # already put two flows on its link); 1, 2 and 4 streams and Gloo in the same run.
      run "${name}_2x2_1gbit" "$PY" -m pycomm.bench all_reduce --hosts 2 --ranks-per-host 2 --link 1gbit \
        --tcp-streams-compare --rounds 3 --thp 1 --threads 1 -b 64M -e 64M -n 3 -w 1 \
        --json "$OUT/${name}_2x2_1gbit.json" --no-progress
      # what one plain TCP connection gets through the same emulated 10 Gbit/s link (no pycomm)
      run "${name}_10gbit_veth" "$PY" -m pycomm.bench.netem measure --link 10gbit --bytes 268435456 ;;
    # docs/COMPRESSION.md / USER_GUIDE.md (cross-host-only compression): 64 MiB all_reduce on
    # 2 hosts x 2 ranks at 1 Gbit/s, OneBit on the host links only (exact in-host steps) next
    # to pycomm hierarchical uncompressed, the flat ring and Gloo, in the same run.
    topology_onebit) run topology_2x2_1gbit_onebit "$PY" -m pycomm.bench all_reduce --hosts 2 --ranks-per-host 2 \
        --link 1gbit --compression onebit --thp 1 --threads 1 -b 64M -e 64M -n 5 -w 1 \
        --json "$OUT/topology_2x2_1gbit_onebit.json" --no-progress ;;
    # The DataParallel step on that layout: cross-host OneBit (dp_onebit, the default scope
    # there) vs OneBit on every hop (dp_onebit_all) vs uncompressed hierarchical (dp) vs DDP
    # on Gloo, with each rank's CPU time per step (rank 0's threads).
    dp_step_2x2_onebit) run dp_step_2x2_1gbit_onebit "$PY" benchmarks/bench_data_parallel.py --hosts 2 \
        --ranks-per-host 2 --link 1gbit --steps 3 --warmup 1 --modes dp,ddp_gloo,dp_onebit,dp_onebit_all \
        --json "$OUT/dp_step_2x2_1gbit_onebit.json" ;;
    # README / docs/USER_GUIDE.md (c10d): torch's own distributed tests on Gloo and pycomm, same
    # run (needs torch's test dependency expecttest: pip install expecttest).
    conformance) "$PY" benchmarks/conformance.py ;;
  esac
done
