"""The body of one rank: joins the process group, sweeps the sizes, prints the table,
writes the files (rank 0)."""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import shlex
import socket
import sys
from typing import Optional

from tqdm import tqdm

from pycomm.bench.columns import COMPRESSORS, DTYPES, REDUCING, avg_busbw, counts_for, format_row, header_lines, \
    sweep_sizes
from pycomm.bench.machine import load
from pycomm.bench.output import human, machine, progress_bar, write_csv, write_plot
from pycomm.bench.timing import Case, GroupRunner, time_compressed, time_mode


def load_compressor(name: str):
    """The pycomm.compression class for `name`, or raises ImportError/AttributeError."""
    mod = importlib.import_module("pycomm.compression")
    return getattr(mod, COMPRESSORS[name])


def backend_problem(backend: str) -> Optional[str]:
    """None if torch.distributed can use `backend` here, else why not."""
    if backend == "gloo":
        return None
    try:
        import pycomm  # noqa: F401  (registers the backend)
    except Exception as e:  # noqa: BLE001
        return f"import pycomm failed: {type(e).__name__}: {e}"
    import torch.distributed as dist

    if backend.upper() not in dist.Backend.backend_list and backend not in dist.Backend.backend_list:
        return "import pycomm succeeded but did not register the 'pycomm' backend"
    return None


