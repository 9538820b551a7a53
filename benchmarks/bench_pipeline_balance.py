#!/usr/bin/env python3
"""Pipeline throughput with stages balanced by measured cost vs the equal-layer split.

    python benchmarks/bench_pipeline_balance.py [--backend pycomm] [--unit-ms 0.5]

A 12-layer model with uneven layers (costs ``[1]*8 + [6, 6, 8, 8]`` units: cheap
embedding-like layers, then heavy ones); each layer sleeps ``cost * unit`` in forward
and twice that in backward, so the measurement isolates partitioning from CPU
contention. The per-layer costs are *measured* with ``pipeline.profile_layers`` in the
parent, then split three ways: ``equal_partition``, ``partition`` (balanced) and the
exhaustive best over all contiguous splits (of the measured costs). Each split runs
1F1B on 4 stages with 8 micro-batches; the step time is the median of the slowest rank
over ``--steps`` steps after one warm-up. Raw output: ``benchmarks/results/pipeline_balance.txt``.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COSTS = [1] * 8 + [6, 6, 8, 8]


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tf, tb):
        time.sleep(tf)
        ctx.tb = tb
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.tb)
        return g, None, None


class SleepLayer(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return _Sleep.apply(x, self.seconds, 2 * self.seconds) * self.w


def _layers(unit: float):
    return [SleepLayer(c * unit) for c in COSTS]


def _worker(rank, world, port, backend, unit, splits, steps, m, queue):
    torch.set_num_threads(1)
    if backend == "pycomm":
        import pycomm  # noqa: F401
    from pycomm import pipeline

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    layers = _layers(unit)
    out = {}
    for name, bounds in splits.items():
        stage = pipeline.PipelineStage(pipeline.split_layers(layers, bounds)[rank])
        sched = pipeline.Schedule1F1B(stage, num_microbatches=m, loss_fn=lambda y, t: (y - t).pow(2).mean())
        times = []
        for s in range(steps + 1):
            x = torch.randn(m * 2, 4)
            dist.barrier()
            t0 = time.perf_counter()
            sched.step(x if rank == 0 else None, target=torch.zeros(m * 2, 4) if rank == world - 1 else None)
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if s:
                times.append(dt.item())
        out[name] = statistics.median(times)
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="gloo")
    p.add_argument("--unit-ms", type=float, default=0.5)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "pipeline_balance.txt"))
    args = p.parse_args()
    from pycomm import pipeline

    unit = args.unit_ms * 1e-3
    load0 = os.getloadavg()
    costs = pipeline.profile_layers(_layers(unit), torch.randn(2, 4), repeats=3)
    S = args.stages
    splits = {"equal": pipeline.equal_partition(len(costs), S), "balanced": pipeline.partition(costs, S)}
    best, best_v = None, float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), S - 1):
        e = (0,) + cuts + (len(costs),)
        b = list(zip(e[:-1], e[1:]))
        v = max(pipeline.stage_costs(costs, b))
        if v < best_v:
            best, best_v = b, v
    splits["exhaustive"] = best
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, S, port, args.backend, unit, splits, args.steps,
                                               args.microbatches, q)) for r in range(S)]
    for pr in procs:
        pr.start()
    res = q.get(timeout=600)
    for pr in procs:
        pr.join()
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    lines = [f"# machine: {os.cpu_count()} cores, {cpu}, {platform.platform()}",
             f"# torch: {torch.__version__}  date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"# command: python benchmarks/bench_pipeline_balance.py {' '.join(sys.argv[1:])}",
             f"# load average before: {' '.join(f'{v:.2f}' for v in load0)}  after: "
             f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}",
             f"# {S} stages ({args.backend}), 1F1B, {args.microbatches} micro-batches, layer costs {COSTS} x "
             f"{args.unit_ms} ms forward (2x backward); measured per-layer fwd+bwd ms: "
             + " ".join(f"{c * 1e3:.2f}" for c in costs),
             "| split | stages (layer ranges) | modelled slowest stage ms | step ms (median) | throughput vs equal |",
             "|---|---|---|---|---|"]
    for name in ("equal", "balanced", "exhaustive"):
        b = splits[name]
        lines.append(f"| {name} | {b} | {max(pipeline.stage_costs(costs, b)) * 1e3:.2f} | {res[name] * 1e3:.1f} | "
                     f"{res['equal'] / res[name]:.2f}x |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
