#!/usr/bin/env python3
"""Convergence and time of local-update and asynchronous data parallelism, all in one run:
torch DDP (Gloo), pycomm DataParallel, torch PostLocalSGD, pycomm LocalSGD (H = 4, 8),
DiLoCo (Nesterov outer steps; plain and with OneBit-compressed deltas), and -- with one
rank slowed -- synchronous DataParallel, balanced DataParallel (SpeedBalancer) and
AsyncLocalSGD (time-based rounds, bounded staleness).

    python benchmarks/bench_local_sgd.py                      # 4 ranks, 3 seeds, all modes, shm
    python benchmarks/bench_local_sgd.py --seeds 1 --modes dp,diloco_h8 --epochs 10
    python benchmarks/bench_local_sgd.py --hosts 4 --link 1gbit --hidden 1024 --depth 2 \
        --seeds 2 --window 0.25 --modes ddp_gloo,dp,postlocalsgd_h8,localsgd_h8,diloco_h8,\
diloco_h8_onebit,dp_slow,balanced_dp_slow,async_slow --out benchmarks/results/local_sgd_1gbit

``--hosts H --link R`` runs the ranks in H network namespaces joined by ``tc``-shaped
links (pycomm.bench.netem; root and iproute2 needed), pycomm over TCP; ``--hidden`` /
``--depth`` widen the MLP (1024 x 2: 1.1 M parameters, 4.5 MB of float32 per
all-reduce) so that communication matters.

Task: a 64-64-10 MLP (``--hidden``, ``--depth``) on scikit-learn's digits (1437 train / 360 test, no download),
batch 32 per rank, SGD (lr 0.1, momentum 0.9, cosine decay over the run). Every mode
processes the same number of samples (``epochs`` x the training set). Rank r reads the
shard ``r::world`` (balanced mode: its share of each global batch drawn from the whole
training set).

Emulated compute: every rank sleeps ``--compute-us`` microseconds per sample in its
forward (so that 4 ranks on a 2-core machine behave like 4 devices, and a rank's speed
is controlled); in the slowed modes (``*_slow``) rank ``world-1`` sleeps
``--slow-factor`` times as long (a benchmark knob emulating a slower device; the
library is not involved). AsyncLocalSGD then runs time-based rounds of ``--window`` seconds with
staleness 1 until the group has processed the same number of samples.

Reported per mode (mean over seeds, +- half the min..max spread): final test accuracy of
the model every rank holds at the end (after ``flush()`` for local modes), wall time of
the training loop (evaluation excluded), the time to reach the target accuracy (sync
DataParallel's mean final accuracy minus 1 point; accuracy is checked once per epoch of
samples, on the outer parameters), and the bytes rank 0 put on the wire
(``pycomm.stats("all")``; Gloo modes show n/a). Raw per-run records go to
``<out>.json``, the table to ``<out>.txt`` (default ``benchmarks/results/local_sgd``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ALL_MODES = ["ddp_gloo", "dp", "postlocalsgd_h8", "localsgd_h4", "localsgd_h8", "localsgd_h8_nooverlap",
             "diloco_h8", "diloco_h8_m09", "diloco_h8_onebit",
             "dp_slow", "balanced_dp_slow", "localsgd_h8_slow", "async_slow"]


def _data():
    """Digits, the 80/20 split of the convergence benchmark (same data, same split)."""
    from bench_convergence import digits  # benchmarks/ is the script's folder

    return digits()


def _model(seed: int, hidden: int = 64, depth: int = 1):
    import torch

    torch.manual_seed(seed)
    layers, width = [], 64
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def _slow_module():
    import torch

    class Slow(torch.nn.Module):
        """Sleeps ``delay`` seconds per sample in forward: the benchmark's slowed rank."""

        def __init__(self, inner: Any, delay: float) -> None:
            super().__init__()
            self.inner = inner
            self.delay = delay

        def forward(self, x: Any) -> Any:
            if self.delay:
                time.sleep(self.delay * x.shape[0])
            return self.inner(x)

    return Slow


def _Slow(inner: Any, delay: float) -> Any:
    return _slow_module()(inner, delay)


