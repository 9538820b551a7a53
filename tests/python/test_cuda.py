"""CUDA checks (need a GPU and pycomm built with PYCOMM_WITH_CUDA; skipped otherwise).

    pytest tests/python/test_cuda.py -m cuda -q -ra        # benchmarks/gpu_check.sh runs this

1. Every torch.distributed collective on the pycomm backend with CUDA tensors, 2/3/4
   ranks sharing cuda:0, float32/float16/bfloat16/int32/int64, lengths 0/1/7/1021/65537,
   checked against float64 references (collective_cases.py) and bitwise across ranks.
2. Every compressor on CUDA vs the same compressor on CPU (same inputs, same state,
   several steps): bitwise for FP16/BF16/OneBit/QSGD/TopK (docs/COMPRESSION.md promises
   it), PowerSGD within rtol 1e-4 / atol 1e-5 (cuBLAS/cuSOLVER vs LAPACK). Plus the raw
   pycomm._C kernels on CUDA vs CPU, bitwise.
3. Stream semantics: collectives and kernels issued while the current (side) stream
   still has pending work see the final inputs; results are usable on the current stream
   right after work.wait(); DataParallel on CUDA matches the CPU run within 1e-5.
4. cupy arrays through pycomm.collectives (DLPack), if cupy imports.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import pycomm
from collective_cases import check, data, digest, red, reference, rounded, to_torch
from dist_util import run_ranks


def _cuda_skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not getattr(pycomm._C, "with_cuda", False):
        return "pycomm was built without CUDA (pycomm._C.with_cuda is False)"
    return ""


_REASON = _cuda_skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(bool(_REASON), reason=_REASON or "n/a")]

DEV = "cuda:0"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]
OPS = ["SUM", "AVG", "MIN", "MAX", "PRODUCT"]
SIZES = [0, 1, 7, 1021, 65537]
WORLD_SIZES = [2, 3, 4]


def _setup_rank() -> torch.device:
    torch.cuda.set_device(0)
    # Exact float32 matmuls on both sides of every CPU/CUDA comparison.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device(DEV)


def _host(t: torch.Tensor) -> torch.Tensor:
    assert t.is_cuda, "result left the GPU"
    return t.cpu()


# ============================================================== 1. collectives on CUDA


def _cuda_all_reduce(rank: int, ws: int) -> dict:
    import torch.distributed as dist

    dev = _setup_rank()
    digests = {}
    seed = 70000
    for dtype in DTYPES:
        for op in OPS:
            for n in SIZES:
                seed += 1
                inputs = [rounded(data(seed, r, n, dtype, op), dtype) for r in range(ws)]
                t = to_torch(data(seed, rank, n, dtype, op), dtype).to(dev)
                dist.all_reduce(t, op=red(op))
                out = _host(t)
                check(out, reference(inputs, dtype, op), dtype, ws, f"cuda all_reduce {dtype} {op} n={n}")
                digests[(str(dtype), op, n)] = digest(out)
    # async + future on a CUDA tensor, and a non-contiguous CUDA view
    t = torch.full((70001,), float(rank + 1), device=dev)
    work = dist.all_reduce(t, async_op=True)
    val = work.get_future().wait()[0]
    work.wait()
    expect = ws * (ws + 1) / 2
    assert val.is_cuda and bool(torch.all(val == expect)) and bool(torch.all(t == expect)), "async cuda all_reduce"
    base = (torch.arange(20, dtype=torch.float32).reshape(4, 5) + rank).to(dev)
    view = base.t()
    dist.all_reduce(view)
    ref = (np.arange(20).reshape(4, 5) * ws + sum(range(ws))).T
    check(_host(view).contiguous(), ref.astype(np.float64), torch.float32, ws, "non-contiguous cuda all_reduce")
    return digests


def _cuda_other_collectives(rank: int, ws: int) -> dict:
    import torch.distributed as dist

    dev = _setup_rank()
    digests = {}
    seed = 90000
    for dtype in DTYPES:
        # reduce_scatter_tensor: every op, n elements per rank
        for op in OPS:
            for n in SIZES:
                seed += 1
                inputs = [rounded(data(seed, r, n * ws, dtype, op), dtype) for r in range(ws)]
                ref = reference(inputs, dtype, op)[rank * n:(rank + 1) * n]
                x = to_torch(data(seed, rank, n * ws, dtype, op), dtype).to(dev)
                out = torch.empty(n, dtype=dtype, device=dev)
                dist.reduce_scatter_tensor(out, x, op=red(op))
                check(_host(out), ref, dtype, ws, f"cuda reduce_scatter_tensor {dtype} {op} n={n}")
        for n in SIZES:
            # all_gather_into_tensor
            seed += 1
            inputs = [rounded(data(seed, r, n, dtype, "SUM"), dtype) for r in range(ws)]
            x = to_torch(data(seed, rank, n, dtype, "SUM"), dtype).to(dev)
            out = torch.empty(n * ws, dtype=dtype, device=dev)
            dist.all_gather_into_tensor(out, x)
            check(_host(out), np.concatenate(inputs), dtype, ws, f"cuda all_gather_into_tensor {dtype} n={n}")
            # all_to_all_single, equal splits: n elements to every peer
            seed += 1
            srcs = [rounded(data(seed, q, n * ws, dtype, "SUM"), dtype) for q in range(ws)]
            x = to_torch(data(seed, rank, n * ws, dtype, "SUM"), dtype).to(dev)
            out = torch.empty(n * ws, dtype=dtype, device=dev)
            dist.all_to_all_single(out, x)
            ref = np.concatenate([srcs[q][rank * n:(rank + 1) * n] for q in range(ws)])
            check(_host(out), ref, dtype, ws, f"cuda all_to_all_single {dtype} n={n}")
            # broadcast and reduce from every root (reduce cycles through the ops)
            for root in range(ws):
                seed += 1
                src = rounded(data(seed, root, n, dtype, "SUM"), dtype)
                x = to_torch(data(seed, rank, n, dtype, "SUM"), dtype).to(dev)
                dist.broadcast(x, src=root)
                out = _host(x)
                check(out, src, dtype, ws, f"cuda broadcast {dtype} n={n} root={root}")
                digests[("bcast", root, str(dtype), n)] = digest(out)
                seed += 1
                op = OPS[(seed + root) % len(OPS)]
                inputs = [rounded(data(seed, r, n, dtype, op), dtype) for r in range(ws)]
                x = to_torch(data(seed, rank, n, dtype, op), dtype).to(dev)
                before = x.clone()
                dist.reduce(x, dst=root, op=red(op))
                if rank == root:
                    check(_host(x), reference(inputs, dtype, op), dtype, ws, f"cuda reduce {dtype} {op} n={n} root={root}")
                else:
                    assert torch.equal(_host(x), before.cpu()), "reduce modified a non-root CUDA buffer"
            # send / recv around the ring (isend/irecv so no rank blocks the others)
            seed += 1
            nxt, prv = (rank + 1) % ws, (rank - 1) % ws
            mine = to_torch(data(seed, rank, n, dtype, "SUM"), dtype).to(dev)
            got = torch.empty(n, dtype=dtype, device=dev)
            sw = dist.isend(mine, nxt, tag=11)
            rw = dist.irecv(got, prv, tag=11)
            rw.wait()
            sw.wait()
            check(_host(got), rounded(data(seed, prv, n, dtype, "SUM"), dtype), dtype, ws,
                  f"cuda send/recv {dtype} n={n}")
    # all_to_all_single with unequal splits: rank q sends (q + p) % 3 rows of 2 to rank p
    for dtype in (torch.float32, torch.int64):
        seed += 1
        send_splits = [(rank + p) % 3 for p in range(ws)]
        recv_splits = [(q + rank) % 3 for q in range(ws)]
        srcs = [rounded(data(seed, q, sum((q + p) % 3 for p in range(ws)) * 2, dtype, "SUM"), dtype)
                for q in range(ws)]
        x = to_torch(srcs[rank], dtype).reshape(-1, 2).to(dev)
        out = torch.empty(sum(recv_splits), 2, dtype=dtype, device=dev)
        dist.all_to_all_single(out, x, recv_splits, send_splits)
        parts = []
        for q in range(ws):
            start = sum((q + p) % 3 for p in range(rank))
            parts.append(srcs[q].reshape(-1, 2)[start:start + (q + rank) % 3])
        check(_host(out), np.concatenate(parts), dtype, ws, f"cuda all_to_all_single unequal {dtype}")
    # blocking send/recv between ranks 0 and 1 (CUDA both sides)
    if rank in (0, 1):
        other = 1 - rank
        buf = torch.full((1021,), float(rank + 10), device=dev)
        if rank == 0:
            dist.send(buf, other, tag=3)
            dist.recv(buf, other, tag=4)
        else:
            got = torch.empty_like(buf)
            dist.recv(got, other, tag=3)
            dist.send(buf, other, tag=4)
            buf = got
        assert bool(torch.all(buf == other + 10)), "blocking cuda send/recv"
    _cuda_list_forms(rank, ws, dev)
    dist.barrier()
    return digests


def _cuda_list_forms(rank: int, ws: int, dev: torch.device) -> None:
    """The list forms of all_gather / reduce_scatter / all_to_all and gather / scatter on
    tensors on `dev` (lists built on the device, so flattening them is device work)."""
    import torch.distributed as dist

    seed = 95000
    for dtype in DTYPES:
        for n in SIZES:
            seed += 1
            op = OPS[seed % len(OPS)]
            inputs = [rounded(data(seed, r, n * ws, dtype, op), dtype) for r in range(ws)]
            x = to_torch(data(seed, rank, n * ws, dtype, op), dtype).to(dev)
            out = torch.empty(n, dtype=dtype, device=dev)
            parts = list(x.chunk(ws)) if n else [torch.empty(0, dtype=dtype, device=dev)] * ws
            dist.reduce_scatter(out, parts, op=red(op))
            check(_host(out), reference(inputs, dtype, op)[rank * n:(rank + 1) * n], dtype, ws,
                  f"{dev.type} reduce_scatter list {dtype} {op} n={n}")
            seed += 1
            inputs = [rounded(data(seed, r, n, dtype, "SUM"), dtype) for r in range(ws)]
            x = to_torch(data(seed, rank, n, dtype, "SUM"), dtype).to(dev)
            outs = [torch.empty(n, dtype=dtype, device=dev) for _ in range(ws)]
            dist.all_gather(outs, x)
            for r in range(ws):
                check(_host(outs[r]), inputs[r], dtype, ws, f"{dev.type} all_gather list {dtype} n={n} from {r}")
            # all_to_all list: rank q sends n + p elements to rank p
            seed += 1
            sizes = [n + p for p in range(ws)]
            srcs = [rounded(data(seed, q, sum(n + p for p in range(ws)), dtype, "SUM"), dtype) for q in range(ws)]
            ins = list(to_torch(srcs[rank], dtype).to(dev).split(sizes))
            outs = [torch.empty(n + rank, dtype=dtype, device=dev) for _ in range(ws)]
            dist.all_to_all(outs, ins)
            for q in range(ws):
                start = sum(sizes[:rank])
                check(_host(outs[q]), srcs[q][start:start + n + rank], dtype, ws,
                      f"{dev.type} all_to_all list {dtype} n={n} from {q}")
        for root in range(ws):
            seed += 1
            n = SIZES[(seed + root) % len(SIZES)]
            inputs = [rounded(data(seed, r, n, dtype, "SUM"), dtype) for r in range(ws)]
            x = to_torch(data(seed, rank, n, dtype, "SUM"), dtype).to(dev)
            outs = [torch.empty(n, dtype=dtype, device=dev) for _ in range(ws)] if rank == root else None
            dist.gather(x, gather_list=outs, dst=root)
            if rank == root:
                for r in range(ws):
                    check(_host(outs[r]), inputs[r], dtype, ws, f"{dev.type} gather {dtype} n={n} from {r} root={root}")
            out = torch.empty(n, dtype=dtype, device=dev)
            src = [to_torch(i, dtype).to(dev) for i in inputs] if rank == root else None
            dist.scatter(out, scatter_list=src, src=root)
            check(_host(out), inputs[rank], dtype, ws, f"{dev.type} scatter {dtype} n={n} root={root}")


def _assert_same_digests(results: list) -> None:
    for key in results[0]:
        vals = {r[key] for r in results}
        assert len(vals) == 1, f"ranks differ on {key}"


# The two CUDA all_reduce paths (docs/GPU.md): CUDA IPC between the ranks of one host
# (the default here), and pinned-host staging in overlapped chunks (what a multi-host
# group does; forced with PYCOMM_CUDA_IPC=0). Small buffers/chunks make the 65537-element
# cases run as many chunks, so the buffer alternation and the chunk pipeline are covered.
PATHS = {
    "ipc": {"PYCOMM_CUDA_IPC_BUFFER_BYTES": "4096"},
    "staged": {"PYCOMM_CUDA_IPC": "0", "PYCOMM_CUDA_STAGE_CHUNK_BYTES": "4096"},
}


def _cuda_all_reduce_path(rank: int, ws: int, path: str) -> dict:
    digests = _cuda_all_reduce(rank, ws)
    s = pycomm.stats()
    if path == "ipc":
        assert s["cuda_ipc_collectives"] > 0 and s["cuda_staged_chunks"] == 0, f"IPC path not taken: {s}"
    else:
        assert s["cuda_ipc_collectives"] == 0 and s["cuda_staged_chunks"] > 0, f"staged path not taken: {s}"
    return digests


@pytest.mark.cuda
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_cuda_all_reduce(world_size, path):
    _assert_same_digests(run_ranks(world_size, _cuda_all_reduce_path, path, timeout=600, pg_timeout=120,
                                   env=PATHS[path]))


def _ipc_vs_staged(rank: int, ws: int) -> None:
    """The same inputs through CUDA IPC (default group) and through host staging (a
    subgroup created with PYCOMM_CUDA_IPC=0): float32 SUM results agree within rounding,
    integer results exactly; large calls cross many IPC buffers; the caller's stream
    has queued work ahead of the input's last write."""
    import os

    import torch.distributed as dist

    dev = _setup_rank()
    os.environ["PYCOMM_CUDA_IPC"] = "0"
    staged_group = dist.new_group(list(range(ws)), backend="pycomm")
    os.environ.pop("PYCOMM_CUDA_IPC")
    side = torch.cuda.Stream()
    big = torch.randn(2048, 2048, device=dev)
    for n in (0, 1, 13, 4099, (8 << 20) // 4 + 17, 3 * (8 << 20) // 4 + 5):
        g = torch.Generator().manual_seed(1000 + n)
        base = [torch.randn(n, generator=g) for _ in range(ws)]
        ints = [torch.randint(-1000, 1000, (n,), generator=g, dtype=torch.int64) for _ in range(ws)]
        with torch.cuda.stream(side):
            for _ in range(8):
                big = big @ big / 2048.0  # keeps the side stream busy before the last write
            a = base[rank].to(dev, non_blocking=True) * 1.0
            i = ints[rank].to(dev, non_blocking=True) + 0
            dist.all_reduce(a)
            dist.all_reduce(i)
        b = base[rank].to(dev)
        j = ints[rank].to(dev)
        dist.all_reduce(b, group=staged_group)
        dist.all_reduce(j, group=staged_group)
        torch.cuda.synchronize()
        ref = torch.stack([x.double() for x in base]).sum(0)
        assert torch.allclose(a.double().cpu(), ref, rtol=1e-5, atol=1e-4), f"ipc all_reduce n={n}"
        assert torch.allclose(b.double().cpu(), ref, rtol=1e-5, atol=1e-4), f"staged all_reduce n={n}"
        assert torch.equal(i.cpu(), torch.stack(ints).sum(0)) and torch.equal(j.cpu(), i.cpu()), f"int64 n={n}"
    assert pycomm.stats()["cuda_ipc_collectives"] > 0, "default group did not use CUDA IPC"
    assert pycomm.stats(staged_group)["cuda_ipc_collectives"] == 0, "PYCOMM_CUDA_IPC=0 group used IPC"
    dist.destroy_process_group(staged_group)


@pytest.mark.cuda
@pytest.mark.parametrize("world_size", [2, 3])
def test_cuda_ipc_matches_staged(world_size):
    run_ranks(world_size, _ipc_vs_staged, timeout=300, pg_timeout=120)


def _cuda_other_collectives_path(rank: int, ws: int, path: str) -> dict:
    digests = _cuda_other_collectives(rank, ws)
    s = pycomm.stats()
    used_ipc = s["cuda_ipc_collectives"] > 0
    assert used_ipc == (path == "ipc"), f"{path} path expected: {s}"
    return digests


@pytest.mark.cuda
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_cuda_other_collectives(world_size, path):
    """Every collective but p2p takes CUDA IPC on the default path (PATHS["ipc"]); all are
    staged with PYCOMM_CUDA_IPC=0."""
    _assert_same_digests(run_ranks(world_size, _cuda_other_collectives_path, path, timeout=600, pg_timeout=120,
                                   env=PATHS[path]))


@pytest.mark.cuda
def test_cuda_reduce_many_matches_cpu():
    """The IPC all-reduce's kernel (reduceManyCuda) vs the CPU loop, bitwise: every dtype
    and op, 1-5 sources, 16-byte aligned (vector path) and shifted by one element
    (element path), awkward lengths."""
    from collective_cases import DTYPES as ALL_DTYPES
    from collective_cases import OPS as ALL_OPS
    from collective_cases import op_supported

    dev = _setup_rank()
    seed = 123000
    for dtype in ALL_DTYPES:
        for op in ALL_OPS:
            if not op_supported(dtype, op):
                continue
            for k in (1, 2, 3, 5):
                for n in (1, 7, 13, 1021, 65537):
                    for shift in (0, 1):
                        seed += 1
                        srcs = [to_torch(data(seed, r, n, dtype, op), dtype) for r in range(k)]
                        out = torch.empty_like(srcs[0])
                        pycomm._C.reduce_many(out, srcs, op.lower())
                        big = [torch.zeros(n + shift, dtype=dtype, device=dev) for _ in range(k + 1)]
                        gsrcs = [b[shift:] for b in big[:k]]
                        for g, c in zip(gsrcs, srcs):
                            g.copy_(c)
                        gout = big[k][shift:]
                        pycomm._C.reduce_many(gout, gsrcs, op.lower())
                        assert torch.equal(gout.cpu().view(torch.uint8) if dtype != torch.bool else gout.cpu(),
                                           out.view(torch.uint8) if dtype != torch.bool else out), \
                            f"reduce_many {dtype} {op} k={k} n={n} shift={shift}"


# ============================================================== 2. compressors CUDA vs CPU


def _compressors():
    import pycomm.compression as C

    return [
        ("FP16", lambda: C.FP16(), True),
        ("FP16+EF", lambda: C.FP16(error_feedback=True), True),
        ("BF16", lambda: C.BF16(), True),
        ("BF16+EF", lambda: C.BF16(error_feedback=True), True),
        ("OneBit", lambda: C.OneBit(), True),
        ("QSGD8", lambda: C.QSGD(bits=8, seed=3), True),
        ("QSGD4+EF", lambda: C.QSGD(bits=4, error_feedback=True, seed=5), True),
        ("TopK", lambda: C.TopK(ratio=0.05), True),
        ("PowerSGD", lambda: C.PowerSGD(rank=2, seed=7), False),
    ]


COMP_SHAPES = [(1,), (1000,), (50, 100), (100003,)]
POWERSGD_TOL = dict(rtol=1e-4, atol=1e-5)


def _state_tensors(comp) -> dict:
    out = {}
    for key, st in comp.state_dict()["states"].items():
        for name, v in st.items():
            out[(key, name)] = v
    return out


def _compare(cpu: torch.Tensor, gpu: torch.Tensor, exact: bool, what: str) -> None:
    assert gpu.is_cuda, f"{what}: result not on the GPU"
    g = gpu.cpu()
    assert g.dtype == cpu.dtype and g.shape == cpu.shape, f"{what}: {g.dtype}{tuple(g.shape)} vs {cpu.dtype}{tuple(cpu.shape)}"
    if exact:
        if not torch.equal(g.contiguous().view(torch.uint8), cpu.contiguous().view(torch.uint8)):
            diff = (g.double() - cpu.double()).abs()
            raise AssertionError(f"{what}: CUDA != CPU bitwise ({int((diff > 0).sum())} elements differ, "
                                 f"max |diff| {float(diff.max()) if diff.numel() else 0})")
    else:
        torch.testing.assert_close(g, cpu, msg=lambda m: f"{what}: {m}", **POWERSGD_TOL)


def _compressor_parity(rank: int, ws: int) -> None:
    import pycomm.compression as C

    dev = _setup_rank()
    for name, make, exact in _compressors():
        for si, shape in enumerate(COMP_SHAPES):
            native, generic, gpu = make(), make(), make()
            key = f"k{si}"
            for step in range(3):
                g = torch.Generator().manual_seed(1000 * si + 10 * step + rank)
                x = torch.randn(shape, generator=g) * (1 + step)
                if step == 1:
                    x.view(-1)[::7] = 0.0  # exact zeros: sign bit and tie paths
                a, b, c = x.clone(), x.clone(), x.to(dev)
                native.all_reduce(a, key=key)  # CPU on a pycomm group: the C++ pipelined path
                C.NATIVE = False
                try:
                    if step == 2:  # async path of the generic scheduler, on both devices
                        fb = generic.all_reduce(b, key=key, async_op=True)
                        fc = gpu.all_reduce(c, key=key, async_op=True)
                        fb.wait()
                        assert fc.wait().data_ptr() == c.data_ptr()
                    else:
                        generic.all_reduce(b, key=key)
                        gpu.all_reduce(c, key=key)
                finally:
                    C.NATIVE = True
                what = f"{name} shape={shape} step={step} ws={ws}"
                _compare(b, c, exact, what + " (CUDA vs CPU generic)")
                if exact:
                    assert torch.equal(a, b), f"{what}: CPU native != CPU generic"
            sg, sc = _state_tensors(generic), _state_tensors(gpu)
            assert sg.keys() == sc.keys(), f"{name}: state keys differ {sg.keys()} vs {sc.keys()}"
            for k, v in sg.items():
                if isinstance(v, torch.Tensor):
                    if name == "PowerSGD" and k[1] == "q":
                        continue  # Q is determined up to column signs by QR; P Q^T is compared above
                    _compare(v, sc[k], exact, f"{name} shape={shape} state {k}")
                else:
                    assert v == sc[k], f"{name} state {k}: {v} vs {sc[k]}"
        # half payload inputs take the no-copy path of FP16/BF16
        if name in ("FP16", "BF16"):
            half = torch.float16 if name == "FP16" else torch.bfloat16
            comp_cpu, comp_gpu = make(), make()
            x = (torch.randn(4099, generator=torch.Generator().manual_seed(rank)) * 3).to(half)
            b, c = x.clone(), x.to(dev)
            C.NATIVE = False
            try:
                comp_cpu.all_reduce(b, key="h")
                comp_gpu.all_reduce(c, key="h")
            finally:
                C.NATIVE = True
            _compare(b, c, True, f"{name} on {half} input")


@pytest.mark.cuda
@pytest.mark.parametrize("world_size", [2, 3])
def test_cuda_compressors_match_cpu(world_size):
    run_ranks(world_size, _compressor_parity, timeout=600, pg_timeout=120)


# ---------------------------------------------------------------- raw kernels, one process

ALIGN = int(getattr(pycomm._C, "COMPRESS_ALIGN", 32))
KERNEL_CASES = [(1, 1), (31, 2), (2048, 1), (2049, 3), (40961, 4), (100003, 3)]


def _chunk(n: int, w: int) -> int:
    per = -(-n // w)
    return max(ALIGN, -(-per // ALIGN) * ALIGN)


def _owned(n: int, chunk: int, r: int) -> int:
    return max(0, min(chunk, n - r * chunk))


def _rand(n: int, seed: int, scale: float = 1.0, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    if ties:
        x = torch.round(x * 4) / 4  # many equal magnitudes
    if n > 5:
        x[::5] = 0.0
        x[3::11] = -0.0
    return x


def _bitwise(cpu: torch.Tensor, gpu: torch.Tensor, what: str) -> None:
    _compare(cpu, gpu, True, what)


def _both(t):
    return (None, None) if t is None else (t.clone(), t.to(DEV))


@pytest.mark.cuda
@pytest.mark.parametrize("n,w", KERNEL_CASES)
def test_cuda_kernels_onebit(n, w):
    _setup_rank()
    _C = pycomm._C
    chunk = _chunk(n, w)
    for use_x, use_res in ((True, True), (False, True), (True, False)):
        x_c, x_g = _both(_rand(n, 1) if use_x else None)
        r_c, r_g = _both(_rand(n, 2, 0.1) if use_res else None)
        p_c = _C.one_bit_compress(x_c, r_c, chunk, w)
        p_g = _C.one_bit_compress(x_g, r_g, chunk, w)
        tag = f"one_bit_compress n={n} w={w} x={use_x} res={use_res}"
        _bitwise(p_c, p_g, tag)
        if r_c is not None:
            _bitwise(r_c, r_g, tag + " residual")
    pb = _C.one_bit_payload_bytes(chunk)
    payloads = torch.cat([_C.one_bit_compress(_rand(n, 10 + r), None, chunk, w)[:pb] for r in range(w)])
    for r in range(w):
        for divisor in (1, w):
            for use_res in (True, False):
                s_c, s_g = _both(_rand(chunk, 20 + r, 0.05) if use_res else None)
                args = (w, chunk, _owned(n, chunk, r), divisor)
                o_c = _C.one_bit_server_reduce(payloads, *args, s_c)
                o_g = _C.one_bit_server_reduce(payloads.to(DEV), *args, s_g)
                tag = f"one_bit_server_reduce n={n} w={w} r={r} div={divisor} res={use_res}"
                _bitwise(o_c, o_g, tag)
                if use_res:
                    _bitwise(s_c, s_g, tag + " residual")
    gathered = _C.one_bit_compress(_rand(n, 30), None, chunk, w)
    for accumulate in (False, True):
        out_c, out_g = _both(_rand(n, 31))
        _C.one_bit_decompress(gathered, w, chunk, out_c, accumulate)
        _C.one_bit_decompress(gathered.to(DEV), w, chunk, out_g, accumulate)
        _bitwise(out_c, out_g, f"one_bit_decompress n={n} w={w} acc={accumulate}")


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,w", KERNEL_CASES)
def test_cuda_kernels_qsgd(n, w, bits):
    _setup_rank()
    _C = pycomm._C
    chunk = _chunk(n, w)
    for use_x, use_res, seed, base in ((True, True, 1, 0), (False, True, 2, 12345), (True, False, 0xDEADBEEF, 7)):
        x_c, x_g = _both(_rand(n, 1) if use_x else None)
        r_c, r_g = _both(_rand(n, 2, 0.1) if use_res else None)
        p_c = _C.qsgd_compress(x_c, r_c, chunk, w, bits, seed, base)
        p_g = _C.qsgd_compress(x_g, r_g, chunk, w, bits, seed, base)
        tag = f"qsgd_compress bits={bits} n={n} w={w} x={use_x} res={use_res} base={base}"
        _bitwise(p_c, p_g, tag)
        if r_c is not None:
            _bitwise(r_c, r_g, tag + " residual")
    pb = _C.qsgd_payload_bytes(chunk, bits)
    payloads = torch.cat([_C.qsgd_compress(_rand(n, 10 + r), None, chunk, w, bits, r)[:pb] for r in range(w)])
    for r in range(w):
        for divisor, use_res, base in ((1, False, 0), (w, True, 99)):
            s_c, s_g = _both(_rand(chunk, 20 + r, 0.05) if use_res else None)
            args = (w, chunk, _owned(n, chunk, r), divisor)
            o_c = _C.qsgd_server_reduce(payloads, *args, s_c, bits, 77 + r, base)
            o_g = _C.qsgd_server_reduce(payloads.to(DEV), *args, s_g, bits, 77 + r, base)
            tag = f"qsgd_server_reduce bits={bits} n={n} w={w} r={r} div={divisor}"
            _bitwise(o_c, o_g, tag)
            if use_res:
                _bitwise(s_c, s_g, tag + " residual")
    gathered = _C.qsgd_compress(_rand(n, 30), None, chunk, w, bits, 5)
    for accumulate in (False, True):
        out_c, out_g = _both(_rand(n, 31))
        _C.qsgd_decompress(gathered, w, chunk, bits, out_c, accumulate)
        _C.qsgd_decompress(gathered.to(DEV), w, chunk, bits, out_g, accumulate)
        _bitwise(out_c, out_g, f"qsgd_decompress bits={bits} n={n} w={w} acc={accumulate}")


@pytest.mark.cuda
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("n,w", KERNEL_CASES)
def test_cuda_kernels_half_and_float(n, w, bf16):
    _setup_rank()
    _C = pycomm._C
    chunk = _chunk(n, w)
    for use_res in (True, False):
        x = _rand(n, 1, 300.0)  # large values: fp16 overflow/rounding paths too
        r_c, r_g = _both(_rand(n, 2, 0.1) if use_res else None)
        p_c = _C.half_compress(x, r_c, w * chunk, bf16)
        p_g = _C.half_compress(x.to(DEV), r_g, w * chunk, bf16)
        tag = f"half_compress bf16={bf16} n={n} w={w} res={use_res}"
        _bitwise(p_c, p_g, tag)
        if use_res:
            _bitwise(r_c, r_g, tag + " residual")
    payloads = torch.cat([_C.half_compress(_rand(n, 10 + r), None, w * chunk, bf16)[:chunk] for r in range(w)])
    fpayloads = torch.cat([torch.nn.functional.pad(_rand(n, 40 + r), (0, w * chunk - n))[:chunk] for r in range(w)])
    for r in range(w):
        count = _owned(n, chunk, r)
        for divisor, use_res in ((1, False), (w, True)):
            s_c, s_g = _both(_rand(chunk, 20 + r, 0.05) if use_res else None)
            o_c = _C.half_server_reduce(payloads, w, chunk, count, divisor, s_c)
            o_g = _C.half_server_reduce(payloads.to(DEV), w, chunk, count, divisor, s_g)
            tag = f"half_server_reduce bf16={bf16} n={n} w={w} r={r} div={divisor}"
            _bitwise(o_c, o_g, tag)
            if use_res:
                _bitwise(s_c, s_g, tag + " residual")
            f_c = _C.float_server_reduce(fpayloads, w, chunk, count, divisor)
            f_g = _C.float_server_reduce(fpayloads.to(DEV), w, chunk, count, divisor)
            _bitwise(f_c, f_g, f"float_server_reduce n={n} w={w} r={r} div={divisor}")
    gathered = _C.half_compress(_rand(n, 30), None, w * chunk, bf16)
    out_c, out_g = _both(_rand(n, 31))
    _C.half_decompress(gathered, out_c)
    _C.half_decompress(gathered.to(DEV), out_g)
    _bitwise(out_c, out_g, f"half_decompress bf16={bf16} n={n}")


@pytest.mark.cuda
@pytest.mark.parametrize("n,w", KERNEL_CASES)
def test_cuda_kernels_topk(n, w):
    _setup_rank()
    _C = pycomm._C
    ks = sorted({1, max(1, n // 100), max(1, n // 3), n})
    for k in ks:
        for ties in (False, True):
            for use_x, use_res in ((True, True), (False, True), (True, False)):
                x_c, x_g = _both(_rand(n, 1, ties=ties) if use_x else None)
                r_c, r_g = _both(_rand(n, 2, 0.5, ties=ties) if use_res else None)
                p_c = _C.topk_compress(x_c, r_c, k)
                p_g = _C.topk_compress(x_g, r_g, k)
                tag = f"topk_compress n={n} k={k} ties={ties} x={use_x} res={use_res}"
                _bitwise(p_c, p_g, tag)  # values, indices, their order and the tie rule
                if use_res:
                    _bitwise(r_c, r_g, tag + " residual")
        payloads = torch.cat([_C.topk_compress(_rand(n, 50 + r, ties=True), None, k) for r in range(w)])
        for divisor in (1, w):
            out_c = torch.empty(n)
            out_g = torch.empty(n, device=DEV)
            _C.topk_decompress(payloads, w, k, out_c, divisor)
            _C.topk_decompress(payloads.to(DEV), w, k, out_g, divisor)
            _bitwise(out_c, out_g, f"topk_decompress n={n} k={k} w={w} div={divisor}")


# ============================================================== 3. streams, DataParallel


SLEEP_CYCLES = 200_000_000  # ~0.1 s of GPU time ahead of the input's final write


def _stream_semantics(rank: int, ws: int) -> None:
    import torch.distributed as dist

    import pycomm.compression as C

    dev = _setup_rank()
    expect = ws * (ws + 1) / 2
    side = torch.cuda.Stream()
    n = 1 << 20

    # (a) input written on the current side stream behind a long sleep, then all_reduce
    x = torch.zeros(n, device=dev)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        x.fill_(rank + 1)
        dist.all_reduce(x)
        y = x * 2  # consumer on the same current stream, no host sync in between
    torch.cuda.current_stream().wait_stream(side)
    assert bool(torch.all(y == 2 * expect)), f"(a) pending fill: got {y[:4].tolist()}"

    # (b) input produced by long matmuls on the current stream; async op, wait, use
    k = 2048
    a = torch.ones(k, k, device=dev)
    b = torch.full((k, k), float(rank + 1), device=dev)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        c = a @ b
        for _ in range(15):
            c = a @ b  # all entries k * (rank + 1), exact in float32
        x = c[0].contiguous()
        work = dist.all_reduce(x, async_op=True)
        work.wait()
        z = x + 1
    torch.cuda.current_stream().wait_stream(side)
    assert bool(torch.all(z == k * expect + 1)), f"(b) matmul input: got {z[:4].tolist()}"

    # (c) outputs of other collectives used right after wait() on the current stream
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        src = torch.full((4099,), float(rank + 1), device=dev)
        out = torch.empty(4099 * ws, device=dev)
        w1 = dist.all_gather_into_tensor(out, src, async_op=True)
        bc = torch.full((777,), float(rank), device=dev)
        w2 = dist.broadcast(bc, src=ws - 1, async_op=True)
        rs_in = torch.full((ws * 513,), float(rank + 1), device=dev)
        rs_out = torch.empty(513, device=dev)
        w3 = dist.reduce_scatter_tensor(rs_out, rs_in, async_op=True)
        w1.wait()
        w2.wait()
        fut_val = w3.get_future().wait()[0]
        gathered_sum = out.view(ws, -1).sum(1)
        bc2 = bc * 3
        rs2 = rs_out - 0.5
    torch.cuda.current_stream().wait_stream(side)
    assert gathered_sum.tolist() == [4099.0 * (r + 1) for r in range(ws)], "(c) all_gather output"
    assert bool(torch.all(bc2 == 3 * (ws - 1))), "(c) broadcast output"
    assert bool(torch.all(rs2 == expect - 0.5)) and bool(torch.all(fut_val == expect)), "(c) reduce_scatter"

    # (d) input written on a side stream, synchronised into the default stream, then the op
    x = torch.zeros(n, device=dev)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        x.fill_(rank + 1)
    torch.cuda.current_stream().wait_stream(side)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    assert bool(torch.all((x - ws) == 0)), "(d) side stream -> default stream"

    # (e) compressors run their kernels on the current stream: pending input, CPU parity
    for comp_cpu, comp_gpu in ((C.FP16(), C.FP16()), (C.OneBit(), C.OneBit()), (C.TopK(1.0), C.TopK(1.0)),
                               (C.QSGD(bits=8), C.QSGD(bits=8))):
        ref = torch.randn(n, generator=torch.Generator().manual_seed(rank))
        C.NATIVE = False
        try:
            comp_cpu.all_reduce(ref, key="s")
            x = torch.zeros(n, device=dev)
            src = torch.randn(n, generator=torch.Generator().manual_seed(rank)).to(dev)
            torch.cuda.synchronize()
            with torch.cuda.stream(side):
                torch.cuda._sleep(SLEEP_CYCLES)
                x.copy_(src)
                comp_gpu.all_reduce(x, key="s")
                x2 = x.clone()
        finally:
            C.NATIVE = True
        torch.cuda.current_stream().wait_stream(side)
        _compare(ref, x2, True, f"(e) {type(comp_cpu).__name__} on a busy side stream")

    # (f) a raw kernel on a busy current stream reads the final input
    with torch.cuda.stream(side):
        v = torch.zeros(65536, device=dev)
        torch.cuda._sleep(SLEEP_CYCLES)
        v.fill_(-2.0)
        p = pycomm._C.one_bit_compress(v, None, 65536, 1)
        back = torch.empty(65536, device=dev)
        pycomm._C.one_bit_decompress(p, 1, 65536, back)
    torch.cuda.current_stream().wait_stream(side)
    assert bool(torch.all(back == -2.0)), "(f) kernel ordering on the current stream"

    # (g) send/recv staged on the p2p threads: the send reads the input written behind a
    # sleep on the busy current stream; the receive lands after a pending fill of its
    # buffer on that stream (not before, which the fill would overwrite)
    nxt, prv = (rank + 1) % ws, (rank - 1) % ws
    mine = torch.zeros(n, device=dev)
    got = torch.zeros(n, device=dev)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        mine.fill_(rank + 1)
        got.fill_(-1.0)
        sw = dist.isend(mine, nxt, tag=21)
        rw = dist.irecv(got, prv, tag=21)
        rw.wait()
        sw.wait()
        got2 = got * 2
    torch.cuda.current_stream().wait_stream(side)
    assert bool(torch.all(got2 == 2 * (prv + 1))), f"(g) p2p stream ordering: got {got2[:4].tolist()}"


@pytest.mark.cuda
@pytest.mark.parametrize("world_size", [2, 3])
def test_cuda_stream_semantics(world_size):
    run_ranks(world_size, _stream_semantics, timeout=300, pg_timeout=120)


class _Mlp(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(8, 32)
        self.l2 = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 4)
        self.register_buffer("steps", torch.zeros(1))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def _data_parallel_cuda(rank: int, ws: int) -> None:
    from pycomm.data_parallel import DataParallel

    dev = _setup_rank()
    base = _Mlp(seed=rank)  # differs per rank: both wrappers must broadcast rank 0's weights
    cpu = DataParallel(copy.deepcopy(base), bucket_cap_mb=0.002, first_bucket_mb=0.001)
    gpu = DataParallel(copy.deepcopy(base).to(dev), bucket_cap_mb=0.002, first_bucket_mb=0.001)
    assert len(gpu.bucket_layout()) > 1, "the test needs several buckets"
    opt_c = torch.optim.SGD(cpu.parameters(), lr=0.1, momentum=0.9)
    opt_g = torch.optim.SGD(gpu.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        for model, opt, d in ((cpu, opt_c, "cpu"), (gpu, opt_g, dev)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.to(d)), y.to(d)).backward()
            opt.step()
        for (nm, p), (_, q) in zip(cpu.module.named_parameters(), gpu.module.named_parameters()):
            assert q.is_cuda and q.grad is not None and q.grad.is_cuda
            torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-5, rtol=0,
                                       msg=lambda m: f"step {step} {nm}.grad: {m}")
            torch.testing.assert_close(q.detach().cpu(), p.detach(), atol=1e-5, rtol=0,
                                       msg=lambda m: f"step {step} {nm}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("world_size", [2, 3])
def test_cuda_data_parallel_matches_cpu(world_size):
    run_ranks(world_size, _data_parallel_cuda, timeout=300, pg_timeout=120)


# ============================================================== 4. cupy interop


def _cupy_skip_reason() -> str:
    try:
        import cupy as cp

        cp.zeros(1).sum().item()
    except Exception as e:  # noqa: BLE001 - any failure to use cupy means "skip"
        return f"cupy unusable here: {type(e).__name__}: {e}"
    return ""


def _cupy_collectives(rank: int, ws: int) -> None:
    import cupy as cp

    import pycomm.compression as C

    _setup_rank()
    with cp.cuda.Device(0):
        n = 1021
        a = cp.arange(n, dtype=cp.float32) + rank
        pycomm.all_reduce(a, op="sum")
        assert np.array_equal(cp.asnumpy(a), np.arange(n) * ws + sum(range(ws))), "cupy all_reduce sum"
        b = cp.full(7, rank + 1, dtype=cp.int64)
        pycomm.all_reduce(b, op="max")
        assert np.all(cp.asnumpy(b) == ws), "cupy all_reduce max"
        c = cp.full(65537, rank, dtype=cp.float16)
        pycomm.broadcast(c, src=ws - 1)
        assert np.all(cp.asnumpy(c) == ws - 1), "cupy broadcast"
        r = cp.full(5, rank + 1, dtype=cp.int32)
        pycomm.reduce(r, dst=0, op="sum")
        if rank == 0:
            assert np.all(cp.asnumpy(r) == ws * (ws + 1) // 2), "cupy reduce"
        out = cp.empty(3 * ws, dtype=cp.float32)
        pycomm.all_gather(out, cp.full(3, rank, dtype=cp.float32))
        assert np.array_equal(cp.asnumpy(out), np.repeat(np.arange(ws), 3)), "cupy all_gather"
        rs = cp.empty(4, dtype=cp.float32)
        pycomm.reduce_scatter(rs, cp.ones(4 * ws, dtype=cp.float32) * (rank + 1), op="sum")
        assert np.all(cp.asnumpy(rs) == ws * (ws + 1) / 2), "cupy reduce_scatter"
        a2a = cp.empty(2 * ws, dtype=cp.int64)
        pycomm.all_to_all(a2a, cp.arange(2 * ws, dtype=cp.int64) + 100 * rank)
        ref = np.concatenate([np.arange(2 * rank, 2 * rank + 2) + 100 * q for q in range(ws)])
        assert np.array_equal(cp.asnumpy(a2a), ref), "cupy all_to_all"
        if ws >= 2 and rank in (0, 1):
            buf = cp.full(9, rank, dtype=cp.float32)
            if rank == 0:
                pycomm.send(buf, 1)
            else:
                pycomm.recv(buf, 0)
                assert np.all(cp.asnumpy(buf) == 0), "cupy send/recv"
        pycomm.barrier()
        # compressed all_reduce on a cupy array == the same compressor on a numpy array
        host = np.random.default_rng(rank).standard_normal(4099).astype(np.float32)
        dev_arr = cp.asarray(host)
        ref_arr = host.copy()
        C.NATIVE = False
        try:
            pycomm.all_reduce(ref_arr, op="avg", compression=C.FP16())
            pycomm.all_reduce(dev_arr, op="avg", compression=C.FP16())
        finally:
            C.NATIVE = True
        assert np.array_equal(cp.asnumpy(dev_arr), ref_arr), "cupy FP16 compressed all_reduce != numpy"


@pytest.mark.cuda
def test_cuda_cupy_interop():
    reason = _cupy_skip_reason()
    if reason:
        pytest.skip(reason)
    run_ranks(2, _cupy_collectives, timeout=300, pg_timeout=120)
