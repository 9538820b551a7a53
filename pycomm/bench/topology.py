"""``pycomm-bench [all_reduce|reduce_scatter|all_gather|broadcast|reduce] --hosts H --ranks-per-host L``
(or ``L0,L1,...``, one count per host: uneven hosts, ranks placed in blocks): a
collective on a multi-host layout, measured three ways in one run - pycomm as it
chooses (hierarchical on such layouts), pycomm flat (``PYCOMM_ALGO=ring`` or, with
``--flat-algo rd``, recursive doubling over every rank) and Gloo - with the bytes each
emulated host put on its link, read from the namespace's interface counters
(``/proc/self/net/dev`` of the host's first rank) and printed next to the hierarchical
limit (all_reduce 2(H-1)/H * S; reduce_scatter and all_gather (n-L_min)/n * S, which is
(H-1)/H * S on equal hosts; broadcast and reduce S), the median and 99th percentile
of the per-call times (each call's slowest rank), and each variant's wire-time limit
(its limit bytes at the link rate).

With ``--compression onebit`` (or fp16, bf16, qsgd; all_reduce) a fourth variant,
``pycomm-<codec>``, runs the compressor with ``scope="cross_host"``: exact in-host steps,
the codec on the host links only; its limit is the codec payload the host's ranks must
send (pycomm's own plan of the call).

``--tcp-streams-compare`` measures TCP streams instead: pycomm with PYCOMM_TCP_STREAMS=auto,
with one stream, two, four, and Gloo, next to the wire time of the limit on the emulated link."""
from __future__ import annotations

import datetime
import json
import os
import resource
import shlex
import statistics
import sys
import time
from typing import Dict, List

from pycomm.bench.machine import machine
from pycomm.bench.output import human

#: The variants measured, in order: label, backend, PYCOMM_ALGO of the group (None: auto;
#: "flat": the run's --flat-algo), PYCOMM_TCP_STREAMS of the group (None: as the environment says).
TOPOLOGY_VARIANTS = (("pycomm", "pycomm", None, None), ("pycomm-flat", "pycomm", "flat", None),
                     ("gloo", "gloo", None, None))
#: --tcp-streams-compare: pycomm with "auto" streams (the default group), one stream, two,
#: four streams, Gloo.
STREAMS_VARIANTS = (("pycomm", "pycomm", None, None), ("pycomm-1stream", "pycomm", None, "1"),
                    ("pycomm-2streams", "pycomm", None, "2"), ("pycomm-4streams", "pycomm", None, "4"),
                    ("gloo", "gloo", None, None))
VARIANTS = TOPOLOGY_VARIANTS


def _variants(args):
    """The variants of this run: the topology or the TCP-streams comparison, plus with
    --compression the cross-host compressed one (on the default group) second."""
    base = STREAMS_VARIANTS if getattr(args, "tcp_streams_compare", False) else TOPOLOGY_VARIANTS
    if not getattr(args, "compression", None):
        return base
    return base[:1] + ((f"pycomm-{args.compression}", "pycomm", None, None),) + base[1:]


def _compressor(args):
    """The cross-host-only compressor of the compressed variant."""
    from pycomm.bench.rank import load_compressor

    return load_compressor(args.compression)(scope="cross_host")


def _run(collective: str, t, group, root: int, out=None) -> None:
    import torch.distributed as dist

    if collective == "all_reduce":
        dist.all_reduce(t, group=group)
    elif collective == "reduce_scatter":
        dist.reduce_scatter_tensor(out, t, group=group)
    elif collective == "all_gather":
        dist.all_gather_into_tensor(out, t, group=group)
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


