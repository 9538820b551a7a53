"""Thin collective API over torch.distributed that also accepts numpy and cupy arrays.

Each function converts its argument to a torch tensor without copying (DLPack /
``torch.from_numpy``), calls the matching ``torch.distributed`` collective (which runs
in pycomm's C++ backend when the group is a pycomm group), and writes results in
place, so a numpy array passed to :func:`all_reduce` holds the reduced values after
the call.
"""
from __future__ import annotations

from typing import Any, List, Optional, Union

import torch
import torch.distributed as dist

ArrayLike = Any  # torch.Tensor, numpy.ndarray, or any DLPack producer (cupy.ndarray)

_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.AVG,
    "mean": dist.ReduceOp.AVG,
    "product": dist.ReduceOp.PRODUCT,
    "prod": dist.ReduceOp.PRODUCT,
    "min": dist.ReduceOp.MIN,
    "max": dist.ReduceOp.MAX,
    "band": dist.ReduceOp.BAND,
    "bor": dist.ReduceOp.BOR,
    "bxor": dist.ReduceOp.BXOR,
}


def as_tensor(x: ArrayLike) -> torch.Tensor:
    """A torch view of `x` sharing its memory (tensor, numpy array or DLPack object)."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        import numpy as np

        if isinstance(x, np.ndarray):
            if not x.flags.writeable:
                raise ValueError("pycomm: the numpy array is read-only; collectives write in place")
            return torch.from_numpy(x)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if hasattr(x, "__dlpack__"):
        return torch.from_dlpack(x)
    raise TypeError(f"pycomm: expected a torch.Tensor, numpy.ndarray or DLPack array, got {type(x).__name__}")


def reduce_op(op: Union[str, dist.ReduceOp, Any]) -> Any:
    """Maps "sum"/"avg"/"product"/"min"/"max"/"band"/"bor"/"bxor" (or a ReduceOp) to a ReduceOp."""
    if isinstance(op, str):
        try:
            return _OPS[op.lower()]
        except KeyError:
            raise ValueError(f"pycomm: unknown reduce op {op!r}; expected one of {sorted(_OPS)}") from None
    return op


def all_reduce(x: ArrayLike, op: Union[str, Any] = "sum", group: Optional[dist.ProcessGroup] = None,
               async_op: bool = False, compression: Any = None, key: Any = None, out: Optional[ArrayLike] = None) -> Any:
    """Reduces `x` in place across `group` (or into `out`).

    With ``compression`` (a :mod:`pycomm.compression` compressor) the reduction goes
    through the compressor's fused kernels and error feedback (``op`` must be "avg"
    or "sum"); ``key`` names the compressor state to use (default: derived from the
    tensor's shape). Returns a Work (or Future with compression) if ``async_op``.

    With ``out`` (a tensor or array of `x`'s shape and dtype, on its device, not
    overlapping it) the result goes to ``out`` and `x` is left unchanged, as NCCL's
    ``ncclAllReduce(sendbuff, recvbuff)``; ranks may mix in-place and out-of-place calls.
    On a pycomm group with CPU tensors it is one native call whose shared-memory
    algorithms read `x` and write ``out`` with no copy between them; elsewhere (other
    backends, CUDA tensors, premultiplied-sum ops) `x` is copied into ``out`` and reduced
    there in place.
    """
    t = as_tensor(x)
    if out is not None:
        return _all_reduce_out(t, as_tensor(out), op, group, async_op, compression)
    if compression is not None:
        opname = op if isinstance(op, str) else {dist.ReduceOp.SUM: "sum", dist.ReduceOp.AVG: "avg"}.get(op)
        if opname not in ("sum", "avg", "mean"):
            raise ValueError("pycomm: compressed all_reduce supports op='sum' or 'avg' only")
        return compression.all_reduce(t, group=group, key=key, op="avg" if opname == "mean" else opname,
                                      async_op=async_op)
    return dist.all_reduce(t, op=reduce_op(op), group=group, async_op=async_op)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if `a` and `b` share bytes without being the same view."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return False

    def span(x: torch.Tensor):
        extent = 1 + sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride()))
        return x.data_ptr(), x.data_ptr() + extent * x.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _all_reduce_out(t: torch.Tensor, o: torch.Tensor, op: Any, group: Optional[dist.ProcessGroup],
                    async_op: bool, compression: Any) -> Any:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if compression is not None:
        raise ValueError(f"pycomm rank {rank}: all_reduce(out=...) takes no compression (compressed "
                         "all-reduces work in place)")
    if o.shape != t.shape or o.dtype != t.dtype or o.device != t.device:
        raise ValueError(f"pycomm rank {rank}: all_reduce out is {tuple(o.shape)} {o.dtype} on {o.device}, "
                         f"its input {tuple(t.shape)} {t.dtype} on {t.device}; they must match")
    if _overlap(o, t):
        raise ValueError(f"pycomm rank {rank}: all_reduce out overlaps its input; pass the same tensor for an "
                         "in-place call, or non-overlapping tensors")
    rop = reduce_op(op)
    try:
        code = int(rop)  # a plain op (RedOpType); a premultiplied sum has no integer form
    except (TypeError, ValueError):
        code = None
    if code is not None and t.device.type == "cpu":
        from pycomm import _backend

        try:
            be = _backend._pycomm_backend(group)
        except (ValueError, RuntimeError):
            be = None
        if be is not None:
            work = be.all_reduce_out(o, t, code, async_op)
            if async_op:
                return work
            work.wait()
            return None
    if o.data_ptr() != t.data_ptr():
        o.copy_(t)
    return dist.all_reduce(o, op=rop, group=group, async_op=async_op)


def broadcast(x: ArrayLike, src: int = 0, group: Optional[dist.ProcessGroup] = None, async_op: bool = False) -> Any:
    """Copies `x` from global rank `src` to every rank of `group`, in place."""
    return dist.broadcast(as_tensor(x), src=src, group=group, async_op=async_op)


def reduce(x: ArrayLike, dst: int = 0, op: Union[str, Any] = "sum", group: Optional[dist.ProcessGroup] = None,
           async_op: bool = False) -> Any:
    """Reduces `x` onto global rank `dst` (other ranks' `x` is unchanged)."""
    return dist.reduce(as_tensor(x), dst=dst, op=reduce_op(op), group=group, async_op=async_op)


def all_gather(output: ArrayLike, x: ArrayLike, group: Optional[dist.ProcessGroup] = None,
               async_op: bool = False) -> Any:
    """Gathers every rank's `x` into `output` (world_size × x.numel() elements, rank order)."""
    return dist.all_gather_into_tensor(as_tensor(output), as_tensor(x), group=group, async_op=async_op)


def reduce_scatter(output: ArrayLike, x: ArrayLike, op: Union[str, Any] = "sum",
                   group: Optional[dist.ProcessGroup] = None, async_op: bool = False) -> Any:
    """`output` = this rank's block of the element-wise reduction of every rank's `x`."""
    return dist.reduce_scatter_tensor(as_tensor(output), as_tensor(x), op=reduce_op(op), group=group,
                                      async_op=async_op)


def all_to_all(output: ArrayLike, x: ArrayLike, output_split_sizes: Optional[List[int]] = None,
               input_split_sizes: Optional[List[int]] = None, group: Optional[dist.ProcessGroup] = None,
               async_op: bool = False) -> Any:
    """Block p of `x` (along dim 0) goes to rank p; block q of `output` comes from rank q."""
    return dist.all_to_all_single(as_tensor(output), as_tensor(x), output_split_sizes, input_split_sizes,
                                  group=group, async_op=async_op)


def send(x: ArrayLike, dst: int, group: Optional[dist.ProcessGroup] = None, tag: int = 0) -> None:
    """Sends `x` to global rank `dst` (blocks until it was received)."""
    dist.send(as_tensor(x), dst=dst, group=group, tag=tag)


def recv(x: ArrayLike, src: int, group: Optional[dist.ProcessGroup] = None, tag: int = 0) -> None:
    """Receives into `x` from global rank `src`."""
    dist.recv(as_tensor(x), src=src, group=group, tag=tag)


def barrier(group: Optional[dist.ProcessGroup] = None) -> None:
    """Returns once every rank of `group` has entered the barrier."""
    dist.barrier(group=group)
