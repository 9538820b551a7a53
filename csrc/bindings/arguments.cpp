#include "bindings/arguments.h"

#include <algorithm>

#include "bindings/staging.h"
#include "bindings/torch_types.h"

namespace pycomm {

ReduceOp toReduceOp(const c10d::ReduceOp& op, DType dtype, int rank) {
  ReduceOp r;
  switch (op.op_) {
    case c10d::ReduceOp::SUM: r = ReduceOp::kSum; break;
    case c10d::ReduceOp::AVG: r = ReduceOp::kAvg; break;
    case c10d::ReduceOp::PRODUCT: r = ReduceOp::kProduct; break;
    case c10d::ReduceOp::MIN: r = ReduceOp::kMin; break;
    case c10d::ReduceOp::MAX: r = ReduceOp::kMax; break;
    case c10d::ReduceOp::BAND: r = ReduceOp::kBand; break;
    case c10d::ReduceOp::BOR: r = ReduceOp::kBor; break;
    case c10d::ReduceOp::BXOR: r = ReduceOp::kBxor; break;
    default:
      TORCH_CHECK_VALUE(false, "pycomm rank ", rank, ": unsupported reduce op (", static_cast<int>(op.op_),
                        "); supported: SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR, BXOR");
  }
  TORCH_CHECK_VALUE(reduceOpSupported(dtype, r), "pycomm rank ", rank, ": reduce op ", reduceOpName(r),
                    " is not supported for dtype ", dtypeName(dtype));
  return r;
}


bool anyCuda(const std::vector<at::Tensor>& ts) {
  return std::any_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return t.defined() && t.is_cuda(); });
}

void checkRoot(int64_t root, int rank, int size, const char* what) {
  TORCH_CHECK_VALUE(root >= 0 && root < size, "pycomm rank ", rank, ": ", what, " root ", root,
                    " is out of range for a group of ", size, " ranks");
}

void checkSameDType(const at::Tensor& a, const at::Tensor& b, int rank, const char* what) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "pycomm rank ", rank, ": ", what, " mixes dtypes ",
                   a.scalar_type(), " and ", b.scalar_type());
}

void checkSameShape(const at::Tensor& a, const at::Tensor& b, int rank, const char* what) {
  checkTensor(a, rank, what);
  TORCH_CHECK_VALUE(a.numel() == b.numel(), "pycomm rank ", rank, ": ", what, " has ", a.numel(),
                    " elements, expected ", b.numel());
  checkSameDType(a, b, rank, what);
}

at::Tensor concatOnDevice(const std::vector<at::Tensor>& ts, int rank, const char* what) {
  std::vector<at::Tensor> parts;
  for (auto& t : ts) {
    checkTensor(t, rank, what);
    checkSameDType(t, ts[0], rank, what);
    TORCH_CHECK_VALUE(t.device() == ts[0].device(), "pycomm rank ", rank, ": the ", what,
                      " tensors must be on one device, got ", ts[0].device(), " and ", t.device());
    parts.push_back(t.reshape({-1}));
  }
  at::NoGradGuard noGrad;
  return at::cat(parts);
}

std::pair<std::vector<size_t>, std::vector<size_t>> splitRows(const at::Tensor& t, const std::vector<int64_t>& sp,
                                                              int rank, int size, const char* which) {
  std::vector<size_t> sizes(size), offsets(size);
  const int64_t rows = t.dim() > 0 ? t.size(0) : 0;
  const size_t rowBytes = rows > 0 ? t.numel() / rows * t.element_size() : 0;
  if (sp.empty()) {
    TORCH_CHECK_VALUE(rows % size == 0, "pycomm rank ", rank, ": all_to_all_single ", which,
                      " dim 0 (", rows, ") is not divisible by the group size ", size);
    for (int p = 0; p < size; ++p) sizes[p] = rows / size * rowBytes;
  } else {
    TORCH_CHECK_VALUE(static_cast<int>(sp.size()) == size, "pycomm rank ", rank, ": all_to_all_single ",
                      which, " split sizes have ", sp.size(), " entries, the group has ", size, " ranks");
    int64_t total = 0;
    for (int p = 0; p < size; ++p) {
      TORCH_CHECK_VALUE(sp[p] >= 0, "pycomm rank ", rank, ": negative split size");
      sizes[p] = static_cast<size_t>(sp[p]) * rowBytes;
      total += sp[p];
    }
    TORCH_CHECK_VALUE(total == rows, "pycomm rank ", rank, ": all_to_all_single ", which,
                      " split sizes sum to ", total, " but dim 0 is ", rows);
  }
  size_t off = 0;
  for (int p = 0; p < size; ++p) {
    offsets[p] = off;
    off += sizes[p];
  }
  return std::make_pair(offsets, sizes);
}

}  // namespace pycomm
