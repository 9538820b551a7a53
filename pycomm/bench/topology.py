"""``pycomm-bench [all_reduce|broadcast|reduce] --hosts H --ranks-per-host L``: a
collective on a multi-host layout, measured three ways in one run - pycomm as it
chooses (hierarchical on such layouts), pycomm flat (``PYCOMM_ALGO=ring`` or, with
``--flat-algo rd``, recursive doubling over every rank) and Gloo - with the bytes each
emulated host put on its link, read from the namespace's interface counters
(``/proc/self/net/dev`` of the host's first rank) and printed next to the hierarchical
limit (all_reduce 2(H-1)/H * S; broadcast and reduce S), and the median and 99th
percentile of the per-call times (each call's slowest rank)."""
from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from typing import Dict, List

from pycomm.bench.machine import machine
from pycomm.bench.output import human

#: The variants measured, in order: label, backend, PYCOMM_ALGO of the group (None: auto;
#: "flat": the run's --flat-algo).
VARIANTS = (("pycomm", "pycomm", None), ("pycomm-flat", "pycomm", "flat"), ("gloo", "gloo", None))


def _run(collective: str, t, group, root: int) -> None:
    import torch.distributed as dist

    if collective == "all_reduce":
        dist.all_reduce(t, group=group)
    elif collective == "broadcast":
        dist.broadcast(t, src=root, group=group)
    else:
        dist.reduce(t, dst=root, group=group)


