"""Overlapped data parallelism: gradients are averaged in fusion buckets while backward runs.

    import pycomm, torch.distributed as dist
    from pycomm.data_parallel import DataParallel
    dist.init_process_group("pycomm")
    model = DataParallel(net)                          # broadcasts rank 0's weights
    loss_fn(model(x), y).backward()                    # buckets all-reduced during backward
    opt.step()                                         # grads are already averaged

How it works (see docs/DATA_PARALLEL.md):

* Parameters are grouped into flat *buckets* (``first_bucket_mb`` for the first one,
  ``bucket_cap_mb`` after it) in reverse registration order, planned in C++
  (``pycomm._C.bucket_plan``, DDP's rule). After the first iteration the buckets are
  rebuilt once from the order gradients actually became ready on the group's first
  rank (broadcast, so every rank agrees).
* A ``register_post_accumulate_grad_hook`` on every parameter copies its gradient into
  its bucket slot (C++ copy). When a bucket's last gradient arrives, the bucket's
  all-reduce (``dist.all_reduce(..., AVG, async_op=True)`` or the compressor's async
  all-reduce) starts at once -- buckets are launched in index order, as in DDP, so that
  every rank issues the same collectives in the same order -- and the rest of backward
  runs meanwhile.
* A callback queued on the autograd engine runs when backward ends: it completes
  buckets holding unused parameters (see below), waits for every bucket and copies the
  averages back into ``param.grad``, so ``optimizer.step()`` sees averaged gradients.

Unused parameters: with ``find_unused_parameters=True`` a parameter that got no
gradient on this rank contributes zeros (or its accumulated ``.grad`` after
``no_sync``), so buckets always complete; a parameter no rank used keeps its ``.grad``
untouched (``None`` stays ``None``), as in DDP. With ``find_unused_parameters=False``
the end-of-backward callback raises a RuntimeError naming the parameters that got no
gradient (after completing the collectives, so the other ranks do not hang).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from pycomm import _C
from pycomm import compression as _compression
from pycomm import timeline as _tl
from pycomm.compression.momentum import exact_last

__all__ = ["DataParallel"]

_MB = 1024 * 1024


def _env_mb(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    return float(v) if v else default


def _supports_avg(group: Optional[dist.ProcessGroup]) -> bool:
    """True if all_reduce(op=AVG) is native on the group (pycomm, NCCL); Gloo lacks it."""
    try:
        backend = dist.get_backend(group)
    except Exception:  # noqa: BLE001
        return False
    return backend in ("pycomm", "nccl")


class _Bucket:
    """One flat buffer and what is in flight for it."""

    __slots__ = ("index", "params", "offsets", "numel", "flat", "pending", "future", "t_ready", "t_issue",
                 "t_issued", "t_done")

    def __init__(self, index: int, params: List[int], offsets: List[int], numel: int, flat: torch.Tensor) -> None:
        self.index = index
        self.params = params
        self.offsets = offsets
        self.numel = numel
        self.flat = flat
        self.pending = len(params)
        self.future: Optional[torch.futures.Future] = None
        self.t_ready = 0
        self.t_issue = 0
        self.t_issued = 0
        self.t_done = 0


class DataParallel(torch.nn.Module):
    """Wraps ``module`` for data-parallel training over ``group`` with overlapped,
    optionally compressed, gradient averaging.

    Args:
        module: the model (CPU or CUDA; parameters of several dtypes are fine).
        group: the process group (default: the world). Any backend; pycomm and NCCL
            average natively (AVG), other backends sum after dividing by the size.
        bucket_cap_mb: bucket size limit in MiB (default 25, or ``PYCOMM_BUCKET_CAP_MB``).
        first_bucket_mb: limit of the first bucket, which is filled first and sent
            earliest (default 1, or ``PYCOMM_FIRST_BUCKET_MB``).
        compression: a :mod:`pycomm.compression` compressor, used as
            ``compression.all_reduce(bucket, group=group, key=bucket_index, op="avg",
            async_op=True)``; None for an exact all-reduce. Give each DataParallel its
            own compressor (the state is keyed by bucket index). OneBit, TopK and
            PowerSGD are wrapped in :class:`pycomm.compression.MomentumCorrection`
            (:func:`pycomm.compression.for_training`; pass a MomentumCorrection to choose).
            Where it compresses is the compressor's ``scope``: by default, on a pycomm
            group spanning several hosts with several ranks on some, FP16/BF16/OneBit/QSGD
            compress the cross-host hop only (exact float32 inside each host); pass e.g.
            ``OneBit(scope="all")`` to compress every hop (docs/COMPRESSION.md).
        broadcast_buffers: broadcast the module's buffers (BatchNorm statistics) from
            the group's first rank at every forward, as DDP does.
        find_unused_parameters: parameters that got no gradient contribute zeros
            instead of raising at the end of backward (costs one small all-reduce per
            iteration, to find the parameters no rank used).
        gradient_as_bucket_view: as DDP's option of that name: after the first
            synchronised step every ``param.grad`` is a view into its bucket, so the
            averaged bucket *is* the gradient (no copy back after the all-reduce, and
            with ``zero_grad(set_to_none=False)`` no copy into the bucket either:
            backward accumulates in place). Gradients then share memory with the
            buckets; don't keep references to them across steps.
        balance: a :class:`pycomm.balance.SpeedBalancer`: each bucket is scaled by its
            ``grad_scale`` (``world * share / global_batch``) before the average, so uneven
            local batches give the big-batch gradient; each synchronised iteration's
            compute time (forward start to end of backward, without the wait for buckets)
            is recorded and ``balance.step()`` runs at its end (see docs/DATA_PARALLEL.md).

    The parameters and buffers of the group's first rank are broadcast at wrap time.
    Environment: ``PYCOMM_TIMELINE=trace.json`` writes a per-rank Chrome trace.
    ``comm_stats`` accumulates, per synchronised iteration, the seconds some bucket was
    being communicated and the seconds the end of backward was blocked waiting for
    them (exposed communication); :meth:`reset_comm_stats` zeroes it.
    """

    def __init__(self, module: torch.nn.Module, group: Optional[dist.ProcessGroup] = None,
                 bucket_cap_mb: Optional[float] = None, first_bucket_mb: Optional[float] = None,
                 compression: Any = None, broadcast_buffers: bool = True,
                 find_unused_parameters: bool = False, gradient_as_bucket_view: bool = False,
                 balance: Any = None) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("pycomm.DataParallel: torch.distributed is not initialised")
        self.module = module
        self.group = group
        # Sign / sparse / low-rank compressors get momentum correction + warm-up (issue 15).
        self.compression = _compression.for_training(compression, [p for p in module.parameters()])
        self.broadcast_buffers = broadcast_buffers
        self.find_unused_parameters = find_unused_parameters
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.world_size = dist.get_world_size(group)
        if balance is not None and balance.world_size != self.world_size:
            raise ValueError("pycomm.DataParallel: the balancer's group differs in size from the model's")
        self.balance = balance
        self._t_forward = 0
        self.rank = dist.get_rank(group)
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        cap = bucket_cap_mb if bucket_cap_mb is not None else _env_mb("PYCOMM_BUCKET_CAP_MB", 25.0)
        first = first_bucket_mb if first_bucket_mb is not None else _env_mb("PYCOMM_FIRST_BUCKET_MB", 1.0)
        if cap < 0 or first < 0:
            raise ValueError("pycomm.DataParallel: bucket sizes must be >= 0")
        self.bucket_cap_bytes = int(cap * _MB)
        self.first_bucket_bytes = int(first * _MB)
        self._avg = _supports_avg(group)
        self._used_device = torch.device("cpu")

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._params: List[torch.nn.Parameter] = [p for _, p in named]
        self._names: List[str] = [n for n, _ in named]
        for n, p in named:
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"pycomm.DataParallel: parameter {n} is not a dense strided tensor")
        classes: Dict[Tuple[torch.dtype, torch.device], int] = {}
        if self._params and self._params[0].is_cuda and dist.get_backend(group) == "nccl":
            self._used_device = self._params[0].device  # NCCL reduces CUDA tensors only
        self._keys = [classes.setdefault((p.dtype, p.device), len(classes)) for p in self._params]

        self._timeline = _tl.from_env(dist.get_rank())
        self.reset_comm_stats()
        self._sync_module_states()

        # Per-iteration state.
        self._require_sync = True
        self._rebuilt = False
        self._ready_order: List[int] = []
        self._marked = [False] * len(self._params)
        self._used = [0] * len(self._params)  # got a gradient since the last sync (no_sync included)
        self._active = False  # a synced backward has started and not been finalized
        self._next_launch = 0
        self._t_backward_start = 0
        self._iteration = 0
        self._plan(order=None)
        self._handles = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self._params)]

    # -- setup ------------------------------------------------------------------------

    def _broadcast_tensors(self, tensors: List[torch.Tensor]) -> None:
        """Broadcasts tensors from the group's first rank, one flat buffer per dtype/device."""
        if self.world_size == 1 or not tensors:
            return
        by_class: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
        for t in tensors:
            by_class.setdefault((t.dtype, t.device), []).append(t)
        for (dtype, device), ts in by_class.items():
            offsets, off = [], 0
            for t in ts:
                offsets.append(off)
                off += t.numel()
            flat = torch.empty(off, dtype=dtype, device=device)
            with torch.no_grad():
                _C.bucket_flatten(flat, [t.detach() for t in ts], offsets, [t.numel() for t in ts])
                dist.broadcast(flat, src=self._src, group=self.group)
                _C.bucket_unflatten(flat, [t.detach() for t in ts], offsets)

    def _sync_module_states(self) -> None:
        tensors = [p.detach() for p in self.module.parameters()]
        tensors += [b.detach() for b in self.module.buffers()]
        self._broadcast_tensors(tensors)

    def _planned(self, order: Optional[List[int]]) -> List[Tuple[List[int], List[int], int, int]]:
        """The buckets (parameter indices, offsets, numel, key): DDP's rule
        (``_C.bucket_plan``), then inside each bucket the parameters the compression keeps
        apart (OneBit's vectors, ``MomentumCorrection(exact=)``) moved to the end, so that
        its exact and compressed parts are two views of the bucket."""
        planned = _C.bucket_plan([p.numel() for p in self._params], [p.element_size() for p in self._params],
                                 self._keys, self.bucket_cap_bytes, self.first_bucket_bytes, order)
        out = []
        for params, _offsets, numel, key in planned:
            params = [params[j] for j in exact_last(self.compression, [self._params[i] for i in params])]
            offsets, off = [], 0
            for i in params:
                offsets.append(off)
                off += self._params[i].numel()
            out.append((params, offsets, numel, key))
        return out

    def _plan(self, order: Optional[List[int]]) -> None:
        planned = self._planned(order)
        self._buckets: List[_Bucket] = []
        self._slot: List[Tuple[int, int]] = [(0, 0)] * len(self._params)  # param -> (bucket, offset)
        for bi, (params, offsets, numel, _key) in enumerate(planned):
            p0 = self._params[params[0]]
            if p0.device.type == "cpu":
                # A registered buffer: the shm transport's peers read it without a system call.
                flat = _C.registered_zeros(numel, p0.dtype)
            else:
                flat = torch.zeros(numel, dtype=p0.dtype, device=p0.device)
            self._buckets.append(_Bucket(bi, list(params), list(offsets), numel, flat))
            for pi, off in zip(params, offsets):
                self._slot[pi] = (bi, off)
            # Which parameters the bucket holds: PowerSGD factorises each matrix-shaped one,
            # and momentum correction with Adam freezes their second moment (issue 15).
            if hasattr(self.compression, "set_layout"):
                self.compression.set_layout(bi, [(self._params[pi], off) for pi, off in zip(params, offsets)])

    def bucket_layout(self) -> List[List[str]]:
        """Parameter names of each bucket, in bucket (launch) order."""
        return [[self._names[i] for i in b.params] for b in self._buckets]

    # -- forward ----------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        t0 = self._t_forward = _tl.now_ns()
        if self.broadcast_buffers and self.world_size > 1:
            bufs = [b.detach() for b in self.module.buffers()]
            if bufs:
                self._broadcast_tensors(bufs)
        out = self.module(*args, **kwargs)
        if torch.is_grad_enabled() and self._require_sync:
            t = _first_grad_tensor(out)
            if t is not None:
                # Fires when the output's gradient is computed: the start of backward.
                t.register_hook(self._on_backward_start)
        if self._timeline is not None:
            self._timeline.span("forward", t0, _tl.now_ns(), args={"iteration": self._iteration})
        return out

    def _on_backward_start(self, grad: torch.Tensor) -> None:
        if self._require_sync:
            self._begin_iteration()
        return None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally without communicating;
        the first backward after the block averages the accumulated gradients."""
        old = self._require_sync
        self._require_sync = False
        try:
            yield
        finally:
            self._require_sync = old

    # -- backward hooks -----------------------------------------------------------------

    def _begin_iteration(self) -> None:
        if self._active:
            return
        self._active = True
        self._t_backward_start = _tl.now_ns()
        torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _make_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self._on_grad_ready(index, param)
        return hook

    def _on_grad_ready(self, index: int, param: torch.Tensor) -> None:
        self._used[index] = 1
        if not self._require_sync:
            return
        self._begin_iteration()
        if self._marked[index]:
            raise RuntimeError(f"pycomm.DataParallel: parameter {self._names[index]} received a gradient twice in "
                               "one synced iteration (several backward passes need no_sync() for all but the last)")
        grad = param.grad
        if grad is None:  # pragma: no cover - the hook fires after accumulation
            return
        if grad.is_sparse:
            raise RuntimeError(f"pycomm.DataParallel: sparse gradient for {self._names[index]} is not supported")
        if not self._rebuilt:
            self._ready_order.append(index)
        bi, off = self._slot[index]
        bucket = self._buckets[bi]
        if not self._is_bucket_view(grad, bucket, off):
            _C.bucket_copy_in(bucket.flat, off, grad.detach())
        self._mark(index, bucket)

    @staticmethod
    def _is_bucket_view(grad: torch.Tensor, bucket: "_Bucket", off: int) -> bool:
        """True when grad already lives at its slot of the bucket (gradient_as_bucket_view)."""
        flat = bucket.flat
        return (grad.dtype == flat.dtype and grad.device == flat.device and grad.is_contiguous()
                and grad.data_ptr() == flat.data_ptr() + off * flat.element_size())

    def _mark(self, index: int, bucket: _Bucket) -> None:
        self._marked[index] = True
        bucket.pending -= 1
        if bucket.pending == 0:
            bucket.t_ready = _tl.now_ns()
            if self._timeline is not None:
                self._timeline.instant("ready", bucket.t_ready, _tl.bucket_tid(bucket.index),
                                       args={"params": len(bucket.params),
                                             "bytes": bucket.numel * bucket.flat.element_size()})
            self._launch_ready()

    def _launch_ready(self) -> None:
        # Buckets start in index order (DDP's rule): every rank issues the same sequence.
        while self._next_launch < len(self._buckets) and self._buckets[self._next_launch].pending == 0:
            self._launch(self._buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.t_issue = _tl.now_ns()
        flat = bucket.flat
        if self.balance is not None:
            flat.mul_(self.balance.grad_scale)  # uneven shares: average of (world * n_i / N) g_i
        if self.world_size == 1:
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(flat)
        elif self.compression is not None:
            fut = self.compression.all_reduce(flat, group=self.group, key=bucket.index, op="avg", async_op=True)
        elif self._avg:
            fut = dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=self.group, async_op=True).get_future()
        else:
            flat.div_(self.world_size)  # as DDP: divide first, then sum
            fut = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True).get_future()
        bucket.t_issued = _tl.now_ns()

        def done(f: torch.futures.Future, b: _Bucket = bucket) -> torch.Tensor:
            b.t_done = _tl.now_ns()
            f.value()  # re-raises a communication error into the chained future
            return b.flat

        bucket.future = fut.then(done)

    # -- end of backward ----------------------------------------------------------------

    def _on_backward_end(self) -> None:
        self.finalize()

    def finalize(self) -> None:
        """Completes the iteration: fills unused slots (or reports them), waits for every
        bucket and writes the averages into ``param.grad``. Runs automatically when
        backward ends; calling it again is a no-op."""
        if not self._active:
            return
        t_end = _tl.now_ns()
        tl = self._timeline
        if tl is not None:
            tl.span("backward", self._t_backward_start, t_end, args={"iteration": self._iteration})
        error: Optional[BaseException] = None
        try:
            missing = [i for i, m in enumerate(self._marked) if not m]
            for i in missing:
                bi, off = self._slot[i]
                bucket = self._buckets[bi]
                g = self._params[i].grad
                numel = self._params[i].numel()
                if g is not None and self.find_unused_parameters:
                    if not self._is_bucket_view(g, bucket, off):  # e.g. accumulated under no_sync
                        _C.bucket_copy_in(bucket.flat, off, g.detach())
                else:
                    _C.bucket_flatten(bucket.flat, [None], [off], [numel])
                self._mark(i, bucket)
            used_work = None
            self._used_any = torch.tensor(self._used, dtype=torch.int32, device=self._used_device)
            if self.find_unused_parameters and self.world_size > 1:
                # Which parameters did any rank use? Decides whether an unused .grad is written.
                used_work = dist.all_reduce(self._used_any, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            if missing and not self.find_unused_parameters:
                names = ", ".join(self._names[i] for i in missing)
                error = RuntimeError(
                    f"pycomm.DataParallel: rank {self.rank} finished backward without a gradient for "
                    f"{len(missing)} parameter(s): {names}. Pass find_unused_parameters=True if parts of the "
                    "model are unused in some iterations, or make every parameter take part in the loss.")
            t_wait = _tl.now_ns()
            for b in self._buckets:
                assert b.future is not None
                b.future.wait()
            if used_work is not None:
                used_work.wait()
            t_waited = _tl.now_ns()
            self._account(t_wait, t_waited)
            if self.balance is not None:  # on every rank, error or not: step() may all-reduce
                self.balance.record(max(0, t_wait - self._t_forward) * 1e-9)
                self.balance.step()
            if tl is not None:
                tl.span("wait for buckets", t_wait, t_waited)
                for b in self._buckets:
                    tid = _tl.bucket_tid(b.index)
                    tl.span("compress+issue" if self.compression is not None else "issue", b.t_issue, b.t_issued,
                            tid)
                    tl.span("communicate", b.t_issued, b.t_done, tid,
                            args={"bytes": b.numel * b.flat.element_size()})
            if error is None:
                self._write_back()
        finally:
            self._reset_iteration()
        if tl is not None:
            tl.flush()
        if error is not None:
            raise error

    def reset_comm_stats(self) -> None:
        """Zeroes :attr:`comm_stats` (seconds accumulated over synchronised iterations)."""
        self.comm_stats = {"iterations": 0, "comm_seconds": 0.0, "exposed_seconds": 0.0}

    def _account(self, t_wait: int, t_waited: int) -> None:
        # comm_seconds: the union of the buckets' [issue, done] intervals (time during which
        # some bucket was being communicated); exposed_seconds: the time backward's end spent
        # blocked waiting for them (communication not hidden behind compute).
        spans = sorted((b.t_issue, b.t_done or t_waited) for b in self._buckets)
        busy, end = 0, None
        for s, e in spans:
            if end is None or s > end:
                busy += e - s
                end = e
            elif e > end:
                busy += e - end
                end = e
        st = self.comm_stats
        st["iterations"] += 1
        st["comm_seconds"] += busy * 1e-9
        st["exposed_seconds"] += (t_waited - t_wait) * 1e-9

    def _write_back(self) -> None:
        tl = self._timeline
        used = self._used_any.tolist()
        for b in self._buckets:
            t0 = _tl.now_ns()
            existing: List[Optional[torch.Tensor]] = []
            for pi, off in zip(b.params, b.offsets):
                p = self._params[pi]
                if p.grad is None and self.find_unused_parameters and not used[pi]:
                    existing.append(None)  # no rank used it: leave .grad alone (None), as DDP
                    continue
                if self.gradient_as_bucket_view:
                    # The bucket holds the average: point .grad at its slot (no copy).
                    if p.grad is None or not self._is_bucket_view(p.grad, b, off):
                        p.grad = b.flat.narrow(0, off, p.numel()).view_as(p)
                    existing.append(None)
                elif p.grad is None:
                    p.grad = b.flat.narrow(0, off, p.numel()).view_as(p).clone()
                    existing.append(None)
                else:
                    existing.append(p.grad.detach())
            with torch.no_grad():
                _C.bucket_unflatten(b.flat, existing, b.offsets)
            if tl is not None:
                tl.span("write-back", t0, _tl.now_ns(), _tl.bucket_tid(b.index))

    def _reset_iteration(self) -> None:
        first = not self._rebuilt
        self._active = False
        self._next_launch = 0
        self._marked = [False] * len(self._params)
        self._used = [0] * len(self._params)
        for b in self._buckets:
            b.pending = len(b.params)
            b.future = None
        self._iteration += 1
        if first:
            self._rebuild()

    def _rebuild(self) -> None:
        """Re-plans the buckets once, from the ready order the group's first rank saw."""
        self._rebuilt = True
        order = _C.bucket_rebuild_order(len(self._params), self._ready_order)
        self._ready_order = []
        if self.world_size > 1:
            t = torch.tensor(order, dtype=torch.int64)
            dist.broadcast(t, src=self._src, group=self.group)
            order = t.tolist()
        old = [b.params for b in self._buckets]
        planned = self._planned(order)
        if [list(p[0]) for p in planned] != old:
            self._plan(order)
            if self.gradient_as_bucket_view:
                # Gradients were views of the old buckets: move them into the new ones.
                for i, p in enumerate(self._params):
                    if p.grad is not None:
                        bi, off = self._slot[i]
                        view = self._buckets[bi].flat.narrow(0, off, p.numel()).view_as(p)
                        view.copy_(p.grad)
                        p.grad = view

    # -- module-like helpers ------------------------------------------------------------

    def remove_hooks(self) -> None:
        """Unregisters the gradient hooks (the wrapper stops communicating)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _first_grad_tensor(out: Any) -> Optional[torch.Tensor]:
    """The first tensor requiring grad in a (nested) module output."""
    if isinstance(out, torch.Tensor):
        return out if out.requires_grad else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_grad_tensor(o)
            if t is not None:
                return t
    return None
