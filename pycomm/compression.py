"""Gradient compression for all-reduce: fused C++/CUDA kernels with error feedback.

Every compressor averages (or sums) a tensor in place across a process group while
sending fewer bytes than a float32 ring all-reduce::

    import pycomm.compression as C
    comp = C.OneBit()
    comp.all_reduce(grad, key="layer1")              # in place, on any group
    fut = comp.all_reduce(grad, key=3, async_op=True)
    fut.then(lambda f: ...)                          # f.value() is grad

The collectives go through ``torch.distributed`` on whatever group is passed (Gloo,
NCCL, or pycomm's own backend): packed payloads travel as uint8/half/float tensors
through ``all_to_all_single`` (a compressed reduce-scatter) and ``all_gather_single``
(``all_gather_into_tensor`` on older torch). The shape of the exchange is the 1-bit
Adam one: each rank compresses ``gradient + worker error`` into ``world_size`` chunk
payloads and all-to-alls them; the owner of a chunk decodes the payloads in rank
order, sums them in float32, adds its *server error* and re-compresses; an all-gather
of the re-compressed chunks gives every rank the same bytes, which each decodes
identically — so every rank ends with bitwise-identical results.

=================  =======================================  ==========================
compressor         wire format                              bytes vs fp32 ring
=================  =======================================  ==========================
``FP16()``         fp16 chunks, fp32 sums, one rounding     1/2
``BF16()``         bf16 chunks, fp32 sums, one rounding     1/2
``OneBit()``       signs + one fp32 scale per chunk         ~1/32
``QSGD(bits=8)``   int8 levels + fp32 scale per 512         ~1/3.97 (bits=4: ~1/7.9)
``TopK(ratio)``    k values + k int32 indices, all-gather   ratio * world_size
``PowerSGD(r)``    P (m x r) and Q (n x r) fp32             r (m + n) / (m n)
=================  =======================================  ==========================

State (error residuals, PowerSGD's Q, the QSGD random-stream step) is kept per
``key`` on the tensor's device and round-trips through :meth:`Compressor.state_dict`.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Any, Dict, Generator, Hashable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from pycomm import _C, _backend

__all__ = [
    "Compressor",
    "FP16",
    "BF16",
    "OneBit",
    "TopK",
    "QSGD",
    "PowerSGD",
    "compressed_all_reduce",
    "ring_all_reduce_bytes",
    "MomentumCorrection",
    "for_training",
    "OneBitAdam",
    "OneBitSGD",
]

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
                async_op: bool) -> Union[torch.Tensor, torch.futures.Future]:
    flat = _flat_float(tensor)  # the tensor itself when it is contiguous float32
    work = backend.compressed_all_reduce(flat, args["codec"], args["bits"], args["error_feedback"], args["chunk"],
                                         divisor, args["worker"], args["server"], args.get("worker_seed", 0),
                                         args.get("server_seed", 0), async_op)
    if not async_op:
        work.wait()
        _write_back(tensor, flat)
        return tensor

    def done(f: torch.futures.Future) -> torch.Tensor:
        f.value()  # raises the collective's error
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


# --------------------------------------------------------------------------- compressors


class Compressor:
    """Base class of the gradient compressors.

    Subclasses implement :meth:`_reduce` (a generator that yields the collectives it
    needs and writes the result into the tensor), :meth:`_stages` and :meth:`wire_bytes`.
    """

    def __init__(self) -> None:
        self._states: Dict[Hashable, Dict[str, Any]] = {}

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
        if backend is not None:
            args = self._native(tensor, self._state(key), world_size, rank, divisor)
            if args is not None:
                return _run_native(backend, tensor, args, divisor, async_op)
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

    def wire_bytes(self, numel: int, world_size: int) -> int:
        """Bytes this rank sends to its peers for one all_reduce of ``numel`` elements:
        (world_size - 1) x the per-peer all_to_all payload plus (world_size - 1) x the
        all-gathered payload (what a ring or direct all-gather forwards)."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """Per-key state (residuals, PowerSGD Q, RNG steps) as cloned tensors and ints."""
        out: Dict[Hashable, Dict[str, Any]] = {}
        for k, st in self._states.items():
            out[k] = {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
        return {"type": type(self).__name__, "states": out}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned, so a resumed run continues exactly."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"state of {state.get('type')} given to {type(self).__name__}")
        self._states = {
            k: {n: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for n, v in st.items()}
            for k, st in state["states"].items()
        }

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

    @staticmethod
    def _buffer(state: Dict[str, Any], name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A zero-initialised float32 state buffer, re-created if its size or device changed."""
        buf = state.get(name)
        if not isinstance(buf, torch.Tensor) or buf.numel() != numel or buf.device != like.device:
            buf = torch.zeros(numel, dtype=torch.float32, device=like.device)
            state[name] = buf
        return buf


