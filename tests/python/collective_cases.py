"""Rank bodies for test_collectives.py: every collective, dtype, op and awkward size,
checked against a float64 (or exact integer) reference each rank computes itself."""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.distributed as dist

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32,
          torch.int64, torch.bool]
FLOATS = {torch.float32, torch.float64, torch.float16, torch.bfloat16}
OPS = ["SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR"]
SIZES = [0, 1, 7, 13, 1021, 65537]


def op_supported(dtype: torch.dtype, op: str) -> bool:
    if op in ("BAND", "BOR", "BXOR"):
        return dtype not in FLOATS
    if op == "AVG":
        return dtype != torch.bool
    return True


def data(seed: int, rank: int, n: int, dtype: torch.dtype, op: str) -> np.ndarray:
    """Deterministic input of `rank` for case `seed`, as float64/int64/bool numpy."""
    rng = np.random.default_rng(seed * 1000 + rank)
    if dtype == torch.bool:
        return rng.integers(0, 2, n).astype(bool)
    if dtype in FLOATS:
        if op == "PRODUCT":
            return rng.uniform(0.5, 1.5, n)
        return rng.standard_normal(n) * 4
    if op == "PRODUCT":
        return rng.choice(np.array([-1, 1, 2]), n) if dtype != torch.uint8 else rng.choice(np.array([1, 2]), n)
    if dtype == torch.uint8:
        return rng.integers(0, 40, n)
    if dtype == torch.int8:
        return rng.integers(-20, 20, n)
    return rng.integers(-1000, 1000, n)


