// Torch glue for fusion buckets (csrc/engine/bucket.h): planning on plain integers, and
// flatten / unflatten between gradients and a flat bucket. CPU tensors are copied with
// memcpy (GIL released, optionally on several threads); CUDA tensors go through
// Tensor::copy_ on the current stream (asynchronous, no host synchronisation).
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "core/shared_arena.h"
#include "engine/bucket.h"

namespace pycomm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
/// (parameter indices, element offsets, numel, key) of one planned bucket.
using PlannedBucket = std::tuple<std::vector<int64_t>, std::vector<int64_t>, int64_t, int64_t>;

std::vector<PlannedBucket> planT(const std::vector<int64_t>& numels, const std::vector<int64_t>& elementSizes,
                                 const std::vector<int64_t>& keys, int64_t capBytes, int64_t firstBytes,
                                 const std::optional<std::vector<int64_t>>& order) {
  TORCH_CHECK(numels.size() == elementSizes.size() && numels.size() == keys.size(),
              "bucket_plan: numels, element_sizes and keys must have equal lengths");
  TORCH_CHECK(capBytes >= 0 && firstBytes >= 0, "bucket_plan: negative bucket limit");
  std::vector<BucketParam> params(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(elementSizes[i] > 0, "bucket_plan: element size of parameter ", i, " must be positive");
    params[i].numel = numels[i];
    params[i].elementSize = static_cast<size_t>(elementSizes[i]);
    params[i].key = keys[i];
  }
  std::vector<Bucket> buckets;
  try {
    buckets = planBuckets(params, static_cast<size_t>(capBytes), static_cast<size_t>(firstBytes),
                          order.value_or(std::vector<int64_t>{}));
  } catch (const InvalidArgument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  std::vector<PlannedBucket> out;
  out.reserve(buckets.size());
  for (auto& b : buckets) out.emplace_back(std::move(b.params), std::move(b.offsets), b.numel, b.key);
  return out;
}

std::vector<int64_t> rebuildOrderT(int64_t numParams, const std::vector<int64_t>& ready) {
  try {
    return rebuildOrder(numParams, ready);
  } catch (const InvalidArgument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  return {};
}

void checkFlat(const Tensor& flat, const char* what) {
  TORCH_CHECK(flat.dim() == 1 && flat.is_contiguous(), what, ": the bucket must be a contiguous 1-D tensor");
}

/// Checks that `t` can live at [offset, offset + numel) of `flat`.
void checkMember(const Tensor& flat, const Tensor& t, int64_t offset, int64_t numel, size_t i, const char* what) {
  TORCH_CHECK(t.scalar_type() == flat.scalar_type(), what, ": tensor ", i, " is ", t.scalar_type(),
              ", the bucket is ", flat.scalar_type());
  TORCH_CHECK(t.device() == flat.device(), what, ": tensor ", i, " is on ", t.device(), ", the bucket on ",
              flat.device());
  TORCH_CHECK(t.numel() == numel, what, ": tensor ", i, " has ", t.numel(), " elements, expected ", numel);
  TORCH_CHECK(offset >= 0 && offset + numel <= flat.numel(), what, ": tensor ", i, " at offset ", offset,
              " does not fit a bucket of ", flat.numel(), " elements");
}

/// flat[offsets[i] : offsets[i] + numels[i]] = tensors[i] (zeros where tensors[i] is None).
void flattenT(const Tensor& flat, const std::vector<OptTensor>& tensors, const std::vector<int64_t>& offsets,
              const std::vector<int64_t>& numels, int64_t threads) {
  checkFlat(flat, "bucket_flatten");
  TORCH_CHECK(tensors.size() == offsets.size() && tensors.size() == numels.size(),
              "bucket_flatten: tensors, offsets and numels must have equal lengths");
  const size_t es = flat.element_size();
  std::vector<Tensor> keep;  // contiguous copies of strided inputs, alive until the copy is done
  std::vector<CopySpan> spans;
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const bool has = tensors[i].has_value() && tensors[i]->defined();
    if (has) checkMember(flat, *tensors[i], offsets[i], numels[i], i, "bucket_flatten");
    TORCH_CHECK(offsets[i] >= 0 && numels[i] >= 0 && offsets[i] + numels[i] <= flat.numel(),
                "bucket_flatten: slot ", i, " does not fit the bucket");
    if (flat.is_cuda()) {
      auto dst = flat.narrow(0, offsets[i], numels[i]);
      if (has) {
        dst.copy_(tensors[i]->reshape(-1), /*non_blocking=*/true);
      } else {
        dst.zero_();
      }
      continue;
    }
    CopySpan s;
    s.dst = static_cast<char*>(flat.data_ptr()) + offsets[i] * es;
    s.bytes = static_cast<size_t>(numels[i]) * es;
    if (has) {
      const Tensor& t = *tensors[i];
      if (t.is_contiguous()) {
        s.src = t.data_ptr();
      } else {
        keep.push_back(t.contiguous());
        s.src = keep.back().data_ptr();
      }
    }
    spans.push_back(s);
  }
  if (!spans.empty()) {
    pybind11::gil_scoped_release nogil;
    copySpans(spans, static_cast<int>(threads));
  }
}

/// tensors[i] = flat[offsets[i] : offsets[i] + tensors[i].numel()] (None entries skipped).
void unflattenT(const Tensor& flat, const std::vector<OptTensor>& tensors, const std::vector<int64_t>& offsets,
                int64_t threads) {
  checkFlat(flat, "bucket_unflatten");
  TORCH_CHECK(tensors.size() == offsets.size(), "bucket_unflatten: tensors and offsets must have equal lengths");
  const size_t es = flat.element_size();
  std::vector<CopySpan> spans;
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!tensors[i].has_value() || !tensors[i]->defined()) continue;
    Tensor t = *tensors[i];
    checkMember(flat, t, offsets[i], t.numel(), i, "bucket_unflatten");
    if (flat.is_cuda() || !t.is_contiguous()) {
      t.view(-1).copy_(flat.narrow(0, offsets[i], t.numel()), /*non_blocking=*/true);
      continue;
    }
    CopySpan s;
    s.src = static_cast<const char*>(flat.data_ptr()) + offsets[i] * es;
    s.dst = t.data_ptr();
    s.bytes = static_cast<size_t>(t.numel()) * es;
    spans.push_back(s);
  }
  if (!spans.empty()) {
    pybind11::gil_scoped_release nogil;
    copySpans(spans, static_cast<int>(threads));
  }
}

