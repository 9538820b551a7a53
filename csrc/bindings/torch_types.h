// Torch scalar types -> core dtypes, for every binding file.
#pragma once

#include <torch/extension.h>

#include "core/dtype.h"

namespace pycomm {

/// The core dtype of a torch scalar type; a TypeError naming `rank` for the others.
inline DType toDType(at::ScalarType t, int rank) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kChar: return DType::kInt8;
    case at::kByte: return DType::kUInt8;
    case at::kInt: return DType::kInt32;
    case at::kLong: return DType::kInt64;
    case at::kBool: return DType::kBool;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "pycomm rank ", rank, ": unsupported dtype ", t,
                   " (supported: float32, float64, float16, bfloat16, int8, uint8, int32, int64, bool)");
}

}  // namespace pycomm
