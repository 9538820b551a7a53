"""pycomm._C.reduce_many, the many-input reduction the CUDA IPC all-reduce runs (CPU
loop here; test_cuda.py compares the CUDA kernel with it bitwise): every dtype and op,
1-5 sources, awkward lengths, against the float64/exact references of the collective
tests; plus aliasing and bad input."""
from __future__ import annotations

import pytest
import torch

import pycomm
from collective_cases import DTYPES, OPS, check, data, op_supported, reference, rounded, to_torch

SIZES = [0, 1, 7, 13, 1021, 65537]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_many_every_op_and_length(dtype):
    seed = 0
    for op in OPS:
        if not op_supported(dtype, op):
            continue
        for k in (1, 2, 3, 5):
            for n in SIZES:
                seed += 1
                raw = [data(seed, r, n, dtype, op) for r in range(k)]
                srcs = [to_torch(a, dtype) for a in raw]
                out = torch.empty_like(srcs[0])
                pycomm._C.reduce_many(out, srcs, op.lower())
                check(out, reference([rounded(a, dtype) for a in raw], dtype, op), dtype, k,
                      f"reduce_many {dtype} {op} k={k} n={n}")


def test_reduce_many_rounds_half_types_once():
    # 2048 + 1 + 1 in float16: a pairwise chain rounds 2049 to 2048 twice and loses both
    # ones; accumulating in float and rounding once gives 2050.
    srcs = [torch.tensor([2048.0], dtype=torch.float16), torch.tensor([1.0], dtype=torch.float16),
            torch.tensor([1.0], dtype=torch.float16)]
    out = torch.empty_like(srcs[0])
    pycomm._C.reduce_many(out, srcs, "sum")
    assert out.item() == 2050.0


def test_reduce_many_in_place_and_bad_input():
    a = torch.arange(10, dtype=torch.float32)
    b = torch.ones(10)
    pycomm._C.reduce_many(a, [a, b], "sum")
    assert torch.equal(a, torch.arange(10, dtype=torch.float32) + 1)
    with pytest.raises(ValueError, match="sources must be contiguous"):
        pycomm._C.reduce_many(a, [a, torch.ones(9)], "sum")
    with pytest.raises(ValueError, match="unknown reduce op"):
        pycomm._C.reduce_many(a, [a, b], "mean")
    with pytest.raises(ValueError, match="not supported for dtype float32"):
        pycomm._C.reduce_many(a, [a, b], "bxor")
    with pytest.raises(ValueError, match="at least one source"):
        pycomm._C.reduce_many(a, [], "sum")
