"""The c10d entry points beyond the plain collectives, on real processes: coalesced
collectives (one operation each), receive from any source, monitored_barrier, sequence
numbers, split groups and torch.compile of functional collectives. Results are checked
against float64 references computed here; Gloo runs the same checks where it has the call."""
from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist

from dist_util import BACKENDS, run_ranks

pytestmark = pytest.mark.skipif("pycomm" not in BACKENDS, reason="pycomm extension not built")

WORLD = 3
LENGTHS = [0, 1, 7, 13]  # empty, one element, primes


def _vals(rank: int, i: int, n: int, dtype=torch.float64) -> torch.Tensor:
    """Rank `rank`'s i-th tensor: distinct small integers (exact in every float dtype)."""
    return (torch.arange(n, dtype=torch.float64) * (i + 1) + 10 * rank + i).to(dtype)


def _collectives() -> int:
    import pycomm

    return pycomm.stats()["collectives"] if dist.get_backend() == "pycomm" else -1


def _coalesced_body(rank, world, dtype):
    before = _collectives()
    ran = []

    # all_reduce, coalesced by torch's coalescing manager -> Backend::allreduce_coalesced.
    ts = [_vals(rank, i, n, dtype) for i, n in enumerate(LENGTHS)]
    with dist._coalescing_manager(async_ops=True) as cm:
        for t in ts:
            dist.all_reduce(t)
    cm.wait()
    for i, n in enumerate(LENGTHS):
        ref = sum(_vals(r, i, n) for r in range(world))
        torch.testing.assert_close(ts[i].double(), ref, rtol=0, atol=0)
    ran.append(_collectives())

    # all_gather_coalesced: outputs[r][i] gets rank r's inputs[i] (shapes differ).
    shapes = [(0,), (1,), (7,), (13,), (2, 3)]
    ins = [_vals(rank, i, int(torch.Size(s).numel()), dtype).reshape(s) for i, s in enumerate(shapes)]
    outs = [[torch.full(s, -1.0, dtype=dtype) for s in shapes] for _ in range(world)]
    work = dist.all_gather_coalesced(outs, ins, async_op=True)
    work.wait()
    for r in range(world):
        for i, s in enumerate(shapes):
            ref = _vals(r, i, int(torch.Size(s).numel())).reshape(s)
            torch.testing.assert_close(outs[r][i].double(), ref, rtol=0, atol=0)
    ran.append(_collectives())

    # all_gather_into_tensor, coalesced -> Backend::allgather_into_tensor_coalesced.
    ins = [_vals(rank, i, n, dtype) for i, n in enumerate(LENGTHS)]
    outs = [torch.full((world * n,), -1.0, dtype=dtype) for n in LENGTHS]
    with dist._coalescing_manager(async_ops=True) as cm:
        for o, t in zip(outs, ins):
            dist.all_gather_into_tensor(o, t)
    cm.wait()
    for i, n in enumerate(LENGTHS):
        ref = torch.cat([_vals(r, i, n) for r in range(world)])
        torch.testing.assert_close(outs[i].double(), ref, rtol=0, atol=0)
    ran.append(_collectives())

    # reduce_scatter_tensor, coalesced -> Backend::reduce_scatter_tensor_coalesced.
    ins = [_vals(rank, i, world * n, dtype) for i, n in enumerate(LENGTHS)]
    outs = [torch.full((n,), -1.0, dtype=dtype) for n in LENGTHS]
    with dist._coalescing_manager(async_ops=True) as cm:
        for o, t in zip(outs, ins):
            dist.reduce_scatter_tensor(o, t)
    cm.wait()
    for i, n in enumerate(LENGTHS):
        full = sum(_vals(r, i, world * n) for r in range(world))
        torch.testing.assert_close(outs[i].double(), full[rank * n:(rank + 1) * n], rtol=0, atol=0)
    ran.append(_collectives())
    return before, ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_coalesced_collectives_are_one_operation_each(dtype):
    for rank, (before, ran) in enumerate(run_ranks(WORLD, _coalesced_body, dtype)):
        # Each coalesced call is one collective of the group (not one per tensor).
        assert ran == [before + 1, before + 2, before + 3, before + 4], (rank, before, ran)


def _coalesced_gloo_body(rank, world, dtype):
    _coalesced_body(rank, world, dtype)


def test_coalesced_collectives_same_results_on_gloo():
    # The references hold for Gloo too (the test is not tuned to pycomm).
    run_ranks(WORLD, _coalesced_gloo_body, torch.float32, backend="gloo")


def _coalesced_bad_input_body(rank, world):
    with pytest.raises(ValueError, match=rf"pycomm rank {rank}: all_reduce_coalesced needs tensors of one dtype"):
        with dist._coalescing_manager():
            dist.all_reduce(torch.ones(3))
            dist.all_reduce(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"pycomm rank {rank}: all_gather_coalesced output list 0 has 1 tensors"):
        dist.all_gather_coalesced([[torch.ones(1)] for _ in range(world)], [torch.ones(1), torch.ones(2)])


