#include "bindings/sparse_allreduce.h"

#include <cstdint>
#include <vector>

#include "core/error.h"

namespace pycomm {
namespace {

// What each rank tells the others first: non-zeros, layout and sizes.
constexpr int kMaxDims = 11;
enum Field { kNnz = 0, kSparseDim, kDenseDim, kDims, kDType, kSizes };
constexpr int kHeader = kSizes + kMaxDims;

std::string shapeOf(const int64_t* h) {
  std::string s = strCat(c10::toString(static_cast<at::ScalarType>(h[kDType])), " [");
  for (int64_t d = 0; d < h[kDims]; ++d) s += strCat(d ? ", " : "", h[kSizes + d]);
  return strCat(s, "] (", h[kSparseDim], " sparse + ", h[kDenseDim], " dense dims)");
}

}  // namespace

void checkSparseAllReduce(const at::Tensor& t, const c10d::ReduceOp& op, int rank) {
  TORCH_CHECK_VALUE(t.layout() == at::kSparse, "pycomm rank ", rank, ": sparse all_reduce takes a sparse COO tensor, got ",
                    t.layout());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "pycomm rank ", rank, ": sparse all_reduce takes CPU tensors, got one on ",
                    t.device());
  TORCH_CHECK_VALUE(op == c10d::ReduceOp::SUM, "pycomm rank ", rank,
                    ": sparse all_reduce supports ReduceOp.SUM only (as Gloo)");
  TORCH_CHECK_VALUE(t.dim() <= kMaxDims, "pycomm rank ", rank, ": sparse all_reduce takes up to ", kMaxDims,
                    " dimensions, got ", t.dim());
}

at::Tensor sparseAllReduceSum(Collectives& c, const at::Tensor& input, const OpDesc& desc, const Deadline& deadline,
                              int rank, int size) {
  const at::Tensor in = input.coalesce();
  const at::Tensor indices = in.indices().contiguous();  // [sparse_dim, nnz] int64
  const at::Tensor values = in.values().contiguous();    // [nnz, dense sizes...]
  OpDesc step = desc;
  step.coll = CollType::kAllGather;
  step.dtype = DType::kInt64;

  // 1. Every rank's header; the layouts must agree.
  std::vector<int64_t> mine(kHeader, 0), all(static_cast<size_t>(kHeader) * size);
  mine[kNnz] = in._nnz();
  mine[kSparseDim] = in.sparse_dim();
  mine[kDenseDim] = in.dense_dim();
  mine[kDims] = in.dim();
  mine[kDType] = static_cast<int64_t>(in.scalar_type());
  for (int64_t d = 0; d < in.dim(); ++d) mine[kSizes + d] = in.size(d);
  step.count = kHeader;
  c.allGather(mine.data(), all.data(), sizeof(int64_t) * kHeader, step, deadline);
  int64_t maxNnz = 0;
  for (int r = 0; r < size; ++r) {
    const int64_t* h = &all[static_cast<size_t>(r) * kHeader];
    for (int f = kSparseDim; f < kHeader; ++f) {
      if (h[f] != mine[f]) {
        throw MismatchError(strCat("pycomm rank ", rank, ": sparse all_reduce #", desc.seq, " of ",
                                   shapeOf(mine.data()), " but rank ", r, " passed ", shapeOf(h)));
      }
    }
    maxNnz = std::max(maxNnz, h[kNnz]);
  }
  std::vector<int64_t> sizes(in.sizes().begin(), in.sizes().end());
  if (maxNnz == 0) return at::sparse_coo_tensor(indices, values, sizes, in.options()).coalesce();

  // 2. Indices and values, each rank's padded to the largest non-zero count.
  const int64_t sparseDim = in.sparse_dim();
  const int64_t nnz = in._nnz();
  at::Tensor idxPad = at::zeros({sparseDim, maxNnz}, indices.options());
  idxPad.narrow(1, 0, nnz).copy_(indices);
  at::Tensor idxAll = at::empty({size, sparseDim, maxNnz}, indices.options());
  step.count = static_cast<uint64_t>(sparseDim * maxNnz);
  c.allGather(idxPad.data_ptr(), idxAll.data_ptr(), idxPad.nbytes(), step, deadline);

  std::vector<int64_t> valShape(values.sizes().begin(), values.sizes().end());
  valShape[0] = maxNnz;
  at::Tensor valPad = at::zeros(valShape, values.options());
  valPad.narrow(0, 0, nnz).copy_(values);
  valShape[0] = maxNnz * size;
  at::Tensor valAll = at::empty(valShape, values.options());
  step.count = static_cast<uint64_t>(valPad.numel());
  step.dtype = DType::kUInt8;  // values travel as bytes (any dtype torch can sum)
  c.allGather(valPad.data_ptr(), valAll.data_ptr(), valPad.nbytes(), step, deadline);

  // 3. The same concatenation, in rank order, summed by coalesce on every rank.
  std::vector<at::Tensor> idxParts, valParts;
  for (int r = 0; r < size; ++r) {
    const int64_t n = all[static_cast<size_t>(r) * kHeader + kNnz];
    idxParts.push_back(idxAll[r].narrow(1, 0, n));
    valParts.push_back(valAll.narrow(0, r * maxNnz, n));
  }
  return at::sparse_coo_tensor(at::cat(idxParts, 1), at::cat(valParts, 0), sizes, in.options()).coalesce();
}

}  // namespace pycomm
