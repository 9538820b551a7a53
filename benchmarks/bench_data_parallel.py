#!/usr/bin/env python3
"""Step time of data-parallel training: pycomm DataParallel (exact and with every
compressor) next to torch DDP on Gloo (plain, fp16 hook, PowerSGD hook, pycomm's hook),
in the same run, plus the overlap figure (step vs compute-only and comm-only).

    python benchmarks/bench_data_parallel.py                        # 4 ranks on this host
    python benchmarks/bench_data_parallel.py --steps 3 --warmup 2   # shorter
    python benchmarks/bench_data_parallel.py --hosts 4 --link 1gbit # emulated 1 Gbit/s cluster
    python benchmarks/bench_data_parallel.py --hosts 2 --ranks-per-host 2 --modes dp,dp_flat,ddp_gloo
    python benchmarks/bench_data_parallel.py --modes dp,dp_onebit,ddp_gloo --json out.json
    python benchmarks/bench_data_parallel.py --device cuda --modes ddp_gloo,dp,dp_fp16,ddp_pycomm

Model: an MLP of ``--depth`` square ``--width`` layers between a ``--width``/4 input and
output (default 6 x 2048: ~27M parameters, ~108 MB of float32 gradients), batch
``--batch``, plain SGD. Each rank runs one process (``torch.set_num_threads(1)``).
Both DataParallel and torch DDP run with ``gradient_as_bucket_view=True`` (gradients are
views into the buckets: no copy back after the all-reduce).
The modes run one after the other; compute-only is re-measured right before each.
Each mode's warm-up is at least ``--warmup`` and 2 steps; with a compressor whose first
steps are exact (DataParallel runs OneBit / TopK / PowerSGD exact for their first 10
steps) it is those steps plus ``--warmup`` (at least 1) compressed ones: the timed steps
are compressed, and the first compressed step's one-time costs (error-feedback buffers
allocated and first touched, codec threads started) are not timed. The CPU time each of
rank 0's threads used per timed step is printed under each mode.

Columns: ``step`` = median over the timed steps of the slowest rank's step time
(forward + backward + gradient averaging + optimizer step); ``compute`` = the same
without communication; ``comm`` = the gradient averaging alone (the same buckets and
compressor, no compute); ``overlap`` = step / max(compute, comm) (1.0 = perfect
overlap; compute + comm over max(...) would be no overlap at all).

``--device cuda`` puts the model, the batch and the buckets on GPU ``rank % device count``
(several ranks may share one GPU) and times each step until the device is done; pycomm's
CUDA path is then CUDA IPC (ranks on this host) and DDP on Gloo stages through the host.

``--hosts H`` runs the ranks inside H network namespaces joined by a ``tc``-shaped
bridge (pycomm.bench.netem; root and iproute2 needed), placed in blocks (ranks
0..L-1 on host 0, ...), pycomm over TCP. ``--hosts H --ranks-per-host L`` puts L ranks
in each namespace (``--ranks`` becomes H*L) and lets pycomm pick the transport per pair:
shared memory between the ranks of one namespace (they share a host key: the key
includes the network namespace), TCP between namespaces. On such a layout DataParallel's
large all-reduces are hierarchical (``algo_all_reduce_hier``); mode ``dp_flat`` runs the
same DataParallel on a group built with ``PYCOMM_ALGO=ring`` (the flat ring over every
rank), for the comparison. Each mode's line names the pycomm all-reduce algorithms its
timed steps ran (``pycomm.stats("all")`` deltas on rank 0).

The output (and ``--json``'s ``meta``) is stamped with the machine, torch version, date,
load average and command (pycomm.bench.machine).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DP_COMPRESSORS = {
    "dp": None, "dp_flat": None, "dp_fp16": "FP16", "dp_bf16": "BF16", "dp_onebit": "OneBit",
    "dp_onebit_all": "OneBitAll", "dp_topk": "TopK", "dp_qsgd": "QSGD", "dp_powersgd": "PowerSGD",
}
DDP_MODES = ["ddp_gloo", "ddp_gloo_fp16", "ddp_gloo_powersgd", "ddp_gloo_pycomm_onebit", "ddp_pycomm"]
ALL_MODES = ["ddp_gloo"] + list(DP_COMPRESSORS) + DDP_MODES[1:]
#: Modes that run on a pycomm group of their own, built with these environment settings.
MODE_ENV = {"dp_flat": {"PYCOMM_ALGO": "ring"}}


def stamp(argv: List[str]) -> Dict[str, Any]:
    """Machine, torch version, date, load and command: what the raw result is stamped with."""
    import datetime
    import shlex

    import torch

    from pycomm.bench.machine import machine

    cmd = os.environ.get("PYCOMM_BENCH_DP_COMMAND") or " ".join(
        shlex.quote(a) for a in ["benchmarks/bench_data_parallel.py"] + list(argv))
    return {"machine": machine(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": cmd}


def _algo_counts() -> Dict[str, int]:
    import pycomm

    return {k[len("algo_all_reduce_"):]: v for k, v in pycomm.stats("all").items() if k.startswith("algo_all_reduce_")}


def make_compressor(name: Optional[str]) -> Any:
    import pycomm.compression as C

    if name is None:
        return None
    return {"FP16": C.FP16, "BF16": C.BF16, "OneBit": C.OneBit, "OneBitAll": lambda: C.OneBit(scope="all"),
            "TopK": lambda: C.TopK(ratio=0.01),
            "QSGD": lambda: C.QSGD(bits=8), "PowerSGD": lambda: C.PowerSGD(rank=4)}[name]()


def build_model(width: int, depth: int) -> Any:
    import torch

    torch.manual_seed(0)
    io = max(1, width // 4)
    layers: List[Any] = [torch.nn.Linear(io, width), torch.nn.ReLU()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, io))
    return torch.nn.Sequential(*layers)


# ----------------------------------------------------------------------------- worker


def thread_cpu() -> Dict[str, float]:
    """CPU seconds (user + system) this process's live threads have used, summed per
    thread name (pycomm's threads are named: pycomm-codec encodes/decodes compressed
    payloads, pycomm-crecv receives them, pycomm-hier runs cross-host steps, ...; the
    Python thread that runs forward/backward is named after the process)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: Dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _time_steps(step: Callable[[], None], warmup: int, steps: int, barrier_group: Any, cuda: bool = False,
                cpu: Optional[Dict[str, float]] = None) -> float:
    """Median over steps of the slowest rank's time for step() (with `cuda`: until the
    device has finished it). `cpu`, if given, receives the CPU ms per timed step of each
    of this process's threads (thread_cpu)."""
    import torch
    import torch.distributed as dist

    times = []
    c0: Dict[str, float] = {}
    for i in range(warmup + steps):
        if i == warmup and cpu is not None:
            c0 = thread_cpu()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier(group=barrier_group)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=barrier_group)
        if i >= warmup:
            times.append(dt.item())
    if cpu is not None:
        c1 = thread_cpu()
        cpu.update({k: (v - c0.get(k, 0.0)) * 1e3 / steps for k, v in c1.items() if v - c0.get(k, 0.0) > 0})
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import pycomm  # registers the backend
    from pycomm.data_parallel import DataParallel
    from pycomm.ddp_hooks import DDPHookState, ddp_comm_hook

    torch.set_num_threads(1)
    dist.init_process_group("pycomm")
    rank, world = dist.get_rank(), dist.get_world_size()
    gloo = dist.new_group(backend="gloo")
    cuda = args.device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise SystemExit("bench_data_parallel: --device cuda, but torch sees no GPU")
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    io = max(1, args.width // 4)
    x = torch.randn(args.batch, io, generator=torch.Generator().manual_seed(rank)).to(dev)
    results: Dict[str, Dict[str, Any]] = {}
    modes = parse_modes(args.modes)
    # Groups of the modes that need their own settings: PYCOMM_ALGO is read when the
    # backend of a group is built (its first collective), so the variable is set around
    # the group's creation and first call only.
    mode_groups: Dict[str, Any] = {}
    for mode in modes:
        if mode in MODE_ENV:
            saved = {k: os.environ.get(k) for k in MODE_ENV[mode]}
            os.environ.update(MODE_ENV[mode])
            try:
                mode_groups[mode] = dist.new_group(backend="pycomm")
                dist.all_reduce(torch.ones(1, device=dev), group=mode_groups[mode])
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def train_step(model: Any, opt: Any) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=False)
            model(x).square().mean().backward()
            opt.step()
        return step

    # Compute only: the bare module.
    net = build_model(args.width, args.depth).to(dev)
    nparams = sum(p.numel() for p in net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    compute_cpu: Dict[str, float] = {}
    compute = _time_steps(train_step(net, opt), args.warmup, args.steps, gloo, cuda, cpu=compute_cpu)
    del net, opt
    gc.collect()
    if rank == 0:
        print(f"# model: {nparams / 1e6:.1f}M parameters ({nparams * 4 / 1e6:.0f} MB fp32 grads), batch "
              f"{args.batch}, {world} ranks; compute-only step {compute * 1e3:.1f} ms", flush=True)
        b, h = pycomm.binding(), pycomm.heap_policy()
        print(f"# pycomm defaults in effect: rank placement (PYCOMM_BIND) {'bound to CPUs ' + str(b['cpus']) if b['bound'] else 'not bound'} "
              f"({b['reason']}); heap (PYCOMM_HEAP) {h['reason']}", flush=True)

    for mode in modes:
        net = build_model(args.width, args.depth).to(dev)
        # Compute-only again, right before this mode: the load on a shared machine drifts.
        opt = torch.optim.SGD(net.parameters(), lr=1e-4)
        compute_here = _time_steps(train_step(net, opt), 1, args.steps, gloo, cuda)
        del opt
        comm_fn: Optional[Callable[[], None]] = None
        if mode in DP_COMPRESSORS:
            comp = make_compressor(DP_COMPRESSORS[mode])
            grp = mode_groups.get(mode)
            model = DataParallel(net, group=grp, compression=comp, gradient_as_bucket_view=True)
            buckets = [b.flat for b in model._buckets]
            comp_only = make_compressor(DP_COMPRESSORS[mode])

            def comm_fn(buckets=buckets, comp_only=comp_only, grp=grp) -> None:
                if comp_only is None:
                    futs = [dist.all_reduce(b, op=dist.ReduceOp.AVG, group=grp, async_op=True).get_future()
                            for b in buckets]
                else:
                    futs = [comp_only.all_reduce(b, key=i, op="avg", async_op=True) for i, b in enumerate(buckets)]
                for f in futs:
                    f.wait()
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            pg = None if mode == "ddp_pycomm" else gloo
            # torch's PowerSGD hook chains all-reduces from future callbacks; on Gloo those
            # callbacks run on Gloo's threads in any order, so with several buckets ranks can
            # issue them in different orders (Gloo aborts: "Received data size doesn't match").
            # One bucket avoids the race (and the overlap).
            cap = {"bucket_cap_mb": 1 << 14} if mode == "ddp_gloo_powersgd" else {}
            if cuda:
                cap["device_ids"] = [dev.index]
            model = DDP(net, process_group=pg, gradient_as_bucket_view=True, **cap)
            if mode == "ddp_gloo_fp16":
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                model.register_comm_hook(gloo, default_hooks.fp16_compress_hook)
            elif mode == "ddp_gloo_powersgd":
                from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

                st = powerSGD_hook.PowerSGDState(process_group=gloo, matrix_approximation_rank=4,
                                                 start_powerSGD_iter=2, min_compression_rate=2)
                model.register_comm_hook(st, powerSGD_hook.powerSGD_hook)
            elif mode == "ddp_gloo_pycomm_onebit":
                model.register_comm_hook(DDPHookState(make_compressor("OneBit"), group=gloo), ddp_comm_hook)
            elif mode not in ("ddp_gloo", "ddp_pycomm"):
                raise SystemExit(f"unknown mode {mode}; choose from {', '.join(ALL_MODES)}")
            if mode == "ddp_gloo":
                # Comm only for DDP: its default layout (25 MB buckets) all-reduced on Gloo.
                from pycomm import _C

                params = list(net.parameters())
                planned = _C.bucket_plan([p.numel() for p in params], [4] * len(params), [0] * len(params),
                                         25 << 20, 1 << 20)
                flats = [torch.zeros(n, device=dev) for _, _, n, _ in planned]

                def comm_fn(flats=flats) -> None:
                    works = [dist.all_reduce(f, group=gloo, async_op=True) for f in flats]
                    for w in works:
                        w.wait()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        # PowerSGD's hooks compress from their start_iter on: keep them in the warm-up. So
        # do DataParallel's sign / sparse / low-rank compressors: their first
        # `warmup_steps` steps (10) are exact all-reduces (pycomm.compression.for_training),
        # and the warm-up goes on past them (--warmup more, at least 1), so the first
        # compressed step's one-time costs (residual buffers of the size of the gradients
        # allocated and first touched, codec threads started) are not timed.
        exact = int(getattr(getattr(model, "compression", None), "warmup_steps", 0))
        warm = max(args.warmup, 2) if not exact else exact + max(args.warmup, 1)
        a0 = _algo_counts()
        step_cpu: Dict[str, float] = {}
        step_t = _time_steps(train_step(model, opt), warm, args.steps, gloo, cuda, cpu=step_cpu)
        a1 = _algo_counts()
        algos = {k: v - a0.get(k, 0) for k, v in a1.items() if v != a0.get(k, 0)}
        comm_t = _time_steps(comm_fn, 1, args.steps, gloo, cuda) if comm_fn is not None else float("nan")
        # CPU ms per step on this rank: every thread's, and pycomm's threads apart (the
        # work that competes with forward/backward for the cores).
        cpu_total = sum(step_cpu.values())
        cpu_pycomm = {k: v for k, v in step_cpu.items() if k.startswith("pycomm")}
        results[mode] = {"step_ms": step_t * 1e3, "compute_ms": compute_here * 1e3, "comm_ms": comm_t * 1e3,
                         "algos": algos, "cpu_ms_per_step": step_cpu, "cpu_total_ms": cpu_total,
                         "cpu_pycomm_ms": sum(cpu_pycomm.values()),
                         "cpu_compute_only_ms": sum(compute_cpu.values())}
        if rank == 0:
            r = results[mode]
            ov = r["step_ms"] / max(r["compute_ms"], r["comm_ms"]) if comm_fn is not None else float("nan")
            names = ",".join(f"{k}:{v}" for k, v in sorted(algos.items())) or "-"
            print(f"{mode:24s} step {r['step_ms']:9.1f} ms   compute-only {r['compute_ms']:8.1f} ms   "
                  f"comm-only {r['comm_ms']:9.1f} ms   overlap {ov:5.2f}   pycomm all_reduce: {names}", flush=True)
            busy = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["cpu_ms_per_step"].items(), key=lambda kv: -kv[1])
                             if v >= 1.0)
            print(f"{'':24s} rank 0 CPU per step: {r['cpu_total_ms']:.1f} ms (compute-only run "
                  f"{r['cpu_compute_only_ms']:.1f} ms), pycomm threads {r['cpu_pycomm_ms']:.1f} ms [{busy}]",
                  flush=True)
        if hasattr(model, "remove_hooks"):
            model.remove_hooks()
        del model, opt, net
        gc.collect()

    if rank == 0:
        base = results.get("ddp_gloo", {}).get("step_ms")
        lines = ["", "| mode | step (ms) | vs DDP Gloo | compute only (ms) | comm only (ms) | "
                 "step / max(compute, comm) | rank 0 CPU/step (ms) | of which pycomm threads |",
                 "|---|---|---|---|---|---|---|---|"]
        for mode, r in results.items():
            speed = f"{base / r['step_ms']:.2f}x" if base else "-"
            comm = r["comm_ms"]
            ov = r["step_ms"] / max(r["compute_ms"], comm) if comm == comm else float("nan")
            lines.append(f"| {mode} | {r['step_ms']:.1f} | {speed} | {r['compute_ms']:.1f} | "
                         f"{'-' if comm != comm else f'{comm:.1f}'} | {'-' if ov != ov else f'{ov:.2f}'} | "
                         f"{r['cpu_total_ms']:.1f} | {r['cpu_pycomm_ms']:.1f} |")
        print("\n".join(lines), flush=True)
        if "dp" in results and "dp_flat" in results:
            print(f"# dp vs dp_flat (PYCOMM_ALGO=ring): {results['dp_flat']['step_ms'] / results['dp']['step_ms']:.2f}x"
                  " faster step", flush=True)
        meta = {"ranks": world, "hosts": args.hosts, "ranks_per_host": args.ranks_per_host, "link": args.link,
                "params": nparams, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                "device": args.device, "netem": json.loads(os.environ.get("PYCOMM_BENCH_NETEM", "null")),
                **stamp(sys.argv[1:])}
        print(f"# {json.dumps(meta)}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "compute_ms": compute * 1e3, "results": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- launcher


def launch(args: argparse.Namespace, argv: List[str]) -> int:
    import shlex

    from pycomm.bench.launch import wait_all

    n = args.ranks
    env_base = {"WORLD_SIZE": str(n), "PYCOMM_BENCH_DP_WORKER": "1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "PYCOMM_BENCH_DP_COMMAND": " ".join(shlex.quote(a)
                                                    for a in ["benchmarks/bench_data_parallel.py"] + argv)}
    cmd = [sys.executable, os.path.abspath(__file__)] + argv
    procs = []
    if args.hosts:
        from pycomm.bench import netem

        with netem.Cluster(hosts=args.hosts, link=args.link, latency=args.latency) as cluster:
            extra = {"MASTER_ADDR": cluster.addr(0), "MASTER_PORT": "29511",
                     "PYCOMM_SOCKET_IFNAME": cluster.ifname, "GLOO_SOCKET_IFNAME": cluster.ifname,
                     "PYCOMM_BENCH_NETEM": json.dumps(cluster.describe())}
            if not args.ranks_per_host:
                # One rank per namespace (the --hosts 4 results): every pair over TCP, as before.
                # With --ranks-per-host pycomm picks: shm inside a namespace, TCP between them.
                extra["PYCOMM_TRANSPORT"] = "tcp"
            # Blocks, as pycomm.bench.launch.launch_cluster places them.
            per_host = [[r for r in range(n) if r * args.hosts // n == h] for h in range(args.hosts)]
            for h, ranks in enumerate(per_host):
                for local, r in enumerate(ranks):
                    env = {**env_base, **extra, "RANK": str(r), "LOCAL_RANK": str(local),
                           "LOCAL_WORLD_SIZE": str(len(ranks)), "GROUP_RANK": str(h)}
                    procs.append(cluster.run(h, cmd, env=env))
            return wait_all(procs, None)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for r in range(n):
        env = dict(os.environ)
        env.update(env_base)
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "LOCAL_RANK": str(r)})
        procs.append(subprocess.Popen(cmd, env=env))
    return wait_all(procs, None)