def test_coalesced_bad_input_names_the_rank():
    run_ranks(WORLD, _coalesced_bad_input_body)


def _sparse_input(rank: int, case: int, shape, sparse_dim: int, dtype) -> torch.Tensor:
    """Rank `rank`'s sparse COO tensor: a rank-dependent number of non-zeros (none on rank 1),
    indices that repeat within and across ranks, small integer values (exact sums)."""
    g = torch.Generator().manual_seed(100 * case + rank)
    nnz = [5, 0, 11, 2][rank % 4]
    idx = torch.stack([torch.randint(0, shape[d], (nnz,), generator=g) for d in range(sparse_dim)])
    vals = torch.randint(-9, 10, (nnz,) + tuple(shape[sparse_dim:]), generator=g).to(dtype)
    return torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True)


def _sparse_body(rank, world):
    for case, (shape, sparse_dim, dtype) in enumerate([((5, 7), 2, torch.float32), ((6, 3), 1, torch.float64),
                                                       ((13,), 1, torch.int64), ((1, 1), 2, torch.float32)]):
        t = _sparse_input(rank, case, shape, sparse_dim, dtype)
        dist.all_reduce(t)
        ref = sum(_sparse_input(r, case, shape, sparse_dim, dtype).to_dense().double() for r in range(world))
        assert t.is_sparse and t.dtype == dtype, (t.layout, t.dtype)
        torch.testing.assert_close(t.to_dense().double(), ref, rtol=0, atol=0)
    # async: the result is in the tensor once the Work is done
    t = _sparse_input(rank, 9, (4, 4), 2, torch.float32)
    dist.all_reduce(t, async_op=True).wait()
    ref = sum(_sparse_input(r, 9, (4, 4), 2, torch.float32).to_dense().double() for r in range(world))
    torch.testing.assert_close(t.to_dense().double(), ref, rtol=0, atol=0)
    if dist.get_backend() == "pycomm":
        with pytest.raises(ValueError, match=rf"pycomm rank {rank}: sparse all_reduce supports ReduceOp.SUM only"):
            dist.all_reduce(_sparse_input(rank, 0, (5, 7), 2, torch.float32), op=dist.ReduceOp.MAX)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_all_reduce_sums_like_gloo(backend):
    run_ranks(WORLD, _sparse_body, backend=backend)


def _sparse_mismatch_body(rank, world):
    shape = (5, 8) if rank == 2 else (5, 7)
    with pytest.raises(Exception, match=r"sparse all_reduce #\d+ of .*but rank \d passed"):
        dist.all_reduce(_sparse_input(rank, 0, shape, 2, torch.float32))
    dist.destroy_process_group()  # the group has failed (as after any mismatch): no closing barrier


def test_sparse_all_reduce_mismatched_sizes_fail_on_every_rank():
    run_ranks(WORLD, _sparse_mismatch_body)


def _recv_any_body(rank, world):
    # Rank 0 receives from whoever sends a message with the tag it asks for; rank 1's
    # tag-5 message arrives first but only the tag-5 receive may take it.
    if rank == 0:
        a = torch.zeros(5)
        w = dist.irecv(a, tag=7)  # src=None: any source
        w.wait()
        src_a = w._source_rank()
        b = torch.zeros(5)
        src_b = dist.recv(b, tag=5)  # any source, returns the sender
        c = torch.zeros(3)
        dist.recv(c, src=1, tag=9)  # a named receive after them keeps the pair's order
        d = torch.zeros(5)
        src_d = dist.recv(d)  # tag 0 from either
        return src_a, a.tolist(), src_b, b.tolist(), c.tolist(), src_d, d.tolist()
    if rank == 1:
        dist.send(torch.full((5,), 1.0), 0, tag=5)
        dist.send(torch.full((3,), 11.0), 0, tag=9)
    if rank == 2:
        time.sleep(0.5)  # rank 1's message is at rank 0 well before this one
        dist.send(torch.full((5,), 2.0), 0, tag=7)
        dist.send(torch.full((5,), 22.0), 0)
    return None


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_recv_from_any_source_reports_the_source(transport):
    src_a, a, src_b, b, c, src_d, d = run_ranks(WORLD, _recv_any_body, env={"PYCOMM_TRANSPORT": transport})[0]
    assert (src_a, a) == (2, [2.0] * 5)
    assert (src_b, b) == (1, [1.0] * 5)
    assert c == [11.0] * 3
    assert (src_d, d) == (2, [22.0] * 5)


def _recv_any_timeout_body(rank, world):
    # A group with a short timeout; the default group (long timeout) ends the test.
    short = dist.new_group(timeout=datetime.timedelta(seconds=1.5))
    if rank == 0:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 0 received no message with tag 3 from any rank"):
            dist.recv(torch.zeros(1), tag=3, group=short)
        return time.monotonic() - t0
    return None


def test_recv_from_any_source_times_out():
    took = run_ranks(WORLD, _recv_any_timeout_body)[0]
    assert 1.0 < took < 10.0


