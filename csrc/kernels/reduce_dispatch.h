// Type/op dispatch shared by the CPU and CUDA reduction entry points.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/half_math.h"

namespace pycomm {

/// Calls f(T{}) with T the storage type of `dtype`.
template <typename F>
void dispatchDType(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat64: f(double{}); return;
    case DType::kFloat16: f(Half{}); return;
    case DType::kBFloat16: f(BFloat16{}); return;
    case DType::kInt8: f(int8_t{}); return;
    case DType::kUInt8: f(uint8_t{}); return;
    case DType::kInt32: f(int32_t{}); return;
    case DType::kInt64: f(int64_t{}); return;
    case DType::kBool: f(bool{}); return;
  }
  throw InvalidArgument(strCat("unsupported dtype code ", static_cast<int>(dtype)));
}

/// True for storage types on which bitwise reduce ops are defined.
template <typename T>
constexpr bool kIsBitwiseType = !std::is_same_v<T, float> && !std::is_same_v<T, double> &&
                                !std::is_same_v<T, Half> && !std::is_same_v<T, BFloat16>;

/// Calls f(std::integral_constant<ReduceOp, op>{}) for the given op; bitwise ops on
/// float types are rejected (checkReduceOp has already refused them).
template <typename T, typename F>
void dispatchOp(ReduceOp op, F&& f) {
  switch (op) {
    case ReduceOp::kSum: f(std::integral_constant<ReduceOp, ReduceOp::kSum>{}); return;
    case ReduceOp::kAvg: f(std::integral_constant<ReduceOp, ReduceOp::kSum>{}); return;
    case ReduceOp::kProduct: f(std::integral_constant<ReduceOp, ReduceOp::kProduct>{}); return;
    case ReduceOp::kMin: f(std::integral_constant<ReduceOp, ReduceOp::kMin>{}); return;
    case ReduceOp::kMax: f(std::integral_constant<ReduceOp, ReduceOp::kMax>{}); return;
    default: break;
  }
  if constexpr (kIsBitwiseType<T>) {
    switch (op) {
      case ReduceOp::kBand: f(std::integral_constant<ReduceOp, ReduceOp::kBand>{}); return;
      case ReduceOp::kBor: f(std::integral_constant<ReduceOp, ReduceOp::kBor>{}); return;
      case ReduceOp::kBxor: f(std::integral_constant<ReduceOp, ReduceOp::kBxor>{}); return;
      default: break;
    }
  }
  throw InvalidArgument(strCat("reduce op ", reduceOpName(op), " is not supported for this dtype"));
}

}  // namespace pycomm
