// CUDA reduction kernels for every dtype/op pair, over the element math of reduce_math.h
// (so the GPU computes exactly the CPU's formulas: half types widened to float, combined,
// rounded once). The fast path reads and writes 16-byte vectors (uint4) when all pointers
// are 16-byte aligned; the tail and unaligned buffers take the element-wise path. Each
// element is combined independently, so results do not depend on the launch shape.
#include <cuda_runtime.h>

#include <type_traits>

#include "core/error.h"
#include "kernels/cuda_check.h"
#include "kernels/reduce_cuda.h"
#include "kernels/reduce_dispatch.h"
#include "kernels/reduce_math.h"

namespace pycomm {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 65535;

unsigned blocksFor(size_t work) {
  const size_t b = (work + kThreads - 1) / kThreads;
  return (unsigned)(b == 0 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

/// 16 bytes of T, as loaded by one uint4 access.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// Vector path: dst[i] = a[i] (op) b[i] over `packs` 16-byte packs.
template <ReduceOp Op, typename T>
__global__ void reducePackedKernel(Pack<T>* dst, const Pack<T>* a, const Pack<T>* b, size_t packs) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += (size_t)gridDim.x * blockDim.x) {
    Pack<T> x = a[i];
    const Pack<T> y = b[i];
#pragma unroll
    for (int j = 0; j < Pack<T>::kN; ++j) x.v[j] = reduceElem<Op, T>(x.v[j], y.v[j]);
    dst[i] = x;
  }
}

// Element path (tails, unaligned buffers).
template <ReduceOp Op, typename T>
__global__ void reduceElemKernel(T* dst, const T* a, const T* b, size_t count) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
    dst[i] = reduceElem<Op, T>(a[i], b[i]);
  }
}

template <typename T>
__global__ void avgKernel(T* buf, size_t count, int n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
    buf[i] = avgElem<T>(buf[i], n);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <ReduceOp Op, typename T>
void launchReduce(T* dst, const T* a, const T* b, size_t count, cudaStream_t stream) {
  size_t done = 0;
  if (aligned16(dst) && aligned16(a) && aligned16(b)) {
    const size_t packs = count / Pack<T>::kN;
    if (packs > 0) {
      reducePackedKernel<Op, T><<<blocksFor(packs), kThreads, 0, stream>>>(
          reinterpret_cast<Pack<T>*>(dst), reinterpret_cast<const Pack<T>*>(a), reinterpret_cast<const Pack<T>*>(b),
          packs);
      done = packs * Pack<T>::kN;
    }
  }
  if (done < count) {
    reduceElemKernel<Op, T><<<blocksFor(count - done), kThreads, 0, stream>>>(dst + done, a + done, b + done,
                                                                             count - done);
  }
}

/// Source pointers of a many-input reduction, passed to the kernel by value.
struct SourcePtrs {
  const void* p[kMaxReduceSources];
};

// Vector path of reduceMany: pack i of every source, accumulated per lane in the
// accumulation type (reduceManyElem's math, lane by lane), rounded once.
template <ReduceOp Op, typename T>
__global__ void reduceManyPackedKernel(Pack<T>* dst, SourcePtrs srcs, int n, size_t packs, int divisor) {
  using A = typename AccType<T>::type;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += (size_t)gridDim.x * blockDim.x) {
    A acc[Pack<T>::kN];
    const Pack<T> x = static_cast<const Pack<T>*>(srcs.p[0])[i];
#pragma unroll
    for (int j = 0; j < Pack<T>::kN; ++j) acc[j] = loadAcc<T>(x.v[j]);
    for (int s = 1; s < n; ++s) {
      const Pack<T> y = static_cast<const Pack<T>*>(srcs.p[s])[i];
#pragma unroll
      for (int j = 0; j < Pack<T>::kN; ++j) acc[j] = Combine<Op, A>::apply(acc[j], loadAcc<T>(y.v[j]));
    }
    Pack<T> out;
#pragma unroll
    for (int j = 0; j < Pack<T>::kN; ++j) out.v[j] = finishAcc<T>(acc[j], divisor);
    dst[i] = out;
  }
}

// Element path of reduceMany (tails, unaligned pointers); `offset` elements skipped.
template <ReduceOp Op, typename T>
__global__ void reduceManyElemKernel(T* dst, SourcePtrs srcs, int n, size_t offset, size_t count, int divisor) {
  const T* s[kMaxReduceSources];
  for (int j = 0; j < n; ++j) s[j] = static_cast<const T*>(srcs.p[j]) + offset;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
    dst[offset + i] = reduceManyElem<Op, T>(s, n, i, divisor);
  }
}

}  // namespace

void reduceManyCuda(void* dst, const void* const* srcs, int n, size_t count, DType dtype, ReduceOp op,
                    cudaStream_t stream) {
  checkReduceOp(dtype, op);
  if (n < 1 || n > kMaxReduceSources) {
    throw InvalidArgument(strCat("reduceManyCuda takes 1..", kMaxReduceSources, " sources, got ", n));
  }
  if (count == 0) return;
  SourcePtrs ptrs{};
  bool aligned = aligned16(dst);
  for (int j = 0; j < n; ++j) {
    ptrs.p[j] = srcs[j];
    aligned = aligned && aligned16(srcs[j]);
  }
  const int divisor = op == ReduceOp::kAvg ? n : 1;
  dispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatchOp<T>(op, [&](auto opTag) {
      constexpr ReduceOp kOp = decltype(opTag)::value;
      size_t done = 0;
      if (aligned) {
        const size_t packs = count / Pack<T>::kN;
        if (packs > 0) {
          reduceManyPackedKernel<kOp, T><<<blocksFor(packs), kThreads, 0, stream>>>(static_cast<Pack<T>*>(dst),
                                                                                   ptrs, n, packs, divisor);
          done = packs * Pack<T>::kN;
        }
      }
      if (done < count) {
        reduceManyElemKernel<kOp, T><<<blocksFor(count - done), kThreads, 0, stream>>>(static_cast<T*>(dst), ptrs,
                                                                                      n, done, count - done, divisor);
      }
    });
  });
  cudaCheck(cudaGetLastError(), "reduceMany");
}

void reduce3Cuda(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op,
                 cudaStream_t stream) {
  checkReduceOp(dtype, op);
  if (count == 0) return;
  dispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatchOp<T>(op, [&](auto opTag) {
      constexpr ReduceOp kOp = decltype(opTag)::value;
      launchReduce<kOp, T>(static_cast<T*>(dst), static_cast<const T*>(a), static_cast<const T*>(b), count, stream);
    });
  });
  cudaCheck(cudaGetLastError(), "reduce");
}

void reduceIntoCuda(void* dst, const void* src, size_t count, DType dtype, ReduceOp op, cudaStream_t stream) {
  reduce3Cuda(dst, dst, src, count, dtype, op, stream);
}

void finalizeAvgCuda(void* buf, size_t count, DType dtype, int n, cudaStream_t stream) {
  if (n <= 1 || count == 0) return;
  dispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, bool>) {
      throw InvalidArgument("reduce op AVG is not supported for dtype bool");
    } else {
      avgKernel<T><<<blocksFor(count), kThreads, 0, stream>>>(static_cast<T*>(buf), count, n);
    }
  });
  cudaCheck(cudaGetLastError(), "finalizeAvg");
}

}  // namespace pycomm
