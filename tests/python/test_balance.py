"""pycomm.balance: speed-proportional batch shares and sample-weighted gradients.

* plan_shares: proportional integer shares, minimum share, determinism, errors.
* On gloo and pycomm, 2 ranks with uneven shares 6:2 of a batch of 8: DataParallel
  (balance=...) and torch DDP with ``loss * loss_scale`` both give exactly the
  parameters of one process stepping on the whole batch (float64, SGD + momentum).
* Re-measuring: with rank 1 made twice as slow per sample, the re-planned shares move
  towards 2:1 on both ranks identically; a one-rank group is refused.
"""
from __future__ import annotations

import time

import pytest
import torch

import pycomm  # noqa: E402
from pycomm.balance import plan_shares  # noqa: E402
from dist_util import BACKENDS, run_ranks  # noqa: E402

N, SHARES, STEPS = 8, [6, 2], 4


def test_plan_shares():
    assert plan_shares([1, 1, 1, 1], 10) == [3, 3, 2, 2]
    assert plan_shares([2, 2, 2, 1], 28) == [8, 8, 8, 4]
    assert plan_shares([3, 1], 8) == [6, 2]
    assert sum(plan_shares([1.7, 0.3, 5.0], 101)) == 101
    assert plan_shares([1000, 1], 10, min_share=2) == [8, 2]
    assert plan_shares([1, 1e-9], 4) == [3, 1]
    for speeds in ([1.0, 2.0, 3.5], [0.1, 0.1, 0.1, 5]):
        for total in (7, 64, 255):
            s = plan_shares(speeds, total)
            assert sum(s) == total and min(s) >= 1
            ideal = [total * v / sum(speeds) for v in speeds]
            if min(ideal) >= 1:  # nobody clamped to min_share: within one of the ideal
                assert all(abs(a - b) < 1 for a, b in zip(s, ideal)), (s, ideal)
            else:
                assert all(a == 1 for a, b in zip(s, ideal) if b < 1), (s, ideal)
    with pytest.raises(ValueError):
        plan_shares([1, 1], 1)
    with pytest.raises(ValueError):
        plan_shares([1, 0], 4)


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).double()


def _global_batch(t: int):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(N, 5, generator=g, dtype=torch.float64), torch.randn(N, 3, generator=g, dtype=torch.float64)


def _flat(model) -> list:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


class _Slow(torch.nn.Module):
    """Sleeps per sample in forward: the test's uneven ranks."""

    def __init__(self, inner: torch.nn.Module, per_sample: float) -> None:
        super().__init__()
        self.inner = inner
        self.per_sample = per_sample

    def forward(self, x):
        time.sleep(self.per_sample * x.shape[0])
        return self.inner(x)


