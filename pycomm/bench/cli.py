"""``pycomm-bench``: the command line (parser, checks) and ``main``; ``pycomm-bench train``
hands over to :mod:`pycomm.evaluation.cli`."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from pycomm.bench.columns import _COLL_ALIASES, _DTYPE_ALIASES, COLLECTIVES, COMPRESSORS, DTYPES, OPS, parse_size
from pycomm.bench.launch import launch_cluster, launch_local
from pycomm.bench.rank import backend_problem, load_compressor, run_rank


def _collective(text: str) -> str:
    t = text.lower().replace("-", "_")
    t = _COLL_ALIASES.get(t.replace("_", ""), _COLL_ALIASES.get(t, t))
    if t not in COLLECTIVES:
        raise argparse.ArgumentTypeError(f"unknown collective {text!r}; choose from {', '.join(COLLECTIVES)}")
    return t


def _dtype(text: str) -> str:
    t = _DTYPE_ALIASES.get(text.lower(), text.lower())
    if t not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")
    return t


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pycomm-bench",
        description="Collective benchmarks in the nccl-tests convention (see docs/BENCHMARKING.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("collective", nargs="?", type=_collective, default="all_reduce",
                    help="all_reduce | reduce_scatter | all_gather | broadcast | all_to_all")
    g = ap.add_argument_group("nccl-tests flags")
    g.add_argument("-b", "--minbytes", type=_size, default=parse_size("8"), help="smallest size (8, 1K, 64M)")
    g.add_argument("-e", "--maxbytes", type=_size, default=parse_size("16M"), help="largest size")
    g.add_argument("-f", "--stepfactor", type=int, default=2, help="multiply the size by this each step")
    g.add_argument("-n", "--iters", type=int, default=20, help="timed iterations per size")
    g.add_argument("-w", "--warmup_iters", dest="warmup", type=int, default=5, help="warm-up iterations")
    g.add_argument("-c", "--check", type=int, choices=(0, 1), default=1, help="check results against a reference")
    g.add_argument("-o", "--op", type=str.lower, choices=OPS, default="sum", help="reduction op")
    g.add_argument("-d", "--datatype", dest="dtype", type=_dtype, default="float",
                   help="float double half bfloat16 int32 int64 int8 uint8")
    g.add_argument("-r", "--root", type=int, default=0, help="broadcast / reduce root")
    p = ap.add_argument_group("pycomm")
    p.add_argument("--backend", default="pycomm", choices=("pycomm", "gloo"), help="backend measured")
    p.add_argument("--ranks", type=int, default=None,
                   help="local processes to launch (default 2; --hosts: one per host). "
                        "Ignored under torchrun (RANK/WORLD_SIZE set)")
    p.add_argument("--compare", choices=("gloo",), default=None,
                   help="also measure this backend on the same ranks; adds a ratio column")
    p.add_argument("--compression", choices=sorted(COMPRESSORS), default=None,
                   help="compressed all_reduce through pycomm.compression")
    p.add_argument("--transport", choices=("shm", "tcp"), default=None, help="sets PYCOMM_TRANSPORT")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the buffers live (cuda: rank i on GPU i %% device count; timed until the "
                        "result is on the device)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per rank (default: torch's own default, left unchanged)")
    p.add_argument("--thp", type=int, choices=(0, 1), default=None,
                   help="set THP_MEM_ALLOC_ENABLE to this for launched ranks (torch's huge pages for large "
                        "tensors, both backends); default: leave the environment as it is")
    p.add_argument("--limits", type=int, choices=(0, 1), default=1,
                   help="probe this machine's copy / process_vm_readv / futex limits first and print each "
                        "time as a fraction of the bound they allow (%%lim)")
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout (s)")
    p.add_argument("--launch-timeout", type=float, default=None, help="kill all ranks after this many seconds")
    o = ap.add_argument_group("output")
    o.add_argument("--csv", default=None, metavar="PATH")
    o.add_argument("--json", default=None, metavar="PATH")
    o.add_argument("--plot", default=None, metavar="PNG", help="busbw vs size (needs matplotlib)")
    o.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bar on stderr (default: on for long sweeps when stderr is a terminal)")
    o.add_argument("--no-progress", dest="progress", action="store_false")
    c = ap.add_argument_group("emulated cluster (pycomm.bench.netem; needs root)")
    c.add_argument("--hosts", type=int, default=None, help="network namespaces to spread the ranks over")
    c.add_argument("--ranks-per-host", type=_ranks_per_host, default=None,
                   help="ranks on each host: L (sets --ranks to H*L) or one count per host, e.g. 3,2 (uneven hosts); "
                        "measures all_reduce, reduce_scatter, all_gather, broadcast or reduce three ways: pycomm as it "
                        "chooses (hierarchical), pycomm flat (ring) and Gloo, with each host link's bytes")
    c.add_argument("--link", default="1gbit", help="per-host link rate (tc syntax)")
    c.add_argument("--tcp-streams-compare", action="store_true",
                   help="with --ranks-per-host: pycomm with PYCOMM_TCP_STREAMS=auto vs 1 vs 4 streams vs Gloo")
    c.add_argument("--rounds", type=int, default=1,
                   help="with --ranks-per-host: measure the variants this many times, interleaved (medians reported)")
    c.add_argument("--flat-algo", choices=("ring", "rd"), default="ring",
                   help="--ranks-per-host: PYCOMM_ALGO of the 'pycomm-flat' variant (ring: bandwidth, "
                        "rd: recursive doubling over every rank, the flat latency algorithm)")
    c.add_argument("--isolated", action="store_true",
                   help="--ranks-per-host: an untimed barrier (Gloo side group) before every timed call, so calls "
                        "do not overlap and p50/p99 are one call's latency, not back-to-back throughput")
    c.add_argument("--latency", default="100us", help="one-way delay per host link")
    return ap


def _validate(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.minbytes <= 0 or args.maxbytes < args.minbytes:
        ap.error(f"need 0 < -b <= -e (got -b {args.minbytes} -e {args.maxbytes})")
    if args.stepfactor < 2:
        ap.error("-f must be >= 2")
    if args.iters < 1 or args.warmup < 0:
        ap.error("-n must be >= 1 and -w >= 0")
    if args.compression:
        if args.collective != "all_reduce":
            ap.error("--compression applies to all_reduce only")
        if args.dtype not in ("float", "half", "bfloat16", "double"):
            ap.error("--compression needs a floating dtype")
        if args.op not in ("sum", "avg"):
            ap.error("--compression supports -o avg (default for compression) or sum")
    if args.ranks is not None and args.ranks < 1:
        ap.error("--ranks must be >= 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is visible on this machine")
    if args.hosts is not None and args.hosts < 1:
        ap.error("--hosts must be >= 1")
    if args.ranks_per_host is not None:
        counts = args.ranks_per_host if isinstance(args.ranks_per_host, list) else [args.ranks_per_host] * (args.hosts or 0)
        if not args.hosts or min(counts, default=0) < 1:
            ap.error("--ranks-per-host needs --hosts and must be >= 1")
        if len(counts) != args.hosts:
            ap.error(f"--ranks-per-host {','.join(map(str, counts))} names {len(counts)} hosts, --hosts is {args.hosts}")
        if args.collective not in ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce"):
            ap.error("--ranks-per-host measures all_reduce, reduce_scatter, all_gather, broadcast or reduce")
        if args.compression not in (None, "onebit", "fp16", "bf16", "qsgd") or (args.compression and args.collective != "all_reduce"):
            ap.error("--ranks-per-host --compression: all_reduce with onebit, fp16, bf16 or qsgd (the codecs that compress "
                     "the cross-host hop only)")
        if args.tcp_streams_compare and args.collective != "all_reduce":
            ap.error("--tcp-streams-compare measures all_reduce")
        if args.ranks is not None and args.ranks != sum(counts):
            ap.error(f"--ranks {args.ranks} contradicts --hosts {args.hosts} x --ranks-per-host {args.ranks_per_host}")
        args.ranks = sum(counts)


def _ranks_per_host(text: str):
    """--ranks-per-host: "L" (every host) -> int, "3,2" (one count per host) -> [3, 2]."""
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected L or L0,L1,... (ranks per host), got {text!r}") from None
    return counts[0] if len(counts) == 1 else counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pycomm-bench`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the strategy evaluation (pycomm/evaluation)
        from pycomm.evaluation.cli import main as train_main

        return train_main(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    _validate(ap, args)
    if args.compression and "-o" not in argv and "--op" not in argv:
        args.op = "avg"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return run_rank(args)  # under torchrun, or one of our own launched ranks
    # Launcher: fail fast here rather than in every rank.
    problem = backend_problem(args.backend)
    if problem:
        print(f"pycomm-bench: backend {args.backend!r} unavailable: {problem}\n"
              f"  (build pycomm with `pip install -e .`, or measure Gloo with --backend gloo)", file=sys.stderr)
        return 3
    if args.compression:
        try:
            load_compressor(args.compression)
        except Exception as e:  # noqa: BLE001
            print(f"# skipped: --compression {args.compression} needs pycomm.compression "
                  f"({type(e).__name__}: {e})")
            return 0
    try:
        if args.hosts:
            return launch_cluster(args, argv)
        return launch_local(args, argv)
    except KeyboardInterrupt:
        print("pycomm-bench: interrupted; ranks stopped" + (", emulated cluster removed" if args.hosts else ""),
              file=sys.stderr)
        return 130
