// Torch glue for the many-input reduction kernel (kernels/reduce.h, reduce_cuda.h) that
// the CUDA IPC all-reduce runs: exposed so that tests compare the CUDA kernel with the
// CPU loop bitwise and the GPU check runs it under compute-sanitizer.
#include <torch/extension.h>

#include <algorithm>
#include <cctype>
#include <string>
#include <vector>

#include "bindings/torch_types.h"
#include "kernels/reduce.h"

#ifdef PYCOMM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/reduce_cuda.h"
#endif

namespace pycomm {
namespace {

/// The op whose core name (reduceOpName: "SUM", "AVG", ...) is `name` in any case.
ReduceOp reduceOpByName(const std::string& name) {
  for (int i = static_cast<int>(ReduceOp::kSum); i <= static_cast<int>(ReduceOp::kBxor); ++i) {
    const auto op = static_cast<ReduceOp>(i);
    const std::string known = reduceOpName(op);
    if (name.size() == known.size() &&
        std::equal(name.begin(), name.end(), known.begin(), [](char a, char b) { return std::toupper(a) == b; })) {
      return op;
    }
  }
  TORCH_CHECK_VALUE(false, "pycomm: unknown reduce op '", name, "' (sum, avg, product, min, max, band, bor, bxor)");
}

/// dst = srcs[0] (op) ... (op) srcs[n-1], element-wise, on the tensors' device (CUDA: on
/// the current stream). Every tensor contiguous, same dtype, device and size; dst may be
/// one of the sources.
void reduceManyT(at::Tensor dst, const std::vector<at::Tensor>& srcs, const std::string& opName) {
  TORCH_CHECK_VALUE(!srcs.empty(), "pycomm: reduce_many needs at least one source");
  const DType dt = toDType(dst.scalar_type(), 0);
  const ReduceOp op = reduceOpByName(opName);
  TORCH_CHECK_VALUE(reduceOpSupported(dt, op), "pycomm: reduce op ", opName, " is not supported for dtype ",
                    dtypeName(dt));
  TORCH_CHECK_VALUE(dst.is_contiguous(), "pycomm: reduce_many dst must be contiguous");
  std::vector<const void*> ptrs;
  for (const auto& s : srcs) {
    TORCH_CHECK_VALUE(s.scalar_type() == dst.scalar_type() && s.device() == dst.device() &&
                          s.numel() == dst.numel() && s.is_contiguous(),
                      "pycomm: reduce_many sources must be contiguous ", dst.scalar_type(), " tensors of ",
                      dst.numel(), " elements on ", dst.device());
    ptrs.push_back(s.data_ptr());
  }
  const size_t n = static_cast<size_t>(dst.numel());
  if (dst.is_cuda()) {
#ifdef PYCOMM_WITH_CUDA
    c10::cuda::CUDAGuard guard(dst.device());
    reduceManyCuda(dst.data_ptr(), ptrs.data(), static_cast<int>(ptrs.size()), n, dt, op,
                   at::cuda::getCurrentCUDAStream().stream());
    return;
#else
    TORCH_CHECK(false, "pycomm was built without CUDA; got a CUDA tensor");
#endif
  }
  reduceMany(dst.data_ptr(), ptrs.data(), static_cast<int>(ptrs.size()), n, dt, op);
}

}  // namespace

void initReduceBindings(pybind11::module_& m) {
  m.def("reduce_many", &reduceManyT, pybind11::arg("dst"), pybind11::arg("srcs"), pybind11::arg("op"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "dst = srcs[0] (op) ... (op) srcs[-1] element-wise, accumulated in float for half types and "
        "rounded once (the CUDA IPC all-reduce's kernel); CPU or CUDA (current stream)");
}

}  // namespace pycomm