def _body(rank: int, world_size: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    # 1. DataParallel(balance=...): uneven shares, big-batch gradient.
    bal = pycomm.balance.SpeedBalancer(N, every=1000, shares=SHARES)
    assert bal.share == SHARES[rank] and bal.offset == sum(SHARES[:rank])
    model = _mlp()
    dp = pycomm.DataParallel(model, balance=bal)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS):
        x, y = bal.slice(_global_batch(t))
        assert x.shape[0] == SHARES[rank]
        opt.zero_grad()
        torch.nn.functional.mse_loss(dp(x), y).backward()
        opt.step()
    out["dp"] = _flat(model)

    # 2. torch DDP: the loss scaled by loss_scale.
    model = _mlp()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS):
        x, y = bal.slice(_global_batch(t))
        opt.zero_grad()
        (torch.nn.functional.mse_loss(ddp(x), y) * bal.loss_scale).backward()
        opt.step()
    out["ddp"] = _flat(model)

    # 3. Re-measuring: rank 1 is twice as slow per sample; re-plan every 3 steps.
    bal = pycomm.balance.SpeedBalancer(24, every=3, smoothing=0.0)
    model = _mlp()
    dp = pycomm.DataParallel(_Slow(model, 0.002 * (1 + rank)), balance=bal)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(5)
    for t in range(9):
        x = torch.randn(24, 5, generator=g, dtype=torch.float64)
        opt.zero_grad()
        dp(bal.slice(x)).pow(2).mean().backward()
        opt.step()
    out["history"] = bal.history
    out["speeds"] = bal.speeds

    # 4. One rank: refused.
    groups = [dist.new_group([r]) for r in range(world_size)]
    try:
        pycomm.balance.SpeedBalancer(N, group=groups[rank])
        out["one_rank"] = "accepted"
    except ValueError as e:
        out["one_rank"] = str(e)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_balanced_step_equals_big_batch(backend):
    res = run_ranks(2, _body, backend=backend, timeout=90)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for t in range(STEPS):
        x, y = _global_batch(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    ref = torch.tensor(_flat(model), dtype=torch.float64)
    for r in res:
        for key in ("dp", "ddp"):
            torch.testing.assert_close(torch.tensor(r[key], dtype=torch.float64), ref, atol=1e-12, rtol=0)
        assert r["dp"] == res[0]["dp"]
        assert r["history"] == res[0]["history"], "ranks planned different shares"
        assert "at least 2 ranks" in r["one_rank"]
    hist = res[0]["history"]
    print("share history:", hist, "speeds:", res[0]["speeds"])
    assert hist[0] == [12, 12] and len(hist) == 4
    # Ideal 16:8; allow for sleep overshoot and load on a shared machine.
    assert all(h[0] > h[1] for h in hist[1:]), hist
    assert 14 <= hist[-1][0] <= 19, hist


# ----------------------------------------------------------------------------- pipeline stages

from pycomm.pipeline import equal_partition, partition, profile_layers, split_layers, stage_costs  # noqa: E402


def _brute(costs, S, memory=None, limit=None, speed=None):
    import itertools

    L, best = len(costs), None
    for cuts in itertools.combinations(range(1, L), S - 1):
        edges = (0,) + cuts + (L,)
        bounds = list(zip(edges[:-1], edges[1:]))
        if limit is not None:
            lims = limit if isinstance(limit, list) else [limit] * S
            if any(sum(memory[a:b]) > lims[i] for i, (a, b) in enumerate(bounds)):
                continue
        v = max(stage_costs(costs, bounds, speed))
        best = v if best is None else min(best, v)
    return best


def test_partition_is_optimal():
    g = torch.Generator().manual_seed(0)
    for case in range(150):
        L = int(torch.randint(1, 10, (1,), generator=g))
        S = int(torch.randint(1, L + 1, (1,), generator=g))
        costs = (torch.rand(L, generator=g) * 10).tolist()
        memory = (torch.rand(L, generator=g) * 4).tolist()
        limit = None if case % 3 == 0 else float(torch.rand(1, generator=g) * 6 + 2)
        speed = None if case % 2 else (torch.rand(S, generator=g) + 0.5).tolist()
        want = _brute(costs, S, memory, limit, speed)
        if want is None:
            with pytest.raises(ValueError, match="memory_limit"):
                partition(costs, S, memory=memory, memory_limit=limit, speed=speed)
            continue
        bounds = partition(costs, S, memory=memory if limit else None, memory_limit=limit, speed=speed)
        assert len(bounds) == S and bounds[0][0] == 0 and bounds[-1][1] == L
        assert all(a < b for a, b in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(S - 1))
        if limit is not None:
            assert all(sum(memory[a:b]) <= limit for a, b in bounds)
        assert max(stage_costs(costs, bounds, speed)) == pytest.approx(want, rel=1e-12)


def test_partition_uneven_layers_beats_equal_split():
    # Embedding-like cheap layers, then expensive ones (e.g. a wide head).
    costs = [1, 1, 1, 1, 1, 1, 1, 1, 6, 6, 8, 8]
    eq = equal_partition(len(costs), 4)
    assert eq == [(0, 3), (3, 6), (6, 9), (9, 12)]
    bal = partition(costs, 4)
    t_eq, t_bal = max(stage_costs(costs, eq)), max(stage_costs(costs, bal))
    assert t_bal == _brute(costs, 4) == 12 and t_eq == 22
    assert t_eq / t_bal >= 1.3
    # Per-stage speed: a stage twice as fast takes twice the work.
    assert partition([1] * 6, 2, speed=[2, 1]) == [(0, 4), (4, 6)]
    # A memory limit forces a worse but feasible split.
    assert partition([1, 1, 1, 10], 2, memory=[1, 1, 1, 5], memory_limit=5) == [(0, 3), (3, 4)]
    assert partition([1, 1, 1, 10], 2, memory=[1, 1, 3, 1], memory_limit=[2, 10]) == [(0, 2), (2, 4)]
    with pytest.raises(ValueError):
        partition([1, 1], 3)
    with pytest.raises(ValueError):
        partition([1, 1], 2, memory_limit=1)


def test_profile_layers_finds_the_heavy_layer():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 512), torch.nn.Linear(512, 512),
              torch.nn.Linear(512, 32), torch.nn.ReLU()]
    costs, mem = profile_layers(layers, torch.randn(64, 32), repeats=5, return_memory=True)
    assert len(costs) == len(layers) and all(c > 0 for c in costs)
    assert costs.index(max(costs)) == 3  # the 512 x 512 layer
    assert mem[3] == 2 * (512 * 512 + 512) * 4 + 64 * 512 * 4
    bounds = partition(costs, 2)
    stages = split_layers(layers, bounds)
    x = torch.randn(8, 32)
    y = x
    for st in stages:
        y = st(y)
    torch.testing.assert_close(y, torch.nn.Sequential(*layers)(x))
