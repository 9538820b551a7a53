"""Launchers: the ranks as local processes, or as processes inside an emulated cluster
(network namespaces, :mod:`pycomm.bench.netem`)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous port of local ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_argv() -> List[str]:
    return [sys.executable, "-m", "pycomm.bench"]


def _child_env(extra: Dict[str, str], thp: Optional[int]) -> Dict[str, str]:
    env = dict(os.environ)
    # The ranks import the same pycomm as this process (a source tree wins over an install).
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYCOMM_BENCH_COMMAND", "pycomm-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    env.update(extra)
    # Nothing else is changed unless asked: the ranks see the settings a user's script
    # would. --thp sets torch's THP_MEM_ALLOC_ENABLE (huge pages for large tensors) and the
    # header says so (pycomm can also ask for huge pages on the buffers its peers read:
    # PYCOMM_HUGE_PAGES_MIN, off by default, see csrc/core/huge_pages.h).
    if thp is not None:
        env["THP_MEM_ALLOC_ENABLE"] = str(int(thp))
        env["PYCOMM_BENCH_SET"] = (env.get("PYCOMM_BENCH_SET", "") + f" THP_MEM_ALLOC_ENABLE={int(thp)}").strip()
    return env


def wait_all(procs: List[subprocess.Popen], timeout: Optional[float]) -> int:
    """Waits for every rank; if one fails, gives the others a moment, then kills them."""
    deadline = None if timeout is None else time.monotonic() + timeout
    failed_at = None
    rc = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            bad = [c for c in codes if c not in (None, 0)]
            if bad and failed_at is None:
                failed_at, rc = time.monotonic(), bad[0]
            if failed_at is not None and time.monotonic() - failed_at > 5.0:
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"pycomm-bench: ranks did not finish within {timeout:.0f}s; killing them", file=sys.stderr)
                rc = rc or 124
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    return rc or next((c for c in codes if c != 0), 0)


def launch_local(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Starts ``--ranks`` processes on this host, each running ``argv``; the first failure's code."""
    n = args.ranks or 2
    port = free_port()
    extra = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n),
             "LOCAL_WORLD_SIZE": str(n)}
    if args.transport:
        extra["PYCOMM_TRANSPORT"] = args.transport
    procs = []
    for r in range(n):
        env = _child_env({**extra, "RANK": str(r), "LOCAL_RANK": str(r)}, args.thp)
        procs.append(subprocess.Popen(_child_argv() + list(argv), env=env))
    return wait_all(procs, args.launch_timeout)


def launch_cluster(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Spreads the ranks over ``--hosts`` emulated hosts (needs root and iproute2)."""
    from pycomm.bench import netem  # imported here: the local launcher needs no iproute2 code

    n = args.ranks or args.hosts
    if n < args.hosts:
        raise SystemExit(f"pycomm-bench: --ranks {n} < --hosts {args.hosts}: every host needs a rank")
    with netem.Cluster(hosts=args.hosts, link=args.link, latency=args.latency) as cluster:
        extra = {"MASTER_ADDR": cluster.addr(0), "MASTER_PORT": "29500", "WORLD_SIZE": str(n),
                 "PYCOMM_SOCKET_IFNAME": cluster.ifname, "GLOO_SOCKET_IFNAME": cluster.ifname,
                 "PYCOMM_BENCH_NETEM": json.dumps(cluster.describe())}
        if args.transport:  # else pycomm picks: shm among a host's ranks, TCP between hosts
            extra["PYCOMM_TRANSPORT"] = args.transport
        if isinstance(getattr(args, "ranks_per_host", None), list):  # uneven hosts: ranks in blocks
            starts = [sum(args.ranks_per_host[:h]) for h in range(args.hosts + 1)]
            per_host = [list(range(starts[h], starts[h + 1])) for h in range(args.hosts)]
        else:
            per_host = [[r for r in range(n) if r * args.hosts // n == h] for h in range(args.hosts)]
        procs = []
        for h, ranks in enumerate(per_host):
            for local, r in enumerate(ranks):
                env = _child_env({**extra, "RANK": str(r), "LOCAL_RANK": str(local),
                                  "LOCAL_WORLD_SIZE": str(len(ranks)), "GROUP_RANK": str(h)}, args.thp)
                procs.append(cluster.run(h, _child_argv() + list(argv), env=env))
        return wait_all(procs, args.launch_timeout)

