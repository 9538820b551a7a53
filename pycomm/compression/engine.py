"""How a compressed all-reduce is issued: the :class:`Compressor` interface and its
per-key state (error-feedback residuals keyed by bucket), the pipelined C++ path on
pycomm groups, the generic path over torch.distributed collectives, and the schedule
that interleaves several asynchronous calls on one group.

A compressor (pycomm/compression/compressors.py) only says what to send: its
``_reduce`` is a generator that yields collective requests and writes the result; its
``_native`` gives the arguments of the C++ exchange. Everything here is shared.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, Generator, Hashable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from pycomm import _C, _backend

_ALIGN: int = int(_C.COMPRESS_ALIGN)

# A collective request yielded by a compressor's reduction generator: ("a2a", input) for
# an equal-split all_to_all_single, ("ag", input) for an all-gather into one tensor.
_Request = Tuple[str, torch.Tensor]
_Reduction = Generator[_Request, torch.Tensor, None]
_OpLike = Union[str, "dist.ReduceOp", Any]


# --------------------------------------------------------------------------- helpers


def _divisor(op: _OpLike, world_size: int) -> int:
    """1 for SUM, world_size for AVG (accepts "sum"/"avg" or dist.ReduceOp)."""
    if isinstance(op, str):
        name = op.lower()
    elif op == dist.ReduceOp.SUM:
        name = "sum"
    elif op == dist.ReduceOp.AVG:
        name = "avg"
    else:
        name = str(op)
    if name == "sum":
        return 1
    if name in ("avg", "mean"):
        return world_size
    raise ValueError(f"compressed all_reduce supports op 'avg' or 'sum', got {op!r}")


def _chunk(numel: int, world_size: int, align: int) -> int:
    """Elements per rank's chunk: ceil(numel / world_size) rounded up to `align`."""
    per = -(-numel // world_size)
    return max(align, -(-per // align) * align)


def _owned(numel: int, chunk: int, rank: int) -> int:
    """Valid (unpadded) elements of `rank`'s chunk."""
    return max(0, min(chunk, numel - rank * chunk))


def _flat_float(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as a contiguous 1-D float32 tensor (a view when it already is one)."""
    x = tensor.reshape(-1)
    if x.dtype != torch.float32:
        x = x.float()
    return x.contiguous()


def _out_buffer(tensor: torch.Tensor) -> torch.Tensor:
    """Where a float32 result is written: the tensor itself when it is contiguous float32."""
    if tensor.dtype == torch.float32 and tensor.is_contiguous():
        return tensor.view(-1)
    return torch.empty(tensor.numel(), dtype=torch.float32, device=tensor.device)


def _write_back(tensor: torch.Tensor, result: torch.Tensor) -> None:
    """Copies a flat result into `tensor` unless it was computed in place."""
    flat = result.reshape(-1)
    if tensor.dtype == torch.float32 and tensor.is_contiguous() and flat.data_ptr() == tensor.data_ptr():
        return
    tensor.copy_(flat[: tensor.numel()].view(tensor.shape))


def _mix_seed(*parts: int) -> int:
    """splitmix64 over the parts, folded to 32 bits (host-side seed derivation)."""
    x = 0
    mask = (1 << 64) - 1
    for p in parts:
        x = ((x ^ (p & mask)) + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return (x ^ (x >> 32)) & 0xFFFFFFFF


def _all_gather_fn():
    """dist.all_gather_single where it exists (torch >= 2.14), else all_gather_into_tensor."""
    fn = getattr(dist, "all_gather_single", None)
    return fn if fn is not None else dist.all_gather_into_tensor


def _issue(req: _Request, group: Optional[dist.ProcessGroup], world_size: int,
           async_op: bool) -> Tuple[Optional[dist.Work], torch.Tensor]:
    """Starts one collective; returns (work or None, output tensor)."""
    kind, inp = req
    if kind == "a2a":
        out = torch.empty_like(inp)
        work = dist.all_to_all_single(out, inp, group=group, async_op=async_op)
    elif kind == "ag":
        out = inp.new_empty(world_size * inp.numel())
        work = _all_gather_fn()(out, inp, group=group, async_op=async_op)
    else:  # pragma: no cover - internal misuse
        raise RuntimeError(f"unknown collective {kind}")
    return work, out


def _float_all_reduce(x: torch.Tensor, world_size: int, rank: int, divisor: int) -> _Reduction:
    """Deterministic float32 all-reduce as reduce-scatter + all-gather: the chunk owner sums
    the ranks' chunks in rank order, so every rank receives identical bits.
    Generator: yields requests, returns the reduced flat tensor (x.numel() elements)."""
    n = x.numel()
    chunk = _chunk(n, world_size, 1)
    payload = x.new_zeros(world_size * chunk)
    payload[:n].copy_(x.reshape(-1))
    recv = yield ("a2a", payload)
    mine = _C.float_server_reduce(recv, world_size, chunk, _owned(n, chunk, rank), divisor)
    gathered = yield ("ag", mine)
    return gathered[:n]


def ring_all_reduce_bytes(numel: int, world_size: int, element_size: int = 4) -> int:
    """Bytes one rank sends in an uncompressed ring all-reduce: 2 (n-1)/n of the buffer."""
    if world_size <= 1 or numel == 0:
        return 0
    return 2 * (world_size - 1) * -(-numel // world_size) * element_size


# --------------------------------------------------------------------------- native path

#: Run compressed all-reduces on pycomm groups through the pipelined C++ exchange
#: (``PYCOMM_COMPRESS_NATIVE=0`` turns it off: every group then uses the generic path
#: over torch.distributed collectives, with bitwise-identical results).
NATIVE: bool = os.environ.get("PYCOMM_COMPRESS_NATIVE", "1") != "0"


def _native_backend(group: Optional[dist.ProcessGroup], tensor: torch.Tensor) -> Any:
    """The group's pycomm backend when the native path applies (CPU tensor), else None."""
    if not NATIVE or tensor.device.type != "cpu":
        return None
    try:
        return _backend._pycomm_backend(group)
    except (ValueError, RuntimeError):
        return None


def _run_native(backend: Any, tensor: torch.Tensor, args: Dict[str, Any], divisor: int,
                async_op: bool, nonfinite: Optional[torch.Tensor] = None) -> Union[torch.Tensor, torch.futures.Future]:
    """The pipelined C++ exchange; ``nonfinite`` (a one-element uint8 tensor) receives 1
    if the result holds an inf or NaN, read off the payloads (no pass over the result)."""
    flat = _flat_float(tensor)  # the tensor itself when it is contiguous float32
    work = backend.compressed_all_reduce(flat, args["codec"], args["bits"], args["error_feedback"], args["chunk"],
                                         divisor, args["worker"], args["server"], args.get("worker_seed", 0),
                                         args.get("server_seed", 0), async_op, nonfinite)
    if not async_op:
        work.wait()
        _write_back(tensor, flat)
        return tensor

    def done(f: torch.futures.Future) -> torch.Tensor:
        f.value()  # raises the collective's error
        _write_back(tensor, flat)
        return tensor

    return work.get_future().then(done)


#: Where a compressor compresses (its ``scope``): "auto", "cross_host" or "all".
SCOPES = ("auto", "cross_host", "all")


def _run_native_hier(backend: Any, tensor: torch.Tensor, args: Dict[str, Any], divisor: int,
                     async_op: bool) -> Union[torch.Tensor, torch.futures.Future]:
    """The cross-host-only compressed all-reduce (algorithms/hier_compressed.cc)."""
    flat = _flat_float(tensor)
    work = backend.hier_compressed_all_reduce(flat, args["codec"], args["bits"], args["error_feedback"], divisor,
                                              args["worker"], args["server"], args.get("worker_seed", 0),
                                              args.get("server_seed", 0), async_op)
    if not async_op:
        work.wait()
        _write_back(tensor, flat)
        return tensor

    def done(f: torch.futures.Future) -> torch.Tensor:
        f.value()
        _write_back(tensor, flat)
        return tensor

    return work.get_future().then(done)


# --------------------------------------------------------------------------- async scheduling


class _Call:
    """One asynchronous compressed all-reduce in flight."""

    __slots__ = ("gen", "tensor", "future", "stage", "ready", "finished")

    def __init__(self, gen: _Reduction, tensor: torch.Tensor, future: torch.futures.Future) -> None:
        self.gen = gen
        self.tensor = tensor
        self.future = future
        self.stage = 0  # index of the last collective issued
        self.ready: Optional[torch.Tensor] = None  # output of the last collective, once done
        self.finished = False


class _Schedule:
    """Orders the collectives of asynchronous compressed all-reduces on one group.

    A compressed all-reduce is a short chain of collectives (stage 0, 1, ...) with kernel
    work in between, advanced from the completion callbacks of the previous stage (no
    Python threads). Callbacks fire in a different order on different ranks, so stage k
    >= 1 runs on its own side group (created once, collectively, from the caller's
    thread) and is issued there in submission order; stage 0 is issued by the caller
    on the user's group, in program order like any other collective.
    """

    def __init__(self, group: Optional[dist.ProcessGroup]) -> None:
        self._group = group
        self._world_size = dist.get_world_size(group)
        self._side: List[dist.ProcessGroup] = []
        self._lock = threading.Lock()
        self._calls: List[_Call] = []
        self._draining = False

    def _ensure_side_groups(self, count: int) -> None:
        # Called from the submitting thread only, so every rank creates them in the same order.
        while len(self._side) < count:
            g = self._group if self._group is not None else dist.group.WORLD
            ranks = dist.get_process_group_ranks(g)
            self._side.append(dist.new_group(ranks=ranks, backend=dist.get_backend(g),
                                             use_local_synchronization=True))

    def submit(self, gen: _Reduction, tensor: torch.Tensor, stages: int) -> torch.futures.Future:
        self._ensure_side_groups(stages - 1)
        fut: torch.futures.Future = torch.futures.Future()
        call = _Call(gen, tensor, fut)
        try:
            req = next(gen)
        except StopIteration:
            fut.set_result(tensor)
            return fut
        with self._lock:
            self._calls.append(call)
        work, out = _issue(req, self._group, self._world_size, async_op=True)
        work.get_future().then(lambda f, c=call, o=out: self._on_done(c, o, f))
        return fut

    def _on_done(self, call: _Call, out: torch.Tensor, fut: torch.futures.Future) -> None:
        try:
            fut.wait()
        except Exception as exc:  # noqa: BLE001 - forwarded to the caller's future
            self._finish(call, exc)
            self._drain()
            return
        with self._lock:
            call.ready = out
        self._drain()

    def _finish(self, call: _Call, exc: Optional[BaseException]) -> None:
        with self._lock:
            call.finished = True
            if call in self._calls:
                self._calls.remove(call)
        if exc is None:
            call.future.set_result(call.tensor)
        else:
            call.future.set_exception(exc)

    def _pick(self) -> Optional[_Call]:
        # Caller holds the lock. A call may issue stage s once every earlier call has issued
        # its own stage s or finished, which keeps side group s in submission order.
        for i, c in enumerate(self._calls):
            if c.ready is None:
                continue
            s = c.stage + 1
            if all(e.finished or e.stage >= s for e in self._calls[:i]):
                return c
        return None

    def _drain(self) -> None:
        with self._lock:
            if self._draining:
                return  # the thread already draining will see the new state
            self._draining = True
        while True:
            with self._lock:
                call = self._pick()
                if call is None:
                    self._draining = False
                    return
                out, call.ready = call.ready, None
            try:
                req = call.gen.send(out)
            except StopIteration:
                self._finish(call, None)
                continue
            except Exception as exc:  # noqa: BLE001
                self._finish(call, exc)
                continue
            with self._lock:
                call.stage += 1
                side = self._side[call.stage - 1]
            try:
                work, o = _issue(req, side, self._world_size, async_op=True)
            except Exception as exc:  # noqa: BLE001
                self._finish(call, exc)
                continue
            work.get_future().then(lambda f, c=call, o=o: self._on_done(c, o, f))


_schedules: Dict[Any, _Schedule] = {}
_schedules_lock = threading.Lock()


def _schedule_for(group: Optional[dist.ProcessGroup]) -> _Schedule:
    key = group if group is not None else dist.group.WORLD
    with _schedules_lock:
        s = _schedules.get(key)
        if s is None:
            s = _schedules[key] = _Schedule(group)
        return s


def _completed(tensor: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut


# --------------------------------------------------------------------------- the Compressor interface


class Compressor:
    """Base class of the gradient compressors.

    Subclasses implement :meth:`_reduce` (a generator that yields the collectives it
    needs and writes the result into the tensor), :meth:`_stages` and :meth:`wire_bytes`.
    """

    def __init__(self, scope: str = "auto") -> None:
        if scope not in SCOPES:
            raise ValueError(f"compression scope must be one of {SCOPES}, got {scope!r}")
        #: Where to compress on a pycomm group whose ranks span several hosts (see
        #: :meth:`route`): "cross_host" compresses only the hop between hosts (exact
        #: float32 inside each host), "all" every hop, "auto" (default) cross-host only
        #: where the group spans several hosts with several ranks on some and the
        #: compressor has a native codec, else "all".
        self.scope = scope
        self._states: Dict[Hashable, Dict[str, Any]] = {}
        # Per key: the one-element flag the last native flat call wrote (1: its result
        # holds an inf or NaN); absent when the key's last call took another path.
        self._nonfinite: Dict[Hashable, torch.Tensor] = {}
        # Per key: the (shape, offset) of every parameter in the flat tensor (set_layout).
        self._layouts: Dict[Hashable, List[Tuple[Tuple[int, ...], int]]] = {}

    # -- public API -------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                   key: Optional[Hashable] = None, op: _OpLike = "avg",
                   async_op: bool = False) -> Union[torch.Tensor, torch.futures.Future]:
        """Averages (``op="avg"``) or sums (``op="sum"``) ``tensor`` in place across ``group``.

        Args:
            tensor: the gradient (any float dtype, any device the group supports); the
                arithmetic happens in float32 and the result is written back in its dtype.
            group: the process group (default: the world), of any backend.
            key: names the error-feedback state to use; defaults to one derived from the
                tensor's shape. DataParallel passes bucket indices.
            op: ``"avg"`` or ``"sum"`` (or ``dist.ReduceOp.AVG`` / ``SUM``).
            async_op: return a ``torch.futures.Future`` completed (with ``tensor`` as its
                value) once the result is in place, instead of blocking.

        Returns:
            ``tensor`` when ``async_op`` is False, otherwise the future.

        Every rank ends with bitwise-identical values. With one rank, or an empty tensor,
        the tensor is left unchanged.
        """
        world_size = dist.get_world_size(group)
        divisor = _divisor(op, world_size)
        if world_size == 1 or tensor.numel() == 0:
            return _completed(tensor) if async_op else tensor
        rank = dist.get_rank(group)
        if key is None:
            key = "shape=" + "x".join(str(d) for d in tensor.shape)
        backend = _native_backend(group, tensor)
        route, plan = self._route(backend, tensor, group, tensor.numel())
        flag = self._nonfinite.pop(key, None)
        if route == "exact":  # cross-host only on a one-host group: nothing to compress
            return _run_native(backend, tensor, _NONE._native(tensor, {}, world_size, rank, divisor), divisor,
                               async_op)
        if route == "cross_host":
            state = self._state(key)
            args = self._codec(state, rank)
            if args["error_feedback"]:
                args["worker"] = self._buffer(state, "worker", plan["worker"], tensor)
                args["server"] = self._buffer(state, "server", plan["server"], tensor)
                if self._errors_reset():  # a codec whose kernels always keep errors, asked not to
                    args["worker"].zero_()
                    args["server"].zero_()
            else:
                args["worker"] = args["server"] = None
            return _run_native_hier(backend, tensor, args, divisor, async_op)
        if backend is not None:
            args = self._native(tensor, self._state(key), world_size, rank, divisor)
            if args is not None:
                if flag is None:
                    flag = torch.zeros(1, dtype=torch.uint8)
                self._nonfinite[key] = flag
                return _run_native(backend, tensor, args, divisor, async_op, flag)
        gen = self._reduce(tensor, self._state(key), world_size, rank, divisor)
        if async_op:
            return _schedule_for(group).submit(gen, tensor, self._stages(tensor, key, world_size))
        try:
            req = next(gen)
            while True:
                _, out = _issue(req, group, world_size, async_op=False)
                req = gen.send(out)
        except StopIteration:
            pass
        return tensor

    def route(self, group: Optional[dist.ProcessGroup] = None, numel: int = 1 << 20,
              tensor: Optional[torch.Tensor] = None) -> str:
        """How an all_reduce of ``numel`` elements (of ``tensor``'s kind, default: a CPU
        float32 tensor) on ``group`` runs with this compressor's :attr:`scope`:

        * ``"cross_host"``: exact float32 reduce-scatter inside each host over shared
          memory, the compressed all-reduce of this rank's shard across hosts (error
          feedback on it), exact all-gather inside the host;
        * ``"exact"``: ``scope="cross_host"`` on a group that is all on one host: no hop
          crosses a host, nothing is compressed (a deterministic float32 all-reduce, no
          error-feedback state);
        * ``"all"``: every hop compressed (the flat exchange).

        ``scope="cross_host"`` needs the native path (a pycomm group, a CPU tensor, a
        compressor with a codec: FP16, BF16, OneBit, QSGD) and raises ValueError otherwise.
        """
        probe = tensor if tensor is not None else torch.empty(0)
        return self._route(_native_backend(group, probe), probe, group, numel)[0]

    def wire_bytes_on(self, numel: int, group: Optional[dist.ProcessGroup] = None) -> Dict[str, int]:
        """Payload bytes this rank sends for one all_reduce of ``numel`` float32 CPU
        elements on ``group``, per kind of hop, as :meth:`route` runs it: ``{"cross_host":
        ..., "in_host": ...}`` for the cross-host route (``in_host``: the float32
        reduce-scatter + all-gather over shared memory, ``None`` as it depends on the
        in-host algorithm), ``{"all": wire_bytes(...)}`` for the others."""
        world_size = dist.get_world_size(group)
        backend = _native_backend(group, torch.empty(0))
        route, plan = self._route(backend, torch.empty(0), group, numel)
        if route == "cross_host":
            return {"cross_host": int(plan["cross_bytes"]), "in_host": None}
        if route == "exact":
            return {"all": ring_all_reduce_bytes(numel, world_size)}
        return {"all": self.wire_bytes(numel, world_size)}

    def _route(self, backend: Any, tensor: torch.Tensor, group: Optional[dist.ProcessGroup],
               numel: int) -> Tuple[str, Optional[Dict[str, int]]]:
        scope = getattr(self, "scope", "auto")
        if scope == "all":
            return "all", None
        codec = self._codec_name()
        if backend is None or codec is None:
            if scope == "cross_host":
                why = ("it has no native codec (FP16, BF16, OneBit, QSGD have one)" if codec is None else
                       "that needs a pycomm group, a CPU tensor and pycomm.compression.NATIVE")
                rank = dist.get_rank(group) if dist.is_initialized() else 0
                raise ValueError(f"pycomm rank {rank}: {type(self).__name__}(scope='cross_host') cannot compress the "
                                 f"cross-host hop only: {why}")
            return "all", None
        plan = backend.hier_compressed_plan(numel, codec[0], codec[1])
        if plan["hierarchical"]:
            return "cross_host", plan
        if scope == "cross_host" and plan["hosts"] == 1:
            return "exact", None
        return "all", None  # several hosts with one rank each: every hop crosses a host

    def _codec_name(self) -> Optional[Tuple[str, int]]:
        """(codec, bits) of the C++ exchange, or None when this compressor has none."""
        return None

    def _codec(self, state: Dict[str, Any], rank: int) -> Dict[str, Any]:
        """The codec arguments of one native call (codec, bits, error_feedback, seeds),
        advancing any per-call state (QSGD's step) as :meth:`_native` does."""
        raise NotImplementedError

    def set_layout(self, key: Hashable, params: Any) -> None:
        """Which parameters make up ``key``'s flat tensor: ``(param or shape, offset)`` pairs
        (DataParallel and the DDP hook pass their buckets). :class:`PowerSGD` factorises
        each matrix-shaped parameter on its own; the element-wise compressors ignore it."""
        self._layouts[key] = [(tuple(p.shape) if isinstance(p, torch.Tensor) else tuple(int(d) for d in p), int(off))
                              for p, off in params]

    def wire_bytes(self, numel: int, world_size: int) -> int:
        """Bytes this rank sends to its peers for one all_reduce of ``numel`` elements:
        (world_size - 1) x the per-peer all_to_all payload plus (world_size - 1) x the
        all-gathered payload (what a ring or direct all-gather forwards)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """Per-key state (residuals, PowerSGD Q, RNG steps) as cloned tensors and ints, and
        the layouts given to :meth:`set_layout`."""
        out: Dict[Hashable, Dict[str, Any]] = {}
        for k, st in self._states.items():
            out[k] = {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
        sd: Dict[str, Any] = {"type": type(self).__name__, "states": out}
        if self._layouts:  # what set_layout gave (PowerSGD's plan depends on it)
            sd["layouts"] = {k: list(v) for k, v in self._layouts.items()}
        return sd

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned, so a resumed run continues exactly."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state of {state.get('type')} given to {type(self).__name__}")
        self._states = {
            k: {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
            for k, st in state["states"].items()
        }
        if "layouts" in state:
            self._layouts = {k: [(tuple(int(d) for d in shp), int(off)) for shp, off in v]
                             for k, v in state["layouts"].items()}

    # -- for subclasses ---------------------------------------------------------------

    def _native(self, tensor: torch.Tensor, state: Dict[str, Any], world_size: int, rank: int,
                divisor: int) -> Optional[Dict[str, Any]]:
        """Arguments of the pipelined C++ path (pycomm groups, CPU tensors), or None when
        this compressor has none. Must update ``state`` exactly as :meth:`_reduce` does:
        both paths give bitwise-identical results and state."""
        return None

    def _state(self, key: Hashable) -> Dict[str, Any]:
        return self._states.setdefault(key, {})

    def _stages(self, tensor: torch.Tensor, key: Hashable, world_size: int) -> int:
        """Number of collectives one all_reduce of `tensor` issues (fixed per call)."""
        return 2

    def _reduce(self, tensor: torch.Tensor, state: Dict[str, Any], world_size: int, rank: int,
                divisor: int) -> _Reduction:
        raise NotImplementedError

    def reset_errors(self, key: Hashable) -> None:
        """Zeroes ``key``'s error-feedback buffers (worker and server), so that the next
        call compresses exactly what it is given: for a caller that feeds the error back
        itself (``MomentumCorrection(delta=...)``)."""
        st = self._states.get(key)
        if st:
            for name in ("worker", "server"):
                buf = st.get(name)
                if isinstance(buf, torch.Tensor):
                    buf.zero_()

    def result_finite(self, key: Hashable) -> Optional[bool]:
        """Whether the result of ``key``'s last :meth:`all_reduce` (once complete) holds
        only finite values, as the native exchange read it off the payloads it decoded
        (the same answer on every rank, no pass over the tensor); None when that call did
        not take the native flat path (the caller must look at the tensor itself)."""
        flag = self._nonfinite.get(key)
        return None if flag is None else not bool(flag.item())

    def _errors_reset(self) -> bool:
        """True when the codec's error buffers must be zeroed before every call (OneBit
        with ``error_feedback=False``: its kernels always write an error)."""
        return False

    @staticmethod
    def _buffer(state: Dict[str, Any], name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A zero-initialised float32 state buffer, re-created if its size or device changed."""
        buf = state.get(name)
        if not isinstance(buf, torch.Tensor) or buf.numel() != numel or buf.device != like.device:
            buf = torch.zeros(numel, dtype=torch.float32, device=like.device)
            state[name] = buf
        return buf


def compressed_all_reduce(tensor: torch.Tensor, compression: Optional[Compressor], op: _OpLike = "avg",
                          group: Optional[dist.ProcessGroup] = None, key: Optional[Hashable] = None,
                          async_op: bool = False) -> Union[torch.Tensor, torch.futures.Future]:
    """All-reduces ``tensor`` in place with ``compression`` (see :meth:`Compressor.all_reduce`).

    ``compression=None`` runs an uncompressed, deterministic float32 all-reduce through the
    same reduce-scatter + all-gather path (useful as the baseline).
    """
    if compression is None:
        compression = _NONE
    return compression.all_reduce(tensor, group=group, key=key, op=op, async_op=async_op)


class _Uncompressed(Compressor):
    """float32 reduce-scatter + all-gather, summed in rank order (the baseline)."""

    def wire_bytes(self, numel: int, world_size: int) -> int:
        return ring_all_reduce_bytes(numel, world_size)

    def _codec_name(self):
        return ("none", 0)

    def _codec(self, state, rank):
        return dict(codec="none", bits=0, error_feedback=False)

    def _native(self, tensor, state, world_size, rank, divisor):
        return dict(codec="none", bits=0, error_feedback=False, chunk=_chunk(tensor.numel(), world_size, _ALIGN),
                    worker=None, server=None)

    def _reduce(self, tensor, state, world_size, rank, divisor):
        result = yield from _float_all_reduce(_flat_float(tensor), world_size, rank, divisor)
        _write_back(tensor, result)


_NONE = _Uncompressed()
