"""pycomm-bench: collective microbenchmarks in the nccl-tests convention.

    pycomm-bench all_reduce -b 8 -e 64M -f 2 --ranks 4            # 4 local ranks, pycomm backend
    pycomm-bench all_gather -b 1K -e 16M --backend gloo --ranks 2
    pycomm-bench all_reduce --compare gloo --csv out.csv --json out.json --plot out.png
    pycomm-bench all_reduce --compression onebit -e 32M --compare gloo
    pycomm-bench all_reduce --hosts 2 --ranks 4 --link 1gbit --latency 100us   # emulated cluster
    torchrun --nproc-per-node 4 -m pycomm.bench all_reduce                       # one rank per process

Columns (as nccl-tests): size(B) count type redop root, then for out-of-place and in-place
time(us) algbw(GB/s) busbw(GB/s) #wrong. ``size`` is the whole array: the all_reduce /
broadcast buffer, the reduce_scatter input, the all_gather output, the all_to_all send
buffer; ``count`` is the element count each rank passes to the call (the per-rank block
for reduce_scatter / all_gather / all_to_all). algbw = size / time; busbw = algbw x
2(n-1)/n (all_reduce), (n-1)/n (reduce_scatter, all_gather, all_to_all), 1 (broadcast).
time is the per-iteration average on each rank, maximum over ranks.

With ``-c 1`` every rank's inputs are deterministic functions of (rank, index) whose
results are exact in the dtype, and every result element is compared with a float64
reference the bench computes from those known inputs; #wrong sums the mismatches over
ranks. See docs/BENCHMARKING.md.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and sys.path[0] and \
        os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    # Run as a script (python pycomm/bench.py): don't let pycomm/*.py shadow top-level modules.
    sys.path.pop(0)

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

__all__ = [
    "main",
    "parse_size",
    "sweep_sizes",
    "bus_factor",
    "bandwidths",
    "format_row",
    "COLLECTIVES",
    "DTYPES",
    "OPS",
    "COMPRESSORS",
]

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all")
_COLL_ALIASES = {c.replace("_", ""): c for c in COLLECTIVES}
_COLL_ALIASES.update({c + "_perf": c for c in COLLECTIVES})
_COLL_ALIASES.update({"alltoall": "all_to_all", "alltoall_perf": "all_to_all"})
REDUCING = ("all_reduce", "reduce_scatter", "reduce")

#: nccl-tests dtype names -> torch dtype attribute names.
DTYPES = {
    "float": "float32", "double": "float64", "half": "float16", "bfloat16": "bfloat16",
    "int32": "int32", "int64": "int64", "int8": "int8", "uint8": "uint8",
}
_DTYPE_ALIASES = {"float32": "float", "fp32": "float", "float64": "double", "fp64": "double",
                  "float16": "half", "fp16": "half", "bf16": "bfloat16", "int": "int32",
                  "long": "int64", "char": "int8", "byte": "uint8"}
OPS = ("sum", "avg", "prod", "min", "max")
COMPRESSORS = {"onebit": "OneBit", "fp16": "FP16", "bf16": "BF16", "topk": "TopK",
               "qsgd": "QSGD", "powersgd": "PowerSGD"}

_CHECK_CHUNK = 1 << 20  # elements verified at a time (bounds the reference's memory)


# ----------------------------------------------------------------------------------------
# Pure helpers (unit-tested without processes)
# ----------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'8' -> 8, '1K' -> 1024, '64M' -> 67108864, '1G' -> 2**30 (K/M/G are powers of 1024;
    an optional trailing 'B' / 'iB' is accepted)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"bad size {text!r}: expected e.g. 8, 1K, 64M, 1G")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def sweep_sizes(begin: int, end: int, factor: int) -> List[int]:
    """nccl-tests -b/-e/-f: begin, begin*f, ... up to and including end."""
    if begin <= 0 or end < begin:
        raise ValueError(f"need 0 < -b <= -e, got -b {begin} -e {end}")
    if factor < 2:
        raise ValueError(f"-f must be >= 2, got {factor}")
    sizes, s = [], begin
    while s <= end:
        sizes.append(s)
        s *= factor
    return sizes


def bus_factor(collective: str, nranks: int) -> float:
    """busbw / algbw, from nccl-tests doc/PERFORMANCE.md."""
    n = nranks
    if collective == "all_reduce":
        return 2.0 * (n - 1) / n
    if collective in ("reduce_scatter", "all_gather", "all_to_all"):
        return (n - 1) / n
    if collective in ("broadcast", "reduce"):
        return 1.0
    raise ValueError(f"unknown collective {collective!r}")


def bandwidths(collective: str, size_bytes: int, seconds: float, nranks: int) -> Tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes/s) for `size_bytes` (whole array) moved in `seconds`."""
    if seconds <= 0:
        return 0.0, 0.0
    algbw = size_bytes / 1e9 / seconds
    return algbw, algbw * bus_factor(collective, nranks)