def parse_modes(text: str) -> List[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def validate(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rejects contradictory or impossible flags before any process starts (ap.error: exit 2)."""
    modes = parse_modes(args.modes)
    unknown = [m for m in modes if m not in ALL_MODES]
    if not modes or unknown:
        ap.error(f"--modes: unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_MODES)}")
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps must be >= 1 and --warmup >= 0 (got --steps {args.steps} --warmup {args.warmup})")
    if args.hosts < 0:
        ap.error(f"--hosts must be >= 0 (got {args.hosts})")
    if args.ranks_per_host is not None:
        if args.ranks_per_host < 1:
            ap.error(f"--ranks-per-host must be >= 1 (got {args.ranks_per_host})")
        if not args.hosts:
            ap.error("--ranks-per-host needs --hosts H (the emulated hosts to put the ranks in)")
        n = args.hosts * args.ranks_per_host
        if args.ranks is not None and args.ranks != n:
            ap.error(f"--ranks {args.ranks} contradicts --hosts {args.hosts} x --ranks-per-host "
                     f"{args.ranks_per_host} = {n}")
        args.ranks = n
    if args.ranks is None:
        args.ranks = 4
    if args.ranks < 1:
        ap.error(f"--ranks must be >= 1 (got {args.ranks})")
    if args.hosts and args.ranks < args.hosts:
        ap.error(f"--ranks {args.ranks} < --hosts {args.hosts}: every emulated host needs a rank")


def parse_args(argv: List[str]) -> argparse.Namespace:
    """The flags, validated (a bad combination exits 2 with a message naming it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ranks", type=int, default=None, help="ranks (default 4; H*L with --ranks-per-host)")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default=",".join(ALL_MODES), help="comma-separated: " + ", ".join(ALL_MODES))
    ap.add_argument("--json", default="", help="write the results here (rank 0)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model and buckets live")
    ap.add_argument("--hosts", type=int, default=0, help="emulated hosts (netem); 0 = this host, shm")
    ap.add_argument("--link", default="1gbit", help="per-host link rate with --hosts (tc syntax)")
    ap.add_argument("--latency", default="100us", help="one-way latency with --hosts")
    ap.add_argument("--ranks-per-host", type=int, default=None,
                    help="with --hosts H: L ranks in each emulated host (--ranks becomes H*L); co-located ranks "
                         "use shared memory, hosts TCP")
    args = ap.parse_args(argv)
    validate(ap, args)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if os.environ.get("PYCOMM_BENCH_DP_WORKER") == "1":
        worker(args)
        return 0
    return launch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
