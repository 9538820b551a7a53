#include "kernels/reduce.h"

#include <type_traits>

#include "kernels/reduce_dispatch.h"
#include "kernels/reduce_math.h"

namespace pycomm {

void reduce3(void* dst, const void* a, const void* b, size_t count, DType dtype, ReduceOp op) {
  checkReduceOp(dtype, op);
  dispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatchOp<T>(op, [&](auto opTag) {
      constexpr ReduceOp kOp = decltype(opTag)::value;
      T* d = static_cast<T*>(dst);
      const T* x = static_cast<const T*>(a);
      const T* y = static_cast<const T*>(b);
      for (size_t i = 0; i < count; ++i) d[i] = reduceElem<kOp, T>(x[i], y[i]);
    });
  });
}

void reduceInto(void* dst, const void* src, size_t count, DType dtype, ReduceOp op) {
  reduce3(dst, dst, src, count, dtype, op);
}

void finalizeAvg(void* buf, size_t count, DType dtype, int n) {
  if (n <= 1) return;
  dispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, bool>) {
      throw InvalidArgument("reduce op AVG is not supported for dtype bool");
    } else {
      T* p = static_cast<T*>(buf);
      for (size_t i = 0; i < count; ++i) p[i] = avgElem<T>(p[i], n);
    }
  });
}

void reduceMany(void* dst, const void* const* srcs, int n, size_t count, DType dtype, ReduceOp op) {
  checkReduceOp(dtype, op);
  PYCOMM_CHECK_ARG(n >= 1, "reduceMany needs at least one source, got ", n);
  const int divisor = op == ReduceOp::kAvg ? n : 1;
  dispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatchOp<T>(op, [&](auto opTag) {
      constexpr ReduceOp kOp = decltype(opTag)::value;
      const T* const* s = reinterpret_cast<const T* const*>(srcs);
      T* d = static_cast<T*>(dst);
      for (size_t i = 0; i < count; ++i) d[i] = reduceManyElem<kOp, T>(s, n, i, divisor);
    });
  });
}

}  // namespace pycomm
