"""Deterministic inputs and the float64 reference every result element is checked against.

Every rank's inputs are functions of (rank, index) whose results are exact in the dtype
(``-c 1``); ``count_wrong`` compares a result with the reference in chunks.
"""
from __future__ import annotations

import math

from pycomm.bench.columns import REDUCING

_CHECK_CHUNK = 1 << 20  # elements verified at a time (bounds the reference's memory)
_EXACT_LIMIT = {"half": 2048, "bfloat16": 256, "int8": 127, "uint8": 255}


def is_int(dtype_name: str) -> bool:
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
        acc = torch.trunc(acc / nranks) if is_int(dtype_name) else acc / nranks
    return acc


def _tolerance(dtype_name: str, op: str, collective: str, nranks: int) -> float:
    if collective not in REDUCING or op != "avg":
        return 0.0  # every other result is exact by construction
    if is_int(dtype_name):
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

