"""Running one case on a process group: warm-up, timed iterations, the check, the maxima.

Timing maxima and #wrong sums go over a separate Gloo group (``side``), never over the
backend being measured.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from pycomm.bench.columns import DTYPES, bandwidths
from pycomm.bench.reference import is_int, count_wrong, rank_values, reference


@dataclass
class Case:
    collective: str
    dtype_name: str
    op: str
    count: int
    size: int
    root: int = 0


def _torch_op(op: str):
    import torch.distributed as dist

    return {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "prod": dist.ReduceOp.PRODUCT,
            "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]


@dataclass
class GroupRunner:
    """Runs collectives on one process group; emulates AVG (sum + divide) where the backend
    refuses it, and remembers that it did."""

    group: Any
    name: str
    rank: int
    nranks: int
    avg_emulated: Dict[str, bool] = field(default_factory=dict)
    device: Any = None  #: torch.device of the buffers (None: CPU)

    def _reduce(self, call: Callable[[Any], None], out, op: str, dtype_name: str, root_only: bool = True) -> None:
        """Runs `call(op)`; for AVG on a backend without it: SUM, then divide (on the ranks
        holding the result: `root_only` False for reduce's non-roots)."""
        import torch

        if op != "avg":
            call(_torch_op(op))
            return
        if not self.avg_emulated.get(dtype_name, False):
            try:
                call(_torch_op("avg"))
                return
            except (RuntimeError, ValueError, TypeError):
                # e.g. Gloo: integer AVG unsupported. Every rank hits the same refusal before
                # any data moves, so all ranks switch to the emulation together.
                self.avg_emulated[dtype_name] = True
        call(_torch_op("sum"))
        if not root_only:
            return
        if is_int(dtype_name):
            out.copy_(torch.div(out, self.nranks, rounding_mode="trunc"))
        else:
            out.div_(self.nranks)

    def _native_out_of_place(self) -> bool:
        """True if the group is a pycomm group on CPU: out-of-place all_reduce is then
        ``pycomm.all_reduce(x, out=y)``, one native call; on other backends (torch has no
        out-of-place all_reduce) it is a copy into the output and an in-place call."""
        if self.device is not None and getattr(self.device, "type", "cpu") != "cpu":
            return False
        from pycomm import _backend

        return _backend.is_pycomm_group(self.group)

    def make(self, case: Case, inplace: bool):
        """Returns (fn, input, output, fill) for one mode, or None if the mode does not exist."""
        import torch
        import torch.distributed as dist

        dt = getattr(torch, DTYPES[case.dtype_name])
        n, r, c, g = self.nranks, self.rank, case.count, self.group
        coll, op = case.collective, case.op
        rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

        if coll == "all_reduce":
            inp = torch.empty(c, dtype=dt, device=self.device)
            out = inp if inplace else torch.empty(c, dtype=dt, device=self.device)
            if inplace and op != "avg":
                top = _torch_op(op)

                def fn():  # the bare call, as a user's loop makes it (no harness work per call)
                    dist.all_reduce(out, op=top, group=g)
            elif inplace:
                def fn():
                    self._reduce(lambda o: dist.all_reduce(out, op=o, group=g), out, op, case.dtype_name)
            elif self._native_out_of_place():
                import pycomm

                def fn():  # pycomm's own out-of-place call (as nccl-tests' sendbuff != recvbuff)
                    self._reduce(lambda o: pycomm.all_reduce(inp, op=o, group=g, out=out), out, op, case.dtype_name)
            else:
                def fn():  # torch's all_reduce is in-place: out-of-place = copy + all_reduce
                    out.copy_(inp)
                    self._reduce(lambda o: dist.all_reduce(out, op=o, group=g), out, op, case.dtype_name)
        elif coll == "reduce_scatter":
            inp = torch.empty(c * n, dtype=dt, device=self.device)
            out = inp[r * c:(r + 1) * c] if inplace else torch.empty(c, dtype=dt, device=self.device)

            def fn():
                self._reduce(lambda o: rs(out, inp, op=o, group=g), out, op, case.dtype_name)

        elif coll == "all_gather":
            out = torch.empty(c * n, dtype=dt, device=self.device)
            inp = out[r * c:(r + 1) * c] if inplace else torch.empty(c, dtype=dt, device=self.device)

            def fn():
                ag(out, inp, group=g)

        elif coll == "broadcast":
            inp = torch.empty(c, dtype=dt, device=self.device)
            # Out-of-place: the root sends from its input buffer, the others receive into a
            # separate output buffer (the root's own output copy is not timed).
            out = inp if (inplace or r == case.root) else torch.empty(c, dtype=dt, device=self.device)
            root = dist.get_global_rank(g, case.root) if g is not None else case.root

            def fn():
                dist.broadcast(out, src=root, group=g)

        elif coll == "reduce":
            inp = torch.empty(c, dtype=dt, device=self.device)
            out = inp if inplace else torch.empty(c, dtype=dt, device=self.device)
            root = dist.get_global_rank(g, case.root) if g is not None else case.root

            def run(o):
                dist.reduce(out, dst=root, op=o, group=g)

            if inplace:
                def fn():
                    self._reduce(run, out, op, case.dtype_name, root_only=r == case.root)
            else:
                def fn():  # torch's reduce is in-place: out-of-place = copy + reduce
                    out.copy_(inp)
                    self._reduce(run, out, op, case.dtype_name, root_only=r == case.root)

        elif coll == "all_to_all":
            if inplace:
                return None  # no in-place all_to_all in torch.distributed
            inp = torch.empty(c * n, dtype=dt, device=self.device)
            out = torch.empty(c * n, dtype=dt, device=self.device)

            def fn():
                dist.all_to_all_single(out, inp, group=g)

        else:
            raise ValueError(coll)

        def fill():
            if out.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr():
                out.zero_()  # a stale result from the previous mode must not pass the check
            inp.copy_(rank_values(r, n, 0, inp.numel(), case.dtype_name, op).to(dt))

        if self.device is not None and self.device.type == "cuda":
            call = fn

            def fn():  # a call is timed until its result is on the device
                call()
                torch.cuda.synchronize(self.device)

        return fn, inp, out, fill


def _side_max(value: float, side) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=side)
    return float(t.item())


