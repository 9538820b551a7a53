// Argument translation for the c10d backend: torch's reduce ops and tensor lists into
// what the core takes, with the checks that turn a wrong call into a ValueError /
// TypeError naming the rank (raised on the caller's thread, before anything is sent).
#pragma once

#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/extension.h>

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "core/dtype.h"

namespace pycomm {

/// The core's reduce op for `op` on `dtype` (ValueError if unsupported).
ReduceOp toReduceOp(const c10d::ReduceOp& op, DType dtype, int rank);

/// True if any tensor of `ts` is a CUDA tensor.
bool anyCuda(const std::vector<at::Tensor>& ts);

/// ValueError unless 0 <= root < size.
void checkRoot(int64_t root, int rank, int size, const char* what);

/// TypeError unless `a` and `b` have one dtype.
void checkSameDType(const at::Tensor& a, const at::Tensor& b, int rank, const char* what);

/// `a` is a valid tensor with `b`'s element count and dtype.
void checkSameShape(const at::Tensor& a, const at::Tensor& b, int rank, const char* what);

/// The tensors of a list argument (one dtype, one device) flattened into one tensor on
/// that device. On a CUDA device the copies are queued on the caller's current stream,
/// which the collective's staging waits for: the caller's thread never waits for the GPU.
at::Tensor concatOnDevice(const std::vector<at::Tensor>& ts, int rank, const char* what);

/// all_to_all_single: the byte offsets and sizes, per peer, of `t` split along dim 0 by
/// `sp` (rows per peer; empty: equal parts). `which`: "input" or "output", for messages.
std::pair<std::vector<size_t>, std::vector<size_t>> splitRows(const at::Tensor& t, const std::vector<int64_t>& sp,
                                                              int rank, int size, const char* which);

}  // namespace pycomm