def _monitored_barrier_body(rank, world, late, wait_all):
    timeout = datetime.timedelta(seconds=1.0)
    # A passing barrier first: it waits for the slowest rank.
    if rank == 1:
        time.sleep(0.4)
    t0 = time.monotonic()
    dist.monitored_barrier(timeout=timeout, wait_all_ranks=wait_all)
    waited = time.monotonic() - t0
    # Now `late` ranks arrive after the timeout.
    if rank in late:
        time.sleep(2.0)
    try:
        dist.monitored_barrier(timeout=timeout, wait_all_ranks=wait_all)
        err = None
    except RuntimeError as e:
        err = str(e)
    dist.barrier()  # the group is still usable
    return waited, err


@pytest.mark.parametrize("late,wait_all,names", [([2], False, "Rank 2 failed"), ([1, 2], True, "Ranks 1, 2 failed"),
                                                 ([1, 2], False, "Rank 1 failed")])
def test_monitored_barrier_names_the_missing_ranks(late, wait_all, names):
    res = run_ranks(WORLD, _monitored_barrier_body, late, wait_all)
    assert res[0][0] > 0.3  # rank 0 waited for rank 1 in the passing barrier
    msg0 = res[0][1]
    assert msg0 is not None and f"[Rank 0]: {names} to pass monitoredBarrier in 1000 ms" in msg0
    for rank in (1, 2):
        # Every other rank fails too, with rank 0's finding (the barrier passes nowhere).
        assert res[rank][1] is not None and names in res[rank][1], (rank, res[rank][1])


def _sequence_body(rank, world):
    pg = dist.group.WORLD
    s0 = pg._get_sequence_number_for_group()
    dist.all_reduce(torch.ones(2))
    dist.broadcast(torch.ones(2), 0)
    s1 = pg._get_sequence_number_for_group()
    return s0, s1


def test_sequence_numbers_count_collectives():
    res = run_ranks(WORLD, _sequence_body)
    assert len(set(res)) == 1  # the same on every rank
    s0, s1 = res[0]
    assert s1 == s0 + 2


def _split_body(rank, world):
    out = {}
    # Backend::split, as ProcessGroup.split_group reaches it (dist.split_group needs a
    # default group bound to an accelerator, so on CPU torch only gets here directly).
    sub = dist.group.WORLD.split_group([0, 2], group_desc="sub02")
    if sub is None:
        out["split"] = None
    else:
        t = torch.tensor([float(rank + 1)])
        sub.allreduce([t]).wait()
        be = sub._get_backend(torch.device("cpu"))
        out["split"] = (t.item(), sub.size(), sub.rank(), be.supports_splitting, type(be).__name__)
    cur, _ = dist.new_subgroups(group_size=1)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=cur)
    out["subgroups"] = t.item()
    ng = dist.new_group([1, 2])
    if rank in (1, 2):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=ng)
        out["new_group"] = t.item()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_group_and_subgroups(backend):
    res = run_ranks(WORLD, _split_body, backend=backend)
    kind = "PycommBackend" if backend == "pycomm" else "ProcessGroupGloo"
    assert res[0]["split"] == (4.0, 2, 0, True, kind) and res[2]["split"] == (4.0, 2, 1, True, kind)
    assert res[1]["split"] is None
    assert [r["subgroups"] for r in res] == [0.0, 1.0, 2.0]
    assert res[1]["new_group"] == 3.0 and res[2]["new_group"] == 3.0


def _compile_body(rank, world):
    import torch.distributed._functional_collectives as funcol

    class M(torch.nn.Module):
        def forward(self, x):
            y = funcol.all_reduce(x * 2, "sum", dist.group.WORLD)
            z = funcol.all_gather_tensor(y + 1, 0, dist.group.WORLD)
            w = funcol.reduce_scatter_tensor(z, "sum", 0, dist.group.WORLD)
            return y, z, w

    x = torch.arange(4, dtype=torch.float32) + rank
    # aot_eager: dynamo traces the whole module (fullgraph) and AOT autograd functionalizes
    # the collectives, as for inductor, without minutes of C++ codegen in the test.
    compiled = torch.compile(M(), fullgraph=True, backend="aot_eager")
    y, z, w = compiled(x)
    return x.tolist(), y.tolist(), z.tolist(), w.tolist()


def test_torch_compile_functional_collectives_fullgraph():
    res = run_ranks(2, _compile_body, timeout=300)
    xs = [torch.tensor(r[0], dtype=torch.float64) for r in res]
    y = 2 * sum(xs)
    z = torch.cat([y + 1] * 2)
    w = 2 * z  # both ranks contribute the same z; rank r keeps block r
    for rank, (_, yr, zr, wr) in enumerate(res):
        torch.testing.assert_close(torch.tensor(yr, dtype=torch.float64), y)
        torch.testing.assert_close(torch.tensor(zr, dtype=torch.float64), z)
        torch.testing.assert_close(torch.tensor(wr, dtype=torch.float64), w[rank * 4:(rank + 1) * 4])
