"""pycomm.ddp_comm_hook: every compressor trains through torch DDP on Gloo and on pycomm;
compression=None matches DDP's built-in all-reduce; timeline events are recorded."""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch

from dist_util import run_ranks

COMPRESSORS = ["FP16", "BF16", "OneBit", "TopK", "QSGD", "PowerSGD"]


def make_compressor(name):
    import pycomm.compression as C

    return {"FP16": lambda: C.FP16(), "BF16": lambda: C.BF16(), "OneBit": lambda: C.OneBit(),
            "TopK": lambda: C.TopK(ratio=0.25), "QSGD": lambda: C.QSGD(bits=8),
            "PowerSGD": lambda: C.PowerSGD(rank=2)}[name]()


def regression_task(rank, n=64, d=16, seed=0):
    """Per-rank shard of a fixed teacher-network regression problem."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d, 1, generator=g)
    gx = torch.Generator().manual_seed(seed + 1 + rank)
    x = torch.randn(n, d, generator=gx)
    return x, torch.tanh(x @ teacher)


def student(seed=0, d=16, h=32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, h), torch.nn.Tanh(),
                               torch.nn.Linear(h, 1))


def train(model, rank, steps=30, lr=0.02):
    """Trains with SGD+momentum; returns (global losses per step, flat params)."""
    import torch.distributed as dist

    x, y = regression_task(rank)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / dist.get_world_size())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return losses, flat


def assert_trained_in_sync(losses, flat, what):
    import torch.distributed as dist

    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, f"{what}: loss {first:.4f} -> {last:.4f} did not decrease enough"
    mx, mn = flat.clone(), flat.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    dist.all_reduce(mn, op=dist.ReduceOp.MIN)
    assert torch.equal(mx, mn), f"{what}: ranks out of sync (max diff {(mx - mn).abs().max().item()})"


def assert_same_state(got, want, what, path="state"):
    """Equal nested state dicts: same keys, equal tensors (dtype and values), equal rest."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (what, path, sorted(got), sorted(want))
        for k in want:
            assert_same_state(got[k], want[k], what, f"{path}[{k!r}]")
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), (what, path)
    else:
        assert got == want, (what, path, got, want)


def _body_hooks(rank, world, trace_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pycomm import timeline
    from pycomm.ddp_hooks import DDPHookState, ddp_comm_hook

    out = {}
    # Uncompressed hook == DDP's built-in all-reduce (small buckets: several hook calls,
    # and DDP's bucket rebuild after iteration 1).
    ref = DDP(student(), bucket_cap_mb=0.002)
    hooked = DDP(student(), bucket_cap_mb=0.002)
    state = DDPHookState(compression=None)
    hooked.register_comm_hook(state, ddp_comm_hook)
    l_ref, f_ref = train(ref, rank, steps=5)
    l_hook, f_hook = train(hooked, rank, steps=5)
    torch.testing.assert_close(f_hook, f_ref, atol=1e-6, rtol=0)
    assert state.calls > 5, state.calls  # several buckets per iteration after the rebuild

    for name in COMPRESSORS:
        model = DDP(student(), bucket_cap_mb=0.002)
        st = DDPHookState(compression=make_compressor(name), group=None)
        sizes = {}  # bucket index -> elements

        def hook(state, bucket, sizes=sizes):
            sizes[bucket.index()] = bucket.buffer().numel()
            return ddp_comm_hook(state, bucket)

        model.register_comm_hook(st, hook)
        losses, flat = train(model, rank)
        assert_trained_in_sync(losses, flat, f"DDP hook {name} on {dist.get_backend()}")
        out[name] = (losses[0], losses[-1])
        sd = st.state_dict()
        assert sd["compression"]["type"] == name
        st2 = DDPHookState(compression=make_compressor(name))
        st2.load_state_dict(sd)
        # The restored state is the saved one (one entry per bucket after training) ...
        assert st2.calls == st.calls and len(sizes) > 1 and set(sd["compression"]["states"]) == set(sizes), sd
        assert_same_state(st2.state_dict(), sd, name)
        # ... and it continues exactly as the original: the next call of every bucket gives
        # the same bits from both (the hook hands each bucket's layout to the compressor on
        # every call; these direct calls get it the same way).
        for key, layout in getattr(st.compression, "_layout", {}).items():
            st2.compression.set_layout(key, layout)
        for key, numel in sorted(sizes.items()):
            g = torch.randn(numel, generator=torch.Generator().manual_seed(rank + 17))
            a, b = g.clone(), g.clone()
            st.compression.all_reduce(a, key=key)
            st2.compression.all_reduce(b, key=key)
            assert torch.equal(a, b), (name, key)
    if trace_dir:
        path = timeline.rank_path(os.path.join(trace_dir, "trace.json"), dist.get_rank())
        timeline.from_env(dist.get_rank()).flush()
        ev = timeline.load(path)
        comm = [e for e in ev if e.get("name") == "communicate" and e.get("args", {}).get("ddp")]
        assert comm, "no communicate events recorded"
        assert all(e["dur"] >= 0 for e in comm)
    return out


@pytest.mark.parametrize("backend", ["gloo", "pycomm"])
def test_every_compressor_trains_through_ddp_hook(backend):
    trace_dir = tempfile.mkdtemp(prefix="pycomm-ddp-trace-") if backend == "pycomm" else ""
    env = {"PYCOMM_TIMELINE": os.path.join(trace_dir, "trace.json")} if trace_dir else {}
    res = run_ranks(2, _body_hooks, trace_dir, backend=backend, env=env, timeout=150)
    assert res[0] == res[1]
    if trace_dir:
        assert sorted(os.listdir(trace_dir)) == ["trace.rank0.json", "trace.rank1.json"]
