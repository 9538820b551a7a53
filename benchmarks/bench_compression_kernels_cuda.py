"""CUDA throughput of the fused compression kernels vs the same math in torch ops (and
cupy.packbits for OneBit when cupy imports), against device-to-device copy bandwidth.

    python benchmarks/bench_compression_kernels_cuda.py [--numel 33554432] [--world-size 4] [--repeat 20]

Timing: CUDA events around each call on the current stream, after 3 warm-ups; the
median of --repeat runs is reported. Columns:

* grad GB/s   float32 gradient bytes processed (numel * 4) / time, as in the CPU
              benchmark (bench_compression_kernels.py).
* traffic GB/s  the least DRAM bytes the step must move (reads + writes, listed per row
              in the "bytes/elem" column) / time.
* % copy      traffic GB/s / the bandwidth of ``dst.copy_(src)`` measured in this run
              (copy counted as read + write, 8 bytes per float32 element), i.e. how close
              the kernel gets to the memory-bound ceiling.
* torch GB/s / cupy GB/s  the same step written with torch (or cupy) ops, grad GB/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pycomm._C as _C  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The device-agnostic torch-op references are shared with the CPU benchmark.
from bench_compression_kernels import qsgd_decompress_torch, topk_cases  # noqa: E402

BLOCK1 = 2048  # OneBit block
BLOCKQ = 512  # QSGD block


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of fn() on the current stream."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------- torch / cupy versions
# (chunk a multiple of 2048 and of 512 here: --numel is rounded so that it is)

_W8 = None


def _weights(dev):
    global _W8
    if _W8 is None:
        _W8 = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=dev)
    return _W8


def onebit_compress_torch(x, res):
    v = (x + res).view(-1, BLOCK1)
    scale = v.abs().mean(1)
    pos = v >= 0
    packed = (pos.view(-1, BLOCK1 // 8, 8).to(torch.uint8) * _weights(x.device)).sum(2, dtype=torch.uint8)
    res.copy_((v - torch.where(pos, scale[:, None], -scale[:, None])).view(-1))
    return scale, packed


def onebit_decompress_torch(scale, packed):
    bits = (packed.unsqueeze(-1) & _weights(packed.device)).ne(0)
    return torch.where(bits.view(scale.numel(), -1), scale[:, None], -scale[:, None]).view(-1)


def onebit_compress_cupy(cp, x, res):
    v = (x + res).view(-1, BLOCK1)
    scale = v.abs().mean(1)
    pos = v >= 0
    packed = cp.packbits(cp.from_dlpack(pos.view(torch.uint8)), axis=1, bitorder="little")
    res.copy_((v - torch.where(pos, scale[:, None], -scale[:, None])).view(-1))
    return scale, packed


def onebit_decompress_cupy(cp, scale, packed):
    bits = torch.from_dlpack(cp.unpackbits(packed, axis=1, bitorder="little")).bool()
    return torch.where(bits, scale[:, None], -scale[:, None]).view(-1)


def qsgd_compress_torch(x, bits):
    levels = 127 if bits == 8 else 7
    blocks = x.view(-1, BLOCKQ)
    scale = blocks.abs().amax(1, keepdim=True)
    u = torch.rand_like(blocks)
    q = (torch.floor(blocks.abs() / scale * levels + u).clamp_(max=levels) * blocks.sign()).to(torch.int8)
    if bits == 4:
        q = q.view(-1, 2)
        q = (q[:, 0] & 0xF) | ((q[:, 1] & 0xF) << 4)
    return scale, q


def half_compress_torch(x, res, dtype):
    v = x + res
    h = v.to(dtype)
    res.copy_(v - h.float())
    return h


# ----------------------------------------------------------------------- main


Row = Tuple[str, str, float, float, Optional[float], Optional[float]]  # name, phase, bytes/elem, fused, torch, cupy


def run(numel: int, w: int, repeat: int, cp) -> Tuple[float, List[Row]]:
    dev = torch.device("cuda:0")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(numel, device=dev, generator=g)
    chunk = numel // w
    rows: List[Row] = []

    src = torch.randn(numel, device=dev, generator=g)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), repeat)
    copy_bw = 8 * numel / t_copy

    def add(name, phase, bpe, fused, ref=None, cup=None):
        tf = timed(fused, repeat)
        tr = timed(ref, repeat) if ref is not None else None
        tc = timed(cup, repeat) if cup is not None else None
        rows.append((name, phase, bpe, tf, tr, tc))

    res, res_t = torch.zeros_like(x), torch.zeros_like(x)
    out = torch.empty_like(x)
    p = _C.one_bit_compress(x, res, chunk, w)
    scale_t, packed_t = onebit_compress_torch(x, res_t)
    cup_c = cup_d = None
    if cp is not None:
        packed_c = cp.packbits(cp.from_dlpack((x.view(-1, BLOCK1) >= 0).view(torch.uint8)), axis=1, bitorder="little")
        cup_c = lambda: onebit_compress_cupy(cp, x, res_t)  # noqa: E731
        cup_d = lambda: onebit_decompress_cupy(cp, scale_t, packed_c)  # noqa: E731
    add("OneBit", "compress", 12.125, lambda: _C.one_bit_compress(x, res, chunk, w),
        lambda: onebit_compress_torch(x, res_t), cup_c)
    add("OneBit", "decompress", 4.125, lambda: _C.one_bit_decompress(p, w, chunk, out),
        lambda: onebit_decompress_torch(scale_t, packed_t), cup_d)
    add("OneBit", "decomp+acc", 8.125, lambda: _C.one_bit_decompress(p, w, chunk, out, True))
    pb = _C.one_bit_payload_bytes(chunk)
    server = torch.zeros(chunk, device=dev)
    add("OneBit", "server_red", (w * 0.125 + 8 + 0.125) / w,  # per gradient element of the whole tensor
        lambda: _C.one_bit_server_reduce(p[: w * pb], w, chunk, chunk, w, server))

    for bits in (8, 4):
        q = _C.qsgd_compress(x, None, chunk, w, bits, 1)
        s_t, q_t = qsgd_compress_torch(x, bits)
        add(f"QSGD({bits})", "compress", 4 + bits / 8, lambda: _C.qsgd_compress(x, None, chunk, w, bits, 1),
            lambda: qsgd_compress_torch(x, bits))
        add(f"QSGD({bits})+EF", "compress", 12 + bits / 8, lambda: _C.qsgd_compress(x, res, chunk, w, bits, 1))
        add(f"QSGD({bits})", "decompress", 4 + bits / 8, lambda: _C.qsgd_decompress(q, w, chunk, bits, out),
            lambda: qsgd_decompress_torch(s_t, q_t, bits))

    tk = topk_cases(x, res, res_t, out, w)
    add("TopK(0.01)", "compress", 12, tk["compress"], tk["compress_torch"])
    add("TopK(0.01)", "decompress", 4 + 0.08 * w, tk["decompress"], tk["decompress_torch"])

    for name, bf16, dt in (("FP16", False, torch.float16), ("BF16", True, torch.bfloat16)):
        res.zero_()
        res_t.zero_()
        h = _C.half_compress(x, res, numel, bf16)
        add(f"{name}+EF", "compress", 14, lambda: _C.half_compress(x, res, numel, bf16),
            lambda: half_compress_torch(x, res_t, dt))
        add(name, "compress", 6, lambda: _C.half_compress(x, None, numel, bf16), lambda: x.to(dt))
        add(name, "decompress", 6, lambda: _C.half_decompress(h, out), lambda: h.float())
        hp = h[: w * chunk]
        add(name, "server_red", (2 * w + 2) / w, lambda: _C.half_server_reduce(hp, w, chunk, chunk, w, None),
            lambda: (hp.view(w, chunk).float().sum(0) / w).to(dt))
    add("float", "server_red", (4 * w + 4) / w, lambda: _C.float_server_reduce(x, w, chunk, chunk, w),
        lambda: x.view(w, chunk).sum(0) / w)
    return copy_bw, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 25)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-cupy", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not getattr(_C, "with_cuda", False):
        print(f"SKIP: cuda available={torch.cuda.is_available()}, pycomm._C.with_cuda={getattr(_C, 'with_cuda', None)}")
        return 3
    w = args.world_size
    unit = w * max(BLOCK1, BLOCKQ)
    numel = max(unit, args.numel // unit * unit)  # whole OneBit/QSGD blocks in every chunk
    cp = None
    if not args.no_cupy:
        try:
            import cupy

            cupy.zeros(1).sum().item()
            cp = cupy
        except Exception as e:  # noqa: BLE001
            print(f"# cupy unavailable ({type(e).__name__}: {e}); cupy column empty")
    torch.cuda.set_device(0)
    copy_bw, rows = run(numel, w, args.repeat, cp)
    gb = numel * 4 / 1e9
    name = torch.cuda.get_device_name(0)
    print(f"# {name}, numel={numel} ({numel * 4 / 2**20:.0f} MiB float32), world_size={w}, repeat={args.repeat} "
          f"(median), torch {torch.__version__}, cupy {cp.__version__ if cp is not None else '-'}")
    print(f"# D2D copy (torch copy_, read+write): {copy_bw / 1e9:.1f} GB/s")
    print(f"{'compressor':<14} {'phase':<11} {'bytes/elem':>10} {'grad GB/s':>10} {'traffic GB/s':>12} "
          f"{'% copy':>7} {'torch GB/s':>10} {'cupy GB/s':>9} {'vs torch':>8}")
    best_pct = 0.0
    for nm, phase, bpe, tf, tr, tc in rows:
        traffic = bpe * numel / tf
        pct = 100 * traffic / copy_bw
        best_pct = max(best_pct, pct)
        tr_s = f"{gb / tr:10.1f}" if tr else f"{'-':>10}"
        tc_s = f"{gb / tc:9.1f}" if tc else f"{'-':>9}"
        sp = f"{tr / tf:7.1f}x" if tr else f"{'-':>8}"
        print(f"{nm:<14} {phase:<11} {bpe:>10.3f} {gb / tf:>10.1f} {traffic / 1e9:>12.1f} {pct:>6.1f}% "
              f"{tr_s} {tc_s} {sp}")
    print(f"KEY copy_GBps={copy_bw / 1e9:.1f} best_pct_of_copy={best_pct:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