def link_bytes(ifname: str) -> Dict[str, int]:
    """tx/rx byte counters of `ifname` in this process's network namespace."""
    with open("/proc/self/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == ifname:
                v = rest.split()
                return {"rx": int(v[0]), "tx": int(v[8])}
    raise RuntimeError(f"pycomm-bench: interface {ifname!r} not found in /proc/self/net/dev")


def _sizes(lo: int, hi: int, factor: int) -> List[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def run_topology(args, rank: int, world: int) -> int:
    """Rank body of the topology comparison (under launch_cluster)."""
    import torch
    import torch.distributed as dist

    import pycomm

    hosts, per_host = args.hosts, args.ranks_per_host
    coll = getattr(args, "collective", "all_reduce")
    root = getattr(args, "root", 0)
    flat = getattr(args, "flat_algo", "ring")
    host = int(os.environ.get("GROUP_RANK", rank // per_host))
    local_rank = int(os.environ.get("LOCAL_RANK", rank % per_host))
    ifname = os.environ.get("PYCOMM_SOCKET_IFNAME", "eth0")
    timeout = datetime.timedelta(seconds=args.timeout)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.pop("PYCOMM_ALGO", None)
    dist.init_process_group("pycomm", init_method="env://", rank=rank, world_size=world, timeout=timeout)
    try:
        side = dist.new_group(backend="gloo", timeout=timeout)
        groups = {}
        for label, backend, algo in VARIANTS:
            if label == "pycomm":
                groups[label] = None
                continue
            if algo:
                os.environ["PYCOMM_ALGO"] = flat if algo == "flat" else algo
            groups[label] = dist.new_group(backend=backend, timeout=timeout)
            warm = torch.ones(1)
            dist.all_reduce(warm, group=groups[label])  # the backend reads PYCOMM_ALGO when it is built
            os.environ.pop("PYCOMM_ALGO", None)
        rows = []
        for size in _sizes(args.minbytes, args.maxbytes, args.stepfactor):
            count = max(1, size // 4)
            size = count * 4
            def inp(r):
                return (torch.arange(count, dtype=torch.float64) % 13) * 0.5 + r

            # reduce: only the root's result is defined (Gloo overwrites other ranks' buffers).
            ref = inp(root) if coll == "broadcast" else sum(inp(r) for r in range(world))
            for label, backend, algo in VARIANTS:
                g = groups[label]
                x = inp(rank).float()
                before_stats = pycomm.stats(g) if backend == "pycomm" else {}
                y = x.clone()
                _run(coll, y, g, root)
                wrong = int((y.double() - ref).abs().gt(1e-6 * ref.abs().max().clamp(min=1)).sum())
                if coll == "reduce" and rank != root:
                    wrong = 0
                for _ in range(args.warmup):
                    _run(coll, x, g, root)
                dist.barrier(group=side)
                c0 = link_bytes(ifname) if local_rank == 0 else None
                p0 = pycomm.stats(g).get("bytes_sent_tcp", 0) if backend == "pycomm" else 0
                each = torch.zeros(args.iters, dtype=torch.float64)
                t0 = time.perf_counter()
                for i in range(args.iters):
                    ti = time.perf_counter()
                    _run(coll, x, g, root)
                    each[i] = time.perf_counter() - ti
                t = (time.perf_counter() - t0) / args.iters
                p1 = pycomm.stats(g).get("bytes_sent_tcp", 0) if backend == "pycomm" else 0
                dist.barrier(group=side)
                c1 = link_bytes(ifname) if local_rank == 0 else None
                # Per host: tx and rx bytes per call on its link, and the TCP payload its
                # ranks sent (pycomm's counters); per rank: #wrong.
                v = torch.zeros(3 * hosts + 1, dtype=torch.float64)
                if c0 is not None:
                    v[2 * host] = (c1["tx"] - c0["tx"]) / args.iters
                    v[2 * host + 1] = (c1["rx"] - c0["rx"]) / args.iters
                v[2 * hosts + host] = (p1 - p0) / args.iters
                v[-1] = wrong
                dist.all_reduce(v, group=side)
                tmax = torch.tensor([t], dtype=torch.float64)
                dist.all_reduce(tmax, op=dist.ReduceOp.MAX, group=side)
                dist.all_reduce(each, op=dist.ReduceOp.MAX, group=side)  # each call's slowest rank
                algos = {}
                if backend == "pycomm":
                    after = pycomm.stats(g)
                    pre = f"algo_{coll}_"
                    algos = {k[len(pre):]: after[k] - before_stats.get(k, 0)
                             for k in after if k.startswith(pre) and after[k] != before_stats.get(k, 0)}
                rows.append({"size": size, "variant": label, "time_s": float(tmax), "algos": algos,
                             "p50_s": float(torch.quantile(each, 0.5)), "p99_s": float(torch.quantile(each, 0.99)),
                             "tx_per_host": [float(v[2 * h]) for h in range(hosts)],
                             "rx_per_host": [float(v[2 * h + 1]) for h in range(hosts)],
                             "payload_per_host": [float(v[2 * hosts + h]) for h in range(hosts)] if backend == "pycomm"
                             else None,
                             "wrong": int(v[-1])})
                if rank == 0:
                    _print_row(rows[-1], hosts, rows, coll)
        if rank == 0:
            _finish(args, rows, world, hosts, per_host, coll, flat)
        dist.barrier(group=side)
        return 0 if all(r["wrong"] == 0 for r in rows) else 1
    finally:
        dist.destroy_process_group()


def _limit(size: int, hosts: int, collective: str = "all_reduce") -> float:
    """Fewest bytes the busiest host link must carry: all_reduce 2(H-1)/H * S; broadcast
    (the root's host sends S) and reduce (every other host sends S) S."""
    if hosts < 2:
        return 0.0
    return 2 * (hosts - 1) / hosts * size if collective == "all_reduce" else float(size)


def _print_row(row, hosts, rows, collective="all_reduce") -> None:
    if row["variant"] == VARIANTS[0][0] and len([r for r in rows if r["variant"] == VARIANTS[0][0]]) == 1:
        print(f"# {'size':>10} {'variant':>12} {'time ms':>9} {'p50 ms':>8} {'p99 ms':>8} {'algbw GB/s':>10} "
              f"{'tx/host MB (max)':>16} {'limit MB':>9} {'tx/limit':>8} {'payload/limit':>13} {'vs pycomm':>9} "
              f"{'#wrong':>6} algorithm")
    base = next(r for r in rows if r["size"] == row["size"] and r["variant"] == VARIANTS[0][0])
    lim = _limit(row["size"], hosts, collective)
    tx = max(row["tx_per_host"])
    payload = f"{max(row['payload_per_host']) / lim:.3f}" if row["payload_per_host"] and lim else "-"
    print(f"  {row['size']:>10} {row['variant']:>12} {row['time_s'] * 1e3:9.3f} {row['p50_s'] * 1e3:8.3f} "
          f"{row['p99_s'] * 1e3:8.3f} {row['size'] / row['time_s'] / 1e9:10.3f} "
          f"{tx / 1e6:16.2f} {lim / 1e6:9.2f} {tx / lim if lim else float('nan'):8.3f} {payload:>13} "
          f"{row['time_s'] / base['time_s']:8.2f}x {row['wrong']:>6} {','.join(row['algos']) or '-'}", flush=True)


def _finish(args, rows, world, hosts, per_host, collective="all_reduce", flat="ring") -> None:
    import torch

    meta = {"collective": collective, "root": getattr(args, "root", 0), "flat_algo": flat,
            "hosts": hosts, "ranks_per_host": per_host, "nranks": world, "link": args.link,
            "latency": args.latency, "iters": args.iters, "warmup": args.warmup, "dtype": "float32", "op": "sum",
            "torch": torch.__version__, "machine": machine(), "load": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": os.environ.get("PYCOMM_BENCH_COMMAND") or " ".join(shlex.quote(a) for a in sys.argv)}
    if os.environ.get("PYCOMM_BENCH_NETEM"):
        meta["netem"] = json.loads(os.environ["PYCOMM_BENCH_NETEM"])
    lim = "2(H-1)/H * S" if collective == "all_reduce" else "S"
    print(f"# {collective}, {hosts} hosts x {per_host} ranks, link {args.link}; pycomm-flat = PYCOMM_ALGO={flat}; "
          f"tx/host = bytes each host's link sent per call (interface counters: Ethernet/IP/TCP headers and ACKs "
          f"included); payload = TCP payload pycomm's ranks on that host sent (bytes_sent_tcp, max over hosts); "
          f"limit = {lim}; p50/p99 = percentiles over the timed calls of each call's slowest rank", flush=True)
    for size in sorted({r["size"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["size"] == size}
        if "pycomm" in by:
            t = by["pycomm"]["time_s"]
            print(f"# {human(size)}B: pycomm {t * 1e3:.3f} ms (p50 {by['pycomm']['p50_s'] * 1e3:.3f}, p99 "
                  f"{by['pycomm']['p99_s'] * 1e3:.3f}); speed-up vs pycomm-flat {by['pycomm-flat']['time_s'] / t:.2f}x "
                  f"(p50 {by['pycomm-flat']['p50_s'] / by['pycomm']['p50_s']:.2f}x), vs gloo "
                  f"{by['gloo']['time_s'] / t:.2f}x (p50 {by['gloo']['p50_s'] / by['pycomm']['p50_s']:.2f}x)",
                  flush=True)
    print(f"# {json.dumps(meta)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