def _side_sum(value: int, side) -> int:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=side)
    return int(t.item())


def percentile(sorted_values, q: float) -> float:
    """The q-th percentile (0..100) of an ascending list, nearest rank (p99 of 20 values is the largest)."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def _timed_loop(fn, iters: int, side):
    """Runs `fn` `iters` times, each call timed. Returns (mean seconds per call, p50, p99):
    the mean is the whole loop's time / iters, maximum over ranks (nccl-tests' time); the
    percentiles are over the calls, each call's time being the slowest rank's."""
    import torch
    import torch.distributed as dist

    n = max(1, iters)
    each = [0.0] * n
    clock = time.perf_counter
    t0 = clock()
    for i in range(n):
        a = clock()
        fn()
        each[i] = clock() - a
    total = (clock() - t0) / n
    t = torch.tensor(each + [total], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=side)
    vals = t.tolist()
    per_call = sorted(vals[:n])
    return vals[n], percentile(per_call, 50), percentile(per_call, 99)


def time_mode(runner: GroupRunner, case: Case, inplace: bool, iters: int, warmup: int, check: bool,
              side) -> Optional[dict]:
    """Times one mode: warm-up, `iters` timed calls, max over ranks; then (check) one call on
    fresh inputs compared with the reference. Returns None if the mode does not exist."""
    import torch.distributed as dist

    made = runner.make(case, inplace)
    if made is None:
        return None
    fn, _inp, out, fill = made
    fill()
    for _ in range(warmup):
        fn()
    dist.barrier(group=side)  # start the timed loop together so the max over ranks is fair
    seconds, p50, p99 = _timed_loop(fn, iters, side)
    wrong = None
    if check:
        fill()
        fn()
        local = count_wrong(out.cpu(), case.collective, case.op, case.dtype_name, runner.rank, runner.nranks,
                            case.count, case.root)
        wrong = _side_sum(local, side)
    algbw, busbw = bandwidths(case.collective, case.size, seconds, runner.nranks)
    return {"time_us": seconds * 1e6, "p50_us": p50 * 1e6, "p99_us": p99 * 1e6, "algbw": algbw, "busbw": busbw,
            "wrong": wrong}


def time_compressed(comp, group, case: Case, iters: int, warmup: int, check: bool, side, rank: int,
                    nranks: int, device=None) -> dict:
    """Times ``comp.all_reduce`` (average) on a float tensor of case.count elements."""
    import torch
    import torch.distributed as dist

    dt = getattr(torch, DTYPES[case.dtype_name])
    buf = torch.empty(case.count, dtype=dt, device=device)
    cuda = device is not None and device.type == "cuda"
    key = f"pycomm-bench-{case.size}"
    op = "sum" if case.op == "sum" else "avg"

    def fill():
        buf.copy_(rank_values(rank, nranks, 0, case.count, case.dtype_name, "sum").to(dt))

    def call(k=key):
        res = comp.all_reduce(buf, group=group, key=k, op=op)
        if cuda:
            torch.cuda.synchronize(device)
        return buf if res is None else res

    fill()
    for _ in range(warmup):
        call()
    dist.barrier(group=side)
    seconds, p50, p99 = _timed_loop(call, iters, side)
    relerr = None
    if check:
        fill()  # a fresh key: no error-feedback residual left over from the timed calls
        res = call(key + "-check").reshape(-1).cpu().to(torch.float64)
        ref = reference("all_reduce", op, case.dtype_name, rank, nranks, case.count, 0, case.count)
        local = float(torch.linalg.vector_norm(res - ref) / max(float(torch.linalg.vector_norm(ref)), 1e-30))
        relerr = _side_max(local, side)
    algbw, busbw = bandwidths("all_reduce", case.size, seconds, nranks)
    wire = None
    try:
        wire = int(comp.wire_bytes(case.count, nranks))
    except Exception:  # noqa: BLE001 - optional information
        pass
    return {"time_us": seconds * 1e6, "p50_us": p50 * 1e6, "p99_us": p99 * 1e6, "algbw": algbw, "busbw": busbw,
            "wrong": None, "relerr": relerr,
            "wire_bytes": wire}

