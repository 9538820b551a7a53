"""Runs a test body on several real processes, each a rank of a process group.

    from dist_util import run_ranks
    def body(rank, world_size, arg): ...          # module-level function (picklable)
    run_ranks(3, body, arg, backend="pycomm")

    @pytest.mark.parametrize("backend", BACKENDS)   # gloo, and pycomm when it is built
    subprocess.run(cmd, env=subprocess_env())       # a child that imports this tree's pycomm

Each rank calls dist.init_process_group(backend, store=TCPStore) before the body and
destroy_process_group() after it. A failure on any rank fails the test with that
rank's traceback; a rank that does not finish within `timeout` seconds fails it too
(all ranks are killed), so a hang never stalls the suite.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable, Dict, List, Optional

#: The repository root; conftest.py puts it first on sys.path, so the tests (and the ranks
#: they spawn, which inherit sys.path) import this tree's pycomm.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _backends() -> List[str]:
    try:
        import pycomm._C as _C
    except ImportError:
        return ["gloo"]
    return ["gloo"] + (["pycomm"] if hasattr(_C, "create_backend") else [])


#: The backends a test runs the same checks on: Gloo, and pycomm when it is built.
BACKENDS = _backends()


def subprocess_env(**extra: str) -> Dict[str, str]:
    """os.environ with ROOT first on PYTHONPATH (plus ``extra``), for child processes that
    import pycomm from this tree rather than from an installed copy."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, backend, pg_timeout, env, fn, args, queue, hang_after):
    import faulthandler
    import sys

    # A rank that hangs prints where it is before the parent kills it.
    faulthandler.dump_traceback_later(hang_after, exit=False, file=sys.stderr)
    try:
        os.environ.update(env)
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend is not None:
            if backend == "pycomm" or "pycomm" in backend:
                import pycomm  # noqa: F401  (registers the backend)
            store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0,
                                  timeout=datetime.timedelta(seconds=60))
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world_size, *args)
        if backend is not None and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, backend: Optional[str] = "pycomm",
              timeout: float = 120.0, pg_timeout: float = 60.0, env: Optional[dict] = None) -> list:
    """Runs fn(rank, world_size, *args) on `world_size` spawned processes.

    Returns the list of per-rank return values (ordered by rank). Raises AssertionError
    with the failing ranks' tracebacks, or if any rank hangs past `timeout` seconds.
    backend=None skips init_process_group (the body sets up what it needs).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, backend, pg_timeout, dict(env or {}),
                                              fn, args, queue, max(1.0, timeout - 3)), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict = {}
    errors: dict = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            rank, status, payload = queue.get(timeout=min(left, 1.0))
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        (results if status == "ok" else errors)[rank] = payload
    for p in procs:
        p.join(timeout=5)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    missing = [r for r in range(world_size) if r not in results and r not in errors]
    if errors or missing:
        msg = []
        for r in sorted(errors):
            msg.append(f"--- rank {r} failed:\n{errors[r]}")
        if missing:
            codes = {r: procs[r].exitcode for r in missing}
            msg.append(f"--- ranks {missing} did not finish within {timeout}s (exit codes {codes})")
        raise AssertionError("\n".join(msg))
    return [results[r] for r in range(world_size)]
