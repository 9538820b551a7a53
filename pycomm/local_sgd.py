"""Local-update data parallelism: LocalSGD / DiLoCo and asynchronous bounded-staleness rounds.

    import pycomm
    ls = pycomm.LocalSGD(model, opt, sync_every=8)                       # model averaging
    ls = pycomm.LocalSGD(model, opt, sync_every=8, outer_optimizer="nesterov")   # DiLoCo
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()        # no communication in backward
        ls.step()                              # opt.step(); every H steps a round
    ls.flush()                                 # every rank now holds the outer parameters

Each rank trains its own copy of the model with its own (inner) optimizer. Every
*round* the ranks average their *deltas* -- the parameters at the start of the round
minus the current ones -- and an *outer optimizer* applies the averaged delta to the
outer parameters ``x`` (identical on every rank):

* ``outer_optimizer=None``: ``x <- x - mean(delta)``, i.e. the ranks' parameters are
  averaged (model averaging; torch's PostLocalSGD after its warm-up).
* ``"nesterov"``: the averaged delta is a pseudo-gradient for SGD with Nesterov momentum
  (DiLoCo): ``m <- mu m + delta``, ``x <- x - lr (delta + mu m)``.
* ``"sgd"``: the same with plain momentum; a callable ``f(params) -> torch.optim.Optimizer``
  (e.g. ``functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)``) gets
  one flat tensor per dtype/device whose ``.grad`` is the averaged delta.

All the parameters of one dtype/device travel as one flat buffer: one collective per
round (``dist.all_reduce`` or a :mod:`pycomm.compression` compressor, which keeps its
own error feedback), no Python loop over elements.

Staleness (``LocalSGD(overlap=True)`` is staleness 1). With staleness ``s`` the
all-reduce of round ``k`` is started at the end of round ``k`` and applied at the end of
round ``k + s``: communication runs while the next ``s`` rounds compute. After the sync
at the end of round ``k`` a rank's parameters are

    x_{k-s} - (own delta of round k-s+1) - ... - (own delta of round k)

where ``x_{k-s}`` is the outer parameters after the rounds applied so far (identical on
every rank): a rank keeps its own not-yet-averaged progress and, when a round's average
arrives, swaps its own delta of that round for the outer step of the group's average.
With ``s = 0`` (``overlap=False``) a round's average is applied at once and every rank
continues from ``x_k``. The outer parameters ``x`` (:meth:`outer_parameters`) follow
exactly the sequence of the ``s = 0`` algorithm applied to the deltas the ranks measured;
only the points the ranks compute those deltas at differ.

:class:`AsyncLocalSGD` makes the rounds time-based: each rank runs as many local steps
as fit in ``window`` seconds, the deltas are averaged weighted by the samples each
rank processed, and ``staleness`` bounds how many rounds a rank may run ahead of the
slowest one before it waits.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from pycomm import _C

__all__ = ["LocalSGD", "AsyncLocalSGD"]

OuterOptimizer = Union[None, str, Callable[[List[torch.Tensor]], "torch.optim.Optimizer"]]


def _supports_avg(group: Optional[dist.ProcessGroup]) -> bool:
    try:
        return dist.get_backend(group) in ("pycomm", "nccl")
    except Exception:  # noqa: BLE001
        return False


class _Class:
    """The parameters of one (dtype, device) and their flat buffers."""

    def __init__(self, params: List[torch.Tensor]) -> None:
        self.params = params
        self.numels = [p.numel() for p in params]
        self.offsets: List[int] = []
        off = 0
        for n in self.numels:
            self.offsets.append(off)
            off += n
        self.numel = off
        p0 = params[0]
        self.x = torch.empty(off, dtype=p0.dtype, device=p0.device)      # outer parameters
        self.start: Optional[torch.Tensor] = None                         # local round start (s >= 1)
        self.momentum: Optional[torch.Tensor] = None                      # built-in outer momentum
        self.free: List[torch.Tensor] = []                                # spare send buffers

    def read(self, out: torch.Tensor) -> None:
        """out <- the current parameters, flattened."""
        with torch.no_grad():
            _C.bucket_flatten(out, [p.detach() for p in self.params], self.offsets, self.numels)

    def write(self, src: torch.Tensor) -> None:
        """parameters <- src."""
        with torch.no_grad():
            _C.bucket_unflatten(src, [p.detach() for p in self.params], self.offsets)

    def buffer(self) -> torch.Tensor:
        return self.free.pop() if self.free else torch.empty_like(self.x)


class _Round:
    """One round's all-reduce in flight."""

    __slots__ = ("index", "bufs", "own", "futures", "count", "count_future", "t_issue", "t_done", "samples")

    def __init__(self, index: int) -> None:
        self.index = index
        self.bufs: List[torch.Tensor] = []          # per class: the delta being reduced (in place)
        self.own: List[Optional[torch.Tensor]] = []  # per class: this rank's unscaled delta (s >= 1)
        self.futures: List[torch.futures.Future] = []
        self.count: Optional[torch.Tensor] = None   # weighted rounds: [samples] summed over ranks
        self.count_future: Optional[torch.futures.Future] = None
        self.t_issue = 0.0
        self.t_done = 0.0
        self.samples = 0


