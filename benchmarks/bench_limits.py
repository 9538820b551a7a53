#!/usr/bin/env python3
"""The default user path against the machine's own limit, in one run (issue 17).

Each round, on ``--ranks`` local ranks and with nothing set in their environment:

1. the limits probe (pycomm.bench.limits: memcpy, process_vm_readv with 4 KiB and huge
   pages, futex round trip), in this process;
2. a plain ``dist.all_reduce(t)`` loop on a tensor from ``torch.randn`` (no environment
   variables, torch's default threads), pycomm backend, then the same loop on Gloo:
   ``--big`` bytes (``--iters-big`` calls) and 8 bytes (``--iters-small`` calls);
3. ``pycomm-bench all_reduce --compare gloo`` with its defaults at the same two sizes
   (its out-of-place pycomm call is ``pycomm.all_reduce(x, out=y)``, one native call;
   Gloo's, as torch offers no out-of-place all_reduce, a copy into the output and an
   in-place call).

Printed: every round's figures (busbw, time, p50/p99, fraction of the bound), then the
median over rounds and the issue's targets checked on them and on every round.

    python benchmarks/bench_limits.py                       # 4 ranks, 3 rounds
    python benchmarks/bench_limits.py --rounds 5 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ---- one rank of the plain loop -------------------------------------------------------------

def _worker(backend: str, big: int, iters_big: int, iters_small: int, out: str, registered: bool = False) -> None:
    import torch
    import torch.distributed as dist

    import pycomm  # registers the backend, as a user's script would
    from pycomm.bench.timing import percentile

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    side = dist.new_group(backend="gloo")
    res = {}
    for name, numel, iters in (("big", big // 4, iters_big), ("small", 2, iters_small)):
        t = torch.randn(numel)
        if registered:
            # A tensor in pycomm's registered arena, as DataParallel's buckets are.
            from pycomm import _C
            t = _C.registered_zeros(numel, torch.float32).copy_(t)
        for _ in range(min(5, iters)):
            dist.all_reduce(t)
        dist.barrier(group=side)
        each = []
        t0 = time.perf_counter()
        for _ in range(iters):
            a = time.perf_counter()
            dist.all_reduce(t)
            each.append(time.perf_counter() - a)
        total = (time.perf_counter() - t0) / iters
        v = torch.tensor(each + [total], dtype=torch.float64)
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=side)
        vals = v.tolist()
        per = sorted(vals[:iters])
        res[name] = {"size": numel * 4, "time_us": vals[iters] * 1e6, "p50_us": percentile(per, 50) * 1e6,
                     "p99_us": percentile(per, 99) * 1e6}
    if rank == 0:
        if backend == "pycomm":
            res["binding"] = pycomm.binding()  # what the library's default placement did
        with open(out, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def _plain(backend: str, ranks: int, args, extra_env: Optional[dict] = None, registered: bool = False) -> dict:
    from pycomm.bench.launch import free_port, wait_all

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        port = free_port()
        procs = []
        for r in range(ranks):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                       WORLD_SIZE=str(ranks), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(ranks),
                       PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
            env.update(extra_env or {})
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", backend,
                                           "--big", str(args.big), "--iters-big", str(args.iters_big),
                                           "--iters-small", str(args.iters_small), "--out", out]
                                          + (["--registered"] if registered else []), env=env))
        rc = wait_all(procs, 900)
        if rc != 0:
            raise SystemExit(f"plain loop on {backend} failed (exit {rc})")
        with open(out) as f:
            return json.load(f)


def _bench(ranks: int, size: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        js = os.path.join(d, "b.json")
        cmd = [sys.executable, "-m", "pycomm.bench", "all_reduce", "--ranks", str(ranks), "-b", str(size),
               "-e", str(size), "-n", str(iters), "-w", "5", "--compare", "gloo", "--limits", "0", "--no-progress",
               "--json", js]
        env = dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"]
                                                   if os.environ.get("PYTHONPATH") else ""))
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"pycomm-bench failed: {p.stdout}\n{p.stderr}")
        with open(js) as f:
            doc = json.load(f)
    return {"settings": doc["meta"]["settings_changed"], "row": doc["rows"][0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big", type=int, default=64 << 20, help="bytes of the bandwidth case")
    ap.add_argument("--iters-big", type=int, default=10)
    ap.add_argument("--iters-small", type=int, default=1000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--baseline-env", default=None, metavar="'K=V ...'",
                    help="also run the plain pycomm loop with these variables set (e.g. "
                         "'PYCOMM_REGISTERED=0 PYCOMM_REGISTERED_COPY_MAX=0': registered buffers off, the code "
                         "before issue 17 item 2) and on a tensor in the registered arena")
    ap.add_argument("--registered", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.big, args.iters_big, args.iters_small, args.out, args.registered)
        return 0

    import torch

    from pycomm.bench import limits as L
    from pycomm.bench.columns import bus_factor
    from pycomm.bench.machine import load, machine

    n = args.ranks
    fb = bus_factor("all_reduce", n)
    m = machine()
    print(f"# bench_limits: {n} ranks, {args.rounds} rounds, all_reduce float32 sum {args.big >> 20} MiB "
          f"({args.iters_big} calls) and 8 B ({args.iters_small} calls)")
    print(f"# {m['cpu']}, {m['cores']} cores, {m['platform']}, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"# command: python {' '.join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])}")
    print(f"# environment of the ranks: nothing set (THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, "
          f"PYCOMM_* {sorted(k for k in os.environ if k.startswith('PYCOMM_')) or 'unset'}); "
          f"other work on the machine: load average before {load()}")
    print("# busbw GB/s = size/time x 2(n-1)/n; time = mean per call (slowest rank); p50/p99 over calls;")
    print("# %lim = the machine's bound (pycomm.bench.limits, probed in the same round) / time")
    rounds = []
    for r in range(args.rounds):
        lim = L.probe(n)
        rec = {"round": r, "load": load(), "limits": lim}
        rec["plain_pycomm"] = _plain("pycomm", n, args)
        rec["plain_gloo"] = _plain("gloo", n, args)
        if args.baseline_env is not None:
            base = dict(kv.split("=", 1) for kv in shlex.split(args.baseline_env))
            rec["baseline_env"] = base
            rec["plain_pycomm_baseline"] = _plain("pycomm", n, args, extra_env=base)
            rec["plain_pycomm_registered"] = _plain("pycomm", n, args, registered=True)
        rec["bench_big"] = _bench(n, args.big, args.iters_big)
        rec["bench_small"] = _bench(n, 8, args.iters_small)
        rec["load_after"] = load()
        rounds.append(rec)
        for line in L.header_lines(lim)[:2]:
            print(line.replace("# ", f"# round {r}: ", 1))
        _print_round(rec, n, fb, args, L)
        sys.stdout.flush()
    summary = _summary(rounds, n, fb, args, L)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": m, "rounds": rounds, "summary": summary}, f, indent=1)
    return 0


def _figures(rec: dict, n: int, fb: float, args, L) -> dict:
    """The round's figures: busbw, times and %lim of every variant."""
    lim = rec["limits"]
    b_ip = L.bound_seconds("all_reduce", args.big, n, True, lim) * 1e6
    b_oop = L.bound_seconds("all_reduce", args.big, n, False, lim) * 1e6
    b_small = L.bound_seconds("all_reduce", 8, n, True, lim) * 1e6
    bb, bs = rec["bench_big"]["row"], rec["bench_small"]["row"]
    f = {
        "bound_big_ip_us": b_ip, "bound_big_oop_us": b_oop, "bound_small_us": b_small,
        "plain_pycomm_big": rec["plain_pycomm"]["big"], "plain_gloo_big": rec["plain_gloo"]["big"],
        "bench_pycomm_big_ip": bb["ip"], "bench_pycomm_big_oop": bb["oop"], "bench_gloo_big_oop": bb["cmp"],
        "plain_pycomm_small": rec["plain_pycomm"]["small"], "plain_gloo_small": rec["plain_gloo"]["small"],
        "bench_pycomm_small_ip": bs["ip"], "bench_gloo_small_oop": bs["cmp"],
    }
    for k in ("plain_pycomm_baseline", "plain_pycomm_registered"):
        if k in rec:
            f[k + "_big"] = rec[k]["big"]
            f[k + "_small"] = rec[k]["small"]
    for k, v in list(f.items()):
        if isinstance(v, dict):
            v = dict(v)
            big = "_big" in k
            v["busbw"] = args.big / (v["time_us"] * 1e-6) / 1e9 * fb if big else None
            bound = b_small if not big else (b_oop if k.endswith("_oop") else b_ip)
            v["frac"] = bound / v["time_us"]
            f[k] = v
    return f


