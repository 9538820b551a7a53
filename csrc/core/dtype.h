// Element types and reduce operations understood by the torch-free core.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pycomm {

/// Element type of a buffer handed to a collective.
enum class DType : uint8_t {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kInt8 = 4,
  kUInt8 = 5,
  kInt32 = 6,
  kInt64 = 7,
  kBool = 8,
};

/// Number of DType values (for range checks on untrusted input).
constexpr int kNumDTypes = 9;

/// Reduction applied element-wise by reducing collectives.
enum class ReduceOp : uint8_t {
  kSum = 0,
  kAvg = 1,
  kProduct = 2,
  kMin = 3,
  kMax = 4,
  kBand = 5,
  kBor = 6,
  kBxor = 7,
};

/// Number of ReduceOp values.
constexpr int kNumReduceOps = 8;

/// Size in bytes of one element of `t`.
size_t dtypeSize(DType t);

/// Lower-case name of `t` as torch spells it ("float32", "bfloat16", ...).
const char* dtypeName(DType t);

/// Upper-case name of `op` as torch.distributed spells it ("SUM", "AVG", ...).
const char* reduceOpName(ReduceOp op);

/// True if `op` is defined for `t` (bitwise ops only on integers and bool, AVG not on bool).
bool reduceOpSupported(DType t, ReduceOp op);

/// Throws pycomm::InvalidArgument naming the pair if `op` is not defined for `t`.
void checkReduceOp(DType t, ReduceOp op);

}  // namespace pycomm
