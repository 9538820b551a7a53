// CUDA reduction entry points (reduce_cuda.cu): the same element math as the CPU loops in
// reduce.cc (reduce_math.h), for device buffers, asynchronous on a stream. Only compiled
// when PYCOMM_WITH_CUDA is defined; this header needs no CUDA headers.
#pragma once

#include <cstddef>

#include "core/dtype.h"

struct CUstream_st;
/// Same type as the CUDA runtime's cudaStream_t (redeclaring the typedef is allowed).
typedef struct CUstream_st* cudaStream_t;

namespace pycomm {

/// dst[i] = dst[i] (op) src[i] for `count` elements of `dtype` on the device, on `stream`.
/// AVG reduces as SUM (finish with finalizeAvgCuda). Half types accumulate in float and
/// round once. Uses 16-byte vector loads when both pointers are 16-byte aligned.
void reduceIntoCuda(void* dst, const void* src, size_t count, DType dtype, ReduceOp op, cudaStream_t stream);

/// dst[i] = a[i] (op) b[i] on the device; dst may alias a or b.
void reduce3Cuda(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op,
                 cudaStream_t stream);

/// buf[i] = buf[i] / n on the device (AVG finalisation; integers truncate toward zero).
void finalizeAvgCuda(void* buf, size_t count, DType dtype, int n, cudaStream_t stream);

/// Most sources reduceManyCuda takes (one per rank of an IPC all-reduce).
constexpr int kMaxReduceSources = 16;

/// reduceMany (kernels/reduce.h) on the device, on `stream`: n <= kMaxReduceSources
/// device pointers (local or IPC-mapped peer memory), one fused pass, 16-byte vector
/// loads when every pointer is 16-byte aligned. Same element math as the CPU version.
void reduceManyCuda(void* dst, const void* const* srcs, int n, size_t count, DType dtype, ReduceOp op,
                    cudaStream_t stream);

}  // namespace pycomm