def _print_round(rec, n, fb, args, L) -> None:
    f = _figures(rec, n, fb, args, L)
    print(f"# round {rec['round']} (load {rec['load']} -> {rec['load_after']}); bounds: {args.big >> 20} MiB in place "
          f"{f['bound_big_ip_us']:.0f} us, out of place {f['bound_big_oop_us']:.0f} us; 8 B {f['bound_small_us']:.1f} us")
    for k in ("plain_pycomm", "plain_pycomm_baseline"):
        b = rec.get(k, {}).get("binding")
        if b:
            print(f"# {k.replace('_', ' ')}: ranks {'bound to CPUs' if b['bound'] else 'not bound'} ({b['reason']}"
                  + (f"; torch threads {b['torch_threads_before']} -> {len(b['cpus'])}" if b.get("torch_threads_before")
                     else "") + ")")
    print(f"{'variant':<50} {'time(us)':>10} {'busbw':>7} {'%lim':>5} {'p50(us)':>9} {'p99(us)':>9}")
    for k, label in (("plain_pycomm_big", "plain loop, pycomm (in place)"),
                     ("plain_gloo_big", "plain loop, gloo (in place)"),
                     ("bench_pycomm_big_oop", "pycomm-bench pycomm out of place (native)"),
                     ("bench_pycomm_big_ip", "pycomm-bench pycomm in place"),
                     ("bench_gloo_big_oop", "pycomm-bench gloo out of place (copy + in place)"),
                     ("plain_pycomm_small", "plain loop, pycomm 8 B"),
                     ("plain_gloo_small", "plain loop, gloo 8 B"),
                     ("bench_pycomm_small_ip", "pycomm-bench pycomm 8 B in place"),
                     ("bench_gloo_small_oop", "pycomm-bench gloo 8 B out of place"),
                     ("plain_pycomm_baseline_big", "plain loop, pycomm, baseline env"),
                     ("plain_pycomm_registered_big", "plain loop, pycomm, registered"),
                     ("plain_pycomm_baseline_small", "plain loop, pycomm 8 B, baseline"),
                     ("plain_pycomm_registered_small", "plain loop, pycomm 8 B, registered")):
        if k not in f:
            continue
        v = f[k]
        bw = f"{v['busbw']:7.2f}" if v["busbw"] is not None else f"{'':>7}"
        print(f"{label:<50} {v['time_us']:10.1f} {bw} {100 * v['frac']:5.0f} {v['p50_us']:9.1f} {v['p99_us']:9.1f}")


