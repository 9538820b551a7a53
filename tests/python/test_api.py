"""The Python surface: numpy/DLPack interop, bad input, subgroups, torch DDP on the
pycomm backend against Gloo, torchrun, and ranks on separate (emulated) hosts."""
import os
import subprocess
import sys
import textwrap

import pytest

from dist_util import ROOT, free_port, run_ranks



class _DLPackOnly:
    """Exposes only the DLPack protocol of a numpy array (not a torch or numpy type)."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def _dlpack_input(rank, n, dtype):
    """Rank `rank`'s input: different on every rank, so a reduction changes it."""
    import numpy as np

    rng = np.random.default_rng(1000 + rank)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-1000, 1000, n).astype(dtype)
    return rng.standard_normal(n).astype(dtype)


def _body_api(rank, ws):
    import numpy as np
    import torch
    import torch.distributed as dist

    import pycomm

    # numpy arrays are reduced in place (zero-copy through torch.from_numpy)
    a = np.arange(11, dtype=np.float64) * (rank + 1)
    pycomm.all_reduce(a, op="sum")
    assert np.array_equal(a, np.arange(11) * ws * (ws + 1) / 2)
    b = np.full(5, rank, dtype=np.int32)
    pycomm.all_reduce(b, op="max")
    assert (b == ws - 1).all()
    c = np.full(3, float(rank))
    pycomm.broadcast(c, src=ws - 1)
    assert (c == ws - 1).all()
    out = np.empty(2 * ws, dtype=np.float32)
    pycomm.all_gather(out, np.full(2, rank, dtype=np.float32))
    assert np.array_equal(out, np.repeat(np.arange(ws, dtype=np.float32), 2))
    # A DLPack producer that is neither a torch tensor nor a numpy array (so as_tensor takes
    # its __dlpack__ branch): numpy makes the capsule, the result lands in numpy's memory.
    for op, dtype in (("sum", np.float32), ("avg", np.float64), ("max", np.int64)):
        inputs = [_dlpack_input(r, 37, dtype) for r in range(ws)]
        ref = np.sum([x.astype(np.float64) for x in inputs], axis=0)
        ref = ref / ws if op == "avg" else (np.max(inputs, axis=0) if op == "max" else ref)
        mine = inputs[rank].copy()
        pycomm.all_reduce(_DLPackOnly(mine), op=op)
        assert not np.array_equal(mine, inputs[rank])  # the result differs from this rank's input
        tol = 1e-6 if dtype == np.float32 else 1e-12  # float32 sums vs the float64 reference
        np.testing.assert_allclose(mine.astype(np.float64), ref, rtol=tol, atol=tol)
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        pycomm.all_reduce(ro)
    with pytest.raises(ValueError, match="unknown reduce op"):
        pycomm.all_reduce(torch.ones(2), op="median")

    # bad input: a clear exception naming what and which rank, and the group stays usable
    with pytest.raises(TypeError, match=rf"pycomm rank {rank}: unsupported dtype"):
        dist.all_reduce(torch.ones(3, dtype=torch.int16))
    # (sparse tensors: torch itself refuses them in every collective but all_reduce)
    with pytest.raises(ValueError, match=rf"pycomm rank {rank}: sparse all_reduce supports ReduceOp.SUM only"):
        dist.all_reduce(torch.ones(3).to_sparse(), op=dist.ReduceOp.MAX)
    with pytest.raises(ValueError, match="BAND is not supported for dtype float32"):
        dist.all_reduce(torch.ones(3), op=dist.ReduceOp.BAND)
    with pytest.raises(ValueError, match="AVG is not supported for dtype bool"):
        dist.all_reduce(torch.ones(3, dtype=torch.bool), op=dist.ReduceOp.AVG)
    if ws > 1:
        with pytest.raises(ValueError, match="output list has"):
            dist.all_gather([torch.empty(3)] * (ws + 1), torch.ones(3))
        with pytest.raises(ValueError, match="expected"):
            dist.all_gather_into_tensor(torch.empty(3 * ws + 1), torch.ones(3))
        with pytest.raises((ValueError, RuntimeError)):
            dist.reduce_scatter_tensor(torch.empty(2), torch.ones(3 * ws))
    x = torch.ones(6)
    dist.all_reduce(x)
    assert torch.all(x == ws)

    # out of place: the input is left as it was; numpy and async too; bad calls are
    # refused on the caller's rank before anything is sent (the group stays in step)
    src = np.arange(100003, dtype=np.float32) + rank  # > 64 KiB: the shm direct algorithm
    keep = src.copy()
    dst = np.zeros_like(src)
    before = pycomm.stats()
    pycomm.all_reduce(src, out=dst)
    assert np.array_equal(src, keep)
    np.testing.assert_array_equal(dst, np.arange(100003, dtype=np.float32) * ws + ws * (ws - 1) // 2)
    if pycomm.transport() == "shm" and ws > 1:
        after = pycomm.stats()
        assert after.get("algo_all_reduce_direct", 0) == before.get("algo_all_reduce_direct", 0) + 1
    o = torch.empty(7)
    w = pycomm.all_reduce(torch.full((7,), float(rank)), op="max", out=o, async_op=True)
    w.wait()
    assert torch.all(o == ws - 1)
    with pytest.raises(ValueError, match=rf"pycomm rank {rank}: all_reduce out is \(6,\)"):
        pycomm.all_reduce(torch.ones(5), out=torch.empty(6))
    with pytest.raises(ValueError, match=rf"pycomm rank {rank}: all_reduce out is .*float64"):
        pycomm.all_reduce(torch.ones(5), out=torch.empty(5, dtype=torch.float64))
    both = torch.ones(10)
    with pytest.raises(ValueError, match=rf"pycomm rank {rank}: all_reduce out overlaps its input"):
        pycomm.all_reduce(both[:6], out=both[4:])
    with pytest.raises(ValueError, match="takes no compression"):
        pycomm.all_reduce(torch.ones(5), out=torch.empty(5), compression=object())
    halves = torch.arange(10, dtype=torch.float32)
    pycomm.all_reduce(halves[:5], out=halves[5:])  # one storage, no overlap: fine
    assert torch.equal(halves[:5], torch.arange(5, dtype=torch.float32))
    assert torch.equal(halves[5:], torch.arange(5, dtype=torch.float32) * ws)
    g = dist.new_group(backend="gloo")  # another backend: a copy into `out`, then in place
    o = torch.empty(3)
    pycomm.all_reduce(torch.full((3,), 2.0), out=o, group=g)
    assert torch.all(o == 2.0 * ws)

    # subgroups: even ranks and odd ranks reduce independently, and the world still works
    evens = list(range(0, ws, 2))
    odds = list(range(1, ws, 2))
    ge = dist.new_group(evens, backend="pycomm")
    go = dist.new_group(odds, backend="pycomm") if odds else None
    mine, members = (ge, evens) if rank % 2 == 0 else (go, odds)
    y = torch.full((1001,), float(rank))
    dist.all_reduce(y, group=mine)
    assert torch.all(y == sum(members))
    assert pycomm.stats(mine)["world_size"] == len(members)
    assert pycomm.stats("all")["groups_live"] >= 2
    z = torch.ones(2)
    dist.all_reduce(z)
    assert torch.all(z == ws)
    return pycomm.transport()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_api_numpy_bad_input_subgroups(transport):
    res = run_ranks(3, _body_api, env={"PYCOMM_TRANSPORT": transport}, timeout=180)
    assert res == [transport] * 3


def _body_ddp(rank, ws):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    gloo = dist.new_group(backend="gloo")
    params = {}
    for name, grp in (("pycomm", None), ("gloo", gloo)):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(13, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        ddp = DDP(net, process_group=grp, bucket_cap_mb=0.001)  # several buckets
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(5):
            x = torch.randn(8, 13, generator=g)
            opt.zero_grad()
            ddp(x).pow(2).mean().backward()
            opt.step()
        params[name] = torch.cat([p.detach().flatten() for p in net.parameters()])
    diff = (params["pycomm"] - params["gloo"]).abs().max().item()
    assert diff <= 1e-6, f"torch DDP on pycomm differs from Gloo by {diff}"
    return params["pycomm"].tolist()


def test_torch_ddp_on_pycomm_matches_gloo():
    res = run_ranks(3, _body_ddp, timeout=180)
    assert all(r == res[0] for r in res)


TORCHRUN_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist, pycomm
    dist.init_process_group("pycomm")
    r, n = dist.get_rank(), dist.get_world_size()
    t = torch.full((100003,), float(r))
    dist.all_reduce(t)
    assert torch.all(t == n * (n - 1) / 2), t[:4]
    dist.barrier()
    if r == 0:
        print("TORCHRUN_OK", n, pycomm.transport())
    dist.destroy_process_group()
""")


def test_torchrun_env_init(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", str(script)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "TORCHRUN_OK 3 shm" in p.stdout


CROSS_HOST_SCRIPT = textwrap.dedent("""
    import datetime, os, sys, torch, torch.distributed as dist, pycomm
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), n, rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("pycomm", store=store, rank=rank, world_size=n, timeout=datetime.timedelta(seconds=60))
    assert pycomm.transport() == "tcp", pycomm.transport()
    for count in (0, 1, 7, 65537, 1 << 20):
        t = torch.arange(count, dtype=torch.float64) + rank
        dist.all_reduce(t)
        ref = torch.arange(count, dtype=torch.float64) * n + n * (n - 1) / 2
        assert torch.equal(t, ref), count
    out = torch.empty(3 * n)
    dist.all_gather_into_tensor(out, torch.full((3,), float(rank)))
    assert torch.equal(out, torch.arange(n).repeat_interleave(3).float())
    dist.barrier()
    print("HOST_OK", rank, flush=True)
    dist.destroy_process_group()
""")


def _netns_available() -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _netns_available(), reason="needs root and iproute2 network namespaces")
def test_ranks_on_separate_emulated_hosts_use_tcp(tmp_path):
    """Three ranks in three network namespaces (one per emulated host, 1 Gbit/s links):
    pycomm sees different hosts, picks TCP, and the collectives are right."""
    from pycomm.bench.netem import Cluster

    script = tmp_path / "host_job.py"
    script.write_text(CROSS_HOST_SCRIPT)
    with Cluster(hosts=3, link="1gbit") as cl:
        port = free_port()
        procs = []
        for r in range(3):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE="3", MASTER_ADDR=cl.addr(0), MASTER_PORT=str(port),
                       PYCOMM_SOCKET_IFNAME=cl.ifname, PYTHONPATH=ROOT)
            procs.append(cl.run(r, [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        outs = []
        for p in procs:
            try:
                o, e = p.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                p.kill()
                o, e = p.communicate()
            outs.append((p.returncode, o, e))
    for r, (rc, o, e) in enumerate(outs):
        o = o.decode() if isinstance(o, bytes) else (o or "")
        e = e.decode() if isinstance(e, bytes) else (e or "")
        assert rc == 0 and f"HOST_OK {r}" in o, f"rank {r}: rc={rc}\n{o[-2000:]}\n{e[-3000:]}"


def _grad_leaf_body(rank, world_size):
    import torch
    import torch.distributed as dist

    p = torch.nn.Parameter(torch.full((6, 4), float(rank + 1)))
    dist.all_reduce(p.t())  # a non-contiguous view of a leaf that requires grad: staged, written back
    w = dist.all_reduce(p, async_op=True)  # contiguous, in place
    w.wait()
    return p.detach().tolist(), p.requires_grad, p.grad_fn is None


def test_collectives_on_parameters_that_require_grad():
    res = run_ranks(3, _grad_leaf_body)
    for values, requires_grad, leaf in res:
        assert requires_grad and leaf
        assert values == [[18.0] * 4] * 6  # (1+2+3) summed twice over 3 ranks
