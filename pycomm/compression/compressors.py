"""The catalogue of compressors: FP16, BF16, OneBit, QSGD, TopK, PowerSGD.

Each says what goes on the wire (its ``_reduce`` generator and, where the C++ exchange
has a codec, its ``_native`` arguments) and how many bytes that is; issuing the
collectives, scheduling and per-key state live in :mod:`pycomm.compression.engine`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Hashable, List, Optional, Tuple

import torch

from pycomm import _C
from pycomm.compression.engine import (_ALIGN, Compressor, _chunk, _flat_float, _float_all_reduce, _mix_seed,
                                       _out_buffer, _owned, _write_back, ring_all_reduce_bytes)


def _scope_repr(comp: Compressor) -> str:
    return "" if comp.scope == "auto" else f", scope={comp.scope!r}"


class _HalfBase(Compressor):
    _bf16 = False

    def __init__(self, error_feedback: bool = False, scope: str = "auto") -> None:
        super().__init__(scope)
        self.error_feedback = error_feedback

    def __repr__(self) -> str:
        return f"{type(self).__name__}(error_feedback={self.error_feedback}{_scope_repr(self)})"

    def _codec_name(self):
        return ("bf16" if self._bf16 else "fp16", 0)

    def _codec(self, state, rank):
        return dict(codec=self._codec_name()[0], bits=0, error_feedback=self.error_feedback)

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
        scope: where to compress on a group spanning several hosts: "auto" (default),
            "cross_host" or "all" (see :meth:`Compressor.route`).
    """

    _bf16 = False


class BF16(_HalfBase):
    """bfloat16 wire format; each chunk owner sums in float32 and rounds once.

    Args:
        error_feedback: keep the rounding errors (worker and server side) and add them
            back next step.
        scope: where to compress on a group spanning several hosts: "auto" (default),
            "cross_host" or "all" (see :meth:`Compressor.route`).
    """

    _bf16 = True


