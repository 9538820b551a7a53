"""pycomm.DataParallel: parity with torch DDP on Gloo, no_sync, unused parameters, AMP,
every compressor, the timeline and overlap (asserted on recorded timestamps)."""
from __future__ import annotations

import copy
import os
import tempfile
import threading
import time

import pytest
import torch

from dist_util import run_ranks

ATOL = 1e-6


class Net(torch.nn.Module):
    """Small MLP with an optional branch (used on some steps/ranks) and a dead layer."""

    def __init__(self, seed: int, width: int = 16, dead: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(8, width)
        self.l2 = torch.nn.Linear(width, width)
        self.branch = torch.nn.Linear(width, width)
        if dead:
            self.dead = torch.nn.Linear(width, 3)
        self.head = torch.nn.Linear(width, 4)
        self.register_buffer("calls", torch.zeros(1))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = torch.tanh(self.l1(x))
        h = torch.tanh(self.l2(h))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def _data(rank: int, step: int, n: int = 6):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def _flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _compare(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert (p.grad is None) == (q.grad is None), f"{what}: {n}.grad None mismatch ({p.grad is None})"
        torch.testing.assert_close(p.detach(), q.detach(), atol=ATOL, rtol=0, msg=lambda m: f"{what}: {n}: {m}")


def _parity_case(rank, world, gloo, name, steps=4, accumulate=0, unused=False, caps=(0.0005, 0.0002),
                 view=False, set_to_none=True):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pycomm.data_parallel import DataParallel

    base = Net(seed=rank, dead=unused)  # different per rank: both wrappers must broadcast rank 0's
    ours = DataParallel(copy.deepcopy(base), bucket_cap_mb=caps[0], first_bucket_mb=caps[1],
                        find_unused_parameters=unused, gradient_as_bucket_view=view)
    ref = DDP(copy.deepcopy(base), process_group=gloo, find_unused_parameters=unused,
              gradient_as_bucket_view=view)
    _compare(ours.module, ref.module, f"{name} after wrap")
    if caps[0] < 0.01:
        assert len(ours.bucket_layout()) > 1, "the test needs several buckets"
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for step in range(steps):
        for model, opt in ((ours, opt_a), (ref, opt_b)):
            opt.zero_grad(set_to_none=set_to_none)
            for micro in range(accumulate):
                x, y = _data(rank, 100 * step + micro + 1)
                with model.no_sync():
                    torch.nn.functional.mse_loss(model(x, use_branch=(micro % 2 == 0)), y).backward()
            x, y = _data(rank, 100 * step)
            # Unused: the branch runs on even steps on rank 0 only (locally unused elsewhere,
            # globally unused on odd steps); `dead` is never used.
            use = (not unused) or (step % 2 == 0 and rank == 0)
            torch.nn.functional.mse_loss(model(x, use_branch=use), y).backward()
            opt.step()
        _compare(ours.module, ref.module, f"{name} step {step}")
        if view:
            # The option is really on: every gradient lives in its bucket slot.
            for i, p in enumerate(ours._params):
                if p.grad is not None:
                    bi, off = ours._slot[i]
                    assert ours._is_bucket_view(p.grad, ours._buckets[bi], off), f"{name}: {ours._names[i]}"
    return _flat(ours.module)


def _body_parity(rank, world):
    import torch.distributed as dist

    from pycomm.data_parallel import DataParallel

    gloo = dist.new_group(backend="gloo")
    out = {}
    out["plain"] = _parity_case(rank, world, gloo, "plain").tolist()
    out["no_sync"] = _parity_case(rank, world, gloo, "no_sync", accumulate=2).tolist()
    out["unused"] = _parity_case(rank, world, gloo, "unused", unused=True, accumulate=1).tolist()
    out["one_bucket"] = _parity_case(rank, world, gloo, "one bucket", steps=2, caps=(25, 1)).tolist()
    out["view"] = _parity_case(rank, world, gloo, "bucket view", view=True).tolist()
    out["view_keep"] = _parity_case(rank, world, gloo, "bucket view, grads kept", view=True, accumulate=2,
                                    unused=True, set_to_none=False).tolist()

    # `dead` never gets a gradient: without find_unused_parameters backward raises, naming
    # it, on every rank (no hang), and the wrapper works again afterwards.
    m = DataParallel(Net(seed=1, dead=True), bucket_cap_mb=0.0005, first_bucket_mb=0.0002)
    x, y = _data(rank, 0)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"without a gradient for 2 parameter\(s\): dead\.weight, dead\.bias"):
            torch.nn.functional.mse_loss(m(x), y).backward()
    m.remove_hooks()
    m.module.dead = torch.nn.Identity()
    m2 = DataParallel(m.module)
    m2.zero_grad()
    torch.nn.functional.mse_loss(m2(x), y).backward()
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_parity_with_torch_ddp(world):
    res = run_ranks(world, _body_parity, timeout=150)
    for r in range(1, world):
        for k in res[0]:
            assert res[r][k] == res[0][k], f"rank {r} diverged in case {k}"


# --------------------------------------------------------------------------- compressors, AMP


def _body_compressors_amp(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pycomm.data_parallel import DataParallel
    from test_ddp_hooks import COMPRESSORS, assert_trained_in_sync, make_compressor, student, train

    out = {}
    for name in COMPRESSORS:
        comp = make_compressor(name)
        model = DataParallel(student(seed=rank), compression=comp, bucket_cap_mb=0.002, first_bucket_mb=0.001)
        losses, flat = train(model, rank)
        assert_trained_in_sync(losses, flat, f"DataParallel {name}")
        assert set(comp.state_dict()["states"]) <= set(range(len(model.bucket_layout()))), "keys = bucket indices"
        out[name] = (losses[0], losses[-1])

    # AMP: autocast (bfloat16 on CPU) + GradScaler, same result as torch DDP on Gloo.
    gloo = dist.new_group(backend="gloo")
    base = student(seed=rank)
    ours = DataParallel(copy.deepcopy(base), bucket_cap_mb=0.002, first_bucket_mb=0.001)
    ref = DDP(copy.deepcopy(base), process_group=gloo)
    from test_ddp_hooks import regression_task

    x, y = regression_task(rank)
    for model in (ours, ref):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for _ in range(4):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    _compare(ours.module, ref.module, "AMP")

    # Mixed dtypes: a float64 layer gets buckets of its own class.
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4).double())

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = net[0], net[1]

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).double())

    ours = DataParallel(copy.deepcopy(Mixed()))
    ref = DDP(copy.deepcopy(Mixed()), process_group=gloo)
    layout = ours.bucket_layout()
    assert layout == [["b.bias", "b.weight"], ["a.bias", "a.weight"]], layout
    for model in (ours, ref):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            opt.zero_grad()
            x, y = _data(rank, step)
            torch.nn.functional.mse_loss(model(x), y.double()).backward()
            opt.step()
    _compare(ours.module, ref.module, "mixed dtypes")
    return out