class _HalfBase(Compressor):
    _bf16 = False

    def __init__(self, error_feedback: bool = False) -> None:
        super().__init__()
        self.error_feedback = error_feedback

    def __repr__(self) -> str:
        return f"{type(self).__name__}(error_feedback={self.error_feedback})"

    def wire_bytes(self, numel: int, world_size: int) -> int:
        if world_size <= 1 or numel == 0:
            return 0
        return 2 * (world_size - 1) * 2 * _chunk(numel, world_size, _ALIGN)

    def _native(self, tensor, state, world_size, rank, divisor):
        n = tensor.numel()
        chunk = _chunk(n, world_size, _ALIGN)
        ef = self.error_feedback
        return dict(codec="bf16" if self._bf16 else "fp16", bits=0, error_feedback=ef, chunk=chunk,
                    worker=self._buffer(state, "worker", n, tensor) if ef else None,
                    server=self._buffer(state, "server", chunk, tensor) if ef else None)

    def _reduce(self, tensor, state, world_size, rank, divisor):
        a = self._native(tensor, state, world_size, rank, divisor)  # the same state use as the C++ path
        n, chunk = tensor.numel(), a["chunk"]
        half = torch.bfloat16 if self._bf16 else torch.float16
        if tensor.dtype == half and not self.error_feedback:
            payload = tensor.new_zeros(world_size * chunk)
            payload[:n].copy_(tensor.reshape(-1))
        else:
            payload = _C.half_compress(_flat_float(tensor), a["worker"], world_size * chunk, self._bf16)
        recv = yield ("a2a", payload)
        mine = _C.half_server_reduce(recv, world_size, chunk, _owned(n, chunk, rank), divisor, a["server"])
        gathered = yield ("ag", mine)
        if tensor.dtype == half:
            tensor.copy_(gathered[:n].view(tensor.shape))
        else:
            out = _out_buffer(tensor)
            _C.half_decompress(gathered, out)
            _write_back(tensor, out)


class FP16(_HalfBase):
    """IEEE half-precision wire format; each chunk owner sums in float32 and rounds once.

    Args:
        error_feedback: keep the rounding errors (worker and server side) and add them
            back next step.
    """

    _bf16 = False


class BF16(_HalfBase):
    """bfloat16 wire format; each chunk owner sums in float32 and rounds once.

    Args:
        error_feedback: keep the rounding errors (worker and server side) and add them
            back next step.
    """

    _bf16 = True


class OneBit(Compressor):
    """Sign compression with a mean-|x| scale per chunk and error feedback on both sides,
    as in 1-bit Adam: worker error before sending, server error after the reduce step."""

    def __repr__(self) -> str:
        return "OneBit()"

    def wire_bytes(self, numel: int, world_size: int) -> int:
        if world_size <= 1 or numel == 0:
            return 0
        return 2 * (world_size - 1) * _C.one_bit_payload_bytes(_chunk(numel, world_size, _ALIGN))

    def _native(self, tensor, state, world_size, rank, divisor):
        n = tensor.numel()
        chunk = _chunk(n, world_size, _ALIGN)
        return dict(codec="onebit", bits=0, error_feedback=True, chunk=chunk,
                    worker=self._buffer(state, "worker", n, tensor),
                    server=self._buffer(state, "server", chunk, tensor))

    def _reduce(self, tensor, state, world_size, rank, divisor):
        a = self._native(tensor, state, world_size, rank, divisor)  # the same state use as the C++ path
        n, chunk = tensor.numel(), a["chunk"]
        payload = _C.one_bit_compress(_flat_float(tensor), a["worker"], chunk, world_size)
        recv = yield ("a2a", payload)
        mine = _C.one_bit_server_reduce(recv, world_size, chunk, _owned(n, chunk, rank), divisor, a["server"])
        gathered = yield ("ag", mine)
        out = _out_buffer(tensor)
        _C.one_bit_decompress(gathered, world_size, chunk, out)
        _write_back(tensor, out)


