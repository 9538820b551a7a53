"""Per-algorithm counters in pycomm.stats(): forcing an all_reduce algorithm
(PYCOMM_ALGO) makes exactly that algorithm run, as its ``algo_all_reduce_<name>``
counter shows, and its results match a float64 reference."""
import pytest

from dist_util import run_ranks

WORLD = 3
# (transport, PYCOMM_ALGO) pairs that select an all_reduce algorithm, and the element
# counts each runs: the ring needs at least one element per rank, one-shot fits its
# data inline in the shared segment (64 KiB).
CASES = {
    ("shm", "ring"): [3, 1021, 65537],
    ("shm", "rd"): [1, 7, 1021, 65537],
    ("shm", "oneshot"): [1, 7, 1021],
    ("shm", "direct"): [1, 7, 1021, 65537],
    ("tcp", "ring"): [3, 1021, 65537],
    ("tcp", "rd"): [1, 7, 1021, 65537],
}


def _algo_counters(s):
    return {k: v for k, v in s.items() if k.startswith("algo_all_reduce_")}


def _input(rank, n, dtype):
    import torch

    g = torch.Generator().manual_seed(1000 * n + rank)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


def _check_all_reduce(rank, ws, counts):
    """Runs SUM and AVG all_reduces of float32 and float64 tensors of each count,
    checks each against the float64 reduction of every rank's input; returns calls run."""
    import torch
    import torch.distributed as dist

    calls = 0
    for n in counts:
        for dtype in (torch.float32, torch.float64):
            for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
                t = _input(rank, n, dtype)
                dist.all_reduce(t, op=op)
                calls += 1
                ref = sum(_input(r, n, dtype).to(torch.float64) for r in range(ws))
                if op == dist.ReduceOp.AVG:
                    ref = ref / ws
                tol = 1e-5 if dtype == torch.float32 else 1e-12
                torch.testing.assert_close(t.to(torch.float64), ref, rtol=tol, atol=tol * ws,
                                           msg=lambda m: f"n={n} {dtype} {op}: {m}")
    return calls


def _forced(rank, ws, algo, counts):
    import pycomm

    before = _algo_counters(pycomm.stats())
    calls = _check_all_reduce(rank, ws, counts)
    after = _algo_counters(pycomm.stats())
    moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert moved == {f"algo_all_reduce_{algo}": calls}, f"PYCOMM_ALGO={algo}: counters moved {moved}"
    return moved


@pytest.mark.parametrize("transport,algo", sorted(CASES))
def test_forced_algorithm_runs(transport, algo):
    results = run_ranks(WORLD, _forced, algo, CASES[(transport, algo)],
                        env={"PYCOMM_TRANSPORT": transport, "PYCOMM_ALGO": algo}, timeout=300)
    assert all(r == results[0] for r in results)


def _auto(rank, ws, small, large):
    import torch
    import torch.distributed as dist

    import pycomm

    moved = {}
    for n in (4, 1 << 16):  # 16 bytes: latency algorithm; 256 KiB: bandwidth algorithm
        before = _algo_counters(pycomm.stats())
        dist.all_reduce(torch.ones(n))
        after = _algo_counters(pycomm.stats())
        moved[n] = sorted(k for k in after if after[k] != before.get(k, 0))
    assert moved == {4: [f"algo_all_reduce_{small}"], 1 << 16: [f"algo_all_reduce_{large}"]}, moved
    return moved


@pytest.mark.parametrize("transport,small,large", [("shm", "oneshot", "direct"), ("tcp", "rd", "ring")])
def test_auto_picks_by_size(transport, small, large):
    run_ranks(WORLD, _auto, small, large, env={"PYCOMM_TRANSPORT": transport, "PYCOMM_ALGO": "auto"}, timeout=300)


