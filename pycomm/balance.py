"""Synchronous data parallelism on ranks of uneven speed: batch shares proportional to
measured speed, gradients weighted so the update is that of one big batch.

    import pycomm
    bal = pycomm.balance.SpeedBalancer(global_batch=256, every=20)
    model = pycomm.DataParallel(net, balance=bal)        # weights gradients, times compute
    for step in range(steps):
        x, y = bal.slice(global_x), bal.slice(global_y)   # this rank's bal.share rows
        opt.zero_grad()
        loss_fn(model(x), y).backward()                   # mean loss over the local rows
        opt.step()                                        # == one step on the whole batch

Each rank's share ``n_i`` of the global batch ``N`` is proportional to its measured
speed (samples per second of compute, i.e. forward + backward without the time spent
waiting for gradients). With a mean-reduced loss, rank ``i``'s gradient is the mean
over its ``n_i`` samples; scaling it by ``world * n_i / N`` before the group average
makes the average ``sum_i n_i g_i / N``: the gradient of the mean loss over all ``N``
samples, exactly what one process would compute on the whole batch.

Every ``every`` steps the ranks exchange their measured time per sample (one small
all-reduce), smooth it (exponential moving average) and re-plan the integer shares
(largest remainder, every rank at least ``min_share``). Every rank computes the same
plan from the same all-reduced numbers.

Without ``pycomm.DataParallel`` (e.g. torch DDP), multiply the loss by
:attr:`SpeedBalancer.loss_scale` and time the compute yourself with
:meth:`SpeedBalancer.measure` / :meth:`SpeedBalancer.record`, then call
:meth:`SpeedBalancer.step` once per step on every rank.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["SpeedBalancer", "plan_shares"]


def plan_shares(speeds: Sequence[float], total: int, min_share: int = 1) -> List[int]:
    """Integer shares of ``total`` proportional to ``speeds`` (largest remainder), each
    at least ``min_share``; deterministic (ties go to the lower index)."""
    n = len(speeds)
    if n == 0:
        raise ValueError("plan_shares: no ranks")
    if min_share < 0 or total < n * min_share:
        raise ValueError(f"plan_shares: a total of {total} cannot give {n} ranks at least {min_share} each")
    if any(not (s > 0 and math.isfinite(s)) for s in speeds):
        raise ValueError(f"plan_shares: speeds must be positive and finite, got {list(speeds)}")
    ssum = float(sum(speeds))
    ideal = [total * s / ssum for s in speeds]
    shares = [max(min_share, int(math.floor(q))) for q in ideal]
    while sum(shares) < total:
        i = max(range(n), key=lambda j: (ideal[j] - shares[j], -j))
        shares[i] += 1
    while sum(shares) > total:
        cands = [j for j in range(n) if shares[j] > min_share]
        i = min(cands, key=lambda j: (ideal[j] - shares[j], -j))
        shares[i] -= 1
    return shares


class SpeedBalancer:
    """Plans per-rank batch shares from measured speed and weights gradients by them.

    Args:
        global_batch: ``N``, samples per step over all ranks of the group.
        group: the process group (default: the world); needs at least 2 ranks.
        every: re-measure and re-plan every this many steps (>= 1).
        smoothing: weight of the previous speed estimate in the moving average
            (0: use the last measurement alone; in [0, 1)).
        min_share: the fewest samples a rank gets (>= 1, so every rank keeps measuring).
        shares: initial shares (default: equal split).

    Attributes: :attr:`shares` (list, same on every rank), :attr:`share` (this rank's),
    :attr:`offset` (where this rank's rows start in the global batch), :attr:`grad_scale`
    (``world * share / N``), :attr:`speeds` (smoothed samples/second per rank, or None
    before the first measurement), :attr:`history` (list of past share plans).
    """

    def __init__(self, global_batch: int, group: Optional[dist.ProcessGroup] = None, every: int = 20,
                 smoothing: float = 0.5, min_share: int = 1, shares: Optional[Sequence[int]] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("pycomm.balance.SpeedBalancer: torch.distributed is not initialised")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.world_size < 2:
            raise ValueError("pycomm.balance.SpeedBalancer: balancing needs a group of at least 2 ranks")
        if every < 1 or not 0 <= smoothing < 1 or min_share < 1:
            raise ValueError("pycomm.balance.SpeedBalancer: need every >= 1, 0 <= smoothing < 1, min_share >= 1")
        if global_batch < self.world_size * min_share:
            raise ValueError(f"pycomm.balance.SpeedBalancer: global_batch {global_batch} is smaller than "
                             f"{self.world_size} ranks x min_share {min_share}")
        self.global_batch = int(global_batch)
        self.every = int(every)
        self.smoothing = float(smoothing)
        self.min_share = int(min_share)
        if shares is None:
            shares = plan_shares([1.0] * self.world_size, self.global_batch, self.min_share)
        shares = [int(s) for s in shares]
        if len(shares) != self.world_size or sum(shares) != self.global_batch or min(shares) < self.min_share:
            raise ValueError(f"pycomm.balance.SpeedBalancer: shares {shares} must be {self.world_size} integers "
                             f">= {self.min_share} summing to {self.global_batch}")
        self._set_shares(shares)
        self.speeds: Optional[List[float]] = None
        self.history: List[List[int]] = [list(shares)]
        self._seconds = 0.0
        self._samples = 0
        self._steps = 0

    # -- shares -------------------------------------------------------------------------

    def _set_shares(self, shares: List[int]) -> None:
        self.shares = shares
        self.share = shares[self.rank]
        self.offset = sum(shares[: self.rank])
        self.grad_scale = self.world_size * self.share / self.global_batch

    @property
    def loss_scale(self) -> float:
        """Multiply a mean-reduced local loss by this before a plain gradient average
        (DDP) to get the big-batch gradient; ``pycomm.DataParallel(balance=...)`` applies
        it to the gradients itself."""
        return self.grad_scale

    def slice(self, batch: Any) -> Any:
        """This rank's rows ``[offset, offset + share)`` of a global batch (a tensor, or a
        tuple/list of tensors, dim 0 of length ``global_batch``)."""
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.slice(b) for b in batch)
        if batch.shape[0] != self.global_batch:
            raise ValueError(f"SpeedBalancer.slice: batch has {batch.shape[0]} rows, expected {self.global_batch}")
        return batch.narrow(0, self.offset, self.share)

    def indices(self, global_indices: Sequence[int]) -> List[int]:
        """This rank's part of a global batch's sample indices (e.g. from a sampler)."""
        if len(global_indices) != self.global_batch:
            raise ValueError(f"SpeedBalancer.indices: got {len(global_indices)} indices, expected "
                             f"{self.global_batch}")
        return list(global_indices[self.offset: self.offset + self.share])

    # -- measuring ----------------------------------------------------------------------

    def record(self, seconds: float, samples: Optional[int] = None) -> None:
        """Adds ``seconds`` of compute (excluding time blocked on communication) spent on
        ``samples`` samples (default: this rank's current share)."""
        self._seconds += float(seconds)
        self._samples += self.share if samples is None else int(samples)

    @contextlib.contextmanager
    def measure(self, model: Any = None) -> Iterator[None]:
        """Times the block as compute for the current share. With ``model`` (a
        ``pycomm.DataParallel``), its ``comm_stats["exposed_seconds"]`` growth during the
        block (time blocked waiting for gradients) is subtracted."""
        exposed0 = model.comm_stats["exposed_seconds"] if model is not None else 0.0
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        if model is not None:
            dt -= model.comm_stats["exposed_seconds"] - exposed0
        self.record(max(dt, 0.0))

    def step(self) -> bool:
        """Counts a step on every rank; every ``every`` steps re-plans the shares (a small
        all-reduce on the group: every rank must call it equally often). Returns True
        when the shares were re-planned."""
        self._steps += 1
        if self._steps % self.every:
            return False
        self.rebalance()
        return True

    def rebalance(self) -> List[int]:
        """Exchanges the time per sample measured since the last plan and re-plans now
        (collective). A rank that measured nothing keeps its previous speed (or the
        group mean before any measurement)."""
        per_sample = self._seconds / self._samples if self._samples > 0 and self._seconds > 0 else 0.0
        t = torch.zeros(self.world_size, dtype=torch.float64)
        t[self.rank] = per_sample
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        self._seconds, self._samples = 0.0, 0
        measured = t.tolist()
        fresh = [1.0 / v if v > 0 else None for v in measured]
        known = [f for f in fresh if f is not None]
        if not known:
            return self.shares
        if self.speeds is None:
            mean = sum(known) / len(known)
            self.speeds = [f if f is not None else mean for f in fresh]
        else:
            a = self.smoothing
            self.speeds = [old if f is None else a * old + (1 - a) * f for old, f in zip(self.speeds, fresh)]
        shares = plan_shares(self.speeds, self.global_batch, self.min_share)
        self._set_shares(shares)
        self.history.append(list(shares))
        return shares

    # -- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {"shares": list(self.shares), "speeds": None if self.speeds is None else list(self.speeds),
                "steps": self._steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        shares = [int(s) for s in state["shares"]]
        if len(shares) != self.world_size or sum(shares) != self.global_batch:
            raise ValueError("SpeedBalancer.load_state_dict: shares do not fit this group and batch")
        self._set_shares(shares)
        self.speeds = None if state["speeds"] is None else list(state["speeds"])
        self._steps = int(state["steps"])
        self._seconds, self._samples = 0.0, 0
