"""Rank bodies and a fault-tolerant spawner for the reliability and security tests.

`launch` differs from dist_util.run_ranks in what it tolerates: ranks may die from a
signal, raise, or be meant to fail; every rank's outcome (result, traceback or exit
code) comes back to the test, which decides what is right. The c10d store is hosted
by the test process itself, so any rank — rank 0 included — may be killed.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue as queue_mod
import re
import signal
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

# ---------------------------------------------------------------------------------------------
# Process-level probes (used by ranks on themselves and by the test on its ranks)


def thread_count(pid: Optional[int] = None) -> int:
    return len(os.listdir(f"/proc/{pid or 'self'}/task"))


def fd_count(pid: Optional[int] = None) -> int:
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


def rss_bytes(pid: Optional[int] = None) -> int:
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def socket_inodes(pid: Optional[int] = None) -> set:
    out = set()
    base = f"/proc/{pid or 'self'}/fd"
    for fd in os.listdir(base):
        try:
            target = os.readlink(os.path.join(base, fd))
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]", target)
        if m:
            out.add(m.group(1))
    return out


def _hex_ipv4(h: str) -> str:
    b = bytes.fromhex(h)
    return ".".join(str(x) for x in reversed(b))


def tcp_sockets(state: Optional[str] = None) -> List[dict]:
    """Entries of /proc/net/tcp (IPv4) and tcp6: local address, port, state, inode."""
    rows = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, st, inode = parts[1], parts[3], parts[9]
            host, port = local.split(":")
            addr = _hex_ipv4(host) if len(host) == 8 else host
            if state is None or st == state:
                rows.append({"addr": addr, "port": int(port, 16), "state": st, "inode": inode})
    return rows


def listening_sockets(pid: Optional[int] = None) -> List[dict]:
    """TCP sockets in LISTEN state owned by `pid` (default: this process)."""
    mine = socket_inodes(pid)
    return [s for s in tcp_sockets("0A") if s["inode"] in mine]


def job_segments(pids) -> List[str]:
    """/dev/shm entries created by any of `pids` (pycomm names them pycomm-<pid>-...)."""
    pids = {str(p) for p in pids}
    out = []
    for n in os.listdir("/dev/shm"):
        m = re.match(r"pycomm-(\d+)-", n)
        if m and m.group(1) in pids:
            out.append(n)
    return out


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# ---------------------------------------------------------------------------------------------
# Spawner


def _entry(rank, world_size, port, init, pg_timeout, env, fn, args, q):
    try:
        os.environ.update(env)
        import torch
        import torch.distributed as dist

        import pycomm  # noqa: F401  (registers the backend)

        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world_size, False, timeout=datetime.timedelta(seconds=60))
        if init:
            dist.init_process_group("pycomm", store=store, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=pg_timeout))
            result = fn(rank, world_size, *args)
        else:
            result = fn(rank, world_size, store, *args)
        q.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - everything goes to the test
        q.put((rank, "error", traceback.format_exc()))


def launch(world_size: int, fn: Callable[..., Any], *args: Any, env: Optional[dict] = None, init: bool = True,
           pg_timeout: float = 60.0, timeout: float = 120.0,
           on_started: Optional[Callable[[Any, List[int]], None]] = None) -> List[Dict[str, Any]]:
    """Runs fn(rank, world_size, *args) on `world_size` spawned ranks.

    init=False: fn(rank, world_size, store, *args) gets the store and sets up itself.
    Returns one dict per rank: status ("ok", "error" or "missing"), payload (result or
    traceback), exitcode, pid. Ranks still alive after `timeout` seconds are killed and
    reported "missing" with exitcode "hung". on_started(store, pids) runs in the test
    process (on a thread) while the ranks run.
    """
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size, True, timeout=datetime.timedelta(seconds=60),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world_size, store.port, init, pg_timeout, dict(env or {}), fn,
                                              args, q), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    helper = None
    helper_error: list = []
    if on_started is not None:
        def run_helper():
            try:
                on_started(store, [p.pid for p in procs])
            except BaseException:  # noqa: BLE001
                helper_error.append(traceback.format_exc())
        helper = threading.Thread(target=run_helper, daemon=True)
        helper.start()
    got: Dict[int, tuple] = {}
    deadline = time.monotonic() + timeout
    while len(got) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = q.get(timeout=0.2)
            got[rank] = (status, payload)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs):
                # Drain what the dead left behind.
                try:
                    while True:
                        rank, status, payload = q.get(timeout=0.5)
                        got[rank] = (status, payload)
                except queue_mod.Empty:
                    break
    hung = []
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
    for r, p in enumerate(procs):
        if p.is_alive():
            hung.append(r)
            p.kill()
            p.join()
    if helper is not None:
        helper.join(timeout=30)
    out = []
    for r, p in enumerate(procs):
        status, payload = got.get(r, ("missing", None))
        out.append({"rank": r, "status": status, "payload": payload, "pid": p.pid,
                    "exitcode": "hung" if r in hung else p.exitcode})
    if helper_error:
        out.append({"rank": "helper", "status": "error", "payload": helper_error[0]})
    del store
    return out


def describe(results) -> str:
    lines = []
    for r in results:
        lines.append(f"--- rank {r['rank']}: {r['status']} exit={r.get('exitcode')}\n{r['payload']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Rank bodies


def skip_collective(rank: int, ws: int, coll: str, sub_timeout: Optional[float]) -> dict:
    """The last rank skips one collective; the others must time out naming it.

    sub_timeout: run it on dist.new_group(timeout=sub_timeout) instead of the world.
    """
    import torch
    import torch.distributed as dist

    group = None
    if sub_timeout is not None:
        group = dist.new_group(ranks=list(range(ws)), timeout=datetime.timedelta(seconds=sub_timeout))
    warm = torch.ones(8)
    dist.all_reduce(warm, group=group)  # collective #1 of the group
    assert warm[0].item() == ws
    if rank == ws - 1:
        # Stays alive (a dead rank is detected by other means, tested elsewhere).
        time.sleep((sub_timeout or 3.0) + 5.0)
        return {"skipped": True}
    t = torch.ones(1 << 20 if coll == "all_reduce_large" else 16)
    start = time.monotonic()
    try:
        if coll == "broadcast":
            dist.broadcast(t, src=ws - 1, group=group)
        elif coll == "barrier":
            dist.barrier(group=group)
        else:
            dist.all_reduce(t, group=group)
    except RuntimeError as e:
        return {"elapsed": time.monotonic() - start, "msg": str(e), "type": type(e).__name__}
    return {"elapsed": time.monotonic() - start, "msg": None}


def kill_mid_allreduce(rank: int, ws: int, victim: int, nbytes: int, stamp_path: str,
                       compression: Optional[str] = None) -> dict:
    """Every rank loops large all_reduces (compressed ones through pycomm.compression when
    `compression` names a compressor class); `victim` SIGKILLs itself in the middle of one."""
    import torch
    import torch.distributed as dist

    t = torch.ones(nbytes // 4)
    dist.all_reduce(t)  # everyone is in
    step = dist.all_reduce
    if compression is not None:
        import pycomm.compression as C

        comp = getattr(C, compression)()

        def step(x):  # noqa: F811 - the compressed variant of the loop body
            comp.all_reduce(x, key="t")
    if rank == victim:
        def die():
            time.sleep(0.3)
            with open(stamp_path, "w") as f:
                f.write(repr(time.time()))
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=die, daemon=True).start()
    iters = 0
    end = time.monotonic() + 120
    try:
        while time.monotonic() < end:
            step(t)
            iters += 1
    except RuntimeError as e:
        failed_at = time.time()
        msg = str(e)
    else:
        return {"msg": None, "iters": iters}
    # The group is unusable; tearing it down must not hang either.
    start = time.monotonic()
    dist.destroy_process_group()
    return {"msg": msg, "failed_at": failed_at, "iters": iters, "destroy_s": time.monotonic() - start,
            "threads": thread_count()}


def raise_after_init(rank: int, ws: int, culprit: int) -> dict:
    """`culprit` raises a Python exception (and exits without tearing down); the others
    notice on their next collective."""
    import torch
    import torch.distributed as dist

    t = torch.ones(1000)
    dist.all_reduce(t)
    if rank == culprit:
        raise ValueError("user code failed on purpose")
    time.sleep(0.5)
    start = time.monotonic()
    try:
        for _ in range(100):
            dist.all_reduce(t)
            time.sleep(0.05)
    except RuntimeError as e:
        return {"msg": str(e), "elapsed": time.monotonic() - start}
    return {"msg": None}


def lifecycle(rank: int, ws: int, store: Any, rounds: int, transport: str) -> dict:
    """init / collective / destroy `rounds` times in one process on one store; returns
    what was observed about threads, fds, listeners and segments."""
    import torch
    import torch.distributed as dist

    warm = torch.ones(4) + 1  # torch's own lazy state before the baseline
    del warm
    base_threads, base_fds = thread_count(), fd_count()
    rounds_out = []
    for i in range(rounds):
        dist.init_process_group("pycomm", store=store, rank=rank, world_size=ws,
                                timeout=datetime.timedelta(seconds=20))
        import pycomm

        assert pycomm.transport() == transport, pycomm.transport()
        t = torch.full((1000,), float(rank + i))
        dist.all_reduce(t)
        expected = sum(r + i for r in range(ws))
        ok = bool((t == expected).all())
        big = torch.ones(1 << 20)
        dist.all_reduce(big)
        ok = ok and bool((big == ws).all())
        listeners = listening_sockets()
        alive_threads = thread_count()
        dist.destroy_process_group()
        back = wait_until(lambda: thread_count() == base_threads and fd_count() == base_fds, 5.0)
        rounds_out.append({"ok": ok, "listeners": listeners, "threads_alive": alive_threads,
                           "threads_after": thread_count(), "fds_after": fd_count(), "back": back})
    return {"base_threads": base_threads, "base_fds": base_fds, "rounds": rounds_out, "pid": os.getpid()}


MISMATCH_KINDS = ["coll", "count_small", "count_large", "dtype", "op", "root"]


def mismatch_cases(rank: int, ws: int, kinds: List[str]) -> dict:
    """For each kind, a fresh group in which the last rank calls something different.
    Every rank must raise (at the call, or at the latest at the barrier right after it)."""
    import torch
    import torch.distributed as dist

    out = {}
    for kind in kinds:
        g = dist.new_group(ranks=list(range(ws)), timeout=datetime.timedelta(seconds=30))
        odd = rank == ws - 1
        start = time.monotonic()
        step = "call"
        try:
            if kind == "coll":
                t = torch.ones(64)
                if odd:
                    dist.broadcast(t, src=0, group=g)
                else:
                    dist.all_reduce(t, group=g)
            elif kind in ("count_small", "count_large"):
                n = 100 if kind == "count_small" else 1 << 20
                dist.all_reduce(torch.ones(n + (1 if odd else 0)), group=g)
            elif kind == "dtype":
                dist.all_reduce(torch.ones(64, dtype=torch.int32 if odd else torch.float32), group=g)
            elif kind == "op":
                dist.all_reduce(torch.ones(64), op=dist.ReduceOp.MAX if odd else dist.ReduceOp.SUM, group=g)
            elif kind == "root":
                dist.broadcast(torch.ones(1000), src=1 if odd else 0, group=g)
            step = "barrier"
            dist.barrier(group=g)
            out[kind] = {"msg": None, "elapsed": time.monotonic() - start}
        except RuntimeError as e:
            out[kind] = {"msg": str(e), "step": step, "elapsed": time.monotonic() - start}
    return out


def soak(rank: int, ws: int, n_small: int, n_large: int, large_bytes: int) -> dict:
    """Many small and large all_reduces, then two groups used alternately; resource
    counters after warm-up and at the end."""
    import torch
    import torch.distributed as dist

    # Inputs vary along the buffer (exact in float32), and every element of every result
    # is compared, so a misplaced or stale chunk anywhere shows up.
    small = torch.zeros(16)
    small_pattern = torch.arange(16, dtype=torch.float32)
    large = torch.zeros(large_bytes // 4)
    large_pattern = (torch.arange(large.numel()) % 1021).to(torch.float32)
    expect_large = ws * large_pattern + float(sum(range(ws)))

    def one_small(i):
        small.copy_(small_pattern + float(rank + i % 7))
        dist.all_reduce(small)
        return torch.equal(small, ws * small_pattern + float(sum(r + i % 7 for r in range(ws))))

    def one_large():
        torch.add(large_pattern, float(rank), out=large)
        dist.all_reduce(large)
        return torch.equal(large, expect_large)

    sub = dist.new_group(ranks=list(range(ws)))
    a = torch.zeros(1000)
    b = torch.zeros(70000)
    for i in range(300):
        assert one_small(i)
    for _ in range(10):
        assert one_large()
    for _ in range(20):
        dist.all_reduce(b, group=sub)
    base = {"fds": fd_count(), "threads": thread_count(), "rss": rss_bytes()}
    start = time.monotonic()
    bad = 0
    for i in range(n_small):
        if not one_small(i):
            bad += 1
    small_s = time.monotonic() - start
    start = time.monotonic()
    for _ in range(n_large):
        if not one_large():
            bad += 1
    large_s = time.monotonic() - start
    # Two groups, used alternately, each with its own values.
    for i in range(200):
        a.fill_(float(rank + 1))
        b.fill_(float(10 * (rank + 1) + i))
        dist.all_reduce(a)
        dist.all_reduce(b, group=sub)
        if not (bool((a == sum(r + 1 for r in range(ws))).all())
                and bool((b == sum(10 * (r + 1) + i for r in range(ws))).all())):
            bad += 1
        w = dist.all_reduce(b, group=sub, async_op=True)  # in flight on one group
        dist.all_reduce(a)                                  # while the other runs
        w.wait()
    end = {"fds": fd_count(), "threads": thread_count(), "rss": rss_bytes()}
    dist.destroy_process_group(sub)
    return {"base": base, "end": end, "bad": bad, "small_s": small_s, "large_s": large_s}


def stale_segment_job(rank: int, ws: int) -> dict:
    import torch
    import torch.distributed as dist

    import pycomm

    t = torch.ones(100)
    dist.all_reduce(t)
    return {"ok": bool((t == ws).all()), "transport": pycomm.transport()}


def destroy_while_running(rank: int, ws: int, absent: int) -> dict:
    """Every rank but `absent` starts an all_reduce that cannot finish, gives up on it with
    Work.wait(timeout=1s) and destroys the group: destroying must abort the running
    collective (not wait for its 60 s deadline), and `absent`, joining late, must fail
    fast instead of waiting for ranks that are gone."""
    import torch
    import torch.distributed as dist

    t = torch.ones(1 << 16)
    dist.all_reduce(t)  # everyone is in
    out: Dict[str, Any] = {}
    if rank != absent:
        w = dist.all_reduce(t, async_op=True)
        try:
            w.wait(timeout=datetime.timedelta(seconds=1))
            out["wait"] = "completed"
        except RuntimeError as e:
            out["wait"] = str(e)
        start = time.monotonic()
        dist.destroy_process_group()
        out["destroy_s"] = time.monotonic() - start
        return out
    time.sleep(3.0)
    start = time.monotonic()
    try:
        dist.all_reduce(t)
        out["late"] = "completed"
    except RuntimeError as e:
        out["late"] = str(e)
    out["late_s"] = time.monotonic() - start
    start = time.monotonic()
    dist.destroy_process_group()
    out["destroy_s"] = time.monotonic() - start
    return out