def _auto_small_collectives(rank, ws):
    """Flat TCP group of 3+ ranks, PYCOMM_ALGO=auto: a broadcast of at most
    PYCOMM_ALLREDUCE_SMALL_BYTES runs the binomial tree, a larger one the chain (from every
    root); an all_gather of at most that many bytes in all runs Bruck's algorithm, a
    larger one the ring; each checked bit for bit."""
    import torch
    import torch.distributed as dist

    import pycomm

    moved = {}
    for n in (0, 1, 13, 16384, 16385, 65537):  # float32: 16384 elements = 64 KiB, the bound
        before = pycomm.stats()
        for root in range(ws):
            x = torch.arange(n, dtype=torch.float32) * (root + 1) if rank == root else torch.full((n,), -1.0)
            dist.broadcast(x, src=root)
            torch.testing.assert_close(x, torch.arange(n, dtype=torch.float32) * (root + 1), rtol=0, atol=0)
        after = pycomm.stats()
        moved[n] = {k: after[k] - before.get(k, 0) for k in after
                    if k.startswith("algo_broadcast_") and after[k] != before.get(k, 0)}
    tree, chain = {"algo_broadcast_tree": ws}, {"algo_broadcast_chain": ws}
    assert moved == {0: tree, 1: tree, 13: tree, 16384: tree, 16385: chain, 65537: chain}, moved
    # all_gather: Bruck while the gathered result has at most 64 KiB, the ring above.
    gathered = {}
    for n in (0, 1, 7, 16384 // ws, 16384 // ws + 1, 6007):
        before = pycomm.stats()
        out = torch.empty(n * ws, dtype=torch.float32)
        dist.all_gather_into_tensor(out, torch.arange(n, dtype=torch.float32) + 1000 * rank)
        ref = torch.cat([torch.arange(n, dtype=torch.float32) + 1000 * r for r in range(ws)])
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        after = pycomm.stats()
        gathered[n] = sorted(k for k in after if k.startswith("algo_all_gather_") and after[k] != before.get(k, 0))
    big = 16384 // ws + 1
    assert gathered == {n: ["algo_all_gather_ring" if n >= big else "algo_all_gather_bruck"] for n in gathered}, \
        gathered
    return moved


@pytest.mark.parametrize("world", [3, 5])
def test_small_broadcast_and_all_gather_run_log_rounds_over_tcp(world):
    run_ranks(world, _auto_small_collectives, env={"PYCOMM_TRANSPORT": "tcp", "PYCOMM_ALGO": "auto"}, timeout=300)


# On a group over several (emulated) hosts with two ranks on one (2+1), each PYCOMM_ALGO
# selects its all_reduce, and the hierarchical broadcast / reduce unless a flat algorithm
# is forced.
HOSTS_EXPECTED = {
    "hier_rd": {"algo_all_reduce_hier_rd": 3, "algo_broadcast_hier": 3, "algo_reduce_hier": 3},
    "hier": {"algo_all_reduce_hier": 3, "algo_broadcast_hier": 3, "algo_reduce_hier": 3},
    # (flat reduce: small calls all-reduce a copy, large ones run the chain)
    "ring": {"algo_all_reduce_ring": 3, "algo_broadcast_chain": 3, "algo_reduce_all_reduce": 2,
             "algo_reduce_chain": 1},
    "rd": {"algo_all_reduce_rd": 3, "algo_broadcast_tree": 3, "algo_reduce_all_reduce": 3},
    "auto": {"algo_all_reduce_hier_rd": 2, "algo_all_reduce_hier": 1, "algo_broadcast_hier": 3,
             "algo_reduce_hier": 3},
}


def test_forced_algorithms_on_several_hosts():
    import reliability_cases as rc
    import topology_cases as tc

    results = rc.launch(3, tc.forced_algorithms, [0, 0, 1], sorted(HOSTS_EXPECTED), init=False, timeout=240)
    for r in results:
        assert r["status"] == "ok", rc.describe(results)
        for algo, moved in r["payload"].items():
            assert moved == HOSTS_EXPECTED[algo], (r["rank"], algo, moved)