def counts_for(collective: str, size_bytes: int, elem_size: int, nranks: int) -> Tuple[int, int]:
    """(count passed per rank, actual whole-array size in bytes) for a requested size."""
    total = size_bytes // elem_size
    if collective in ("reduce_scatter", "all_gather", "all_to_all"):
        count = total // nranks
        return count, count * nranks * elem_size
    return total, total * elem_size


def _fmt_time(us: float) -> str:
    if us >= 10000.0:
        return f"{us:7.0f}"
    if us >= 100.0:
        return f"{us:7.1f}"
    return f"{us:7.2f}"


def _fmt_mode(m: Optional[dict]) -> str:
    if m is None:
        return f"  {'N/A':>7}  {'N/A':>6}  {'N/A':>6}  {'N/A':>6}"
    wrong = "N/A" if m.get("wrong") is None else str(m["wrong"])
    return f"  {_fmt_time(m['time_us'])}  {m['algbw']:6.2f}  {m['busbw']:6.2f}  {wrong:>6}"


def header_lines(compare: Optional[str] = None) -> List[str]:
    """The nccl-tests column header (three lines), with the --compare columns appended."""
    l1 = "#" + " " * 62 + "out-of-place" + " " * 23 + "in-place"
    l2 = (f"#{'size':>11}  {'count':>12}  {'type':>8}  {'redop':>6}  {'root':>6}"
          + f"  {'time':>7}  {'algbw':>6}  {'busbw':>6}  {'#wrong':>6}" * 2)
    l3 = (f"#{'(B)':>11}  {'(elements)':>12}  {'':>8}  {'':>6}  {'':>6}"
          + f"  {'(us)':>7}  {'(GB/s)':>6}  {'(GB/s)':>6}  {'':>6}" * 2)
    if compare:
        l1 += " " * 20 + f"{compare} out-of-place"
        l2 += f"  {'time':>7}  {'busbw':>6}  {'#wrong':>6}  {'ratio':>6}"
        l3 += f"  {'(us)':>7}  {'(GB/s)':>6}  {'':>6}  {'':>6}"
    return [l1, l2, l3]


def format_row(row: dict) -> str:
    """One result line in nccl-tests layout (plus the --compare columns if present)."""
    s = (f"{row['size']:12d}  {row['count']:12d}  {row['type']:>8}  {row['redop']:>6}  {row['root']:6d}"
         + _fmt_mode(row.get("oop")) + _fmt_mode(row.get("ip")))
    if "cmp" in row:
        c = row["cmp"]
        wrong = "N/A" if c.get("wrong") is None else str(c["wrong"])
        ratio = "N/A" if row.get("ratio") is None else f"{row['ratio']:6.2f}"
        s += f"  {_fmt_time(c['time_us'])}  {c['busbw']:6.2f}  {wrong:>6}  {ratio:>6}"
    return s


def avg_busbw(rows: Sequence[dict], key: str = "primary") -> float:
    """Mean busbw over every measured value (out-of-place and in-place), as nccl-tests."""
    vals = []
    for r in rows:
        if key == "primary":
            vals += [r[m]["busbw"] for m in ("oop", "ip") if r.get(m)]
        elif r.get("cmp"):
            vals.append(r["cmp"]["busbw"])
    return sum(vals) / len(vals) if vals else 0.0


# ----------------------------------------------------------------------------------------
# Deterministic data and the float64 reference
# ----------------------------------------------------------------------------------------

_EXACT_LIMIT = {"half": 2048, "bfloat16": 256, "int8": 127, "uint8": 255}


def _is_int(dtype_name: str) -> bool:
    return dtype_name in ("int32", "int64", "int8", "uint8")


