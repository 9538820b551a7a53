#include "core/dtype.h"

#include "core/error.h"

namespace pycomm {

size_t dtypeSize(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt8: return 1;
    case DType::kUInt8: return 1;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
    case DType::kBool: return 1;
  }
  throw InvalidArgument("unknown dtype code " + std::to_string(static_cast<int>(t)));
}

const char* dtypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kBool: return "bool";
  }
  return "unknown";
}

const char* reduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "SUM";
    case ReduceOp::kAvg: return "AVG";
    case ReduceOp::kProduct: return "PRODUCT";
    case ReduceOp::kMin: return "MIN";
    case ReduceOp::kMax: return "MAX";
    case ReduceOp::kBand: return "BAND";
    case ReduceOp::kBor: return "BOR";
    case ReduceOp::kBxor: return "BXOR";
  }
  return "UNKNOWN";
}

bool reduceOpSupported(DType t, ReduceOp op) {
  const bool isFloat = t == DType::kFloat32 || t == DType::kFloat64 ||
                       t == DType::kFloat16 || t == DType::kBFloat16;
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kProduct:
    case ReduceOp::kMin:
    case ReduceOp::kMax:
      return true;
    case ReduceOp::kAvg:
      return t != DType::kBool;
    case ReduceOp::kBand:
    case ReduceOp::kBor:
    case ReduceOp::kBxor:
      return !isFloat;
  }
  return false;
}

void checkReduceOp(DType t, ReduceOp op) {
  if (static_cast<int>(t) >= kNumDTypes) {
    throw InvalidArgument("unsupported dtype code " + std::to_string(static_cast<int>(t)));
  }
  if (static_cast<int>(op) >= kNumReduceOps) {
    throw InvalidArgument("unsupported reduce op code " + std::to_string(static_cast<int>(op)));
  }
  if (!reduceOpSupported(t, op)) {
    throw InvalidArgument(std::string("reduce op ") + reduceOpName(op) +
                          " is not supported for dtype " + dtypeName(t));
  }
}

}  // namespace pycomm