def _run(rank: int, world: int, mode: str, seed: int, args: argparse.Namespace, gloo: Any) -> Dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import pycomm

    xtr, ytr, xte, yte = _data()
    batch = args.batch
    slow = mode.endswith("_slow")
    delay = args.compute_us * 1e-6 * (args.slow_factor if (slow and rank == world - 1) else 1.0)
    model = _model(seed, args.hidden, args.depth)  # the same initial weights on every rank
    evalm = _model(seed, args.hidden, args.depth)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    core = _Slow(model, delay)
    steps_per_epoch = len(ytr) // (batch * world)
    total_steps = args.epochs * steps_per_epoch
    budget = total_steps * batch * world  # samples, all ranks together

    net: Any = core
    ls: Any = None
    bal: Any = None
    post = False
    if mode == "ddp_gloo":
        net = torch.nn.parallel.DistributedDataParallel(core, process_group=gloo)
    elif mode in ("dp", "dp_slow"):
        net = pycomm.DataParallel(core)
    elif mode == "balanced_dp_slow":
        bal = pycomm.balance.SpeedBalancer(batch * world, every=10, smoothing=0.5)
        net = pycomm.DataParallel(core, balance=bal)
    elif mode == "postlocalsgd_h8":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

        opt = PostLocalSGDOptimizer(optim=opt, averager=PeriodicModelAverager(period=8, warmup_steps=0,
                                                                              process_group=gloo))
        post = True
    elif mode == "async_slow":
        ls = pycomm.AsyncLocalSGD(model, opt, window=args.window, staleness=1)
    else:
        kw: Dict[str, Any] = {
            "localsgd_h4": dict(sync_every=4),
            "localsgd_h8": dict(sync_every=8),
            "localsgd_h8_slow": dict(sync_every=8),
            "localsgd_h8_nooverlap": dict(sync_every=8, overlap=False),
            "diloco_h8": dict(sync_every=8, outer_optimizer="nesterov", outer_momentum=0.5),
            "diloco_h8_m09": dict(sync_every=8, outer_optimizer="nesterov", outer_momentum=0.9),
            "diloco_h8_onebit": dict(sync_every=8, outer_optimizer="nesterov", outer_momentum=0.5,
                                     compression=pycomm.compression.OneBit()),
        }[mode]
        ls = pycomm.LocalSGD(model, opt, **kw)
    base_opt = opt.optim if post else opt

    def accuracy() -> float:
        with torch.no_grad():
            if ls is not None:  # the outer parameters: what every rank agrees on
                flat = ls.outer_parameters()[0]
                torch.nn.utils.vector_to_parameters(flat, evalm.parameters())
                m = evalm
            else:
                m = model
            return (m(xte).argmax(1) == yte).float().mean().item()

    g = torch.Generator().manual_seed(seed * 7919 + rank)
    shard_x, shard_y = xtr[rank::world], ytr[rank::world]
    gperm = torch.Generator().manual_seed(seed)  # balanced: the same global batches everywhere

    def next_batch():
        if bal is not None:
            idx = torch.randint(0, len(ytr), (batch * world,), generator=gperm)
            return bal.slice(xtr[idx]), bal.slice(ytr[idx])
        idx = torch.randint(0, len(shard_y), (batch,), generator=g)
        return shard_x[idx], shard_y[idx]

    stats0 = pycomm.stats("all")
    dist.barrier()
    curve: List[List[float]] = []
    train_time = 0.0
    t_start = time.perf_counter()
    step = 0
    next_eval = budget / args.epochs
    while True:
        if ls is not None and mode == "async_slow":
            done = ls.samples_applied
            if done >= budget:
                break
            frac = done / budget
        else:
            if step >= total_steps:
                break
            done = step * batch * world
            frac = step / total_steps
        for pg in base_opt.param_groups:
            pg["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        x, y = next_batch()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if ls is not None:
            ls.step(num_samples=x.shape[0])
        else:
            opt.step()
        step += 1
        done_now = ls.samples_applied if mode == "async_slow" else step * batch * world
        if done_now >= next_eval:
            t_pause = time.perf_counter()
            train_time += t_pause - t_start
            curve.append([train_time, done_now, accuracy()])
            next_eval += budget / args.epochs
            t_start = time.perf_counter()
    if ls is not None:
        ls.flush()
    train_time += time.perf_counter() - t_start
    stats1 = pycomm.stats("all")
    with torch.no_grad():
        final = (model(xte).argmax(1) == yte).float().mean().item()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    check = torch.stack([flat.sum(), flat.pow(2).sum()]).double()
    mx = check.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=gloo)
    mn = check.clone()
    dist.all_reduce(mn, op=dist.ReduceOp.MIN, group=gloo)
    rec = {"mode": mode, "seed": seed, "final_acc": final, "train_seconds": train_time, "local_steps": step,
           "samples": budget, "curve": curve,
           "bytes_sent": (stats1["bytes_sent"] - stats0["bytes_sent"]) if not mode.startswith(("ddp", "post"))
           else None,
           "ranks_identical": bool(torch.equal(mx, mn))}
    if ls is not None:
        rec["comm_stats"] = dict(ls.comm_stats)
    if bal is not None:
        rec["shares"] = bal.history[-1]
    if mode == "async_slow":
        rec["steps_per_round_mean"] = statistics.mean(ls.steps_per_round[:-1]) if len(ls.steps_per_round) > 1 else 0
    return rec


