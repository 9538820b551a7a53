"""Rank bodies of test_topology.py: each rank first takes the emulated host key of its
layout entry (PYCOMM_HOST_KEY), then joins the group, so one machine holds several
"hosts" (shared memory inside each, TCP between them)."""
from __future__ import annotations

import datetime
import os
from typing import List

import reliability_cases as rc

LENGTHS = [0, 1, 13, 40009]


def _join(rank: int, ws: int, store, layout: List[int], pg_timeout: float = 60.0) -> None:
    import torch.distributed as dist

    os.environ["PYCOMM_HOST_KEY"] = f"host{layout[rank]}"
    # Chunks small enough that the largest test calls pipeline their hierarchical steps.
    os.environ["PYCOMM_HIER_CHUNK_BYTES"] = "65536"
    dist.init_process_group("pycomm", store=store, rank=rank, world_size=ws,
                            timeout=datetime.timedelta(seconds=pg_timeout))


def _inputs(rank: int, n: int):
    import torch

    return (torch.arange(n, dtype=torch.float64) % 11) * 0.5 - 2.0 + 0.25 * rank


def every_collective(rank: int, ws: int, store, layout: List[int]) -> dict:
    import torch
    import torch.distributed as dist

    import pycomm

    _join(rank, ws, store, layout)
    out = {"transport": pycomm.transport()}
    before = pycomm.stats()
    for n in LENGTHS:
        ref = sum(_inputs(r, n) for r in range(ws))
        for op, scale in ((dist.ReduceOp.SUM, 1.0), (dist.ReduceOp.AVG, 1.0 / ws)):
            x = _inputs(rank, n).float()
            dist.all_reduce(x, op=op)
            torch.testing.assert_close(x.double(), ref * scale, rtol=1e-5, atol=1e-5)
        y = _inputs(rank, n)
        dist.all_reduce(y)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        # reduce_scatter / all_gather (n elements per rank)
        full = torch.cat([_inputs(rank, n) + 10 * b for b in range(ws)])
        mine = torch.empty(n, dtype=torch.float64)
        dist.reduce_scatter_tensor(mine, full)
        torch.testing.assert_close(mine, sum(_inputs(r, n) + 10 * rank for r in range(ws)))
        gathered = torch.empty(n * ws, dtype=torch.float64)
        dist.all_gather_into_tensor(gathered, _inputs(rank, n))
        torch.testing.assert_close(gathered, torch.cat([_inputs(r, n) for r in range(ws)]))
        # Every root (a host's first rank or not, every host) for 1 element and the large
        # (pipelined) length, a root on the first and one on the last host for the others
        # (test_hierarchical.cc covers every root at every length); MAX on the large one.
        for root in (range(ws) if n in (1, LENGTHS[-1]) else sorted({0, ws - 1})):
            b = _inputs(rank, n)
            dist.broadcast(b, src=root)
            torch.testing.assert_close(b, _inputs(root, n), rtol=0, atol=0)
            r_ = _inputs(rank, n)
            dist.reduce(r_, dst=root)
            torch.testing.assert_close(r_, ref if rank == root else _inputs(rank, n), rtol=1e-12, atol=1e-12)
            if n != LENGTHS[-1]:
                continue
            m = _inputs(rank, n).float()
            dist.reduce(m, dst=root, op=dist.ReduceOp.MAX)
            mref = torch.stack([_inputs(r, n) for r in range(ws)]).amax(0)
            torch.testing.assert_close(m.double(), mref if rank == root else _inputs(rank, n))
        dist.barrier()
    after = pycomm.stats()
    out["algos"] = {k: after[k] - before.get(k, 0) for k in after
                    if k.startswith("algo_") and after[k] != before.get(k, 0)}
    # Receive from any source: rank 0 takes every other rank's message, over shm or TCP.
    if rank == 0:
        seen = {}
        for _ in range(ws - 1):
            t = torch.empty(7, dtype=torch.float64)
            src = dist.recv(t)
            seen[src] = t
        assert sorted(seen) == list(range(1, ws)), sorted(seen)
        for src, t in seen.items():
            torch.testing.assert_close(t, _inputs(src, 7))
    else:
        dist.send(_inputs(rank, 7), dst=0)
    # A subgroup on one host: shared memory only.
    host0 = [r for r in range(ws) if layout[r] == layout[0]]
    sub = dist.new_group(host0)
    if rank in host0:
        out["sub_transport"] = pycomm.transport(sub)
        s = _inputs(rank, 1009)
        dist.all_reduce(s, group=sub)
        torch.testing.assert_close(s, sum(_inputs(r, 1009) for r in host0))
    dist.barrier()
    dist.destroy_process_group()
    return out


def kill_on_other_host(rank: int, ws: int, store, layout: List[int], victim: int, stamp: str) -> dict:
    _join(rank, ws, store, layout)
    return rc.kill_mid_allreduce(rank, ws, victim, 16 << 20, stamp)


def forced_algorithms(rank: int, ws: int, store, layout: List[int], algos: List[str]) -> dict:
    """For each PYCOMM_ALGO in `algos`, a group built with it runs all_reduce, broadcast
    and reduce (checked against float64 references); returns the algorithm counters each
    group's calls moved."""
    import torch
    import torch.distributed as dist

    import pycomm

    _join(rank, ws, store, layout)
    out = {}
    for algo in algos:
        os.environ["PYCOMM_ALGO"] = algo
        g = dist.new_group(list(range(ws)))
        dist.all_reduce(torch.ones(1), group=g)  # the backend reads PYCOMM_ALGO when it is built
        os.environ.pop("PYCOMM_ALGO")
        before = pycomm.stats(g)
        for n in (7, 1021, 65537):
            ref = sum(_inputs(r, n) for r in range(ws))
            x = _inputs(rank, n)
            dist.all_reduce(x, group=g)
            torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)
            b = _inputs(rank, n)
            dist.broadcast(b, src=ws - 1, group=g)
            torch.testing.assert_close(b, _inputs(ws - 1, n), rtol=0, atol=0)
            r_ = _inputs(rank, n)
            dist.reduce(r_, dst=1, group=g)
            torch.testing.assert_close(r_, ref if rank == 1 else _inputs(rank, n), rtol=1e-12, atol=1e-12)
        after = pycomm.stats(g)
        out[algo] = {k: after[k] - before.get(k, 0) for k in after
                     if k.startswith("algo_") and after[k] != before.get(k, 0)}
    dist.destroy_process_group()
    return out