def _value_bound(dtype_name: str, op: str, nranks: int) -> int:
    """Largest |value| such that a sum over nranks stays exact in the dtype."""
    if op in ("sum", "avg"):
        return max(1, min(8, _EXACT_LIMIT.get(dtype_name, 1 << 20) // max(1, nranks)))
    return 15


def rank_values(rank: int, nranks: int, start: int, count: int, dtype_name: str, op: str):
    """float64 values of `rank`'s input at indices [start, start+count); exact in the dtype."""
    import torch

    idx = torch.arange(start, start + count, dtype=torch.int64)
    unsigned = dtype_name == "uint8"
    if op == "prod":
        v = torch.ones(count, dtype=torch.float64)
        v[(idx % nranks) == rank] = 2.0  # exactly one rank holds a 2 per element: |product| <= 2
        if not unsigned:
            v[((idx * 3 + rank) % 7) == 0] *= -1.0
        return v
    b = _value_bound(dtype_name, op, nranks)
    period = 2 * b + 1
    v = ((idx * 7 + rank * 13) % period).to(torch.float64)
    return v if unsigned else v - b


def reference(collective: str, op: str, dtype_name: str, rank: int, nranks: int, count: int,
              start: int, length: int, root: int = 0):
    """float64 expected output of `rank` at output indices [start, start+length)."""
    import torch

    if collective == "broadcast":
        return rank_values(root, nranks, start, length, dtype_name, op)
    if collective == "all_gather":
        out = torch.empty(length, dtype=torch.float64)
        pos = 0
        while pos < length:  # output block j = rank j's input
            j, k = divmod(start + pos, count)
            take = min(length - pos, count - k)
            out[pos:pos + take] = rank_values(j, nranks, k, take, dtype_name, op)
            pos += take
        return out
    if collective == "all_to_all":
        out = torch.empty(length, dtype=torch.float64)
        pos = 0
        while pos < length:  # output block j = block `rank` of rank j's input
            j, k = divmod(start + pos, count)
            take = min(length - pos, count - k)
            out[pos:pos + take] = rank_values(j, nranks, rank * count + k, take, dtype_name, op)
            pos += take
        return out
    # Reductions: all_reduce and reduce (root) over [start, ...), reduce_scatter over this
    # rank's block.
    base = rank * count + start if collective == "reduce_scatter" else start
    acc = rank_values(0, nranks, base, length, dtype_name, op)
    for j in range(1, nranks):
        v = rank_values(j, nranks, base, length, dtype_name, op)
        if op in ("sum", "avg"):
            acc += v
        elif op == "prod":
            acc *= v
        elif op == "min":
            acc = torch.minimum(acc, v)
        else:
            acc = torch.maximum(acc, v)
    if op == "avg":
        acc = torch.trunc(acc / nranks) if _is_int(dtype_name) else acc / nranks
    return acc


def _tolerance(dtype_name: str, op: str, collective: str, nranks: int) -> float:
    if collective not in REDUCING or op != "avg":
        return 0.0  # every other result is exact by construction
    if _is_int(dtype_name):
        return 1.0  # trunc vs floor division of a negative sum
    eps = {"float": 2.0 ** -23, "double": 2.0 ** -52, "half": 2.0 ** -10, "bfloat16": 2.0 ** -7}[dtype_name]
    return 4.0 * eps * _value_bound(dtype_name, op, nranks) * max(1.0, math.log2(nranks) + 1)


def count_wrong(out, collective: str, op: str, dtype_name: str, rank: int, nranks: int, count: int,
                root: int = 0) -> int:
    """Number of elements of `out` (this rank's result) that differ from the reference.
    reduce: only the root's result is checked (as nccl-tests; a backend may use the other
    ranks' buffers as scratch)."""
    import torch

    if collective == "reduce" and rank != root:
        return 0

    flat = out.reshape(-1)
    tol = _tolerance(dtype_name, op, collective, nranks)
    wrong = 0
    for start in range(0, flat.numel(), _CHECK_CHUNK):
        n = min(_CHECK_CHUNK, flat.numel() - start)
        ref = reference(collective, op, dtype_name, rank, nranks, count, start, n, root)
        got = flat[start:start + n].to(torch.float64)
        if tol == 0.0:
            bad = got != ref
        else:
            bad = (got - ref).abs() > tol
        bad |= torch.isnan(got)
        wrong += int(bad.sum())
    return wrong


# ----------------------------------------------------------------------------------------
# Running one case on a process group
# ----------------------------------------------------------------------------------------

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
        if _is_int(dtype_name):
            out.copy_(torch.div(out, self.nranks, rounding_mode="trunc"))
        else:
            out.div_(self.nranks)

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
            if inplace:
                def fn():
                    self._reduce(lambda o: dist.all_reduce(out, op=o, group=g), out, op, case.dtype_name)
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
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    per_iter = (time.perf_counter() - t0) / max(1, iters)
    seconds = _side_max(per_iter, side)
    wrong = None
    if check:
        fill()
        fn()
        local = count_wrong(out.cpu(), case.collective, case.op, case.dtype_name, runner.rank, runner.nranks,
                            case.count, case.root)
        wrong = _side_sum(local, side)
    algbw, busbw = bandwidths(case.collective, case.size, seconds, runner.nranks)
    return {"time_us": seconds * 1e6, "algbw": algbw, "busbw": busbw, "wrong": wrong}


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
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    seconds = _side_max((time.perf_counter() - t0) / max(1, iters), side)
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
    return {"time_us": seconds * 1e6, "algbw": algbw, "busbw": busbw, "wrong": None, "relerr": relerr,
            "wire_bytes": wire}


# ----------------------------------------------------------------------------------------
# Output: progress, CSV, JSON, plot
# ----------------------------------------------------------------------------------------

class Progress:
    """A plain-text progress bar on stderr (no dependencies)."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = max(1, total), enabled, width
        self.done, self.t0 = 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        self.done += 1
        frac = self.done / self.total
        el = time.monotonic() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        fill = int(round(frac * self.width))
        line = (f"[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} "
                f"{label:<10} {el:5.1f}s elapsed, ~{eta:4.1f}s left")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _human(n: int) -> str:
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


CSV_FIELDS = ["collective", "backend", "compression", "nranks", "size", "count", "type", "redop", "root",
              "oop_time_us", "oop_algbw", "oop_busbw", "oop_wrong", "ip_time_us", "ip_algbw", "ip_busbw",
              "ip_wrong", "cmp_backend", "cmp_time_us", "cmp_busbw", "cmp_wrong", "ratio", "relerr",
              "wire_bytes"]


def _flat(row: dict) -> dict:
    d = {k: row.get(k) for k in ("collective", "backend", "compression", "nranks", "size", "count", "type",
                                 "redop", "root", "ratio")}
    for m in ("oop", "ip"):
        v = row.get(m) or {}
        for k in ("time_us", "algbw", "busbw", "wrong"):
            d[f"{m}_{k}"] = v.get(k)
    c = row.get("cmp") or {}
    d["cmp_backend"] = row.get("cmp_backend")
    for k in ("time_us", "busbw", "wrong"):
        d[f"cmp_{k}"] = c.get(k)
    d["relerr"] = (row.get("oop") or {}).get("relerr")
    d["wire_bytes"] = (row.get("oop") or {}).get("wire_bytes")
    return d


def write_csv(path: str, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in _flat(r).items()})


def write_plot(path: str, rows: Sequence[dict], meta: dict) -> bool:
    """busbw (out-of-place) vs size, one line per backend / compressor. False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pycomm-bench: --plot needs matplotlib (pip install matplotlib); plot skipped", file=sys.stderr)
        return False
    series: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        label = r["backend"] + (f"+{r['compression']}" if r.get("compression") else "")
        if r.get("oop"):
            series.setdefault(label, []).append((r["size"], r["oop"]["busbw"]))
        if r.get("cmp"):
            series.setdefault(r["cmp_backend"], []).append((r["size"], r["cmp"]["busbw"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size (B)")
    ax.set_ylabel("busbw (GB/s), out-of-place")
    net = f", {meta['hosts']} hosts @ {meta['link']}" if meta.get("hosts") else ""
    ax.set_title(f"{meta['collective']} {meta['dtype']} {meta['op']}, {meta['nranks']} ranks{net}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, f"torch {meta['torch']} · {meta['date']} · {meta['machine']}", fontsize=6, alpha=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------
# The rank body
# ----------------------------------------------------------------------------------------

def _load_compressor(name: str):
    """The pycomm.compression class for `name`, or raises ImportError/AttributeError."""
    mod = importlib.import_module("pycomm.compression")
    return getattr(mod, COMPRESSORS[name])


def _backend_problem(backend: str) -> Optional[str]:
    """None if torch.distributed can use `backend` here, else why not."""
    if backend == "gloo":
        return None
    try:
        import pycomm  # noqa: F401  (registers the backend)
    except Exception as e:  # noqa: BLE001
        return f"import pycomm failed: {type(e).__name__}: {e}"
    import torch.distributed as dist

    if backend.upper() not in dist.Backend.backend_list and backend not in dist.Backend.backend_list:
        return "import pycomm succeeded but did not register the 'pycomm' backend"
    return None


def run_rank(args: argparse.Namespace) -> int:
    """Body of one rank: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT come from the environment."""
    if args.transport:
        os.environ["PYCOMM_TRANSPORT"] = args.transport
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    problem = _backend_problem(args.backend)
    if problem:
        if rank == 0:
            print(f"pycomm-bench: backend {args.backend!r} unavailable: {problem}", file=sys.stderr)
        return 3
    comp = None
    if args.compression:
        try:
            comp = _load_compressor(args.compression)()
        except Exception as e:  # noqa: BLE001
            if rank == 0:
                print(f"# skipped: --compression {args.compression} needs pycomm.compression "
                      f"({type(e).__name__}: {e})")
            return 0
    timeout = datetime.timedelta(seconds=args.timeout)
    dist.init_process_group(args.backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    try:
        # Timing maxima and #wrong sums travel on a separate Gloo group, so they never share
        # queues or connections with the backend being measured.
        side = dist.new_group(backend="gloo", timeout=timeout)
        cmp_group = dist.new_group(backend=args.compare, timeout=timeout) if args.compare else None
        return _sweep(args, rank, world, side, cmp_group, comp)
    finally:
        dist.destroy_process_group()


def _sweep(args, rank: int, world: int, side, cmp_group, comp) -> int:
    import torch

    dtype_name = args.dtype
    elem = torch.empty((), dtype=getattr(torch, DTYPES[dtype_name])).element_size()
    coll = args.collective
    redop = args.op if coll in REDUCING else "none"
    root = args.root if coll in ("broadcast", "reduce") else -1
    if coll in ("broadcast", "reduce") and not 0 <= args.root < world:
        raise SystemExit(f"pycomm-bench: -r {args.root} out of range for {world} ranks")
    device = None
    if args.device == "cuda":
        # Ranks share the visible GPUs round-robin (all on cuda:0 on a one-GPU machine).
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    primary = GroupRunner(None, args.backend, rank, world, device=device)
    other = GroupRunner(cmp_group, args.compare, rank, world, device=device) if cmp_group is not None else None

    cases, seen = [], set()
    for s in sweep_sizes(args.minbytes, args.maxbytes, args.stepfactor):
        count, size = counts_for(coll, s, elem, world)
        if count == 0 or size in seen:
            continue
        seen.add(size)
        cases.append(Case(coll, dtype_name, args.op, count, size, max(root, 0)))

    meta = {
        "collective": coll, "backend": args.backend, "compression": args.compression, "compare": args.compare,
        "nranks": world, "dtype": dtype_name, "op": redop, "root": root, "iters": args.iters,
        "warmup": args.warmup, "check": bool(args.check), "transport": os.environ.get("PYCOMM_TRANSPORT"),
        "hosts": args.hosts, "link": args.link if args.hosts else None, "device": args.device,
        "latency": args.latency if args.hosts else None,
        "torch": torch.__version__, "python": platform.python_version(), "machine": _machine(),
        "hostname": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": os.environ.get("PYCOMM_BENCH_COMMAND") or " ".join(shlex.quote(a) for a in sys.argv),
    }
    if os.environ.get("PYCOMM_BENCH_NETEM"):
        meta["netem"] = json.loads(os.environ["PYCOMM_BENCH_NETEM"])
    out = sys.stdout
    if rank == 0:
        label = args.backend + (f" + {args.compression} compression" if args.compression else "")
        print(f"# pycomm-bench {coll}: nranks {world}, backend {label}"
              + (f", compared with {args.compare}" if args.compare else ""), file=out)
        print(f"# minBytes {args.minbytes} maxBytes {args.maxbytes} step: {args.stepfactor}(factor) "
              f"warmup iters: {args.warmup} iters: {args.iters} validation: {int(bool(args.check))}", file=out)
        print(f"# {meta['machine']}, torch {meta['torch']}, {meta['date']}"
              + (f", transport {meta['transport']}" if meta["transport"] else "")
              + (f", buffers on {primary.device} ({torch.cuda.get_device_name(primary.device)})"
                 if primary.device is not None else "")
              + f", THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}", file=out)
        if args.hosts:
            nm = meta.get("netem", {})
            lat = args.latency if nm.get("latency_applied", True) else f"{args.latency} (NOT applied: no sch_netem)"
            print(f"# emulated cluster: {args.hosts} hosts, link {args.link}, latency {lat}", file=out)
        if comp is not None:
            print("# compressed all_reduce: #wrong is N/A (lossy); relative error goes to --json/--csv", file=out)
        print("#", file=out)
        for line in header_lines(args.compare):
            print(line, file=out)
        out.flush()

    steps = len(cases) * (2 if other else 1)
    show = args.progress if args.progress is not None else (steps >= 8 and sys.stderr.isatty())
    prog = Progress(steps, enabled=bool(show) and rank == 0)
    rows = []
    for case in cases:
        if comp is not None:
            oop = time_compressed(comp, None, case, args.iters, args.warmup, bool(args.check), side, rank, world,
                                  device=primary.device)
            ip = None
        else:
            oop = time_mode(primary, case, False, args.iters, args.warmup, bool(args.check), side)
            ip = time_mode(primary, case, True, args.iters, args.warmup, bool(args.check), side)
        prog.step(_human(case.size))
        row = {"collective": coll, "backend": args.backend, "compression": args.compression, "nranks": world,
               "size": case.size, "count": case.count, "type": dtype_name, "redop": redop, "root": root,
               "oop": oop, "ip": ip}
        if other is not None:
            ccase = Case(coll, dtype_name, "avg" if comp is not None and args.op != "sum" else args.op,
                         case.count, case.size, case.root)
            c = time_mode(other, ccase, False, args.iters, args.warmup, bool(args.check), side)
            prog.step(_human(case.size))
            row["cmp_backend"] = args.compare
            row["cmp"] = c
            row["ratio"] = (oop["busbw"] / c["busbw"]) if c and c["busbw"] > 0 else None
        rows.append(row)
        if rank == 0:
            if prog.enabled and prog.tty:
                sys.stderr.write("\r" + " " * 79 + "\r")
            print(format_row(row), file=out)
            out.flush()
    prog.close()

    if rank != 0:
        return 0
    wrong_total = sum((r[m] or {}).get("wrong") or 0 for r in rows for m in ("oop", "ip"))
    wrong_total += sum((r.get("cmp") or {}).get("wrong") or 0 for r in rows)
    summary = {"avg_busbw": avg_busbw(rows), "wrong_total": wrong_total}
    for name, runner in (("primary", primary), ("compare", other)):
        if runner is not None and any(runner.avg_emulated.values()):
            print(f"# note: {runner.name} refused AVG for {sorted(k for k, v in runner.avg_emulated.items() if v)}; "
                  f"measured as SUM + divide", file=out)
    print(f"# Out of bounds values : {wrong_total} {'OK' if wrong_total == 0 else 'FAILED'}", file=out)
    print(f"# Avg bus bandwidth    : {summary['avg_busbw']:g}", file=out)
    if other is not None:
        summary["avg_busbw_compare"] = avg_busbw(rows, "cmp")
        ratios = [r["ratio"] for r in rows if r.get("ratio")]
        print(f"# Avg bus bandwidth ({args.compare}) : {summary['avg_busbw_compare']:g}", file=out)
        if ratios:
            geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            lo = min(rows, key=lambda r: r.get("ratio") or float("inf"))
            hi = max(rows, key=lambda r: r.get("ratio") or 0.0)
            summary.update({"ratio_geomean": geo, "ratio_min": lo["ratio"], "ratio_max": hi["ratio"]})
            print(f"# busbw ratio {args.backend}{'+' + args.compression if args.compression else ''}/{args.compare} "
                  f"(out-of-place): geomean {geo:.2f}x, min {lo['ratio']:.2f}x at {_human(lo['size'])}B, "
                  f"max {hi['ratio']:.2f}x at {_human(hi['size'])}B", file=out)
    if comp is not None and rows and rows[-1]["oop"].get("wire_bytes"):
        last = rows[-1]
        plain = 2 * (world - 1) * (last["size"] // world)  # what a ring all_reduce sends per rank
        wire = last["oop"]["wire_bytes"]
        summary.update({"wire_bytes_largest": wire, "ring_bytes_largest": plain})
        print(f"# {args.compression}: {wire} B sent per rank at {_human(last['size'])}B vs {plain} B "
              f"uncompressed ring ({plain / max(wire, 1):.1f}x less); relative error "
              + (f"{last['oop']['relerr']:.3g}" if last["oop"]["relerr"] is not None else "not checked (-c 0)"),
              file=out)
    print("#", file=out)
    out.flush()
    if args.csv:
        write_csv(args.csv, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)
    if args.plot:
        write_plot(args.plot, rows, meta)
    return 1 if (args.check and wrong_total) else 0


# ----------------------------------------------------------------------------------------
# Launchers: local processes, or processes inside an emulated cluster
# ----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_argv() -> List[str]:
    if __package__:
        return [sys.executable, "-m", f"{__package__}.bench"]
    return [sys.executable, os.path.abspath(__file__)]


_THP_DEFAULT = [True]  # set from --thp in main()


def _child_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYCOMM_BENCH_COMMAND", "pycomm-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    # torch's CPU allocator backs large tensors with transparent huge pages when this is
    # set before the process starts; cross-memory reads (the shm transport) then pin
    # 2 MiB pages instead of 4 KiB ones, about twice as fast. --thp 0 turns it off.
    if _THP_DEFAULT[0]:
        env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    else:
        env["THP_MEM_ALLOC_ENABLE"] = "0"
    return env


def _wait_all(procs: List[subprocess.Popen], timeout: Optional[float]) -> int:
    """Waits for every rank; if one fails, gives the others a moment, then kills them."""
    deadline = None if timeout is None else time.monotonic() + timeout
    failed_at = None
    rc = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            bad = [c for c in codes if c not in (None, 0)]
            if bad and failed_at is None:
                failed_at, rc = time.monotonic(), bad[0]
            if failed_at is not None and time.monotonic() - failed_at > 5.0:
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"pycomm-bench: ranks did not finish within {timeout:.0f}s; killing them", file=sys.stderr)
                rc = rc or 124
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    return rc or next((c for c in codes if c != 0), 0)


def launch_local(args: argparse.Namespace, argv: Sequence[str]) -> int:
    n = args.ranks or 2
    port = _free_port()
    extra = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n),
             "LOCAL_WORLD_SIZE": str(n)}
    if args.transport:
        extra["PYCOMM_TRANSPORT"] = args.transport
    procs = []
    for r in range(n):
        env = _child_env({**extra, "RANK": str(r), "LOCAL_RANK": str(r)})
        procs.append(subprocess.Popen(_child_argv() + list(argv), env=env))
    return _wait_all(procs, args.launch_timeout)


def _load_netem():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYCOMM_NETEM") or os.path.join(here, "benchmarks", "netem.py")
    if not os.path.exists(path):
        raise SystemExit(f"pycomm-bench: --hosts needs benchmarks/netem.py from the pycomm source tree "
                         f"(not found at {path}; set PYCOMM_NETEM to its path)")
    spec = importlib.util.spec_from_file_location("pycomm_netem", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pycomm_netem"] = mod
    spec.loader.exec_module(mod)
    return mod


def launch_cluster(args: argparse.Namespace, argv: Sequence[str]) -> int:
    netem = _load_netem()
    n = args.ranks or args.hosts
    if n < args.hosts:
        raise SystemExit(f"pycomm-bench: --ranks {n} < --hosts {args.hosts}: every host needs a rank")
    with netem.Cluster(hosts=args.hosts, link=args.link, latency=args.latency) as cluster:
        extra = {"MASTER_ADDR": cluster.addr(0), "MASTER_PORT": "29500", "WORLD_SIZE": str(n),
                 "PYCOMM_TRANSPORT": args.transport or "tcp",
                 "PYCOMM_SOCKET_IFNAME": cluster.ifname, "GLOO_SOCKET_IFNAME": cluster.ifname,
                 "PYCOMM_BENCH_NETEM": json.dumps(cluster.describe())}
        per_host = [[r for r in range(n) if r * args.hosts // n == h] for h in range(args.hosts)]
        procs = []
        for h, ranks in enumerate(per_host):
            for local, r in enumerate(ranks):
                env = _child_env({**extra, "RANK": str(r), "LOCAL_RANK": str(local),
                                  "LOCAL_WORLD_SIZE": str(len(ranks)), "GROUP_RANK": str(h)})
                procs.append(cluster.run(h, _child_argv() + list(argv), env=env))
        return _wait_all(procs, args.launch_timeout)


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def _collective(text: str) -> str:
    t = text.lower().replace("-", "_")
    t = _COLL_ALIASES.get(t.replace("_", ""), _COLL_ALIASES.get(t, t))
    if t not in COLLECTIVES:
        raise argparse.ArgumentTypeError(f"unknown collective {text!r}; choose from {', '.join(COLLECTIVES)}")
    return t


def _dtype(text: str) -> str:
    t = _DTYPE_ALIASES.get(text.lower(), text.lower())
    if t not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")
    return t


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pycomm-bench",
        description="Collective benchmarks in the nccl-tests convention (see docs/BENCHMARKING.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("collective", nargs="?", type=_collective, default="all_reduce",
                    help="all_reduce | reduce_scatter | all_gather | broadcast | all_to_all")
    g = ap.add_argument_group("nccl-tests flags")
    g.add_argument("-b", "--minbytes", type=_size, default=parse_size("8"), help="smallest size (8, 1K, 64M)")
    g.add_argument("-e", "--maxbytes", type=_size, default=parse_size("16M"), help="largest size")
    g.add_argument("-f", "--stepfactor", type=int, default=2, help="multiply the size by this each step")
    g.add_argument("-n", "--iters", type=int, default=20, help="timed iterations per size")
    g.add_argument("-w", "--warmup_iters", dest="warmup", type=int, default=5, help="warm-up iterations")
    g.add_argument("-c", "--check", type=int, choices=(0, 1), default=1, help="check results against a reference")
    g.add_argument("-o", "--op", type=str.lower, choices=OPS, default="sum", help="reduction op")
    g.add_argument("-d", "--datatype", dest="dtype", type=_dtype, default="float",
                   help="float double half bfloat16 int32 int64 int8 uint8")
    g.add_argument("-r", "--root", type=int, default=0, help="broadcast / reduce root")
    p = ap.add_argument_group("pycomm")
    p.add_argument("--backend", default="pycomm", choices=("pycomm", "gloo"), help="backend measured")
    p.add_argument("--ranks", type=int, default=None,
                   help="local processes to launch (default 2; --hosts: one per host). "
                        "Ignored under torchrun (RANK/WORLD_SIZE set)")
    p.add_argument("--compare", choices=("gloo",), default=None,
                   help="also measure this backend on the same ranks; adds a ratio column")
    p.add_argument("--compression", choices=sorted(COMPRESSORS), default=None,
                   help="compressed all_reduce through pycomm.compression")
    p.add_argument("--transport", choices=("shm", "tcp"), default=None, help="sets PYCOMM_TRANSPORT")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the buffers live (cuda: rank i on GPU i %% device count; timed until the "
                        "result is on the device)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--thp", type=int, choices=(0, 1), default=1,
                   help="launched ranks set THP_MEM_ALLOC_ENABLE (huge pages for large tensors; both backends)")
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout (s)")
    p.add_argument("--launch-timeout", type=float, default=None, help="kill all ranks after this many seconds")
    o = ap.add_argument_group("output")
    o.add_argument("--csv", default=None, metavar="PATH")
    o.add_argument("--json", default=None, metavar="PATH")
    o.add_argument("--plot", default=None, metavar="PNG", help="busbw vs size (needs matplotlib)")
    o.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bar on stderr (default: on for long sweeps when stderr is a terminal)")
    o.add_argument("--no-progress", dest="progress", action="store_false")
    c = ap.add_argument_group("emulated cluster (benchmarks/netem.py; needs root)")
    c.add_argument("--hosts", type=int, default=None, help="network namespaces to spread the ranks over")
    c.add_argument("--link", default="1gbit", help="per-host link rate (tc syntax)")
    c.add_argument("--latency", default="100us", help="one-way delay per host link")
    return ap


def _validate(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.minbytes <= 0 or args.maxbytes < args.minbytes:
        ap.error(f"need 0 < -b <= -e (got -b {args.minbytes} -e {args.maxbytes})")
    if args.stepfactor < 2:
        ap.error("-f must be >= 2")
    if args.iters < 1 or args.warmup < 0:
        ap.error("-n must be >= 1 and -w >= 0")
    if args.compression:
        if args.collective != "all_reduce":
            ap.error("--compression applies to all_reduce only")
        if args.dtype not in ("float", "half", "bfloat16", "double"):
            ap.error("--compression needs a floating dtype")
        if args.op not in ("sum", "avg"):
            ap.error("--compression supports -o avg (default for compression) or sum")
    if args.ranks is not None and args.ranks < 1:
        ap.error("--ranks must be >= 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is visible on this machine")
    if args.hosts is not None and args.hosts < 1:
        ap.error("--hosts must be >= 1")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pycomm-bench`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the strategy evaluation (pycomm/evaluation)
        from pycomm.evaluation.cli import main as train_main

        return train_main(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    _THP_DEFAULT[0] = bool(args.thp)
    _validate(ap, args)
    if args.compression and "-o" not in argv and "--op" not in argv:
        args.op = "avg"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return run_rank(args)  # under torchrun, or one of our own launched ranks
    # Launcher: fail fast here rather than in every rank.
    problem = _backend_problem(args.backend)
    if problem:
        print(f"pycomm-bench: backend {args.backend!r} unavailable: {problem}\n"
              f"  (build pycomm with `pip install -e .`, or measure Gloo with --backend gloo)", file=sys.stderr)
        return 3
    if args.compression:
        try:
            _load_compressor(args.compression)
        except Exception as e:  # noqa: BLE001
            print(f"# skipped: --compression {args.compression} needs pycomm.compression "
                  f"({type(e).__name__}: {e})")
            return 0
    try:
        if args.hosts:
            return launch_cluster(args, argv)
        return launch_local(args, argv)
    except KeyboardInterrupt:
        print("pycomm-bench: interrupted; ranks stopped" + (", emulated cluster removed" if args.hosts else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
