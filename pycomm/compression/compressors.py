"""The catalogue of compressors: FP16, BF16, OneBit, QSGD, TopK, PowerSGD.

Each says what goes on the wire (its ``_reduce`` generator and, where the C++ exchange
has a codec, its ``_native`` arguments) and how many bytes that is; issuing the
collectives, scheduling and per-key state live in :mod:`pycomm.compression.engine`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from pycomm import _C
from pycomm.compression.engine import (_ALIGN, Compressor, _chunk, _flat_float, _float_all_reduce, _mix_seed,
                                       _out_buffer, _owned, _write_back, ring_all_reduce_bytes)


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
