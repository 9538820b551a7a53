"""pycomm in five minutes: 4 local ranks train a classifier on scikit-learn's digits
with pycomm.DataParallel, uncompressed and with 1-bit compression, then compare
pycomm's all_reduce with Gloo's.

    python examples/demo.py [--ranks 4] [--epochs 30] [--no-bench]
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def load_digits_split(rank: int, world: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n_test = 360
    xt, yt = x[:n_test], y[:n_test]
    xtr, ytr = x[n_test:], y[n_test:]
    return xtr[rank::world], ytr[rank::world], xt, yt


def train(rank: int, world: int, epochs: int, compression) -> tuple:
    import pycomm
    from pycomm.data_parallel import DataParallel

    xtr, ytr, xt, yt = load_digits_split(rank, world)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    dp = DataParallel(model, compression=compression)
    opt = torch.optim.SGD(dp.parameters(), lr=0.2)
    before = pycomm.stats("all")["bytes_sent"]
    t0 = time.perf_counter()
    batch = 16
    steps = 0
    for _ in range(epochs):
        for i in range(0, len(xtr) - batch + 1, batch):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(dp(xtr[i:i + batch]), ytr[i:i + batch])
            loss.backward()
            opt.step()
            steps += 1
    dt = time.perf_counter() - t0
    sent = pycomm.stats("all")["bytes_sent"] - before
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item() * 100
    from pycomm.compression import ring_all_reduce_bytes

    numel = sum(p.numel() for p in model.parameters())
    return acc, sent, dt, steps * ring_all_reduce_bytes(numel, world)


def rank_main(rank: int, world: int, port: int, epochs: int, queue) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import pycomm
    from pycomm.compression import OneBit

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=120))
    pycomm.init_process_group(store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    rows = []
    for name, comp in (("none (float32)", None), ("OneBit (1-bit + error feedback)", OneBit())):
        rows.append((name,) + train(rank, world, epochs, comp))
    transport = pycomm.transport()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        queue.put((rows, transport))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--no-bench", action="store_true", help="skip the all_reduce sweep against Gloo")
    args = ap.parse_args()

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"== pycomm demo: {args.ranks} ranks train an MLP on sklearn digits with pycomm.DataParallel",
          flush=True)
    # Huge pages for large tensors (inherited by the spawned ranks): the shm transport's
    # cross-memory reads pin 2 MiB pages instead of 4 KiB ones (docs/USER_GUIDE.md).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, args.ranks, port, args.epochs, q)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    rows, transport = q.get(timeout=900)
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        print("a rank failed", file=sys.stderr)
        return 1
    ring = rows[0][4]  # what a float32 ring all-reduce of the gradients would send per rank
    print(f"\n   transport: {transport}, {args.epochs} epochs, per-rank batch 16, SGD lr 0.2")
    print(f"   bytes sent/rank are measured by pycomm.stats(); 'vs fp32 ring' divides the {ring:,d} bytes a\n"
          f"   float32 ring all-reduce sends per rank for the same steps by the measured bytes\n"
          f"   (small uncompressed all-reduces use the one-shot shared-memory algorithm, which trades\n"
          f"   bytes for latency, so the uncompressed row can send more than a ring would)\n")
    print(f"   {'compression':34s} {'test acc':>9s} {'bytes sent/rank':>16s} {'vs fp32 ring':>13s} {'time':>7s}")
    for name, acc, sent, dt, _ in rows:
        ratio = ring / sent if sent else float("inf")
        print(f"   {name:34s} {acc:8.2f}% {sent:16,d} {ratio:12.1f}x {dt:6.1f}s")
    print(f"\n   OneBit sent {ring / max(rows[1][2], 1):.1f}x fewer bytes than a float32 ring all-reduce; "
          f"accuracy {rows[1][1] - rows[0][1]:+.2f} points vs uncompressed.", flush=True)
    if args.no_bench:
        return 0
    print(f"\n== all_reduce sweep: pycomm vs Gloo, {args.ranks} ranks on this host (nccl-tests columns)\n",
          flush=True)
    cmd = [sys.executable, "-m", "pycomm.bench", "all_reduce", "--ranks", str(args.ranks), "-b", "8", "-e", "64M",
           "-f", "2", "-n", "10", "-w", "3", "--compare", "gloo", "--no-progress"]
    return subprocess.call(cmd, env=dict(os.environ, PYTHONWARNINGS="ignore"))


if __name__ == "__main__":
    sys.exit(main())
