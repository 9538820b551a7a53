"""pycomm-bench: collective microbenchmarks in the nccl-tests convention.

    pycomm-bench all_reduce -b 8 -e 64M -f 2 --ranks 4            # 4 local ranks, pycomm backend
    pycomm-bench all_gather -b 1K -e 16M --backend gloo --ranks 2
    pycomm-bench all_reduce --compare gloo --csv out.csv --json out.json --plot out.png
    pycomm-bench all_reduce --compression onebit -e 32M --compare gloo
    pycomm-bench all_reduce --hosts 2 --ranks 4 --link 1gbit --latency 100us   # emulated cluster
    torchrun --nproc-per-node 4 -m pycomm.bench all_reduce                       # one rank per process

Columns (as nccl-tests): size(B) count type redop root, then for out-of-place and in-place
time(us) algbw(GB/s) busbw(GB/s) #wrong. ``size`` is the whole array: the all_reduce /
broadcast buffer, the reduce_scatter input, the all_gather output, the all_to_all send
buffer; ``count`` is the element count each rank passes to the call (the per-rank block
for reduce_scatter / all_gather / all_to_all). algbw = size / time; busbw = algbw x
2(n-1)/n (all_reduce), (n-1)/n (reduce_scatter, all_gather, all_to_all), 1 (broadcast).
time is the per-iteration average on each rank, maximum over ranks.

With ``-c 1`` every rank's inputs are deterministic functions of (rank, index) whose
results are exact in the dtype, and every result element is compared with a float64
reference the bench computes from those known inputs; #wrong sums the mismatches over
ranks. See docs/BENCHMARKING.md.

The package, one module per part of a run:

    columns    nccl-tests arithmetic (sizes, counts, algbw/busbw) and the table's rows
    reference  deterministic inputs and the float64 reference results are checked against
    timing     one case on a process group: warm-up, timed iterations, check
    output     progress bar (tqdm), CSV, plot
    rank       the body of one rank: the sweep, the summary, the files
    launch     ranks as local processes, or inside an emulated cluster
    netem      the emulated cluster: network namespaces, a bridge, tc limits
    cli        the command line and ``main`` (``pycomm-bench train`` -> pycomm.evaluation)
"""
from __future__ import annotations

from pycomm.bench.cli import build_parser, main
from pycomm.bench.columns import (COLLECTIVES, COMPRESSORS, DTYPES, OPS, avg_busbw, bandwidths, bus_factor,
                                  counts_for, format_row, header_lines, parse_size, sweep_sizes)
from pycomm.bench.launch import free_port, wait_all
from pycomm.bench.output import write_csv, write_plot
from pycomm.bench.reference import count_wrong, rank_values, reference

__all__ = [
    "main",
    "build_parser",
    "parse_size",
    "sweep_sizes",
    "bus_factor",
    "bandwidths",
    "counts_for",
    "format_row",
    "header_lines",
    "avg_busbw",
    "rank_values",
    "reference",
    "count_wrong",
    "write_csv",
    "write_plot",
    "free_port",
    "wait_all",
    "COLLECTIVES",
    "DTYPES",
    "OPS",
    "COMPRESSORS",
]