def run_rank(args: argparse.Namespace) -> int:
    """Body of one rank: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT come from the environment."""
    if args.transport:
        os.environ["PYCOMM_TRANSPORT"] = args.transport
    import torch
    import torch.distributed as dist

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    problem = backend_problem(args.backend)
    if problem:
        if rank == 0:
            print(f"pycomm-bench: backend {args.backend!r} unavailable: {problem}", file=sys.stderr)
        return 3
    comp = None
    if args.compression:
        try:
            comp = load_compressor(args.compression)()
        except Exception as e:  # noqa: BLE001
            if rank == 0:
                print(f"# skipped: --compression {args.compression} needs pycomm.compression "
                      f"({type(e).__name__}: {e})")
            return 0
    if getattr(args, "ranks_per_host", None):
        from pycomm.bench.topology import run_topology

        return run_topology(args, rank, world)
    timeout = datetime.timedelta(seconds=args.timeout)
    dist.init_process_group(args.backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    try:
        # Timing maxima and #wrong sums travel on a separate Gloo group, so they never share
        # queues or connections with the backend being measured.
        side = dist.new_group(backend="gloo", timeout=timeout)
        cmp_group = dist.new_group(backend=args.compare, timeout=timeout) if args.compare else None
        limits = None
        if args.limits and not args.hosts and args.device == "cpu":
            # Rank 0 probes while the others wait, before any collective runs.
            if rank == 0:
                from pycomm.bench import limits as limits_mod

                try:
                    limits = limits_mod.probe(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
                except Exception as e:  # noqa: BLE001 - the sweep runs without %lim
                    print(f"# limits not probed: {type(e).__name__}: {e}", file=sys.stderr)
            dist.barrier(group=side)
        return _sweep(args, rank, world, side, cmp_group, comp, limits)
    finally:
        dist.destroy_process_group()


def _binding() -> Optional[dict]:
    """pycomm.binding() where this process has a pycomm group (else None)."""
    try:
        import pycomm

        b = pycomm.binding()
    except Exception:  # noqa: BLE001 - no pycomm here (a Gloo-only run)
        return None
    return b if b.get("decided") else None


def _heap() -> Optional[dict]:
    """pycomm.heap_policy() where this process has a pycomm group (else None)."""
    try:
        import pycomm

        h = pycomm.heap_policy()
    except Exception:  # noqa: BLE001 - no pycomm here (a Gloo-only run)
        return None
    return h if h.get("decided") else None


def _binding_words(b: dict) -> str:
    """What the library's default placement did, for the header."""
    if b["bound"]:
        threads = (f", torch threads {b['torch_threads_before']} -> {len(b['cpus'])}"
                   if b.get("torch_threads_before") else "")
        return f"each rank bound to its CPU share ({b['reason'].split(';')[0]}{threads})"
    return f"not bound ({b['reason']})"


def _settings(args) -> str:
    """Every setting the bench changed in the ranks, or "none"."""
    changed = os.environ.get("PYCOMM_BENCH_SET", "").split()
    if args.transport:
        changed.append(f"PYCOMM_TRANSPORT={args.transport}")
    if args.threads is not None:
        changed.append(f"torch.set_num_threads({args.threads})")
    return ", ".join(changed) if changed else "none"


def _sweep(args, rank: int, world: int, side, cmp_group, comp, limits=None) -> int:
    import torch

    from pycomm.bench import limits as limits_mod

    dtype_name = args.dtype
    elem = torch.empty((), dtype=getattr(torch, DTYPES[dtype_name])).element_size()
    coll = args.collective
    redop = args.op if coll in REDUCING else "none"
    root = args.root if coll in ("broadcast", "reduce") else -1
    if coll in ("broadcast", "reduce") and not 0 <= args.root < world:
        raise SystemExit(f"pycomm-bench: -r {args.root} out of range for {world} ranks")
    device = None
    if args.device == "cuda":
        # Ranks share the visible GPUs round-robin (all on cuda:0 on a one-GPU machine).
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    primary = GroupRunner(None, args.backend, rank, world, device=device)
    other = GroupRunner(cmp_group, args.compare, rank, world, device=device) if cmp_group is not None else None

    cases, seen = [], set()
    for s in sweep_sizes(args.minbytes, args.maxbytes, args.stepfactor):
        count, size = counts_for(coll, s, elem, world)
        if count == 0 or size in seen:
            continue
        seen.add(size)
        cases.append(Case(coll, dtype_name, args.op, count, size, max(root, 0)))

    meta = {
        "collective": coll, "backend": args.backend, "compression": args.compression, "compare": args.compare,
        "nranks": world, "dtype": dtype_name, "op": redop, "root": root, "iters": args.iters,
        "warmup": args.warmup, "check": bool(args.check), "transport": os.environ.get("PYCOMM_TRANSPORT"),
        "hosts": args.hosts, "link": args.link if args.hosts else None, "device": args.device,
        "latency": args.latency if args.hosts else None,
        "torch": torch.__version__, "python": platform.python_version(), "machine": machine(),
        "hostname": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": os.environ.get("PYCOMM_BENCH_COMMAND") or " ".join(shlex.quote(a) for a in sys.argv),
        "load": load(), "settings_changed": _settings(args), "torch_threads": torch.get_num_threads(),
        "binding": _binding(), "heap": _heap(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "limits": limits,
        "pycomm_env": {k: v for k, v in os.environ.items() if k.startswith("PYCOMM_") and not k.startswith("PYCOMM_BENCH")},
    }
    if os.environ.get("PYCOMM_BENCH_NETEM"):
        meta["netem"] = json.loads(os.environ["PYCOMM_BENCH_NETEM"])
    out = sys.stdout
    if rank == 0:
        label = args.backend + (f" + {args.compression} compression" if args.compression else "")
        print(f"# pycomm-bench {coll}: nranks {world}, backend {label}"
              + (f", compared with {args.compare}" if args.compare else ""), file=out)
        print(f"# minBytes {args.minbytes} maxBytes {args.maxbytes} step: {args.stepfactor}(factor) "
              f"warmup iters: {args.warmup} iters: {args.iters} validation: {int(bool(args.check))}", file=out)
        print(f"# {meta['machine']}, torch {meta['torch']}, {meta['date']}"
              + (f", transport {meta['transport']}" if meta["transport"] else "")
              + (f", buffers on {primary.device} ({torch.cuda.get_device_name(primary.device)})"
                 if primary.device is not None else "")
              + f", load average {meta['load']}", file=out)
        print(f"# settings changed by pycomm-bench: {meta['settings_changed']}; in effect: THP_MEM_ALLOC_ENABLE="
              f"{meta['THP_MEM_ALLOC_ENABLE'] or 'unset'}, torch threads per rank {meta['torch_threads']}"
              + "".join(f", {k}={v}" for k, v in sorted(meta["pycomm_env"].items()))
              + (f"; pycomm's rank placement (PYCOMM_BIND): {_binding_words(meta['binding'])}"
                 if meta["binding"] else "")
              + (f"; pycomm's heap policy (PYCOMM_HEAP): {meta['heap']['reason']}" if meta["heap"] else ""),
              file=out)
        if limits:
            for line in limits_mod.header_lines(limits):
                print(line, file=out)
        if args.hosts:
            nm = meta.get("netem", {})
            lat = args.latency if nm.get("latency_applied", True) else f"{args.latency} (NOT applied: no sch_netem)"
            print(f"# emulated cluster: {args.hosts} hosts, link {args.link}, latency {lat}", file=out)
        if comp is not None:
            print("# compressed all_reduce: #wrong is N/A (lossy); relative error goes to --json/--csv", file=out)
        print("#", file=out)
        for line in header_lines(args.compare):
            print(line, file=out)
        out.flush()

    steps = len(cases) * (2 if other else 1)
    show = args.progress if args.progress is not None else (steps >= 8 and sys.stderr.isatty())
    prog = progress_bar(steps, enabled=bool(show) and rank == 0)
    rows = []
    for case in cases:
        if comp is not None:
            oop = time_compressed(comp, None, case, args.iters, args.warmup, bool(args.check), side, rank, world,
                                  device=primary.device)
            ip = None
        else:
            oop = time_mode(primary, case, False, args.iters, args.warmup, bool(args.check), side)
            ip = time_mode(primary, case, True, args.iters, args.warmup, bool(args.check), side)
        transport = "tcp" if (args.hosts or os.environ.get("PYCOMM_TRANSPORT") == "tcp") else "shm"
        for m, inplace in ((oop, False), (ip, True)):
            if m is not None:
                b = limits_mod.bound_seconds(coll, case.size, world, inplace, limits, transport)
                m["bound_us"] = None if b is None else b * 1e6
                m["frac"] = None if b is None or comp is not None else b / (m["time_us"] * 1e-6)
        prog.set_postfix_str(human(case.size), refresh=False)
        prog.update()
        row = {"collective": coll, "backend": args.backend, "compression": args.compression, "nranks": world,
               "size": case.size, "count": case.count, "type": dtype_name, "redop": redop, "root": root,
               "oop": oop, "ip": ip}
        if other is not None:
            ccase = Case(coll, dtype_name, "avg" if comp is not None and args.op != "sum" else args.op,
                         case.count, case.size, case.root)
            c = time_mode(other, ccase, False, args.iters, args.warmup, bool(args.check), side)
            prog.update()
            if c is not None and oop is not None and oop.get("bound_us") is not None:
                c["bound_us"] = oop["bound_us"]
                c["frac"] = c["bound_us"] / c["time_us"]
            row["cmp_backend"] = args.compare
            row["cmp"] = c
            row["ratio"] = (oop["busbw"] / c["busbw"]) if c and c["busbw"] > 0 else None
        rows.append(row)
        if rank == 0:
            tqdm.write(format_row(row), file=out)
            out.flush()
    prog.close()

    if rank != 0:
        return 0
    wrong_total = sum((r[m] or {}).get("wrong") or 0 for r in rows for m in ("oop", "ip"))
    wrong_total += sum((r.get("cmp") or {}).get("wrong") or 0 for r in rows)
    summary = {"avg_busbw": avg_busbw(rows), "wrong_total": wrong_total}
    for name, runner in (("primary", primary), ("compare", other)):
        if runner is not None and any(runner.avg_emulated.values()):
            print(f"# note: {runner.name} refused AVG for {sorted(k for k, v in runner.avg_emulated.items() if v)}; "
                  f"measured as SUM + divide", file=out)
    print(f"# Out of bounds values : {wrong_total} {'OK' if wrong_total == 0 else 'FAILED'}", file=out)
    print(f"# Avg bus bandwidth    : {summary['avg_busbw']:g}", file=out)
    if other is not None:
        summary["avg_busbw_compare"] = avg_busbw(rows, "cmp")
        ratios = [r["ratio"] for r in rows if r.get("ratio")]
        print(f"# Avg bus bandwidth ({args.compare}) : {summary['avg_busbw_compare']:g}", file=out)
        if ratios:
            geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            lo = min(rows, key=lambda r: r.get("ratio") or float("inf"))
            hi = max(rows, key=lambda r: r.get("ratio") or 0.0)
            summary.update({"ratio_geomean": geo, "ratio_min": lo["ratio"], "ratio_max": hi["ratio"]})
            print(f"# busbw ratio {args.backend}{'+' + args.compression if args.compression else ''}/{args.compare} "
                  f"(out-of-place): geomean {geo:.2f}x, min {lo['ratio']:.2f}x at {human(lo['size'])}B, "
                  f"max {hi['ratio']:.2f}x at {human(hi['size'])}B", file=out)
    if comp is not None and rows and rows[-1]["oop"].get("wire_bytes"):
        last = rows[-1]
        plain = 2 * (world - 1) * (last["size"] // world)  # what a ring all_reduce sends per rank
        wire = last["oop"]["wire_bytes"]
        summary.update({"wire_bytes_largest": wire, "ring_bytes_largest": plain})
        print(f"# {args.compression}: {wire} B sent per rank at {human(last['size'])}B vs {plain} B "
              f"uncompressed ring ({plain / max(wire, 1):.1f}x less); relative error "
              + (f"{last['oop']['relerr']:.3g}" if last["oop"]["relerr"] is not None else "not checked (-c 0)"),
              file=out)
    print("#", file=out)
    out.flush()
    if args.csv:
        write_csv(args.csv, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
    if args.plot:
        write_plot(args.plot, rows, meta)
    return 1 if (args.check and wrong_total) else 0