def shaped_bytes(ifname: str):
    """Bytes the link's shaper (the tbf / netem qdisc on `ifname` in this process's
    network namespace) has charged: every frame it sent with its Ethernet, IP and TCP
    headers counted once per wire packet (a GSO super-packet counts as the packets it is
    cut into), so bytes * 8 / rate is the least time the frames needed on the link. None
    where tc is missing or the device has no such qdisc."""
    import subprocess

    try:
        p = subprocess.run(["tc", "-s", "-j", "qdisc", "show", "dev", ifname], capture_output=True, text=True,
                           timeout=10)
        rows = json.loads(p.stdout) if p.returncode == 0 and p.stdout.strip() else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    shaper = [r for r in rows if r.get("kind") in ("tbf", "netem") and "bytes" in r]
    return int(shaper[0]["bytes"]) if shaper else None


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
    layout = host_counts(args)
    coll = getattr(args, "collective", "all_reduce")
    root = getattr(args, "root", 0)
    flat = getattr(args, "flat_algo", "ring")
    starts = [sum(layout[:h]) for h in range(hosts + 1)]
    my_host = next(h for h in range(hosts) if starts[h] <= rank < starts[h + 1])
    host = int(os.environ.get("GROUP_RANK", my_host))
    local_rank = int(os.environ.get("LOCAL_RANK", rank - starts[my_host]))
    ifname = os.environ.get("PYCOMM_SOCKET_IFNAME", "eth0")
    timeout = datetime.timedelta(seconds=args.timeout)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.pop("PYCOMM_ALGO", None)
    variants = _variants(args)
    if getattr(args, "tcp_streams_compare", False):
        os.environ.pop("PYCOMM_TCP_STREAMS", None)  # the default group: "auto"
    dist.init_process_group("pycomm", init_method="env://", rank=rank, world_size=world, timeout=timeout)
    try:
        side = dist.new_group(backend="gloo", timeout=timeout)
        groups = {}
        comp = _compressor(args) if args.compression else None
        for label, backend, algo, streams in variants:
            if label == "pycomm" or label == f"pycomm-{args.compression}":
                groups[label] = None
                continue
            if algo:
                os.environ["PYCOMM_ALGO"] = flat if algo == "flat" else algo
            saved = os.environ.get("PYCOMM_TCP_STREAMS")
            if streams:
                os.environ["PYCOMM_TCP_STREAMS"] = streams
            groups[label] = dist.new_group(backend=backend, timeout=timeout)
            warm = torch.ones(1)
            dist.all_reduce(warm, group=groups[label])  # the backend reads the settings when it is built
            os.environ.pop("PYCOMM_ALGO", None)
            if saved is None:
                os.environ.pop("PYCOMM_TCP_STREAMS", None)
            else:
                os.environ["PYCOMM_TCP_STREAMS"] = saved
        rows = []
        gather = coll == "all_gather"
        scatter = coll == "reduce_scatter"
        for size in _sizes(args.minbytes, args.maxbytes, args.stepfactor):
            # all_gather: size is the gathered result (nccl-tests), each rank gives 1/world of
            # it; reduce_scatter: size is each rank's input, each rank gets 1/world of it.
            count = max(1, size // 4 // world) if gather or scatter else max(1, size // 4)
            size = count * 4 * (world if gather or scatter else 1)
            def inp(r):
                return (torch.arange(count * (world if scatter else 1), dtype=torch.float64) % 13) * 0.5 + r

            # reduce: only the root's result is defined (Gloo overwrites other ranks' buffers).
            if gather:
                ref = torch.cat([inp(r) for r in range(world)])
            elif scatter:
                ref = sum(inp(r) for r in range(world))[rank * count:(rank + 1) * count]
            else:
                ref = inp(root) if coll == "broadcast" else sum(inp(r) for r in range(world))
            gathered = torch.empty(count * world) if gather else (torch.empty(count) if scatter else None)
            # Several rounds, the variants interleaved in each, so that a load change on a
            # shared machine hits every variant alike; the summary takes medians.
            for label, backend, algo, _streams in [v for _ in range(max(1, args.rounds)) for v in variants]:
                g = groups[label]
                compressed = comp is not None and label == f"pycomm-{args.compression}"
                x = inp(rank).float()
                before_stats = pycomm.stats(g) if backend == "pycomm" else {}
                y = x.clone()
                err = None
                if compressed:
                    # Lossy: no #wrong; the relative error of the first (fresh-state) call instead.
                    comp.all_reduce(y, key="bench", op="sum")
                    wrong = 0 if bool(torch.isfinite(y).all()) else count
                    err = float((y.double() - ref).norm() / ref.norm())
                    call = lambda t: comp.all_reduce(t, key="bench", op="avg")  # noqa: E731 - bounded values
                else:
                    if gather or scatter:
                        gathered.fill_(-1.0)
                        _run(coll, y, g, root, out=gathered)
                        y = gathered
                    else:
                        _run(coll, y, g, root)
                    wrong = int((y.double() - ref).abs().gt(1e-6 * ref.abs().max().clamp(min=1)).sum())
                    if coll == "reduce" and rank != root:
                        wrong = 0
                    call = lambda t, g=g: _run(coll, t, g, root, out=gathered)  # noqa: E731
                for _ in range(args.warmup):
                    call(x)
                dist.barrier(group=side)
                c0 = link_bytes(ifname) if local_rank == 0 else None
                q0 = shaped_bytes(ifname) if local_rank == 0 else None
                # Nobody sends until every host has read its counters (reading the
                # shaper's takes a `tc` process: its host's other ranks would otherwise
                # be sending already, and those bytes went uncounted).
                dist.barrier(group=side)
                p0 = pycomm.stats(g).get("bytes_sent_tcp", 0) if backend == "pycomm" else 0
                each = torch.zeros(args.iters, dtype=torch.float64)
                cpu0 = _cpu_s()
                t0 = time.perf_counter()
                isolated = getattr(args, "isolated", False)
                for i in range(args.iters):
                    if isolated:  # no overlap with the previous call
                        dist.barrier(group=side)
                    ti = time.perf_counter()
                    call(x)
                    each[i] = time.perf_counter() - ti
                t = (time.perf_counter() - t0) / args.iters
                cpu = (_cpu_s() - cpu0) / args.iters
                p1 = pycomm.stats(g).get("bytes_sent_tcp", 0) if backend == "pycomm" else 0
                dist.barrier(group=side)
                c1 = link_bytes(ifname) if local_rank == 0 else None
                q1 = shaped_bytes(ifname) if local_rank == 0 else None
                # Per host: tx and rx bytes per call on its link, and the TCP payload its
                # ranks sent (pycomm's counters); per rank: #wrong.
                # (and the shaper's charged bytes per call on the host's egress: -1 unknown).
                v = torch.zeros(5 * hosts + 1, dtype=torch.float64)
                if compressed:  # the codec payload this rank must send across hosts (pycomm's plan)
                    v[3 * hosts + host] = comp.wire_bytes_on(count)["cross_host"]
                if c0 is not None:
                    v[2 * host] = (c1["tx"] - c0["tx"]) / args.iters
                    v[2 * host + 1] = (c1["rx"] - c0["rx"]) / args.iters
                v[2 * hosts + host] = (p1 - p0) / args.iters
                if c0 is not None:
                    v[4 * hosts + host] = (q1 - q0) / args.iters if q0 is not None and q1 is not None else -1.0
                v[-1] = wrong
                dist.all_reduce(v, group=side)
                dist.all_reduce(each, op=dist.ReduceOp.MAX, group=side)  # each call's slowest rank
                if isolated:  # the barriers between calls are not the collective's time
                    t = float(each.mean())
                tmax = torch.tensor([t, cpu], dtype=torch.float64)
                dist.all_reduce(tmax, op=dist.ReduceOp.MAX, group=side)
                algos = {}
                if backend == "pycomm":
                    after = pycomm.stats(g)
                    pre = f"algo_{coll}_"
                    algos = {k[len(pre):]: after[k] - before_stats.get(k, 0)
                             for k in after if k.startswith(pre) and after[k] != before_stats.get(k, 0)}
                if compressed:
                    algos = {"hier_compressed": 1}
                lim_bytes = [float(v[3 * hosts + h]) for h in range(hosts)] if compressed else None
                rows.append({"size": size, "variant": label, "time_s": float(tmax[0]), "algos": algos,
                             "cpu_s": float(tmax[1]),  # user + system CPU of the busiest rank process
                             "p50_s": float(torch.quantile(each, 0.5)), "p99_s": float(torch.quantile(each, 0.99)),
                             "rel_err": err, "limit_per_host": lim_bytes, "layout": layout,
                             "tx_per_host": [float(v[2 * h]) for h in range(hosts)],
                             "rx_per_host": [float(v[2 * h + 1]) for h in range(hosts)],
                             "shaped_per_host": [float(v[4 * hosts + h]) for h in range(hosts)]
                             if all(v[4 * hosts + h] >= 0 for h in range(hosts)) else None,
                             "payload_per_host": [float(v[2 * hosts + h]) for h in range(hosts)] if backend == "pycomm"
                             else None,
                             "wrong": int(v[-1])})
                if rank == 0:
                    _print_row(rows[-1], hosts, rows, variants, coll)
        if rank == 0:
            _finish(args, rows, world, hosts, per_host, variants, coll, flat)
        dist.barrier(group=side)
        return 0 if all(r["wrong"] == 0 for r in rows) else 1
    finally:
        dist.destroy_process_group()


def _cpu_s() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def host_counts(args) -> List[int]:
    """Ranks on each host: --ranks-per-host L on every host, or its per-host list."""
    rph = args.ranks_per_host
    return list(rph) if isinstance(rph, list) else [rph] * args.hosts


def _limit(size: int, hosts: int, collective: str = "all_reduce", layout=None) -> float:
    """Fewest bytes the busiest host link must carry: all_reduce 2(H-1)/H * S;
    reduce_scatter and all_gather (n - L_min)/n * S (a host of L of the n ranks sends its
    contribution to every block owned elsewhere / receives every such block; equal hosts:
    (H-1)/H * S); broadcast (the root's host sends S) and reduce (every other host sends S) S."""
    if hosts < 2:
        return 0.0
    if collective in ("all_gather", "reduce_scatter"):
        if layout:
            return (sum(layout) - min(layout)) / sum(layout) * size
        return (hosts - 1) / hosts * size
    return 2 * (hosts - 1) / hosts * size if collective == "all_reduce" else float(size)


def _wire_s(nbytes: float):
    """Seconds `nbytes` take on the emulated link at its rate (None without netem)."""
    netem = json.loads(os.environ.get("PYCOMM_BENCH_NETEM") or "{}")
    rate = netem.get("rate_bits")
    return nbytes * 8 / rate if rate else None


def _frames_s(row):
    """Seconds the frames this row's calls put on the busiest host link (the shaper's
    charged bytes per call, headers included) need at the link rate: the time no
    algorithm sending those bytes can beat (None without netem or without the counter)."""
    shaped = row.get("shaped_per_host")
    return _wire_s(max(shaped)) if shaped else None


def _row_limit(row, hosts: int, collective: str = "all_reduce") -> float:
    """Bytes the busiest host link must carry for this row's variant: _limit, or for the
    compressed variant the codec payload the host's ranks send (pycomm's plan)."""
    if row.get("limit_per_host"):
        return max(row["limit_per_host"])
    return _limit(row["size"], hosts, collective, row.get("layout"))


def _print_row(row, hosts, rows, variants=TOPOLOGY_VARIANTS, collective="all_reduce") -> None:
    first = variants[0][0]
    if row["variant"] == first and len([r for r in rows if r["variant"] == first]) == 1:
        print(f"# {'size':>10} {'variant':>15} {'time ms':>9} {'p50 ms':>8} {'p99 ms':>8} {'wire ms':>8} {'frames ms':>9} "
              f"{'algbw GB/s':>10} {'tx/host MB (max)':>16} {'limit MB':>9} {'tx/limit':>8} {'payload/limit':>13} "
              f"{'vs pycomm':>9} {'#wrong':>6} algorithm", flush=True)
    base = next(r for r in rows if r["size"] == row["size"] and r["variant"] == first)
    lim = _row_limit(row, hosts, collective)
    tx = max(row["tx_per_host"])
    payload = f"{max(row['payload_per_host']) / lim:.3f}" if row["payload_per_host"] and lim else "-"
    wire = _wire_s(lim)
    wire_ms = f"{wire * 1e3:8.1f}" if wire else f"{'-':>8}"
    frames = _frames_s(row)
    frames_ms = f"{frames * 1e3:9.1f}" if frames else f"{'-':>9}"
    extra = f" rel_err={row['rel_err']:.3g}" if row.get("rel_err") is not None else ""
    print(f"  {row['size']:>10} {row['variant']:>15} {row['time_s'] * 1e3:9.3f} {row['p50_s'] * 1e3:8.3f} "
          f"{row['p99_s'] * 1e3:8.3f} {wire_ms} {frames_ms} {row['size'] / row['time_s'] / 1e9:10.3f} "
          f"{tx / 1e6:16.2f} {lim / 1e6:9.2f} {tx / lim if lim else float('nan'):8.3f} {payload:>13} "
          f"{row['time_s'] / base['time_s']:8.2f}x {row['wrong']:>6} {','.join(row['algos']) or '-'}{extra}",
          flush=True)


def _finish(args, rows, world, hosts, per_host, variants=TOPOLOGY_VARIANTS, collective="all_reduce",
            flat="ring") -> None:
    import torch

    meta = {"collective": collective, "root": getattr(args, "root", 0), "flat_algo": flat,
            "variants": [v[0] for v in variants], "rounds": max(1, args.rounds),
            "tcp_streams": os.environ.get("PYCOMM_TCP_STREAMS", "auto"),
            "hosts": hosts, "ranks_per_host": per_host, "nranks": world, "link": args.link,
            "latency": args.latency, "isolated": bool(getattr(args, "isolated", False)),
            "iters": args.iters, "warmup": args.warmup, "dtype": "float32", "op": "sum",
            "torch": torch.__version__, "machine": machine(), "load": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": os.environ.get("PYCOMM_BENCH_COMMAND") or " ".join(shlex.quote(a) for a in sys.argv)}
    if os.environ.get("PYCOMM_BENCH_NETEM"):
        meta["netem"] = json.loads(os.environ["PYCOMM_BENCH_NETEM"])
    if args.compression:
        meta["compression"] = f"{args.compression} scope=cross_host"
    layout = host_counts(args)
    lim = {"all_reduce": "2(H-1)/H * S", "all_gather": "(n-L_min)/n * S (equal hosts: (H-1)/H * S)",
           "reduce_scatter": "(n-L_min)/n * S (equal hosts: (H-1)/H * S)"}.get(collective, "S")
    hosts_txt = f"{hosts} hosts x {per_host}" if not isinstance(per_host, list) else "hosts of " + "+".join(map(str, per_host))
    print(f"# {collective}, {hosts_txt} ranks, link {args.link}; pycomm-flat = PYCOMM_ALGO={flat}; "
          f"wire ms = limit at the link rate; frames ms = the frames this variant's call put on the busiest "
          f"host link (the shaper's qdisc byte counter: every wire packet's Ethernet/IP/TCP headers counted) at "
          f"the link rate; "
          f"tx/host = bytes each host's link sent per call (interface counters: Ethernet/IP/TCP headers and ACKs "
          f"included); payload = TCP payload pycomm's ranks on that host sent (bytes_sent_tcp, max over hosts); "
          f"limit = {lim}; p50/p99 = percentiles over the timed calls of each call's slowest rank"
          + ("; --isolated: an untimed barrier before every call, time = mean over the calls of each call's "
             "slowest rank; CPU per call includes the barrier" if getattr(args, "isolated", False) else ""),
          flush=True)
    for size in sorted({r["size"] for r in rows}):
        times = {}
        for r in rows:
            if r["size"] == size:
                times.setdefault(r["variant"], []).append(r["time_s"])
        by = {v: {"time_s": statistics.median(ts),
                  "p50_s": statistics.median(r["p50_s"] for r in rows if r["size"] == size and r["variant"] == v),
                  "p99_s": max(r["p99_s"] for r in rows if r["size"] == size and r["variant"] == v)}
              for v, ts in times.items()}
        if "pycomm" in by:
            t = by["pycomm"]["time_s"]
            p50 = by["pycomm"]["p50_s"]
            others = ", ".join(f"vs {v[0]} {by[v[0]]['time_s'] / t:.2f}x (p50 {by[v[0]]['p50_s'] / p50:.2f}x)"
                               for v in variants[1:] if v[0] in by)
            if max(len(ts) for ts in times.values()) > 1:
                print(f"# {human(size)}B medians over {len(times['pycomm'])} interleaved rounds: " + ", ".join(
                    f"{v} {by[v]['time_s'] * 1e3:.1f} ms (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})"
                    for v, ts in times.items()), flush=True)
                cpu = {}
                for r in rows:
                    if r["size"] == size:
                        cpu.setdefault(r["variant"], []).append(r["cpu_s"])
                print(f"# {human(size)}B CPU per call (user+sys of the busiest rank process, median): " + ", ".join(
                    f"{v} {statistics.median(c) * 1e3:.1f} ms = {statistics.median(c) / size * 1e9:.2f} ns/B"
                    for v, c in cpu.items()), flush=True)
            wire = _wire_s(_limit(size, hosts, collective, layout))
            wire_txt = (f"; wire-time limit {wire * 1e3:.1f} ms ({human(_limit(size, hosts, collective, layout))}B per host "
                        f"link at {args.link})" if wire else "")
            print(f"# {human(size)}B: pycomm {t * 1e3:.3f} ms (p50 {p50 * 1e3:.3f}, p99 "
                  f"{by['pycomm']['p99_s'] * 1e3:.3f}); speed-up {others}{wire_txt}", flush=True)
            frames = {}
            for r in rows:
                if r["size"] == size and _frames_s(r):
                    frames.setdefault(r["variant"], []).append(_frames_s(r))
            if "pycomm" in frames:
                fp = statistics.median(frames["pycomm"])
                print(f"# {human(size)}B link time of the frames each variant sent (shaper bytes at the link rate, "
                      f"medians): " + ", ".join(
                          f"{v} {statistics.median(f) * 1e3:.1f} ms ({statistics.median(f) / by[v]['time_s']:.1%} "
                          f"of its time)" for v, f in frames.items() if v in by)
                      + "; speed-up of pycomm if every variant ran at that limit: " + ", ".join(
                          f"vs {v} {statistics.median(f) / fp:.3f}x" for v, f in frames.items()
                          if v != "pycomm"), flush=True)
        for label in by:
            if args.compression and label == f"pycomm-{args.compression}":
                tc = by[label]["time_s"]
                r0 = next(r for r in rows if r["size"] == size and r["variant"] == label)
                wire = _wire_s(_row_limit(r0, hosts))
                print(f"# {human(size)}B: {label} (cross-host only) {tc * 1e3:.1f} ms; vs gloo "
                      f"{by['gloo']['time_s'] / tc:.2f}x, vs pycomm {t / tc:.2f}x"
                      + (f"; wire-time limit {wire * 1e3:.1f} ms" if wire else "")
                      + f"; relative error of one call {r0['rel_err']:.3g}", flush=True)
    print(f"# {json.dumps(meta)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