class LocalSGD:
    """Local SGD / DiLoCo: inner steps on each rank, every ``sync_every`` steps the
    parameter deltas are averaged over ``group`` and applied by an outer optimizer.

    Args:
        model: the module (or an iterable of parameters) being trained on this rank.
            The group's first rank's parameters and buffers are broadcast at construction.
        optimizer: the inner optimizer (its state stays local, as in DiLoCo).
            :meth:`step` calls ``optimizer.step()``.
        group: the process group (default: the world); any backend.
        sync_every: ``H``, local steps per round (>= 1).
        outer_optimizer: ``None`` (plain averaging), ``"sgd"``, ``"nesterov"`` (DiLoCo) or
            a callable ``f(list_of_flat_tensors) -> torch.optim.Optimizer``.
        outer_lr, outer_momentum: the built-in outer optimizers' learning rate and momentum
            (ignored for ``None`` and callables).
        compression: a :mod:`pycomm.compression` compressor for the deltas
            (``compression.all_reduce(delta, group=group, key=("local_sgd", i), op=...,
            async_op=True)``; its error feedback carries over between rounds).
        overlap: apply each round's average one round late (staleness 1) so the
            all-reduce runs behind the next round's inner steps; ``False``: wait at once.

    ``comm_stats``: ``rounds``, ``steps``, ``comm_seconds`` (issue to completion of each
    round's collectives, summed), ``exposed_seconds`` (time :meth:`step` was blocked
    issuing and waiting for them) and ``sync_seconds`` (all time spent in rounds).
    """

    def __init__(self, model: Any, optimizer: Optional[torch.optim.Optimizer],
                 group: Optional[dist.ProcessGroup] = None,
                 sync_every: int = 8, outer_optimizer: OuterOptimizer = None, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, compression: Any = None, overlap: bool = True) -> None:
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"pycomm.LocalSGD: sync_every must be an integer >= 1, got {sync_every!r}")
        self.sync_every = sync_every
        self._init(model, optimizer, group, outer_optimizer, outer_lr, outer_momentum, compression,
                   staleness=1 if overlap else 0, weighted=False)

    # -- construction -----------------------------------------------------------------

    def _init(self, model: Any, optimizer: Optional[torch.optim.Optimizer], group: Optional[dist.ProcessGroup],
              outer_optimizer: OuterOptimizer, outer_lr: float, outer_momentum: float, compression: Any,
              staleness: int, weighted: bool) -> None:
        name = type(self).__name__
        if outer_optimizer is not None and not callable(outer_optimizer) and \
                outer_optimizer not in ("avg", "sgd", "nesterov"):
            raise ValueError(f"pycomm.{name}: outer_optimizer must be None, 'avg', 'sgd', 'nesterov' or a "
                             f"callable, got {outer_optimizer!r}")
        if outer_lr <= 0 or not 0 <= outer_momentum < 1:
            raise ValueError(f"pycomm.{name}: need outer_lr > 0 and 0 <= outer_momentum < 1")
        if not dist.is_initialized():
            raise RuntimeError(f"pycomm.{name}: torch.distributed is not initialised")
        self.optimizer = optimizer
        self.group = group
        self.compression = compression
        self.staleness = staleness
        self.weighted = weighted
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        self._avg = _supports_avg(group)
        self._count_device = torch.device("cpu")

        if isinstance(model, torch.nn.Module):
            self.module: Optional[torch.nn.Module] = model
            params = [p for p in model.parameters() if p.requires_grad]
            buffers = list(model.buffers())
        else:
            self.module = None
            params = [p for p in model if p.requires_grad]
            buffers = []
        if not params:
            raise ValueError(f"pycomm.{name}: no parameters require grad")
        for p in params:
            if p.is_sparse or p.layout != torch.strided or not p.is_floating_point():
                raise ValueError(f"pycomm.{name}: parameters must be dense floating-point tensors")
        by: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
        for p in params:
            by.setdefault((p.dtype, p.device), []).append(p)
        self._classes = [_Class(ps) for ps in by.values()]
        if params[0].is_cuda and dist.get_backend(group) == "nccl":
            self._count_device = params[0].device  # NCCL reduces CUDA tensors only

        # Same starting point everywhere: the group's first rank's parameters and buffers.
        self._broadcast([p.detach() for p in params] + [b.detach() for b in buffers])
        for c in self._classes:
            c.read(c.x)
            if staleness > 0:
                c.start = c.x.clone()

        self._outer_kind = outer_optimizer if not callable(outer_optimizer) else "callable"
        if outer_optimizer == "avg":
            self._outer_kind = None
        self._outer_opt: Optional[torch.optim.Optimizer] = None
        if self._outer_kind == "callable":
            self._outer_opt = outer_optimizer([c.x for c in self._classes])
        elif self._outer_kind in ("sgd", "nesterov"):
            for c in self._classes:
                c.momentum = torch.zeros_like(c.x)

        self._pending: List[_Round] = []
        self._round = 0              # rounds started
        self._steps_in_round = 0
        self._samples_in_round = 0
        self.steps = 0               # local steps on this rank
        self.rounds_applied = 0      # rounds whose average is in the outer parameters (same on every rank)
        self.samples_applied = 0     # weighted modes: samples of those rounds, all ranks together
        self.reset_comm_stats()

    def _broadcast(self, tensors: List[torch.Tensor]) -> None:
        if self.world_size == 1 or not tensors:
            return
        by: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
        for t in tensors:
            by.setdefault((t.dtype, t.device), []).append(t)
        for ts in by.values():
            flat = torch._utils._flatten_dense_tensors(ts)
            dist.broadcast(flat, src=self._src, group=self.group)
            with torch.no_grad():
                for t, v in zip(ts, torch._utils._unflatten_dense_tensors(flat, ts)):
                    t.copy_(v)

    def reset_comm_stats(self) -> None:
        """Zeroes :attr:`comm_stats`."""
        self.comm_stats: Dict[str, float] = {"rounds": 0, "steps": 0, "comm_seconds": 0.0, "exposed_seconds": 0.0,
                                             "sync_seconds": 0.0}

    # -- the training loop ------------------------------------------------------------

    def step(self, closure: Optional[Callable[[], Any]] = None, num_samples: Optional[int] = None) -> Any:
        """``optimizer.step(closure)``, then a round if one is due. ``num_samples``: the
        samples this step used (weights the average in :class:`AsyncLocalSGD`; default 1).
        Returns what ``optimizer.step`` returned."""
        out = None
        if self.optimizer is not None:
            out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.local_step_done(num_samples)
        return out

    def local_step_done(self, num_samples: Optional[int] = None) -> None:
        """Counts one local step taken by the caller's own optimizer and runs a round if
        one is due (what :meth:`step` does after ``optimizer.step()``)."""
        n = 1 if num_samples is None else int(num_samples)
        if n < 0:
            raise ValueError("num_samples must be >= 0")
        self.steps += 1
        self.comm_stats["steps"] += 1
        self._steps_in_round += 1
        self._samples_in_round += n
        if self._due():
            self.sync()

    def _due(self) -> bool:
        return self._steps_in_round >= self.sync_every

    def sync(self) -> None:
        """Ends the current round now (every rank must end the same rounds): starts the
        all-reduce of this rank's delta and applies the rounds that are due."""
        t0 = time.perf_counter()
        self._exposed = 0.0
        s = self.staleness
        # 1. Rounds launched s rounds ago are applied first (waiting if still in flight).
        while self._pending and self._pending[0].index <= self._round - s:
            self._apply(self._pending.pop(0))
        # 2. This round's delta: start - current.
        rnd = _Round(self._round)
        rnd.samples = self._samples_in_round
        for c in self._classes:
            buf = c.buffer()
            c.read(buf)
            start = c.start if c.start is not None else c.x
            torch.sub(start, buf, out=buf)
            own = buf.clone() if s > 0 else None
            if self.weighted:
                buf.mul_(float(rnd.samples))
            rnd.bufs.append(buf)
            rnd.own.append(own)
        self._launch(rnd)
        self._round += 1
        self._steps_in_round = 0
        self._samples_in_round = 0
        if s == 0:
            self._apply(rnd)
            for c in self._classes:
                c.write(c.x)
        else:
            self._pending.append(rnd)
            self._reset_start()
        st = self.comm_stats
        st["rounds"] += 1
        st["exposed_seconds"] += self._exposed
        st["sync_seconds"] += time.perf_counter() - t0
        self._after_sync()

    def _after_sync(self) -> None:
        pass

    def _reset_start(self) -> None:
        """start <- x - (own deltas of the rounds still in flight); parameters <- start."""
        for i, c in enumerate(self._classes):
            assert c.start is not None
            c.start.copy_(c.x)
            for r in self._pending:
                own = r.own[i]
                assert own is not None
                c.start.sub_(own)
            c.write(c.start)

    def flush(self) -> None:
        """Completes every round in flight and averages the progress since the last round
        in one more synchronous round (:class:`LocalSGD` skips it when there was no local
        step since the last round -- the same on every rank; :class:`AsyncLocalSGD` always
        runs it). Afterwards every rank's parameters are the outer parameters, bitwise equal.
        Every rank must call it at the same round."""
        s = self.staleness
        need_round = self._steps_in_round > 0 or self.weighted
        self.staleness = 0
        try:
            self._exposed = 0.0
            while self._pending:
                self._apply(self._pending.pop(0))
            self.comm_stats["exposed_seconds"] += self._exposed
            if need_round:
                self.sync()  # measures from the round's start, applies at once (staleness 0 now)
            else:
                for c in self._classes:
                    c.write(c.x)
        finally:
            self.staleness = s
        for c in self._classes:
            if c.start is not None:
                c.start.copy_(c.x)

    def _launch(self, rnd: _Round) -> None:
        t0 = time.perf_counter()
        rnd.t_issue = t0
        ws = self.world_size
        if self.weighted:
            rnd.count = torch.tensor([float(rnd.samples)], dtype=torch.float64, device=self._count_device)
        if ws == 1:
            for b in rnd.bufs:
                f: torch.futures.Future = torch.futures.Future()
                f.set_result(b)
                rnd.futures.append(f)
            if rnd.count is not None:
                f = torch.futures.Future()
                f.set_result(rnd.count)
                rnd.count_future = f
        else:
            op_name = "sum" if self.weighted else "avg"
            for i, b in enumerate(rnd.bufs):
                if self.compression is not None:
                    fut = self.compression.all_reduce(b, group=self.group, key=("local_sgd", i), op=op_name,
                                                      async_op=True)
                elif self.weighted:
                    fut = dist.all_reduce(b, op=dist.ReduceOp.SUM, group=self.group, async_op=True).get_future()
                elif self._avg:
                    fut = dist.all_reduce(b, op=dist.ReduceOp.AVG, group=self.group, async_op=True).get_future()
                else:
                    b.div_(ws)  # as DDP: divide, then sum
                    fut = dist.all_reduce(b, op=dist.ReduceOp.SUM, group=self.group, async_op=True).get_future()
                rnd.futures.append(fut)
            if rnd.count is not None:
                rnd.count_future = dist.all_reduce(rnd.count, op=dist.ReduceOp.SUM, group=self.group,
                                                   async_op=True).get_future()

        def done(f: torch.futures.Future, r: _Round = rnd) -> None:
            r.t_done = time.perf_counter()

        last = rnd.count_future if rnd.count_future is not None else rnd.futures[-1]
        last.then(done)
        self._exposed += time.perf_counter() - t0

    def _apply(self, rnd: _Round) -> None:
        """Waits for a round and applies its average to the outer parameters."""
        t0 = time.perf_counter()
        for f in rnd.futures:
            f.wait()
        total = float(rnd.samples)
        if rnd.count_future is not None:
            rnd.count_future.wait()
            assert rnd.count is not None
            total = float(rnd.count.item())
        t1 = time.perf_counter()
        self._exposed += t1 - t0
        self.comm_stats["comm_seconds"] += max(0.0, (rnd.t_done or t1) - rnd.t_issue)
        if self.weighted:
            self.samples_applied += int(round(total))
            if total > 0:
                for b in rnd.bufs:
                    b.div_(total)
        if not self.weighted or total > 0:
            self._outer_step(rnd.bufs)
        self.rounds_applied += 1
        for c, b in zip(self._classes, rnd.bufs):
            c.free.append(b)

    def _outer_step(self, deltas: List[torch.Tensor]) -> None:
        kind = self._outer_kind
        with torch.no_grad():
            if kind is None:
                for c, d in zip(self._classes, deltas):
                    c.x.sub_(d)
            elif kind in ("sgd", "nesterov"):
                mu, lr = self.outer_momentum, self.outer_lr
                for c, d in zip(self._classes, deltas):
                    assert c.momentum is not None
                    c.momentum.mul_(mu).add_(d)
                    if kind == "nesterov":
                        d.add_(c.momentum, alpha=mu)
                        c.x.sub_(d, alpha=lr)
                    else:
                        c.x.sub_(c.momentum, alpha=lr)
            else:
                assert self._outer_opt is not None
                for c, d in zip(self._classes, deltas):
                    c.x.grad = d
                self._outer_opt.step()
                for c in self._classes:
                    c.x.grad = None

    # -- inspection and checkpoints -----------------------------------------------------

    def outer_parameters(self) -> List[torch.Tensor]:
        """The outer parameters (one flat tensor per dtype/device, in parameter order),
        bitwise identical on every rank; views, do not modify."""
        return [c.x for c in self._classes]

    def load_outer_into_model(self) -> None:
        """Copies the outer parameters into the model (without flushing pending rounds)."""
        for c in self._classes:
            c.write(c.x)

    def state_dict(self) -> Dict[str, Any]:
        """Outer parameters, outer optimizer state, rounds in flight (waited for, not
        applied), counters and the compressor state. The model and the inner optimizer
        are checkpointed by the caller as usual. Issues no collective."""
        pending = []
        for r in self._pending:
            for f in r.futures:
                f.wait()
            if r.count_future is not None:
                r.count_future.wait()
            pending.append({"index": r.index, "samples": r.samples, "bufs": [b.clone() for b in r.bufs],
                            "own": [o.clone() if o is not None else None for o in r.own],
                            "count": r.count.clone() if r.count is not None else None})
        outer: Any = None
        if self._outer_opt is not None:
            outer = self._outer_opt.state_dict()
        elif self._outer_kind is not None:
            outer = [c.momentum.clone() for c in self._classes]  # type: ignore[union-attr]
        return {
            "x": [c.x.clone() for c in self._classes],
            "start": [c.start.clone() if c.start is not None else None for c in self._classes],
            "outer": outer,
            "pending": pending,
            "round": self._round,
            "steps_in_round": self._steps_in_round,
            "samples_in_round": self._samples_in_round,
            "steps": self.steps,
            "rounds_applied": self.rounds_applied,
            "samples_applied": self.samples_applied,
            "compression": self.compression.state_dict() if self.compression is not None else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (construct with the same model and settings first)."""
        if len(state["x"]) != len(self._classes):
            raise ValueError("LocalSGD.load_state_dict: the state belongs to a different model")
        with torch.no_grad():
            for c, x, st in zip(self._classes, state["x"], state["start"]):
                c.x.copy_(x)
                if c.start is not None and st is not None:
                    c.start.copy_(st)
        outer = state["outer"]
        if self._outer_opt is not None:
            self._outer_opt.load_state_dict(outer)
        elif self._outer_kind is not None:
            for c, m in zip(self._classes, outer):
                c.momentum.copy_(m)  # type: ignore[union-attr]
        self._pending = []
        for p in state["pending"]:
            r = _Round(p["index"])
            r.samples = p["samples"]
            r.bufs = [b.clone() for b in p["bufs"]]
            r.own = [o.clone() if o is not None else None for o in p["own"]]
            for b in r.bufs:
                f: torch.futures.Future = torch.futures.Future()
                f.set_result(b)
                r.futures.append(f)
            if p["count"] is not None:
                r.count = p["count"].clone()
                f = torch.futures.Future()
                f.set_result(r.count)
                r.count_future = f
            self._pending.append(r)
        self._round = state["round"]
        self._steps_in_round = state["steps_in_round"]
        self._samples_in_round = state["samples_in_round"]
        self.steps = state["steps"]
        self.rounds_applied = state["rounds_applied"]
        self.samples_applied = state["samples_applied"]
        if self.compression is not None and state.get("compression") is not None:
            self.compression.load_state_dict(state["compression"])


class AsyncLocalSGD(LocalSGD):
    """Asynchronous data parallelism with bounded staleness and time-based rounds.

    Each rank runs as many local steps as fit in ``window`` seconds (at least one), then
    ends its round: its delta, multiplied by the samples it processed in the round, and
    that sample count are summed over the group (asynchronously); the outer optimizer
    applies ``sum(n_r delta_r) / sum(n_r)``. A round's average is applied ``staleness``
    rounds later (see the module docs), so a slow rank holds the others up only when it
    falls more than ``staleness`` rounds behind: a rank never runs more than ``staleness``
    rounds ahead of the slowest. ``staleness=0`` waits for every round at its end.

    Round deadlines follow a fixed schedule on each rank's clock (``t0 + k * window``,
    re-anchored after a stall longer than a window), so overshooting one deadline by a
    step shortens the next round instead of drifting.

    Args: as :class:`LocalSGD`, plus ``window`` (seconds per round, > 0) and
    ``staleness`` (rounds in flight, >= 0). :meth:`step` takes ``num_samples`` (the
    step's batch size; default 1, i.e. weighting by steps).

    Every rank ends the same rounds, so stop on a condition all ranks see at the same
    round, e.g. ``while ls.samples_applied < budget`` or ``ls.rounds_applied < R``, then
    call :meth:`flush` (which always runs one more round, possibly empty).
    """

    def __init__(self, model: Any, optimizer: Optional[torch.optim.Optimizer],
                 group: Optional[dist.ProcessGroup] = None,
                 window: float = 0.1, staleness: int = 1, outer_optimizer: OuterOptimizer = None,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, compression: Any = None) -> None:
        if not window > 0:
            raise ValueError(f"pycomm.AsyncLocalSGD: window must be > 0 seconds, got {window!r}")
        if not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0:
            raise ValueError(f"pycomm.AsyncLocalSGD: staleness must be an integer >= 0, got {staleness!r}")
        self.window = float(window)
        self.sync_every = 0
        self._init(model, optimizer, group, outer_optimizer, outer_lr, outer_momentum, compression,
                   staleness=staleness, weighted=True)
        self.steps_per_round: List[int] = []
        self._deadline = time.perf_counter() + self.window

    def _due(self) -> bool:
        return self._steps_in_round >= 1 and time.perf_counter() >= self._deadline

    def sync(self) -> None:
        self.steps_per_round.append(self._steps_in_round)
        super().sync()

    def _after_sync(self) -> None:
        now = time.perf_counter()
        self._deadline += self.window
        if self._deadline <= now:  # stalled for more than a window: re-anchor the schedule
            self._deadline = now + self.window
