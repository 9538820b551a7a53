"""Rank-to-core binding on an oversubscribed host (core/affinity.h, pycomm.binding()).

Each test gives its ranks the same two CPUs first (so the host is oversubscribed on any
machine with two CPUs or more), then creates the pycomm group the way torch does.
"""
from __future__ import annotations

import datetime
import os

import pytest

from dist_util import free_port, run_ranks

pytest.importorskip("pycomm._C")

CPUS = sorted(os.sched_getaffinity(0))[:2]
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs two usable CPUs")


def _masks():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = sorted(os.sched_getaffinity(int(tid)))
        except OSError:  # the thread ended meanwhile
            pass
    return out


def _body(rank, world, port, cpus, mode, threads, hosts=1):
    import torch
    import torch.distributed as dist

    os.sched_setaffinity(0, cpus)
    if mode is not None:
        os.environ["PYCOMM_BIND"] = mode
    if hosts > 1:  # emulated hosts on this one machine
        os.environ["PYCOMM_HOST_KEY"] = f"h{rank * hosts // world}"
    torch.set_num_threads(threads)
    import pycomm
    from pycomm import _C

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("pycomm", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        b = pycomm.binding()
        masks = _masks()
        x = torch.arange(7, dtype=torch.float32) * (rank + 1)
        dist.all_reduce(x)
        # The probes measure the machine, not this rank's share, and give the share back.
        avail = int(_C.available_cpus())
        probe = _C.probe_memcpy(1 << 20, 2, 1, False)
        mine_after_probe = sorted(os.sched_getaffinity(0))
        dist.barrier()
        return dict(b, masks=masks, sum=x.tolist(), threads=torch.get_num_threads(), avail=avail,
                    probe_error=probe["error"], after_probe=mine_after_probe)
    finally:
        dist.destroy_process_group()


def _expected_sum(world):
    return [float(i * world * (world + 1) // 2) for i in range(7)]


@needs_two
def test_oversubscribed_ranks_are_bound_round_robin_with_one_torch_thread():
    world = 4
    res = run_ranks(world, _body, free_port(), CPUS, None, 2, backend=None)
    for rank, r in enumerate(res):
        assert r["sum"] == _expected_sum(world)
        assert r["decided"] and r["bound"], r["reason"]
        assert r["mode"] == "auto" and r["local_index"] == rank and r["local_size"] == world
        assert r["before"] == CPUS
        assert r["cpus"] == [CPUS[rank % 2]]
        assert "oversubscribed: 4 ranks on this host, 2 usable CPUs" in r["reason"]
        # every thread of the process, pycomm's own included, is on the rank's CPU
        assert all(m == r["cpus"] for m in r["masks"].values()), r["masks"]
        assert r["threads"] == 1 and r["torch_threads_before"] == 2
        assert r["avail"] == 2 and r["probe_error"] is None
        assert r["after_probe"] == r["cpus"]


@needs_two
def test_bind_0_leaves_the_placement_to_the_os():
    res = run_ranks(3, _body, free_port(), CPUS, "0", 2, backend=None)
    for r in res:
        assert r["sum"] == _expected_sum(3)
        assert r["decided"] and not r["bound"] and r["reason"] == "PYCOMM_BIND=0"
        assert r["cpus"] == [] and r["threads"] == 2 and r["torch_threads_before"] is None
        assert all(m == CPUS for m in r["masks"].values())


@needs_two
def test_not_oversubscribed_is_not_bound_unless_asked():
    res = run_ranks(2, _body, free_port(), CPUS, None, 1, backend=None)
    for r in res:
        assert not r["bound"] and r["reason"] == "not oversubscribed: 2 ranks on this host, 2 usable CPUs"
        assert all(m == CPUS for m in r["masks"].values())
    res = run_ranks(2, _body, free_port(), CPUS, "1", 1, backend=None)
    for rank, r in enumerate(res):
        assert r["bound"] and r["cpus"] == [CPUS[rank]] and r["reason"].startswith("PYCOMM_BIND=1")
        assert r["sum"] == _expected_sum(2)


def _bad_env_body(rank, world, port):
    import torch.distributed as dist

    os.environ["PYCOMM_BIND"] = "sometimes"
    import pycomm  # noqa: F401

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
    try:
        dist.init_process_group("pycomm", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=20))
    except Exception as e:  # noqa: BLE001 - the message is the test
        if rank == 0:
            import time

            time.sleep(3)  # keep the store up until rank 1 has read its own error
        return f"{type(e).__name__}: {e}"
    dist.destroy_process_group()
    return "no error"


def test_a_bad_pycomm_bind_is_a_clear_error_naming_the_rank():
    res = run_ranks(2, _bad_env_body, free_port(), backend=None)
    for rank, msg in enumerate(res):
        assert f"rank {rank}" in msg and "PYCOMM_BIND must be auto, 0 or 1 (got 'sometimes')" in msg, msg


def test_cpu_share_matches_the_policy():
    from pycomm import _C

    assert _C._cpu_share([3, 9], 2, 4) == [3]
    assert _C._cpu_share([0, 1, 2, 3, 4], 1, 2) == [3, 4]
    assert _C._cpu_share([0, 1, 2, 3, 4], 0, 2) == [0, 1, 2]


@needs_two
def test_emulated_hosts_on_one_machine_count_as_one_for_the_cpus():
    # 2 emulated hosts of 2 ranks (PYCOMM_HOST_KEY): each host alone would fit 2 CPUs, but
    # all 4 ranks share them, so all 4 are bound round robin, not 2 and 2 on the same CPUs.
    res = run_ranks(4, _body, free_port(), CPUS, None, 1, 2, backend=None)
    for rank, r in enumerate(res):
        assert r["sum"] == _expected_sum(4)
        assert r["bound"] and r["local_size"] == 4 and r["local_index"] == rank
        assert r["cpus"] == [CPUS[rank % 2]]