def to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.from_numpy(a.copy())
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def rounded(a: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The input as the rank actually holds it (rounded to dtype), back in float64/int64."""
    if dtype == torch.bool:
        return a
    t = to_torch(a, dtype)
    return t.double().numpy() if dtype in FLOATS else t.long().numpy()


def reference(inputs: list, dtype: torch.dtype, op: str) -> np.ndarray:
    stack = np.stack(inputs) if inputs and inputs[0].size else np.zeros((len(inputs), 0))
    if dtype == torch.bool:
        stack = stack.astype(bool)
        if op in ("SUM", "MAX", "BOR"):
            return stack.any(0)
        if op in ("PRODUCT", "MIN", "BAND"):
            return stack.all(0)
        return np.logical_xor.reduce(stack, axis=0)
    if op == "SUM":
        return stack.sum(0)
    if op == "AVG":
        s = stack.sum(0)
        if dtype in FLOATS:
            return s / len(inputs)
        return np.trunc(s / len(inputs))
    if op == "PRODUCT":
        return stack.prod(0)
    if op == "MIN":
        return stack.min(0)
    if op == "MAX":
        return stack.max(0)
    if op == "BAND":
        return np.bitwise_and.reduce(stack.astype(np.int64), axis=0)
    if op == "BOR":
        return np.bitwise_or.reduce(stack.astype(np.int64), axis=0)
    return np.bitwise_xor.reduce(stack.astype(np.int64), axis=0)


def wrap(ref: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Integer references wrap like the fixed-width type does."""
    if dtype in FLOATS or dtype == torch.bool:
        return ref
    return torch.from_numpy(ref.astype(np.int64)).to(dtype).long().numpy()


def check(result: torch.Tensor, ref: np.ndarray, dtype: torch.dtype, ws: int, what: str) -> None:
    if dtype == torch.bool:
        got = result.numpy()
        assert np.array_equal(got, ref.astype(bool)), f"{what}: wrong bool result"
        return
    if dtype in FLOATS:
        got = result.double().numpy()
        # One rounding per hop: error grows with hops and magnitude.
        eps = {torch.float32: 2e-7, torch.float64: 1e-15, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        scale = np.abs(ref) + 4.0
        bad = np.abs(got - ref) > eps * (ws + 2) * scale
        assert not bad.any(), f"{what}: max err {np.max(np.abs(got - ref)) if got.size else 0} (first bad at {np.argmax(bad)})"
        return
    got = result.long().numpy()
    assert np.array_equal(got, wrap(ref, dtype)), f"{what}: integer mismatch"


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def red(op: str):
    return getattr(dist.ReduceOp, op)


def all_reduce_cases(rank: int, ws: int, sizes=SIZES, dtypes=DTYPES, ops=OPS) -> dict:
    """Every dtype x op x size; returns digests so the caller checks bitwise equality across ranks.

    The ranks of one call mix the forms (by case and rank): ``dist.all_reduce`` in place,
    ``pycomm.all_reduce(x, out=y)`` out of place (the input must come back unchanged) and
    ``pycomm.all_reduce(x, out=x)``; every form must give the same bits."""
    import pycomm

    digests = {}
    seed = 0
    for dtype in dtypes:
        for op in ops:
            if not op_supported(dtype, op):
                continue
            for n in sizes:
                seed += 1
                inputs = [rounded(data(seed, r, n, dtype, op), dtype) for r in range(ws)]
                t = to_torch(data(seed, rank, n, dtype, op), dtype)
                form = (seed + rank) % 3
                what = f"all_reduce {dtype} {op} n={n} form {form}"
                if form == 0:
                    dist.all_reduce(t, op=red(op))
                elif form == 1:
                    before = t.clone()
                    out = torch.full_like(t, 1)  # anything but the result
                    pycomm.all_reduce(t, op=red(op), out=out)
                    assert torch.equal(t, before), f"{what}: out-of-place all_reduce changed its input"
                    t = out
                else:
                    pycomm.all_reduce(t, op=op.lower(), out=t)
                check(t, reference(inputs, dtype, op), dtype, ws, what)
                digests[(str(dtype), op, n)] = digest(t)
    return digests


def other_collective_cases(rank: int, ws: int) -> dict:
    digests = {}
    seed = 5000
    # reduce_scatter (tensor and list forms)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.float64):
        for op in ("SUM", "AVG", "MAX"):
            for n in (0, 1, 7, 1021, 40000):
                seed += 1
                inputs = [rounded(data(seed, r, n * ws, dtype, op), dtype) for r in range(ws)]
                ref = reference(inputs, dtype, op)[rank * n:(rank + 1) * n]
                x = to_torch(data(seed, rank, n * ws, dtype, op), dtype)
                out = torch.empty(n, dtype=dtype)
                dist.reduce_scatter_tensor(out, x, op=red(op))
                check(out, ref, dtype, ws, f"reduce_scatter_tensor {dtype} {op} n={n}")
                out2 = torch.empty(n, dtype=dtype)
                dist.reduce_scatter(out2, list(x.chunk(ws)) if n else [torch.empty(0, dtype=dtype)] * ws,
                                    op=red(op))
                check(out2, ref, dtype, ws, f"reduce_scatter list {dtype} {op} n={n}")
    # all_gather
    for dtype in (torch.float32, torch.float16, torch.int8, torch.bool, torch.int64):
        for n in (0, 1, 13, 65537):
            seed += 1
            inputs = [rounded(data(seed, r, n, dtype, "SUM"), dtype) for r in range(ws)]
            x = to_torch(data(seed, rank, n, dtype, "SUM"), dtype)
            out = torch.empty(n * ws, dtype=dtype)
            dist.all_gather_into_tensor(out, x)
            check(out, np.concatenate(inputs), dtype, ws, f"all_gather_into_tensor {dtype} n={n}")
            outs = [torch.empty(n, dtype=dtype) for _ in range(ws)]
            dist.all_gather(outs, x)
            for r in range(ws):
                check(outs[r], inputs[r], dtype, ws, f"all_gather list {dtype} n={n} from {r}")
    # broadcast and reduce from every root
    for root in range(ws):
        for dtype in (torch.float32, torch.bfloat16, torch.int32):
            for n in (0, 1, 7919, 300001):
                seed += 1
                src = rounded(data(seed, root, n, dtype, "SUM"), dtype)
                x = to_torch(data(seed, rank, n, dtype, "SUM"), dtype)
                dist.broadcast(x, src=root)
                check(x, src, dtype, ws, f"broadcast {dtype} n={n} root={root}")
                digests[("bcast", root, str(dtype), n)] = digest(x)
        for op in ("SUM", "MAX", "PRODUCT"):
            seed += 1
            n = 1021
            inputs = [rounded(data(seed, r, n, torch.float64, op), torch.float64) for r in range(ws)]
            x = to_torch(data(seed, rank, n, torch.float64, op), torch.float64)
            before = x.clone()
            dist.reduce(x, dst=root, op=red(op))
            if rank == root:
                check(x, reference(inputs, torch.float64, op), torch.float64, ws, f"reduce {op} root={root}")
            else:
                assert torch.equal(x, before), "reduce modified a non-root buffer"
        # gather / scatter
        seed += 1
        n = 101
        inputs = [rounded(data(seed, r, n, torch.float32, "SUM"), torch.float32) for r in range(ws)]
        x = to_torch(data(seed, rank, n, torch.float32, "SUM"), torch.float32)
        outs = [torch.empty(n) for _ in range(ws)] if rank == root else None
        dist.gather(x, gather_list=outs, dst=root)
        if rank == root:
            for r in range(ws):
                check(outs[r], inputs[r], torch.float32, ws, f"gather from {r} root={root}")
        out = torch.empty(n)
        dist.scatter(out, scatter_list=[to_torch(i, torch.float32) for i in inputs] if rank == root else None,
                     src=root)
        check(out, inputs[rank], torch.float32, ws, f"scatter root={root}")
    # all_to_all: equal and unequal splits, list form
    for dtype in (torch.float32, torch.int64, torch.float16):
        seed += 1
        rows = 3 * ws
        mats = [rounded(data(seed, r, rows * 5, dtype, "SUM"), dtype).reshape(rows, 5) for r in range(ws)]
        x = to_torch(data(seed, rank, rows * 5, dtype, "SUM"), dtype).reshape(rows, 5)
        out = torch.empty(rows, 5, dtype=dtype)
        dist.all_to_all_single(out, x)
        ref = np.concatenate([mats[q][rank * 3:(rank + 1) * 3] for q in range(ws)])
        check(out, ref, dtype, ws, f"all_to_all_single equal {dtype}")
        # unequal: rank q sends (q + p) % 3 rows to rank p
        send_splits = [(rank + p) % 3 for p in range(ws)]
        recv_splits = [(q + rank) % 3 for q in range(ws)]
        srcs = [rounded(data(seed + 77, q, sum((q + p) % 3 for p in range(ws)) * 2, dtype, "SUM"), dtype)
                for q in range(ws)]
        x = to_torch(srcs[rank], dtype).reshape(-1, 2)
        out = torch.empty(sum(recv_splits), 2, dtype=dtype)
        dist.all_to_all_single(out, x, recv_splits, send_splits)
        parts = []
        for q in range(ws):
            rows_q = srcs[q].reshape(-1, 2)
            start = sum((q + p) % 3 for p in range(rank))
            parts.append(rows_q[start:start + (q + rank) % 3])
        check(out, np.concatenate(parts), dtype, ws, f"all_to_all_single unequal {dtype}")
        ins = list(to_torch(data(seed + 99, rank, 4 * ws, dtype, "SUM"), dtype).chunk(ws))
        outs = [torch.empty(4, dtype=dtype) for _ in range(ws)]
        dist.all_to_all(outs, ins)
        for q in range(ws):
            ref = rounded(data(seed + 99, q, 4 * ws, dtype, "SUM"), dtype)[rank * 4:(rank + 1) * 4]
            check(outs[q], ref, dtype, ws, f"all_to_all list {dtype} from {q}")
    # barrier, async work + futures, coalesced
    dist.barrier()
    ts = [torch.full((n,), float(rank + 1)) for n in (3, 70000, 1)]
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    futs = [w.get_future() for w in works]
    for w in works:
        w.wait()
        assert w.is_completed() and w.is_success()
    expect = ws * (ws + 1) / 2
    for f, t in zip(futs, ts):
        val = f.wait()[0]
        assert torch.all(val == expect) and torch.all(t == expect)
    chained = dist.all_reduce(torch.ones(5), async_op=True).get_future().then(lambda f: f.value()[0] * 2)
    assert torch.all(chained.wait() == 2 * ws)
    # non-contiguous tensor (staged and written back)
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5) + rank
    view = base.t()
    dist.all_reduce(view)
    ref = (np.arange(20).reshape(4, 5) * ws + sum(range(ws))).T
    check(view, ref.astype(np.float64), torch.float32, ws, "non-contiguous all_reduce")
    # send / recv around a ring, several tags and sizes
    if ws > 1:
        nxt, prv = (rank + 1) % ws, (rank - 1) % ws
        for n in (0, 1, 5003, 1 << 20):
            mine = torch.full((n,), float(rank))
            got = torch.empty(n)
            sw = dist.isend(mine, nxt, tag=7)
            rw = dist.irecv(got, prv, tag=7)
            rw.wait()
            sw.wait()
            assert torch.all(got == prv), f"send/recv n={n}"
        # non-contiguous both ways: sent from a transposed view, received into a strided one
        # (staged, written back on the receive thread before wait() returns), many times
        for step in range(20):
            mine = (torch.arange(60, dtype=torch.float64).reshape(6, 10) * (rank + 1) + step).t()
            holder = torch.full((10, 12), -1.0, dtype=torch.float64)
            got = holder[:, ::2]
            sw = dist.isend(mine, nxt, tag=8)
            dist.recv(got, prv, tag=8)
            want = (torch.arange(60, dtype=torch.float64).reshape(6, 10) * (prv + 1) + step).t()
            assert torch.equal(got, want) and torch.all(holder[:, 1::2] == -1.0), f"strided send/recv {step}"
            sw.wait()
        # both ranks receive first, then send: independent send/recv threads keep it deadlock-free
        if ws == 2:
            other = 1 - rank
            got = torch.empty(10)
            rw = dist.irecv(got, other)
            dist.send(torch.full((10,), float(rank)), other)
            rw.wait()
            assert torch.all(got == other)
    return digests


def run_all(rank: int, ws: int, big: bool) -> dict:
    import pycomm

    d = all_reduce_cases(rank, ws)
    d.update(other_collective_cases(rank, ws))
    if big:
        # 64 MiB float32 all_reduce, the size the benchmark targets.
        n = 16 << 20
        x = torch.full((n,), float(rank + 1))
        x[::4097] = rank * 0.5
        dist.all_reduce(x)
        assert torch.all(x[1:4097] == ws * (ws + 1) / 2)
        assert torch.all(x[::4097] == 0.5 * ws * (ws - 1) / 2)
        d["big"] = digest(x[:1 << 16])
    d["transport"] = pycomm.transport()
    return d