def test_every_compressor_trains_and_amp_parity():
    res = run_ranks(2, _body_compressors_amp, timeout=150)
    assert res[0] == res[1]


# --------------------------------------------------------------------------- overlap, timeline


class DelayedAllReduce:
    """Stands in for a slow link: an exact all-reduce whose completion is reported
    `delay_s` after the collective itself finished (a compressor-shaped wrapper)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls = 0

    def all_reduce(self, tensor, group=None, key=None, op="avg", async_op=False):
        import torch.distributed as dist

        self.calls += 1
        work = dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=group, async_op=True)
        fut = torch.futures.Future()

        def finish():
            try:
                work.wait()
                fut.set_result(tensor)
            except Exception as exc:  # noqa: BLE001
                fut.set_exception(exc)

        threading.Timer(self.delay_s, finish).start()
        return fut


def _body_overlap(rank, world, trace):
    import torch.distributed as dist

    from pycomm import timeline
    from pycomm.data_parallel import DataParallel

    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [torch.nn.Linear(64, 64), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers)
    slow = DelayedAllReduce(0.05)
    # ~16.6 KB per layer: one layer per bucket, six buckets.
    model = DataParallel(net, compression=slow, bucket_cap_mb=0.01, first_bucket_mb=0.01)
    assert len(model.bucket_layout()) == 6
    x = torch.randn(32, 64)
    for _ in range(3):
        model.zero_grad()
        model(x).square().mean().backward()
    assert slow.calls == 18
    path = timeline.rank_path(trace, dist.get_rank())
    events = timeline.load(path)
    return events


def test_overlap_from_timeline(tmp_path):
    trace = str(tmp_path / "trace.json")
    res = run_ranks(2, _body_overlap, trace, env={"PYCOMM_TIMELINE": trace}, timeout=120)
    assert sorted(os.listdir(tmp_path)) == ["trace.rank0.json", "trace.rank1.json"]
    for rank, events in enumerate(res):
        assert any(e.get("ph") == "M" and e.get("args", {}).get("name") == f"rank {rank}" for e in events)
        backward = [e for e in events if e.get("name") == "backward"]
        assert len(backward) == 3
        for it, bw in enumerate(backward):
            # The events of this iteration: those inside [backward start, next backward start).
            start = bw["ts"]
            end = bw["ts"] + bw["dur"]
            nxt = backward[it + 1]["ts"] if it + 1 < len(backward) else float("inf")
            mine = [e for e in events if start <= e.get("ts", -1) < nxt and e.get("tid", 0) >= 100]
            ready = {e["tid"] - 100: e["ts"] for e in mine if e["name"] == "ready"}
            comm = {e["tid"] - 100: e for e in mine if e["name"] == "communicate"}
            issue = {e["tid"] - 100: e for e in mine if e["name"] == "compress+issue"}
            assert sorted(ready) == list(range(6)) and sorted(comm) == list(range(6)), (ready, comm)
            # Bucket 0 (the last layer's gradients) started communicating before backward
            # finished and before the last bucket's gradients existed ...
            assert issue[0]["ts"] < end
            assert comm[0]["ts"] < ready[5]
            # ... and was still in flight while the rest of backward ran (slow link).
            assert comm[0]["ts"] + comm[0]["dur"] > ready[5]
            # Buckets launch in index order, each after it became ready.
            for b in range(6):
                assert ready[b] <= issue[b]["ts"]
                if b:
                    assert issue[b - 1]["ts"] <= issue[b]["ts"]
            wb = [e for e in mine if e["name"] == "write-back"]
            assert len(wb) == 6 and min(e["ts"] for e in wb) >= end


# --------------------------------------------------------------------------- CUDA


def _body_cuda(rank, world):
    from pycomm.data_parallel import DataParallel

    out = []
    for device in ("cpu", "cuda:0"):
        model = DataParallel(Net(seed=rank).to(device), bucket_cap_mb=0.0005, first_bucket_mb=0.0002)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            opt.zero_grad()
            x, y = _data(rank, step)
            torch.nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()
            opt.step()
        out.append(_flat(model.module).cpu())
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_module_matches_cpu():
    run_ranks(2, _body_cuda, timeout=120)
