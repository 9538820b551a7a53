#!/usr/bin/env python3
"""Cost of the flight recorder: latency of an 8-byte all_reduce (2 float32) with the
recorder on (PYCOMM_FLIGHT_RECORDER_ENTRIES=2000, the default) and off (=0), in one run.

    python benchmarks/bench_flight_recorder.py                 # 4 ranks, shm, 5 rounds x 2000 calls
    python benchmarks/bench_flight_recorder.py --rounds 3 --iters 1000 --transport tcp

The recorder's size is fixed per process, so each round launches the ranks twice, once
per setting, alternating on/off (the order flips every round) so that drifting load
hits both alike. Each rank times every call (after a warm-up); a call's latency is the
slowest rank's. Reported: p50, p99 and mean per setting over all rounds, and the
on - off difference of the p50s; raw per-round figures follow. Written to
``--out`` (default benchmarks/results/flight_recorder.txt).
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _rank(rank: int, ws: int, port: int, iters: int, warmup: int, entries: int, transport: str, q) -> None:
    os.environ["PYCOMM_FLIGHT_RECORDER_ENTRIES"] = str(entries)
    os.environ["PYCOMM_TRANSPORT"] = transport
    import torch
    import torch.distributed as dist
    import pycomm

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, ws, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("pycomm", store=store, rank=rank, world_size=ws,
                            timeout=datetime.timedelta(seconds=60))
    assert pycomm.flight_recorder.capacity() == entries
    t = torch.ones(2)  # 8 bytes
    for _ in range(warmup):
        dist.all_reduce(t)
    dist.barrier()
    lat = []
    clock = time.perf_counter_ns
    for _ in range(iters):
        t0 = clock()
        dist.all_reduce(t)
        lat.append(clock() - t0)
    dist.barrier()
    dist.destroy_process_group()
    q.put((rank, lat))


def _launch(ws: int, iters: int, warmup: int, entries: int, transport: str) -> List[float]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, ws, port, iters, warmup, entries, transport, q)) for r in range(ws)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=600) for _ in range(ws))
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise RuntimeError(f"a rank exited with {p.exitcode}")
    # A call's latency: the slowest rank's (the collective is done when every rank is).
    return [max(got[r][i] for r in range(ws)) / 1e3 for i in range(iters)]  # us


def _pct(xs: List[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main(argv: List[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--transport", default="shm", choices=["shm", "tcp"])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "flight_recorder.txt"))
    args = ap.parse_args(argv)
    import torch

    from pycomm.bench.machine import machine

    load0 = os.getloadavg()
    start = datetime.datetime.now(datetime.timezone.utc)
    lat = {"on": [], "off": []}
    rounds = []
    for r in range(args.rounds):
        order = ["on", "off"] if r % 2 == 0 else ["off", "on"]
        row = {}
        for mode in order:
            xs = _launch(args.ranks, args.iters, args.warmup, 2000 if mode == "on" else 0, args.transport)
            lat[mode] += xs
            row[mode] = (_pct(xs, 50), _pct(xs, 99))
        rounds.append((order, row))
        print(f"round {r}: " + "  ".join(f"{m}: p50 {row[m][0]:.1f} us p99 {row[m][1]:.1f} us" for m in order),
              flush=True)
    load1 = os.getloadavg()
    m = machine()
    lines = [
        f"# machine: {m['cores']} cores, {m['cpu']}, {m['platform']}",
        f"# torch: {torch.__version__}  python: {platform.python_version()}  "
        f"date: {start.strftime('%Y-%m-%d %H:%M')} UTC",
        f"# command: python benchmarks/bench_flight_recorder.py {' '.join(argv)}".rstrip(),
        f"# load average before: {' '.join(f'{v:.2f}' for v in load0)}  "
        f"after: {' '.join(f'{v:.2f}' for v in load1)}",
        f"# {args.ranks} ranks, pycomm over {args.transport}, all_reduce of 8 bytes (2 float32, sum), "
        f"{args.rounds} rounds x {args.iters} timed calls per setting (after {args.warmup} warm-up calls); "
        f"latency of a call = the slowest rank's; recorder on = PYCOMM_FLIGHT_RECORDER_ENTRIES=2000 "
        f"(the default), off = 0",
        "",
        "| recorder | calls | p50 us | p99 us | mean us |",
        "|---|---|---|---|---|",
    ]
    for mode in ("on", "off"):
        xs = lat[mode]
        lines.append(f"| {mode} | {len(xs)} | {_pct(xs, 50):.1f} | {_pct(xs, 99):.1f} | {statistics.fmean(xs):.1f} |")
    d50 = _pct(lat["on"], 50) - _pct(lat["off"], 50)
    d99 = _pct(lat["on"], 99) - _pct(lat["off"], 99)
    lines += ["", f"on - off: p50 {d50:+.1f} us ({100 * d50 / _pct(lat['off'], 50):+.1f} %), "
                  f"p99 {d99:+.1f} us", "", "per round (launch order, p50 / p99 us):"]
    for i, (order, row) in enumerate(rounds):
        lines.append(f"  round {i}: " + ", ".join(f"{mo} {row[mo][0]:.1f} / {row[mo][1]:.1f}" for mo in order))
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