class QSGD(Compressor):
    """Stochastic quantisation to 8 or 4 bits with one float32 scale (max |x|) per block
    of 512 elements; unbiased. The random stream is a counter-based hash of (seed, step,
    rank, element index), identical on CPU and CUDA and restored by load_state_dict.

    Args:
        bits: 8 or 4.
        error_feedback: keep the quantisation errors (worker and server) for next step;
            without it the compressor is unbiased.
        seed: base seed of the rounding stream.
    """

    def __init__(self, bits: int = 8, error_feedback: bool = False, seed: int = 0) -> None:
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"QSGD bits must be 8 or 4, got {bits}")
        self.bits = bits
        self.error_feedback = error_feedback
        self.seed = seed

    def __repr__(self) -> str:
        return f"QSGD(bits={self.bits}, error_feedback={self.error_feedback})"

    def wire_bytes(self, numel: int, world_size: int) -> int:
        if world_size <= 1 or numel == 0:
            return 0
        chunk = _chunk(numel, world_size, _ALIGN)
        return 2 * (world_size - 1) * _C.qsgd_payload_bytes(chunk, self.bits)

    def _native(self, tensor, state, world_size, rank, divisor):
        n = tensor.numel()
        chunk = _chunk(n, world_size, _ALIGN)
        step = int(state.get("step", 0))
        state["step"] = step + 1
        ef = self.error_feedback
        return dict(codec="qsgd", bits=self.bits, error_feedback=ef, chunk=chunk,
                    worker=self._buffer(state, "worker", n, tensor) if ef else None,
                    server=self._buffer(state, "server", chunk, tensor) if ef else None,
                    worker_seed=_mix_seed(self.seed, step, rank, 0),
                    server_seed=_mix_seed(self.seed, step, rank, 1))

    def _reduce(self, tensor, state, world_size, rank, divisor):
        a = self._native(tensor, state, world_size, rank, divisor)  # the same state use as the C++ path
        n, chunk = tensor.numel(), a["chunk"]
        payload = _C.qsgd_compress(_flat_float(tensor), a["worker"], chunk, world_size, self.bits, a["worker_seed"])
        recv = yield ("a2a", payload)
        mine = _C.qsgd_server_reduce(recv, world_size, chunk, _owned(n, chunk, rank), divisor, a["server"],
                                     self.bits, a["server_seed"])
        gathered = yield ("ag", mine)
        out = _out_buffer(tensor)
        _C.qsgd_decompress(gathered, world_size, chunk, self.bits, out)
        _write_back(tensor, out)


class TopK(Compressor):
    """Keeps the ``ceil(ratio * numel)`` largest-magnitude entries of gradient + residual
    (the rest stays in the residual); values and int32 indices are all-gathered and every
    rank scatter-adds them in rank order, so different index sets sum correctly.

    Args:
        ratio: fraction of the entries sent, in (0, 1].
    """

    def __init__(self, ratio: float = 0.01) -> None:
        super().__init__()
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"TopK ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio

    def __repr__(self) -> str:
        return f"TopK(ratio={self.ratio})"

    def k(self, numel: int) -> int:
        """Entries sent for a tensor of ``numel`` elements."""
        return min(numel, max(1, math.ceil(self.ratio * numel)))

    def wire_bytes(self, numel: int, world_size: int) -> int:
        if world_size <= 1 or numel == 0:
            return 0
        return (world_size - 1) * 8 * self.k(numel)

    def _stages(self, tensor, key, world_size):
        return 1

    def _reduce(self, tensor, state, world_size, rank, divisor):
        n = tensor.numel()
        k = self.k(n)
        residual = self._buffer(state, "residual", n, tensor)
        payload = _C.topk_compress(_flat_float(tensor), residual, k)
        gathered = yield ("ag", payload)
        out = _out_buffer(tensor)
        _C.topk_decompress(gathered, world_size, k, out, divisor)
        _write_back(tensor, out)