def _worker(args: argparse.Namespace) -> None:
    """One rank, started by main() (env: RANK, WORLD_SIZE, MASTER_ADDR/PORT); appends its
    records as JSON lines to ``$PYCOMM_BENCH_LSGD_DIR/rank<r>.jsonl``."""
    import torch
    import torch.distributed as dist

    import pycomm  # noqa: F401

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("pycomm", timeout=datetime.timedelta(seconds=300))
    gloo = dist.new_group(backend="gloo")
    path = os.path.join(os.environ["PYCOMM_BENCH_LSGD_DIR"], f"rank{rank}.jsonl")
    with open(path, "w") as f:
        for seed in range(args.seeds):
            for mode in args.modes:
                dist.barrier()
                rec = _run(rank, world, mode, seed, args, gloo)
                if rank == 0:
                    print(f"seed {seed} {mode:24s} acc {rec['final_acc']:.4f}  train {rec['train_seconds']:.2f}s",
                          flush=True)
                else:
                    rec = {"rank": rank, "mode": mode, "seed": seed, "steps": rec["local_steps"],
                           "train_seconds": rec["train_seconds"]}
                f.write(json.dumps(rec) + "\n")
                f.flush()
    dist.barrier()
    dist.destroy_process_group()


def _launch(args: argparse.Namespace, argv: List[str], tmp: str) -> Optional[Dict[str, Any]]:
    """Starts the ranks (on this host, or one per emulated host) and waits for them."""
    import subprocess

    n = args.ranks
    base = {"WORLD_SIZE": str(n), "PYCOMM_BENCH_LSGD_WORKER": "1", "PYCOMM_BENCH_LSGD_DIR": tmp,
            "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.abspath(__file__)] + argv
    if args.hosts:
        from pycomm.bench import netem

        with netem.Cluster(hosts=args.hosts, link=args.link, latency=args.latency) as cluster:
            extra = {"MASTER_ADDR": cluster.addr(0), "MASTER_PORT": "29517", "PYCOMM_TRANSPORT": "tcp",
                     "PYCOMM_SOCKET_IFNAME": cluster.ifname, "GLOO_SOCKET_IFNAME": cluster.ifname}
            procs = [cluster.run(r * args.hosts // n, cmd, env={**base, **extra, "RANK": str(r)})
                     for r in range(n)]
            rc = max(p.wait() for p in procs)
            desc = cluster.describe()
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for r in range(n):
            env = dict(os.environ)
            env.update(base)
            env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r)})
            procs.append(subprocess.Popen(cmd, env=env))
        rc = max(p.wait() for p in procs)
        desc = None
    if rc != 0:
        raise SystemExit(f"a rank failed (exit code {rc})")
    return desc


