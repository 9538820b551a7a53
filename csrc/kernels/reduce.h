// CPU reduction loops (the CUDA versions live in reduce_cuda.cu and use the same math).
#pragma once

#include <cstddef>

#include "core/dtype.h"

namespace pycomm {

/// dst[i] = dst[i] (op) src[i] for `count` elements of `dtype`. AVG reduces as SUM;
/// call finalizeAvg once on the fully reduced data. dst and src may not overlap
/// partially (dst == src is allowed).
void reduceInto(void* dst, const void* src, size_t count, DType dtype, ReduceOp op);

/// dst[i] = a[i] (op) b[i]; dst may alias a or b.
void reduce3(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op);

/// buf[i] = buf[i] / n (AVG finalisation; integers truncate toward zero).
void finalizeAvg(void* buf, size_t count, DType dtype, int n);

/// dst[i] = srcs[0][i] (op) srcs[1][i] (op) ... (op) srcs[n-1][i], combined in source
/// order in the accumulation type and rounded once; AVG divides by n before rounding.
/// dst may alias one of the sources (element i is read before it is written).
void reduceMany(void* dst, const void* const* srcs, int n, size_t count, DType dtype, ReduceOp op);

}  // namespace pycomm