class OneBit(Compressor):
    """Sign compression with a mean-|x| scale per chunk and error feedback on both sides,
    as in 1-bit Adam: worker error before sending, server error after the reduce step.

    Args:
        scope: where to compress on a group spanning several hosts: "auto" (default:
            the cross-host hop only where the group has several hosts with several ranks
            on some), "cross_host" or "all" (see :meth:`Compressor.route`).
        error_feedback: keep the worker and server errors for the next call (default).
            ``False``: each call is a plain scaled sign of what it is given (the error
            buffers are zeroed before every call; same bytes) -- for a caller that feeds
            the error back itself (``MomentumCorrection(delta=...)`` zeroes them itself).
    """

    def __init__(self, scope: str = "auto", error_feedback: bool = True) -> None:
        super().__init__(scope)
        self.error_feedback = bool(error_feedback)

    def __repr__(self) -> str:
        ef = "" if self.error_feedback else "error_feedback=False"
        sc = _scope_repr(self)[2:]
        return f"OneBit({', '.join(x for x in (sc, ef) if x)})"

    def _codec_name(self):
        return ("onebit", 0)

    def _errors_reset(self) -> bool:
        return not self.error_feedback

    def _codec(self, state, rank):
        return dict(codec="onebit", bits=0, error_feedback=True)

    def wire_bytes(self, numel: int, world_size: int) -> int:
        if world_size <= 1 or numel == 0:
            return 0
        return 2 * (world_size - 1) * _C.one_bit_payload_bytes(_chunk(numel, world_size, _ALIGN))

    def _native(self, tensor, state, world_size, rank, divisor):
        n = tensor.numel()
        chunk = _chunk(n, world_size, _ALIGN)
        worker = self._buffer(state, "worker", n, tensor)
        server = self._buffer(state, "server", chunk, tensor)
        if self._errors_reset():
            # The kernels always write their error into these; zeroed, none carries over.
            worker.zero_()
            server.zero_()
        return dict(codec="onebit", bits=0, error_feedback=True, chunk=chunk, worker=worker, server=server)

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
        scope: where to compress on a group spanning several hosts: "auto" (default),
            "cross_host" or "all" (see :meth:`Compressor.route`).
    """

    def __init__(self, bits: int = 8, error_feedback: bool = False, seed: int = 0, scope: str = "auto") -> None:
        super().__init__(scope)
        if bits not in (8, 4):
            raise ValueError(f"QSGD bits must be 8 or 4, got {bits}")
        self.bits = bits
        self.error_feedback = error_feedback
        self.seed = seed

    def __repr__(self) -> str:
        return f"QSGD(bits={self.bits}, error_feedback={self.error_feedback}{_scope_repr(self)})"

    def _codec_name(self):
        return ("qsgd", self.bits)

    def _codec(self, state, rank):
        step = int(state.get("step", 0))
        state["step"] = step + 1
        return dict(codec="qsgd", bits=self.bits, error_feedback=self.error_feedback,
                    worker_seed=_mix_seed(self.seed, step, rank, 0), server_seed=_mix_seed(self.seed, step, rank, 1))

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
    """Rank-r PowerSGD (Vogels et al. 2019), per parameter as torch's ``powerSGD_hook``:
    every matrix-shaped parameter of the flat tensor (a DataParallel / DDP bucket, whose
    layout they pass through :meth:`set_layout`), viewed as ``shape[0] x rest``, gets its
    own M ~ P Q^T: P = M Q all-reduced and orthogonalised (QR), Q = M^T P all-reduced and
    kept for the next call (warm start), M = gradient + error feedback. Vectors, small
    matrices (``(rows + cols) * r * min_compression_rate >= rows * cols``) and gaps of the
    layout travel exactly, in the same all-reduce as the P's. The per-matrix arithmetic
    runs in C++ (``pycomm._C.powersgd_*``, on ATen) with the GIL released.

    Without a layout the tensor is one matrix: its own ``shape[0] x rest`` view, a 1-D
    tensor the largest near-square ``rows x cols`` prefix (the rest exact). During the
    first ``start_iter`` calls per key, or when nothing is worth compressing, the tensor
    is all-reduced uncompressed (float32, deterministic).

    Args:
        rank: the approximation rank r.
        start_iter: calls per key that run uncompressed before compression starts.
        min_compression_rate: the least compression worth the extra error.
        seed: seed of the initial Q's (identical on every rank).
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

    def _plan(self, shape: Tuple[int, ...], numel: int) -> Optional[Tuple[int, int, int]]:
        """(rows, cols, r) of a parameter of this shape when compressing it pays, else None."""
        if len(shape) < 2 or numel == 0 or shape[0] <= 0:
            return None
        rows, cols = shape[0], numel // shape[0]
        r = min(self.rank, rows, cols)
        if (rows + cols) * r * self.min_compression_rate >= rows * cols:
            return None
        return rows, cols, r

    def _matrices(self, key: Hashable, shape: Tuple[int, ...], numel: int) -> Tuple[List[int], ...]:
        """The layout handed to the C++ steps: (offsets, rows, cols, ranks) of the matrices
        compressed in a tensor of ``shape`` under ``key`` (lists of equal length, maybe empty)."""
        layout = self._layouts.get(key)
        if layout is None:
            if len(shape) >= 2:
                layout = [(tuple(shape), 0)]
            else:  # a flat tensor with no layout: its largest near-square prefix
                cols = math.isqrt(max(numel - 1, 0)) + 1
                layout = [((numel // cols, cols), 0)] if numel // cols >= 1 else []
        offs: List[int] = []
        rows: List[int] = []
        cols_: List[int] = []
        ranks: List[int] = []
        end = 0
        for shp, off in sorted(layout, key=lambda e: e[1]):
            size = math.prod(shp)
            if off < end or off + size > numel:
                raise ValueError(f"PowerSGD: the layout of key {key!r} does not fit its tensor of {numel} elements "
                                 f"(a parameter of shape {tuple(shp)} at offset {off})")
            end = off + size
            plan = self._plan(tuple(shp), size)
            if plan is not None:
                offs.append(off)
                rows.append(plan[0])
                cols_.append(plan[1])
                ranks.append(plan[2])
        return offs, rows, cols_, ranks

    def wire_bytes(self, numel: int, world_size: int, shape: Optional[Tuple[int, ...]] = None,
                   key: Optional[Hashable] = None) -> int:
        """As :meth:`Compressor.wire_bytes`, for a compressed call (after ``start_iter``)
        of the tensor under ``key`` (its layout) or of ``shape`` (default: 1-D)."""
        if world_size <= 1 or numel == 0:
            return 0
        mats = self._matrices(key, tuple(shape) if shape is not None else (numel,), numel)
        if not mats[0]:
            return ring_all_reduce_bytes(numel, world_size)
        exact, p, q = _C.powersgd_payload_sizes(numel, *mats)
        return ring_all_reduce_bytes(exact + p, world_size) + ring_all_reduce_bytes(q, world_size)

    def _compressing(self, tensor: torch.Tensor, state: Dict[str, Any]) -> Optional[Tuple[List[int], ...]]:
        if int(state.get("step", 0)) < self.start_iter:
            return None
        mats = self._matrices(state.get("key"), tuple(tensor.shape), tensor.numel())
        return mats if mats[0] else None

    def _state(self, key: Hashable) -> Dict[str, Any]:
        st = super()._state(key)
        st["key"] = key  # which layout _reduce uses (the state may be reset or restored)
        return st

    def _stages(self, tensor, key, world_size):
        return 2 if self._compressing(tensor, self._state(key)) is None else 4

    def _initial_q(self, mats: Tuple[List[int], ...], device: torch.device) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        qs = [torch.linalg.qr(torch.randn(c, r, generator=gen, dtype=torch.float32)).Q.reshape(-1)
              for c, r in zip(mats[2], mats[3])]
        return torch.cat(qs).to(device)

    def _reduce(self, tensor, state, world_size, rank, divisor):
        mats = self._compressing(tensor, state)
        state["step"] = int(state.get("step", 0)) + 1
        n = tensor.numel()
        x = _flat_float(tensor)
        if mats is None:
            result = yield from _float_all_reduce(x, world_size, rank, divisor)
            _write_back(tensor, result)
            return
        qcount = sum(c * r for c, r in zip(mats[2], mats[3]))
        err = self._buffer(state, "error", n, tensor)
        q = state.get("q")
        if not isinstance(q, torch.Tensor) or q.dim() != 1 or q.numel() != qcount or q.device != tensor.device:
            q = self._initial_q(mats, tensor.device)
        payload = _C.powersgd_compress(x, err, q, *mats)  # [exact ranges | P_i = M_i Q_i]
        payload = yield from _float_all_reduce(payload, world_size, rank, divisor)
        payload = payload.contiguous()
        q_local = _C.powersgd_project(err, payload, *mats)  # P_i orthonormalised; error feedback
        q = yield from _float_all_reduce(q_local, world_size, rank, divisor)
        state["q"] = q = q.contiguous()
        out = _out_buffer(tensor)
        _C.powersgd_decompress(out, payload, q, *mats)
        _write_back(tensor, out)
