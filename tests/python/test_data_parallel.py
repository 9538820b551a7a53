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


def _parity_case(rank, world, gloo, name, steps=4, accumulate=0, unused=False, caps=(0.0005, 0.0002)):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pycomm.data_parallel import DataParallel

    base = Net(seed=rank, dead=unused)  # different per rank: both wrappers must broadcast rank 0's
    ours = DataParallel(copy.deepcopy(base), bucket_cap_mb=caps[0], first_bucket_mb=caps[1],
                        find_unused_parameters=unused)
    ref = DDP(copy.deepcopy(base), process_group=gloo, find_unused_parameters=unused)
    _compare(ours.module, ref.module, f"{name} after wrap")
    if caps[0] < 0.01:
        assert len(ours.bucket_layout()) > 1, "the test needs several buckets"
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for step in range(steps):
        for model, opt in ((ours, opt_a), (ref, opt_b)):
            opt.zero_grad()
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