def _summary(rounds, n, fb, args, L) -> dict:
    figs = [_figures(r, n, fb, args, L) for r in rounds]

    def med(key, field):
        return statistics.median(f[key][field] for f in figs)

    s = {}
    print(f"# median over {len(rounds)} rounds")
    for key in figs[0]:
        if isinstance(figs[0][key], dict):
            s[key] = {fld: med(key, fld) for fld in ("time_us", "p50_us", "p99_us", "frac")
                      if figs[0][key].get(fld) is not None}
            if figs[0][key].get("busbw") is not None:
                s[key]["busbw"] = med(key, "busbw")
            print(f"{key:<24} " + "  ".join(f"{k} {v:.4g}" for k, v in s[key].items()))
    checks = []
    for name, key, cmp_key in (("plain loop in place", "plain_pycomm_big", "plain_gloo_big"),
                               ("bench out of place", "bench_pycomm_big_oop", "bench_gloo_big_oop"),
                               ("bench in place", "bench_pycomm_big_ip", "bench_gloo_big_oop")):
        frac = s[key]["frac"]
        ratios = [f[cmp_key]["time_us"] / f[key]["time_us"] for f in figs]
        checks.append(f"{name}: {100 * frac:.0f}% of the bound (target >= 70%: {'met' if frac >= 0.7 else 'NOT met'}); "
                      f"vs gloo {min(ratios):.2f}x..{max(ratios):.2f}x over rounds (target >= 2.5x in every round: "
                      f"{'met' if min(ratios) >= 2.5 else 'NOT met'})")
    for name, key, cmp_key in (("plain loop 8 B", "plain_pycomm_small", "plain_gloo_small"),
                               ("bench 8 B", "bench_pycomm_small_ip", "bench_gloo_small_oop")):
        r50 = s[key]["p50_us"] / s[cmp_key]["p50_us"]
        r99 = s[key]["p99_us"] / s[cmp_key]["p99_us"]
        checks.append(f"{name}: p50 {s[key]['p50_us']:.1f} vs gloo {s[cmp_key]['p50_us']:.1f} us = 1/{1 / r50:.1f} "
                      f"(target <= 1/10: {'met' if r50 <= 0.1 else 'NOT met'}); p99 {s[key]['p99_us']:.1f} vs "
                      f"{s[cmp_key]['p99_us']:.1f} us = 1/{1 / r99:.1f} (target <= 1/4: {'met' if r99 <= 0.25 else 'NOT met'})")
    if "plain_pycomm_baseline_big" in s:
        b, a, g = s["plain_pycomm_baseline_big"], s["plain_pycomm_big"], s["plain_pycomm_registered_big"]
        checks.append(f"before/after, plain loop {args.big >> 20} MiB (before = {rounds[0]['baseline_env']}): "
                      f"{b['time_us']:.0f} -> {a['time_us']:.0f} us ({b['time_us'] / a['time_us']:.2f}x; "
                      f"{100 * b['frac']:.0f}% -> {100 * a['frac']:.0f}% of the bound); registered tensor "
                      f"{g['time_us']:.0f} us ({100 * g['frac']:.0f}%)")
        b, a = s["plain_pycomm_baseline_small"], s["plain_pycomm_small"]
        checks.append(f"before/after, plain loop 8 B: p50 {b['p50_us']:.1f} -> {a['p50_us']:.1f} us, "
                      f"p99 {b['p99_us']:.1f} -> {a['p99_us']:.1f} us")
    s["checks"] = checks
    print("# targets (issue 17), on the medians:")
    for c in checks:
        print("#   " + c)
    return s


if __name__ == "__main__":
    raise SystemExit(main())