def _stamp(argv: List[str]) -> Dict[str, Any]:
    import torch

    from pycomm.bench.machine import machine

    return {"machine": machine(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_start": list(os.getloadavg()),
            "command": " ".join(["python", "benchmarks/bench_local_sgd.py"] + argv)}


def _fmt(vals: List[float], scale: float = 1.0, digits: int = 1) -> str:
    if not vals or any(v is None for v in vals):
        return "n/a"
    m = statistics.mean(vals) * scale
    half = (max(vals) - min(vals)) * scale / 2
    return f"{m:.{digits}f} ± {half:.{digits}f}"


def summarize(doc: Dict[str, Any]) -> str:
    runs = doc["runs"]
    modes = [m for m in ALL_MODES if any(r["mode"] == m for r in runs)]
    by = {m: [r for r in runs if r["mode"] == m] for m in modes}
    dp_final = [r["final_acc"] for r in by.get("dp", [])]
    target = (statistics.mean(dp_final) - 0.01) if dp_final else None
    lines = [f"# machine: {doc['machine']['cores']} cores, {doc['machine']['cpu']}, {doc['machine']['platform']}",
             f"# torch: {doc['torch']}  date: {doc['date']}",
             f"# command: {doc['command']}",
             f"# load average before: {' '.join(f'{v:.2f}' for v in doc['loadavg_start'])}  "
             f"after: {' '.join(f'{v:.2f}' for v in doc['loadavg_end'])}",
             f"# {doc['world']} ranks (pycomm, "
             + (f"{doc['hosts']} emulated hosts, {doc['link']} links, tcp" if doc.get("hosts") else "shm")
             + f"; DDP/PostLocalSGD on a Gloo group of the same ranks), MLP 64-"
             f"{'-'.join([str(doc.get('hidden', 64))] * doc.get('depth', 1))}-10, "
             f"{doc['seeds']} seeds, {doc['epochs']} epochs of samples, batch {doc['batch']}/rank, "
             f"emulated compute {doc['compute_us']} us/sample on every rank, x{doc['slow_factor']} on the slowed "
             f"rank, async window {doc['window']} s",
             f"# target accuracy (dp mean final - 1 point): {target * 100:.1f} %" if target else "# target: n/a",
             "",
             "| mode | final acc % | train wall s | time to target s (reached) | bytes sent by rank 0 | "
             "ranks identical | notes |",
             "|---|---|---|---|---|---|---|"]
    for m in modes:
        rs = by[m]
        ttt = []
        for r in rs:
            hit = next((c[0] for c in r["curve"] if target is not None and c[2] >= target), None)
            ttt.append(hit)
        reached = [t for t in ttt if t is not None]
        ttt_s = (_fmt(reached, digits=2) + f" ({len(reached)}/{len(rs)})") if reached else f"- (0/{len(rs)})"
        b = [r["bytes_sent"] for r in rs]
        bytes_s = "n/a" if any(v is None for v in b) else f"{statistics.mean(b) / 1e6:.2f} MB"
        notes = []
        if m == "async_slow":
            notes.append(f"rounds of {statistics.mean(r['steps_per_round_mean'] for r in rs):.1f} steps (rank 0)")
        if "shares" in rs[0]:
            notes.append(f"final shares {rs[0]['shares']}")
        slow_steps = [x for x in doc.get("rank_steps", []) if x["mode"] == m]
        if m in ("async_slow", "localsgd_h8_slow") and slow_steps:
            per = {}
            for x in slow_steps:
                per.setdefault(x["rank"], []).append(x["steps"])
            notes.append("local steps by rank " + "/".join(
                f"{statistics.mean(per[k]):.0f}" for k in sorted(per)))
        if rs[0].get("comm_stats"):
            cs = rs[0]["comm_stats"]
            notes.append(f"exposed comm {cs['exposed_seconds'] * 1e3:.0f} of {cs['comm_seconds'] * 1e3:.0f} ms")
        lines.append(f"| {m} | {_fmt([r['final_acc'] for r in rs], 100)} | "
                     f"{_fmt([r['train_seconds'] for r in rs], 1, 2)}"
                     f" | {ttt_s} | {bytes_s} | {all(r['ranks_identical'] for r in rs)} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--compute-us", type=float, default=200.0,
                   help="emulated compute: microseconds slept per sample in every rank's forward")
    p.add_argument("--slow-factor", type=float, default=2.0, help="the slowed rank's emulated compute multiplier")
    p.add_argument("--window", type=float, default=0.05, help="AsyncLocalSGD round length, seconds")
    p.add_argument("--modes", default=",".join(ALL_MODES))
    p.add_argument("--hidden", type=int, default=64, help="MLP width")
    p.add_argument("--depth", type=int, default=1, help="hidden layers")
    p.add_argument("--hosts", type=int, default=0, help="emulated hosts (pycomm.bench.netem, root); 0 = shm")
    p.add_argument("--link", default="1gbit", help="per-host link rate with --hosts (tc syntax)")
    p.add_argument("--latency", default="100us", help="one-way latency with --hosts (if sch_netem exists)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "local_sgd"))
    args = p.parse_args(argv)
    if os.environ.get("PYCOMM_BENCH_LSGD_WORKER") == "1":
        args.modes = [m for m in args.modes.split(",") if m]
        _worker(args)
        return
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in ALL_MODES:
            raise SystemExit(f"unknown mode {m}; choose from {ALL_MODES}")
    doc = _stamp(argv)
    doc.update({"world": args.ranks, "seeds": args.seeds, "epochs": args.epochs, "batch": args.batch,
                "hidden": args.hidden, "depth": args.depth, "hosts": args.hosts,
                "link": args.link if args.hosts else None, "compute_us": args.compute_us,
                "slow_factor": args.slow_factor, "window": args.window, "runs": [], "rank_steps": []})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        doc["netem"] = _launch(args, argv, tmp)
        for r in range(args.ranks):
            with open(os.path.join(tmp, f"rank{r}.jsonl")) as f:
                for line in f:
                    item = json.loads(line)
                    if "rank" in item:
                        doc["rank_steps"].append(item)
                    else:
                        doc["runs"].append(item)
                        doc["rank_steps"].append({"rank": 0, "mode": item["mode"], "seed": item["seed"],
                                                  "steps": item["local_steps"],
                                                  "train_seconds": item["train_seconds"]})
    doc["loadavg_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    table = summarize(doc)
    with open(args.out + ".txt", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
