// Tensors as the core sees them: contiguous host buffers. A CPU tensor that is
// contiguous is used as it is; another is copied and written back afterwards; a CUDA
// tensor is staged through pinned host memory on the group's comm stream for its
// device, by the thread that runs the operation (so the caller's thread never waits
// for the device). Also the chunked staging of in-place CUDA collectives that cannot
// go over CUDA IPC (stagedChunks).
#pragma once

#include <torch/extension.h>

#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>

#if defined(PYCOMM_WITH_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace pycomm {

#if defined(PYCOMM_WITH_CUDA)
/// Host staging of a CUDA tensor for a collective: the caller's current stream is
/// captured by `ready` when the collective is issued; on the communication thread the
/// group's comm `stream` waits for that event and copies the tensor into a pinned buffer
/// (Staged::prepare), the collective runs on the host buffer, and the result is copied
/// back on the comm stream (Staged::finish), which that thread synchronises before the
/// Work completes.
struct CudaStage {
  at::cuda::CUDAEvent ready;
  c10::cuda::CUDAStream stream;
  explicit CudaStage(c10::cuda::CUDAStream s) : stream(s) {}
};
#endif

/// A tensor as the core sees it: `buf`, a contiguous CPU buffer (`orig` itself when it
/// already is one).
struct Staged {
  at::Tensor orig;        ///< the caller's tensor
  at::Tensor buf;         ///< what the collective reads and writes
  bool copyBack = false;  ///< `buf` is a copy of an output: finish() writes it into `orig`
#if defined(PYCOMM_WITH_CUDA)
  std::shared_ptr<CudaStage> cuda;  ///< set when the device copies are deferred
#endif
  /// The host buffer.
  void* data() const { return buf.data_ptr(); }
  /// Its size in bytes.
  size_t bytes() const { return buf.numel() * buf.element_size(); }
  /// On the thread that runs the operation, before it: brings a deferred CUDA tensor's
  /// values into the host buffer.
  void prepare() const;
  /// After the operation: writes the result back into an output that was staged.
  void finish() const;
};

/// Checks that `t` is a dense CPU or CUDA tensor of a supported dtype (ValueError /
/// TypeError naming `rank` and `what` otherwise).
void checkTensor(const at::Tensor& t, int rank, const char* what);

/// The communication streams of one group, one per device (created on first use).
class CommStreams {
 public:
#if defined(PYCOMM_WITH_CUDA)
  /// The group's stream on `device`: a pool stream, which never waits on the legacy
  /// default stream.
  c10::cuda::CUDAStream get(c10::DeviceIndex device);

 private:
  std::mutex mu_;
  std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams_;
#endif
};

/// Stages `t` for an operation (`isOutput`: the operation writes it). A CUDA tensor is
/// copied by the thread that runs the operation (prepare/finish), on its device's
/// stream from `streams`; without pycomm's CUDA code, synchronously here.
Staged stage(const at::Tensor& t, bool isOutput, int rank, const char* what, CommStreams& streams);

#if defined(PYCOMM_WITH_CUDA)
/// Runs `coll` over a contiguous CUDA tensor in chunks staged through one pinned host
/// buffer, on `stream` (current on the calling thread): the device-to-host copy of chunk
/// i+1 is queued before `coll` runs on chunk i, and the host-to-device copy of chunk i
/// right after it, so both copy directions overlap the network work of the neighbouring
/// chunks; the host waits only for the chunk it is about to send. `copyIn`: the
/// collective reads the tensor; `copyOut`: it writes it. Complete on return.
void stagedChunks(const at::Tensor& t, c10::cuda::CUDAStream stream, size_t chunkBytes, bool copyIn, bool copyOut,
                  const std::function<void(void* host, size_t firstElem, size_t count)>& coll);
#endif

}  // namespace pycomm