/// flat[offset : offset + t.numel()] = t (one gradient, the hook's hot path).
void copyInT(const Tensor& flat, int64_t offset, const Tensor& t) {
  checkFlat(flat, "bucket_copy_in");
  checkMember(flat, t, offset, t.numel(), 0, "bucket_copy_in");
  if (flat.is_cuda() || !t.is_contiguous()) {
    flat.narrow(0, offset, t.numel()).copy_(t.reshape(-1), /*non_blocking=*/true);
    return;
  }
  CopySpan s;
  s.src = t.data_ptr();
  s.dst = static_cast<char*>(flat.data_ptr()) + offset * flat.element_size();
  s.bytes = static_cast<size_t>(t.numel()) * flat.element_size();
  pybind11::gil_scoped_release nogil;
  copySpans({s}, 1);
}

// A zero-filled 1-D CPU tensor over a registered buffer (core/shared_arena.h): the shm
// transport's peers read it without a system call. Ordinary memory when the arena
// refuses the size (its cap, no memory): the collectives then read it as before.
Tensor registeredZerosT(int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(numel >= 0, "registered_zeros: negative numel ", numel);
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  void* p = SharedArena::instance().allocate(bytes);
  if (!p) return at::zeros({numel}, opts);
  memset(p, 0, bytes);
  return at::from_blob(p, {numel}, [](void* q) { SharedArena::instance().free(q); }, opts);
}

bool isRegisteredT(const Tensor& t) {
  if (!t.defined() || !t.device().is_cpu()) return false;
  SharedArena::Location loc;
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  return SharedArena::instance().locate(t.data_ptr(), bytes, &loc);
}

pybind11::dict registeredStatsT() {
  const SharedArena& a = SharedArena::instance();
  pybind11::dict d;
  d["segments"] = a.segmentCount();
  d["bytes_reserved"] = a.bytesReserved();
  d["bytes_in_use"] = a.bytesInUse();
  return d;
}

}  // namespace

void initBucketBindings(pybind11::module_& m) {
  namespace py = pybind11;
  using py::arg;
  m.def("bucket_plan", &planT, arg("numels"), arg("element_sizes"), arg("keys"), arg("bucket_cap_bytes"),
        arg("first_bucket_bytes"), arg("order") = py::none(),
        "Plans fusion buckets (DDP's rule); returns [(param indices, element offsets, numel, key)] in fill "
        "order. order: visiting order (default: reverse index order).");
  m.def("bucket_rebuild_order", &rebuildOrderT, arg("num_params"), arg("ready"),
        "Visiting order for a rebuild: the observed ready order, then the missing ones in reverse index order.");
  m.def("bucket_flatten", &flattenT, arg("flat"), arg("tensors"), arg("offsets"), arg("numels"),
        arg("threads") = 1, "Copies tensors (None: zeros) into their slots of a flat bucket.");
  m.def("bucket_unflatten", &unflattenT, arg("flat"), arg("tensors"), arg("offsets"), arg("threads") = 1,
        "Copies a flat bucket's slots back into tensors (None entries skipped).");
  m.def("bucket_copy_in", &copyInT, arg("flat"), arg("offset"), arg("tensor"),
        "Copies one tensor into flat[offset : offset + numel].");
  m.def("registered_zeros", &registeredZerosT, arg("numel"), arg("dtype"),
        "A zero-filled 1-D CPU tensor in the registered arena (peers on the host read it without a system "
        "call); ordinary memory if the arena refuses it.");
  m.def("is_registered", &isRegisteredT, arg("tensor"),
        "Whether a CPU tensor's bytes lie in the registered arena.");
  m.def("registered_stats", &registeredStatsT, "The registered arena: segments, bytes_reserved, bytes_in_use.");
}

}  // namespace pycomm
