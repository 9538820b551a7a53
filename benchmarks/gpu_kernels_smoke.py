"""Runs every CUDA kernel pycomm exposes once, in one process, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python benchmarks/gpu_kernels_smoke.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/gpu_kernels_smoke.py

No torch.distributed and no subprocesses (the sanitizer follows this process only).
Sizes are small but cover whole and partial OneBit (2048) and QSGD (512) blocks, several
chunks, residual / no residual, accumulate, 8- and 4-bit QSGD, fp16 and bf16, TopK with
ties, and the CUDA branches of the bucket flatten/unflatten helpers. Each CUDA result is
also compared with the CPU kernel bitwise; a mismatch exits 2. Run with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 (gpu_check.sh does) so every tensor is its own
allocation and memcheck sees out-of-bounds accesses that the caching allocator would hide.

Also reduceManyCuda (the CUDA IPC all-reduce's kernel, through _C.reduce_many) on
16-byte aligned and shifted buffers. Not covered: reduceIntoCuda / reduce3Cuda /
finalizeAvgCuda have no caller and no binding; the IPC all-reduce itself needs several
processes, which this one-process driver does not start.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pycomm  # noqa: E402

_C = pycomm._C
DEV = torch.device("cuda:0")
ALIGN = int(_C.COMPRESS_ALIGN)
failures = []
launched = []


def chunk_of(n: int, w: int) -> int:
    per = -(-n // w)
    return max(ALIGN, -(-per // ALIGN) * ALIGN)


def owned(n: int, chunk: int, r: int) -> int:
    return max(0, min(chunk, n - r * chunk))


def rand(n: int, seed: int, scale: float = 1.0, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    if ties:
        x = torch.round(x * 4) / 4
    if n > 5:
        x[::5] = 0.0
    return x


def same(name: str, cpu: torch.Tensor, gpu: torch.Tensor) -> None:
    launched.append(name)
    g = gpu.cpu()
    if g.shape != cpu.shape or not torch.equal(g.contiguous().view(torch.uint8), cpu.contiguous().view(torch.uint8)):
        failures.append(name)
        print(f"MISMATCH {name}", flush=True)


def both(t):
    return (None, None) if t is None else (t.clone(), t.to(DEV))


def run(n: int, w: int) -> None:
    chunk = chunk_of(n, w)
    tag = f"n={n} w={w}"
    # OneBit
    for use_x in (True, False):
        x_c, x_g = both(rand(n, 1) if use_x else None)
        r_c, r_g = both(rand(n, 2, 0.1))
        same(f"one_bit_compress {tag} x={use_x}", _C.one_bit_compress(x_c, r_c, chunk, w),
             _C.one_bit_compress(x_g, r_g, chunk, w))
        same(f"one_bit_compress residual {tag}", r_c, r_g)
    pb = _C.one_bit_payload_bytes(chunk)
    pay = torch.cat([_C.one_bit_compress(rand(n, 10 + r), None, chunk, w)[:pb] for r in range(w)])
    s_c, s_g = both(rand(chunk, 3, 0.05))
    same(f"one_bit_server_reduce {tag}", _C.one_bit_server_reduce(pay, w, chunk, owned(n, chunk, w - 1), w, s_c),
         _C.one_bit_server_reduce(pay.to(DEV), w, chunk, owned(n, chunk, w - 1), w, s_g))
    gathered = _C.one_bit_compress(rand(n, 4), None, chunk, w)
    for acc in (False, True):
        o_c, o_g = both(rand(n, 5))
        _C.one_bit_decompress(gathered, w, chunk, o_c, acc)
        _C.one_bit_decompress(gathered.to(DEV), w, chunk, o_g, acc)
        same(f"one_bit_decompress {tag} acc={acc}", o_c, o_g)
    # QSGD
    for bits in (8, 4):
        x_c, x_g = both(rand(n, 6))
        r_c, r_g = both(rand(n, 7, 0.1))
        same(f"qsgd_compress {tag} bits={bits}", _C.qsgd_compress(x_c, r_c, chunk, w, bits, 11, 3),
             _C.qsgd_compress(x_g, r_g, chunk, w, bits, 11, 3))
        same(f"qsgd_compress residual {tag} bits={bits}", r_c, r_g)
        qb = _C.qsgd_payload_bytes(chunk, bits)
        pay = torch.cat([_C.qsgd_compress(rand(n, 20 + r), None, chunk, w, bits, r)[:qb] for r in range(w)])
        s_c, s_g = both(rand(chunk, 8, 0.05))
        cnt = owned(n, chunk, 0)
        same(f"qsgd_server_reduce {tag} bits={bits}", _C.qsgd_server_reduce(pay, w, chunk, cnt, w, s_c, bits, 9, 1),
             _C.qsgd_server_reduce(pay.to(DEV), w, chunk, cnt, w, s_g, bits, 9, 1))
        gathered = _C.qsgd_compress(rand(n, 12), None, chunk, w, bits, 13)
        for acc in (False, True):
            o_c, o_g = both(rand(n, 14))
            _C.qsgd_decompress(gathered, w, chunk, bits, o_c, acc)
            _C.qsgd_decompress(gathered.to(DEV), w, chunk, bits, o_g, acc)
            same(f"qsgd_decompress {tag} bits={bits} acc={acc}", o_c, o_g)
    # FP16 / BF16 / float
    for bf16 in (False, True):
        x = rand(n, 15, 10.0)
        r_c, r_g = both(rand(n, 16, 0.1))
        same(f"half_compress {tag} bf16={bf16}", _C.half_compress(x, r_c, w * chunk, bf16),
             _C.half_compress(x.to(DEV), r_g, w * chunk, bf16))
        same(f"half_compress residual {tag} bf16={bf16}", r_c, r_g)
        pay = torch.cat([_C.half_compress(rand(n, 30 + r), None, w * chunk, bf16)[:chunk] for r in range(w)])
        s_c, s_g = both(rand(chunk, 17, 0.05))
        cnt = owned(n, chunk, 0)
        same(f"half_server_reduce {tag} bf16={bf16}", _C.half_server_reduce(pay, w, chunk, cnt, w, s_c),
             _C.half_server_reduce(pay.to(DEV), w, chunk, cnt, w, s_g))
        h = _C.half_compress(rand(n, 18), None, w * chunk, bf16)
        o_c, o_g = torch.empty(n), torch.empty(n, device=DEV)
        _C.half_decompress(h, o_c)
        _C.half_decompress(h.to(DEV), o_g)
        same(f"half_decompress {tag} bf16={bf16}", o_c, o_g)
    fpay = rand(w * chunk, 19)
    same(f"float_server_reduce {tag}", _C.float_server_reduce(fpay, w, chunk, owned(n, chunk, 0), w),
         _C.float_server_reduce(fpay.to(DEV), w, chunk, owned(n, chunk, 0), w))
    # TopK
    for k in sorted({1, max(1, n // 10), n}):
        x_c, x_g = both(rand(n, 21, ties=True))
        r_c, r_g = both(rand(n, 22, 0.5, ties=True))
        same(f"topk_compress {tag} k={k}", _C.topk_compress(x_c, r_c, k), _C.topk_compress(x_g, r_g, k))
        same(f"topk_compress residual {tag} k={k}", r_c, r_g)
        pay = torch.cat([_C.topk_compress(rand(n, 40 + r), None, k) for r in range(w)])
        o_c, o_g = torch.empty(n), torch.empty(n, device=DEV)
        _C.topk_decompress(pay, w, k, o_c, w)
        _C.topk_decompress(pay.to(DEV), w, k, o_g, w)
        same(f"topk_decompress {tag} k={k}", o_c, o_g)


def buckets() -> None:
    """CUDA branches of the DataParallel bucket helpers (torch copies on the current stream)."""
    ts = [torch.randn(s, device=DEV) for s in (3, 1000, 7)]
    offsets, off = [], 0
    for t in ts:
        offsets.append(off)
        off += t.numel()
    flat = torch.zeros(off, device=DEV)
    _C.bucket_flatten(flat, ts, offsets, [t.numel() for t in ts])
    outs = [torch.empty_like(t) for t in ts]
    _C.bucket_unflatten(flat, outs, offsets)
    ok = all(torch.equal(a, b) for a, b in zip(ts, outs))
    launched.append("bucket_flatten/unflatten cuda")
    if not ok:
        failures.append("bucket_flatten/unflatten cuda")
        print("MISMATCH bucket_flatten/unflatten cuda", flush=True)


def reduce_many() -> None:
    """reduceManyCuda vs the CPU loop: vector path (aligned), element path (shifted by one
    element), tails, half types, 1 and 5 sources, AVG and MAX."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32):
        for k, n, op in ((1, 37, "sum"), (5, 2049, "avg"), (3, 5003, "max")):
            for shift in (0, 1):
                srcs = [(rand(n, 900 + r) * 8).to(dtype) for r in range(k)]
                out = torch.empty_like(srcs[0])
                _C.reduce_many(out, srcs, op)
                bufs = [torch.zeros(n + shift, dtype=dtype, device=DEV) for _ in range(k + 1)]
                for b, c in zip(bufs, srcs):
                    b[shift:].copy_(c)
                gout = bufs[k][shift:]
                _C.reduce_many(gout, [b[shift:] for b in bufs[:k]], op)
                same(f"reduce_many {dtype} k={k} n={n} {op} shift={shift}", out, gout)


def main() -> int:
    if not torch.cuda.is_available() or not getattr(_C, "with_cuda", False):
        print(f"SKIP: cuda available={torch.cuda.is_available()}, pycomm._C.with_cuda={getattr(_C, 'with_cuda', None)}")
        return 3
    torch.cuda.set_device(0)
    for n, w in ((1, 1), (37, 2), (2049, 3), (5000, 4)):
        run(n, w)
    buckets()
    reduce_many()
    torch.cuda.synchronize()
    print(f"launched {len(launched)} CUDA kernel checks; {len(failures)} CPU/CUDA mismatches")
    print("note: reduceIntoCuda/reduce3Cuda/finalizeAvgCuda have no caller and were not launched")
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
