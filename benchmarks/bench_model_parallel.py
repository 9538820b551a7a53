"""Model-parallel benchmarks: pipeline bubble and tensor-parallel communication time.

    python benchmarks/bench_model_parallel.py                  # both parts, gloo
    python benchmarks/bench_model_parallel.py --part pipeline --backend pycomm

Pipeline: each stage's work is a fixed sleep (forward ``t_f``, backward ``2 t_f``), so
the measurement isolates the schedule from CPU contention between ranks on a small
machine. With ``m`` micro-batches on ``p`` stages, a stage computes for
``m (t_f + t_b)`` and the step takes ``T``; the measured bubble is
``1 - m (t_f + t_b) / T`` (T: slowest rank), printed next to the ideal
``(p-1)/(m+p-1)``. The gap between the two is point-to-point latency (several sends per
micro-batch). ``live`` is the most micro-batches whose activations a stage held at once
(stage 0: ``m`` for GPipe, ``min(p, m)`` for 1F1B).

Tensor parallel: a pre-LN transformer (tensor-parallel attention + MLP, vocab-parallel
embedding and loss) runs forward + backward steps; the time spent blocked in
tensor-parallel collectives (``pycomm.tensor_parallel.comm_stats``) is reported per step
next to the step time. The input-gradient all-reduces are started asynchronously and
overlap the weight-gradient matmul, so only their wait is counted.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, backend: str) -> None:
    torch.set_num_threads(1)
    if backend == "pycomm":
        import pycomm  # noqa: F401  (registers the backend)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


# ------------------------------------------------------------------------------- pipeline

class _Sleep(torch.autograd.Function):
    """Identity that sleeps ``tf`` seconds in forward and ``tb`` in backward."""

    @staticmethod
    def forward(ctx, x, tf, tb):
        time.sleep(tf)
        ctx.tb = tb
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.tb)
        return g, None, None


class SleepStage(nn.Module):
    def __init__(self, width: int, tf: float, tb: float) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.tf, self.tb = tf, tb

    def forward(self, x):
        return _Sleep.apply(self.lin(x), self.tf, self.tb)


def _pipeline_rank(rank, world, port, backend, tf, micro, steps, queue):
    from pycomm import pipeline

    _init(rank, world, port, backend)
    tb = 2 * tf
    rows = []
    # Point-to-point latency between stages 0 and 1 (half a round trip of a 1 KiB
    # activation): the schedule pays a few of these per micro-batch.
    buf = torch.zeros(4, 64)
    lat = []
    for _ in range(21):
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        lat.append((time.perf_counter() - t0) / 2)
    rows.append(("latency", sorted(lat[1:])[len(lat) // 2]))
    for m in micro:
        for name, cls in (("GPipe", pipeline.ScheduleGPipe), ("1F1B", pipeline.Schedule1F1B)):
            stage = pipeline.PipelineStage(SleepStage(64, tf, tb))
            sched = cls(stage, m, loss_fn=lambda y, t: ((y - t) ** 2).mean())
            x, y = torch.randn(4 * m, 64), torch.randn(4 * m, 64)
            times = []
            for it in range(steps + 1):  # the first step is warm-up
                dist.barrier()
                t0 = time.perf_counter()
                sched.step(x, target=y)
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if it:
                    times.append(dt.item())
            live = torch.tensor([sched.max_live])
            dist.all_reduce(live, op=dist.ReduceOp.MAX)
            t = sorted(times)[len(times) // 2]
            rows.append((name, world, m, t, 1 - m * (tf + tb) / t, (world - 1) / (m + world - 1), live.item()))
    dist.destroy_process_group()
    if rank == 0:
        queue.put(rows)


def bench_pipeline(backend: str, stages, micro, tf: float, steps: int) -> None:
    print(f"# pipeline bubble, backend {backend}: t_f = {tf * 1e3:.1f} ms, t_b = {2 * tf * 1e3:.1f} ms "
          f"per micro-batch and stage; median of {steps} steps")
    print(f"{'schedule':>8} {'p':>3} {'m':>3} {'step(ms)':>9} {'ideal(ms)':>9} {'bubble':>7} "
          f"{'(p-1)/(m+p-1)':>13} {'live':>5}")
    ctx = mp.get_context("spawn")
    for p in stages:
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_pipeline_rank, args=(r, p, port, backend, tf, micro, steps, q))
                 for r in range(p)]
        for pr in procs:
            pr.start()
        rows = q.get(timeout=600)
        for pr in procs:
            pr.join()
        print(f"# p = {p}: send/recv latency between stages {rows.pop(0)[1] * 1e3:.2f} ms")
        for name, p_, m, t, bubble, ideal, live in rows:
            print(f"{name:>8} {p_:>3} {m:>3} {t * 1e3:9.1f} {(m + p_ - 1) * 3 * tf * 1e3:9.1f} "
                  f"{bubble:7.3f} {ideal:13.3f} {live:5d}", flush=True)


# ------------------------------------------------------------------------------- tensor parallel

def _tp_rank(rank, world, port, backend, d, layers, seq, batch, steps, queue):
    from pycomm import tensor_parallel as tp

    _init(rank, world, port, backend)
    vocab = 256

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = tp.ParallelSelfAttention(d, 8, causal=True)
            self.mlp = tp.ParallelMLP(d, 4 * d)

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    torch.manual_seed(0)
    emb = tp.VocabParallelEmbedding(vocab, d)
    blocks = nn.Sequential(*[Block() for _ in range(layers)])
    head = tp.ColumnParallelLinear(d, vocab, bias=False)
    ids = torch.randint(0, vocab, (batch, seq))
    tgt = torch.randint(0, vocab, (batch, seq))

    def step():
        loss = tp.vocab_parallel_cross_entropy(head(blocks(emb(ids))), tgt).mean()
        loss.backward()

    step()  # warm-up
    tp.comm_stats.enabled = True
    step_times, comm_times, calls = [], [], 0
    for _ in range(steps):
        tp.comm_stats.reset()
        dist.barrier()
        t0 = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t0)
        comm_times.append(tp.comm_stats.seconds)
        calls = tp.comm_stats.calls
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    out = torch.tensor([med(step_times), med(comm_times)], dtype=torch.float64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    if rank == 0:
        queue.put((world, out[0].item(), out[1].item(), calls))


def bench_tp(backend: str, sizes, d: int, layers: int, seq: int, batch: int, steps: int) -> None:
    print(f"\n# tensor parallel, backend {backend}: {layers} blocks, d_model {d}, seq {seq}, batch {batch}; "
          f"forward + backward, median of {steps} steps (slowest rank)")
    print(f"{'tp':>3} {'step(ms)':>9} {'in TP collectives(ms)':>22} {'share':>6} {'calls/step':>10}")
    ctx = mp.get_context("spawn")
    for n in sizes:
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_tp_rank, args=(r, n, port, backend, d, layers, seq, batch, steps, q))
                 for r in range(n)]
        for pr in procs:
            pr.start()
        world, t, c, calls = q.get(timeout=600)
        for pr in procs:
            pr.join()
        print(f"{world:>3} {t * 1e3:9.1f} {c * 1e3:22.1f} {c / t:6.1%} {calls:>10}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="pipeline bubble and tensor-parallel communication time")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--part", choices=["pipeline", "tp", "all"], default="all")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tf-ms", type=float, default=10.0, help="forward time per micro-batch and stage")
    ap.add_argument("--tp-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    if a.part in ("pipeline", "all"):
        bench_pipeline(a.backend, a.stages, a.micro, a.tf_ms / 1e3, a.steps)
    if a.part in ("tp", "all"):
        bench_tp(a.backend, a.tp_sizes, a.d_model, a.layers, a.seq, a.batch, a.steps)


if __name__ == "__main__":
    main()
