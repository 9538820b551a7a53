#!/usr/bin/env bash
# Regenerates benchmarks/results/eval/ — the strategy evaluation whose headline table is
# in the README: one `pycomm-bench train` run per model (each model gets the strategies,
# world sizes and links that say something about it within ~35 minutes on 2 cores), then
# one report over all of them. Every run's stamp (machine, torch, date, load, command) is
# kept in results.json (meta.parts). Needs root for the emulated 1 Gbit/s hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYCOMM_VENV:-$(pwd)/.venv}/bin/python
OUT=${1:-benchmarks/results/eval}
RUNS=${PYCOMM_EVAL_RUNS:-$OUT/runs}
mkdir -p "$RUNS"
train() { local name=$1; shift; "$PY" -m pycomm.bench train --repeats 3 --out "$RUNS/$name" "$@"; }

# The small models on one host: every strategy that applies, 1, 2 and 4 ranks.
train mlp --models mlp --links shm --worlds 1,2,4 \
  --strategies dp,dp-onebit,dp-topk,dp-powersgd,ddp-gloo,localsgd,tp,tp-dtensor,pp-gpipe,pp-1f1b,pp-torch,dp-tp,dp-pp
train cnn --models cnn --links shm --worlds 1,2,4 --strategies dp,dp-onebit,ddp-gloo,localsgd,pp-1f1b
train charlm --models charlm --links shm --worlds 1,2,4 --strategies dp,ddp-gloo,localsgd,tp,pp-1f1b,dp-tp
# The 25.5M-parameter model, where communication matters: on one host and over 1 Gbit/s.
train large --models large --links shm,1gbit --worlds 1,4 --strategies dp,dp-onebit,ddp-gloo,localsgd,tp,pp-1f1b

# The compression x optimizer matrix (bench_convergence.py, measured apart: make_results.sh
# convergence*) goes into the same report, with its own stamp.
CONV=(benchmarks/results/convergence_digits_mlp.json benchmarks/results/convergence_digits_cnn.json
      benchmarks/results/convergence_charlm_64ep.json)
"$PY" -m pycomm.bench train --render "$RUNS"/{mlp,cnn,charlm,large}/results.json --out "$OUT" --convergence "${CONV[@]}"
# The per-model reports are parts of the combined one; their raw results.json stay.
rm -rf "$RUNS"/*/plots "$RUNS"/*/report.md "$RUNS"/*/report.html
