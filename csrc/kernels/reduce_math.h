// Element-wise reduction math shared by the CPU loops (reduce.cc) and the CUDA
// kernels (reduce.cu). Half types are widened to float, combined, and rounded once:
// one rounding per hop, never a sum carried out in half precision.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "kernels/half_math.h"
#include "kernels/hd.h"

namespace pycomm {

/// Storage type -> type the arithmetic happens in.
template <typename T> struct AccType { using type = T; };
template <> struct AccType<Half> { using type = float; };
template <> struct AccType<BFloat16> { using type = float; };
template <> struct AccType<bool> { using type = bool; };

/// Widens a stored element to its accumulation type.
template <typename T> PYCOMM_HD typename AccType<T>::type loadAcc(T v) { return v; }
template <> PYCOMM_HD float loadAcc<Half>(Half v) { return halfToFloat(v.bits); }
template <> PYCOMM_HD float loadAcc<BFloat16>(BFloat16 v) { return bf16ToFloat(v.bits); }

/// Narrows an accumulated value back to storage (the single rounding of a hop).
template <typename T> PYCOMM_HD T storeAcc(typename AccType<T>::type v) { return (T)v; }
template <> PYCOMM_HD Half storeAcc<Half>(float v) { return Half{floatToHalf(v)}; }
template <> PYCOMM_HD BFloat16 storeAcc<BFloat16>(float v) { return BFloat16{floatToBf16(v)}; }

/// Combines two accumulated values with a (non-AVG) reduce op. AVG combines as SUM
/// and is divided once at the end (finalizeAvg). Bitwise ops are only instantiated
/// for integral types; bool SUM/MAX/BOR mean OR, PRODUCT/MIN/BAND mean AND.
template <ReduceOp Op, typename A>
struct Combine {
  PYCOMM_HD static A apply(A a, A b) {
    if constexpr (Op == ReduceOp::kSum || Op == ReduceOp::kAvg) {
      return a + b;
    } else if constexpr (Op == ReduceOp::kProduct) {
      return a * b;
    } else if constexpr (Op == ReduceOp::kMin) {
      // NaN propagates like torch.minimum.
      return (a != a) ? a : ((b != b) ? b : (b < a ? b : a));
    } else if constexpr (Op == ReduceOp::kMax) {
      return (a != a) ? a : ((b != b) ? b : (b > a ? b : a));
    } else if constexpr (Op == ReduceOp::kBand) {
      return a & b;
    } else if constexpr (Op == ReduceOp::kBor) {
      return a | b;
    } else {
      return a ^ b;
    }
  }
};

template <ReduceOp Op>
struct Combine<Op, bool> {
  PYCOMM_HD static bool apply(bool a, bool b) {
    if constexpr (Op == ReduceOp::kSum || Op == ReduceOp::kMax || Op == ReduceOp::kBor) {
      return a || b;
    } else if constexpr (Op == ReduceOp::kBxor) {
      return a != b;
    } else {
      return a && b;
    }
  }
};

/// dst = dst (op) src for one element, computed in the accumulation type.
template <ReduceOp Op, typename T>
PYCOMM_HD T reduceElem(T dst, T src) {
  using A = typename AccType<T>::type;
  return storeAcc<T>(Combine<Op, A>::apply(loadAcc<T>(dst), loadAcc<T>(src)));
}

/// Rounds an accumulated value back to storage once; a divisor > 1 (AVG, combined as
/// SUM) divides first, in the accumulation type (integers truncate toward zero).
template <typename T>
PYCOMM_HD T finishAcc(typename AccType<T>::type acc, int avgDivisor) {
  using A = typename AccType<T>::type;
  if (avgDivisor > 1) acc = static_cast<A>(acc / static_cast<A>(avgDivisor));
  return storeAcc<T>(acc);
}

/// AVG finalisation for one element: value / n (integers truncate toward zero, as torch).
template <typename T>
PYCOMM_HD T avgElem(T v, int n) {
  return finishAcc<T>(loadAcc<T>(v), n);
}

/// Element i of the reduction of n sources, combined in source order in the
/// accumulation type and rounded once (the many-input kernels of the IPC all-reduce,
/// CPU and CUDA alike). Op is never kAvg here: AVG passes kSum and its divisor.
template <ReduceOp Op, typename T>
PYCOMM_HD T reduceManyElem(const T* const* srcs, int n, size_t i, int avgDivisor) {
  using A = typename AccType<T>::type;
  A acc = loadAcc<T>(srcs[0][i]);
  for (int j = 1; j < n; ++j) acc = Combine<Op, A>::apply(acc, loadAcc<T>(srcs[j][i]));
  return finishAcc<T>(acc, avgDivisor);
}

}  // namespace pycomm