class PowerSGD(Compressor):
    """Rank-r PowerSGD (Vogels et al. 2019): M ~ P Q^T with P = M Q all-reduced and
    orthogonalised (QR), Q = M^T P all-reduced; error feedback and warm-started Q.

    A tensor is viewed as ``shape[0] x rest`` (1-D tensors as a near-square zero-padded
    matrix). Tensors where ``(rows + cols) * rank * min_compression_rate >= rows * cols``,
    and every tensor during the first ``start_iter`` calls per key, are all-reduced
    uncompressed (float32, deterministic).

    Args:
        rank: the approximation rank r.
        start_iter: calls per key that run uncompressed before compression starts.
        min_compression_rate: the least compression worth the extra error.
        seed: seed of the initial Q (identical on every rank).
    """

    def __init__(self, rank: int = 4, start_iter: int = 0, min_compression_rate: float = 2,
                 seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
        self.rank = rank
        self.start_iter = start_iter
        self.min_compression_rate = min_compression_rate
        self.seed = seed

    def __repr__(self) -> str:
        return f"PowerSGD(rank={self.rank})"

    @staticmethod
    def _matrix_shape(shape: Tuple[int, ...], numel: int) -> Tuple[int, int]:
        if len(shape) >= 2 and shape[0] > 0:
            return shape[0], numel // shape[0]
        cols = max(1, math.isqrt(max(numel - 1, 0)) + 1) if numel > 1 else 1
        return -(-numel // cols), cols

    def _plan(self, shape: Tuple[int, ...], numel: int) -> Optional[Tuple[int, int, int]]:
        """(rows, cols, r) when compression pays, else None."""
        rows, cols = self._matrix_shape(shape, numel)
        r = min(self.rank, rows, cols)
        if (rows + cols) * r * self.min_compression_rate >= rows * cols:
            return None
        return rows, cols, r

    def wire_bytes(self, numel: int, world_size: int, shape: Optional[Tuple[int, ...]] = None) -> int:
        """As :meth:`Compressor.wire_bytes`, for a compressed step (after ``start_iter``);
        ``shape`` picks the matrix view (default: 1-D)."""
        if world_size <= 1 or numel == 0:
            return 0
        plan = self._plan(tuple(shape) if shape is not None else (numel,), numel)
        if plan is None:
            return ring_all_reduce_bytes(numel, world_size)
        rows, cols, r = plan
        return ring_all_reduce_bytes(rows * r, world_size) + ring_all_reduce_bytes(cols * r, world_size)

    def _compressing(self, tensor: torch.Tensor, state: Dict[str, Any]) -> Optional[Tuple[int, int, int]]:
        if int(state.get("step", 0)) < self.start_iter:
            return None
        return self._plan(tuple(tensor.shape), tensor.numel())

    def _stages(self, tensor, key, world_size):
        return 2 if self._compressing(tensor, self._state(key)) is None else 4

    def _reduce(self, tensor, state, world_size, rank, divisor):
        plan = self._compressing(tensor, state)
        state["step"] = int(state.get("step", 0)) + 1
        n = tensor.numel()
        if plan is None:
            result = yield from _float_all_reduce(_flat_float(tensor), world_size, rank, divisor)
            _write_back(tensor, result)
            return
        rows, cols, r = plan
        err = self._buffer(state, "error", rows * cols, tensor)
        m = err.view(rows, cols)
        m.view(-1)[:n].add_(_flat_float(tensor))  # M = gradient + error (error buffer reused)
        q = state.get("q")
        if not isinstance(q, torch.Tensor) or q.shape != (cols, r) or q.device != tensor.device:
            gen = torch.Generator().manual_seed(self.seed)
            q = torch.randn(cols, r, generator=gen, dtype=torch.float32).to(tensor.device)
            q = torch.linalg.qr(q).Q.contiguous()
        p = m @ q
        p = yield from _float_all_reduce(p, world_size, rank, 1)
        p = torch.linalg.qr(p.view(rows, r)).Q.contiguous()
        q_local = m.t() @ p
        m.sub_(p @ q_local.t())  # error feedback: what the local rank-r projection missed
        q = yield from _float_all_reduce(q_local, world_size, rank, divisor)
        q = q.view(cols, r).contiguous()
        state["q"] = q
        approx = (p @ q.t()).view(-1)
        _write_back(tensor, approx[:n])


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

    def _native(self, tensor, state, world_size, rank, divisor):
        return dict(codec="none", bits=0, error_feedback=False, chunk=_chunk(tensor.numel(), world_size, _ALIGN),
                    worker=None, server=None)

    def _reduce(self, tensor, state, world_size, rank, divisor):
        result = yield from _float_all_reduce(_flat_float(tensor), world_size, rank, divisor)
        _write_back(tensor, result)


_NONE = _Uncompressed()


# Momentum-aware compression and compressed-momentum optimizers (issue 15) live in their
# own modules; they are part of this namespace.
from pycomm.momentum import DEFAULT_WARMUP_STEPS, MomentumCorrection, for_training  # noqa: E402,F401
from pycomm.compressed_optim import OneBitAdam, OneBitSGD  # noqa: E402
