#include "bindings/staging.h"

#include <algorithm>

#if defined(PYCOMM_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

#include "bindings/torch_types.h"
#include "core/shared_arena.h"

namespace pycomm {

void Staged::prepare() const {
#if defined(PYCOMM_WITH_CUDA)
  if (cuda) {
    c10::cuda::CUDAStreamGuard g(cuda->stream);
    cuda->ready.block(cuda->stream);  // after everything the caller queued before the call
    buf.copy_(orig, /*non_blocking=*/true);
    cuda->stream.synchronize();
  }
#endif
}

void Staged::finish() const {
  if (!copyBack) return;
#if defined(PYCOMM_WITH_CUDA)
  if (cuda) {
    c10::cuda::CUDAStreamGuard g(cuda->stream);
    cuda->ready.block(cuda->stream);  // not before the caller's earlier work on the tensor (recv)
    orig.copy_(buf, /*non_blocking=*/true);
    cuda->stream.synchronize();  // the pinned buffer is released with the Work
    return;
  }
#endif
  orig.copy_(buf);
}

void checkTensor(const at::Tensor& t, int rank, const char* what) {
  TORCH_CHECK_VALUE(t.defined(), "pycomm rank ", rank, ": ", what, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "pycomm rank ", rank, ": ", what,
                    " is a sparse tensor; pycomm supports dense (strided) tensors only");
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), "pycomm rank ", rank, ": ", what,
                    " is on device ", t.device(), "; pycomm serves cpu and cuda tensors");
  toDType(t.scalar_type(), rank);
}

#if defined(PYCOMM_WITH_CUDA)
c10::cuda::CUDAStream CommStreams::get(c10::DeviceIndex device) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = streams_.find(device);
  if (it == streams_.end()) {
    it = streams_.emplace(device, c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device)).first;
  }
  return it->second;
}

void stagedChunks(const at::Tensor& t, c10::cuda::CUDAStream stream, size_t chunkBytes, bool copyIn, bool copyOut,
                  const std::function<void(void* host, size_t firstElem, size_t count)>& coll) {
  const size_t esz = t.element_size();
  const size_t n = static_cast<size_t>(t.numel());
  if (n == 0) {
    coll(nullptr, 0, 0);  // every rank still takes part
    return;
  }
  const size_t per = std::max<size_t>(1, chunkBytes / esz);
  const size_t chunks = (n + per - 1) / per;
  at::Tensor pinned = at::empty({static_cast<int64_t>(n * esz)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  char* host = static_cast<char*>(pinned.data_ptr());
  char* dev = static_cast<char*>(t.data_ptr());
  // Chunk i's copy-in is marked by landed[i % 2]: that event is recorded again for
  // chunk i + 2 only after the host has waited for chunk i.
  at::cuda::CUDAEvent landed[2];
  auto first = [&](size_t i) { return i * per; };
  auto len = [&](size_t i) { return std::min(per, n - i * per); };
  auto fetch = [&](size_t i) {
    C10_CUDA_CHECK(cudaMemcpyAsync(host + first(i) * esz, dev + first(i) * esz, len(i) * esz,
                                   cudaMemcpyDeviceToHost, stream.stream()));
    landed[i % 2].record(stream);
  };
  try {
    if (copyIn) fetch(0);
    for (size_t i = 0; i < chunks; ++i) {
      if (copyIn && i + 1 < chunks) fetch(i + 1);  // overlaps coll(i)
      if (copyIn) landed[i % 2].synchronize();
      coll(host + first(i) * esz, first(i), len(i));
      if (copyOut) {  // overlaps coll(i + 1)
        C10_CUDA_CHECK(cudaMemcpyAsync(dev + first(i) * esz, host + first(i) * esz, len(i) * esz,
                                       cudaMemcpyHostToDevice, stream.stream()));
      }
    }
    stream.synchronize();  // the pinned buffer is released on return
  } catch (...) {
    cudaStreamSynchronize(stream.stream());  // copies still queued must not outlive the buffer
    throw;
  }
}
#endif

Staged stage(const at::Tensor& t, bool isOutput, int rank, const char* what, CommStreams& streams) {
  checkTensor(t, rank, what);
  Staged s;
  s.orig = t;
#if defined(PYCOMM_WITH_CUDA)
  if (t.device().is_cuda()) {
    s.buf = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
    s.copyBack = isOutput;
    s.cuda = std::make_shared<CudaStage>(streams.get(t.device().index()));
    s.cuda->ready.record(c10::cuda::getCurrentCUDAStream(t.device().index()));
    return s;
  }
#else
  (void)streams;
#endif
  if (t.device().is_cpu() && t.is_contiguous()) {
    s.buf = t;
  } else {
    // A contiguous copy, in the registered arena when it has room (peers on the host
    // then read it without a system call; core/shared_arena.h).
    const auto opts = t.options().device(at::kCPU);
    const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
    if (void* p = SharedArena::instance().allocate(bytes)) {
      s.buf = at::from_blob(p, t.sizes(), [](void* q) { SharedArena::instance().free(q); }, opts);
    } else {
      s.buf = at::empty(t.sizes(), opts);
    }
    s.buf.copy_(t);
    s.copyBack = isOutput;
  }
  return s;
}

}  // namespace pycomm
