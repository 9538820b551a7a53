"""Throughput of the fused compression kernels vs the same math written with torch ops.

    python benchmarks/bench_compression_kernels.py [--numel 4194304] [--world-size 4] [--threads 1]

GB/s = float32 gradient bytes processed (numel * 4) / time, best of --repeat runs. Both
sides run in this process, on the same tensors, with the same torch thread count (the
fused CPU kernels are single-threaded). "compress" is the worker step (add residual,
scale, quantise, pack, new residual); "decompress" unpacks the world_size payloads into a
float32 buffer.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pycomm._C as _C  # noqa: E402
import pycomm.compression as C  # noqa: E402


def _best(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------- torch-op versions

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


_ONE_BIT_BLOCK = 2048


def _onebit_counts(n, chunk, w):
    """Valid elements of each 2048-block of the w chunks (the kernel's per-block divisor)."""
    nb = -(-chunk // _ONE_BIT_BLOCK)
    first = torch.arange(nb) * _ONE_BIT_BLOCK
    start = (torch.arange(w)[:, None] * chunk + first[None, :]).reshape(-1)
    length = (chunk - first).clamp(max=_ONE_BIT_BLOCK).repeat(w)
    return (n - start).clamp(min=0).minimum(length)


def onebit_compress_torch(x, res, chunk, w):
    # Same math as the kernel: per 2048-element block scale = mean |v| over its valid elements.
    nb = -(-chunk // _ONE_BIT_BLOCK)
    v = torch.zeros(w * chunk)
    v[: x.numel()] = x + res[: x.numel()]
    m = v.view(w, chunk)
    if chunk % _ONE_BIT_BLOCK:
        m = torch.nn.functional.pad(m, (0, nb * _ONE_BIT_BLOCK - chunk))
    blocks = m.reshape(w * nb, _ONE_BIT_BLOCK)
    scale = blocks.abs().sum(1) / _onebit_counts(x.numel(), chunk, w).clamp(min=1)
    pos = blocks >= 0
    packed = (pos.view(w * nb, _ONE_BIT_BLOCK // 8, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(2, dtype=torch.uint8)
    err = (blocks - torch.where(pos, scale[:, None], -scale[:, None])).view(w, -1)[:, :chunk]
    res[: x.numel()] = err.reshape(-1)[: x.numel()]
    return scale, packed


def onebit_decompress_torch(scale, packed, n):  # chunk a multiple of 2048 (as benchmarked)
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS).ne(0)
    vals = torch.where(bits.view(scale.numel(), -1), scale[:, None], -scale[:, None])
    return vals.view(-1)[:n]


def qsgd_compress_torch(x, bits, gen):
    levels = 127 if bits == 8 else 7
    blocks = x.view(-1, 512)
    scale = blocks.abs().amax(1, keepdim=True)
    u = torch.rand(blocks.shape, generator=gen)
    q = torch.floor(blocks.abs() / scale * levels + u).clamp_(max=levels) * blocks.sign()
    q = q.to(torch.int8)
    if bits == 4:
        q = q.view(-1, 2)
        q = (q[:, 0] & 0xF) | ((q[:, 1] & 0xF) << 4)
    return scale, q


def qsgd_decompress_torch(scale, q, bits):
    levels = 127 if bits == 8 else 7
    if bits == 4:
        lo = (q << 4).to(torch.int8) >> 4
        hi = q.to(torch.int8) >> 4
        q = torch.stack([lo, hi], 1).view(scale.shape[0], -1)
    return (q.view(scale.shape[0], -1).float() * (scale / levels)).view(-1)


def topk_compress_torch(x, res, k):
    res.add_(x)
    idx = torch.topk(res.abs(), k, sorted=False).indices
    vals = res[idx]
    res[idx] = 0
    return vals, idx


def topk_decompress_torch(vals, idx, n, w):
    out = torch.zeros(n, device=vals.device)
    for _ in range(w):
        out.index_add_(0, idx, vals)
    return out.div_(w)


def topk_cases(x, res, res_t, out, w):
    """TopK(1 %) benchmark calls on x's device: fused and torch-op compress and decompress
    (of w identical payloads), after one warm-up compress that fills the payloads."""
    numel = x.numel()
    k = max(1, numel // 100)
    res.zero_()
    res_t.zero_()
    gathered = torch.cat([_C.topk_compress(x, res, k)] * w)
    vals_t, idx_t = topk_compress_torch(x, res_t, k)
    return {
        "compress": lambda: _C.topk_compress(x, res, k),
        "compress_torch": lambda: topk_compress_torch(x, res_t, k),
        "decompress": lambda: _C.topk_decompress(gathered, w, k, out, w),
        "decompress_torch": lambda: topk_decompress_torch(vals_t, idx_t, numel, w),
    }


def half_compress_torch(x, res):
    v = x + res
    h = v.half()
    res.copy_(v - h.float())
    return h


# ----------------------------------------------------------------------- main


def run(numel: int, w: int, repeat: int) -> List[Tuple[str, str, float, float]]:
    torch.manual_seed(0)
    x = torch.randn(numel)
    gb = numel * 4 / 1e9
    chunk = C.engine._chunk(numel, w, 32)
    gen = torch.Generator().manual_seed(0)
    rows: List[Tuple[str, str, float, float]] = []

    def add(name, phase, fused, ref):
        rows.append((name, phase, gb / _best(fused, repeat), gb / _best(ref, repeat)))

    res = torch.zeros(numel)
    res_t = torch.zeros(numel)
    out = torch.empty(numel)
    p = _C.one_bit_compress(x, res, chunk, w)
    scale_t, packed_t = onebit_compress_torch(x, res_t, chunk, w)
    add("OneBit", "compress", lambda: _C.one_bit_compress(x, res, chunk, w),
        lambda: onebit_compress_torch(x, res_t, chunk, w))
    add("OneBit", "decompress", lambda: _C.one_bit_decompress(p, w, chunk, out),
        lambda: onebit_decompress_torch(scale_t, packed_t, numel))

    for bits in (8, 4):
        q = _C.qsgd_compress(x, None, chunk, w, bits, 1)
        xs = x[: numel // 512 * 512]
        s_t, q_t = qsgd_compress_torch(xs, bits, gen)
        add(f"QSGD({bits})", "compress", lambda: _C.qsgd_compress(x, None, chunk, w, bits, 1),
            lambda: qsgd_compress_torch(xs, bits, gen))
        add(f"QSGD({bits})", "decompress", lambda: _C.qsgd_decompress(q, w, chunk, bits, out),
            lambda: qsgd_decompress_torch(s_t, q_t, bits))

    tk = topk_cases(x, res, res_t, out, w)
    add("TopK(0.01)", "compress", tk["compress"], tk["compress_torch"])
    add("TopK(0.01)", "decompress", tk["decompress"], tk["decompress_torch"])

    res.zero_()
    res_t.zero_()
    h = _C.half_compress(x, res, numel, False)
    add("FP16+EF", "compress", lambda: _C.half_compress(x, res, numel, False), lambda: half_compress_torch(x, res_t))
    add("FP16", "decompress", lambda: _C.half_decompress(h, out), lambda: h.float())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.numel, args.world_size, args.repeat)
    print(f"# numel={args.numel} ({args.numel * 4 / 2**20:.0f} MiB float32), world_size={args.world_size}, "
          f"torch threads={args.threads}, torch {torch.__version__}")
    print(f"{'compressor':<12} {'phase':<11} {'fused GB/s':>10} {'torch GB/s':>10} {'speedup':>8}")
    for name, phase, fused, ref in rows:
        print(f"{name:<12} {phase:<11} {fused:>10.2f} {ref:>10.2f} {fused / ref:>7.1f}x")


if __name__ == "__main__":
    main()
