#include "bindings/cuda_collectives.h"

#if defined(PYCOMM_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>

#include "transport/cuda_ipc.h"
#endif

namespace pycomm {

CudaCollectives::CudaCollectives(Group& group, CommStreams& streams) : group_(group), streams_(streams) {}

std::map<std::string, uint64_t> CudaCollectives::stats() const {
  return {{"cuda_ipc_collectives", ipcCalls_.load()}, {"cuda_staged_chunks", stagedChunks_.load()}};
}

#if defined(PYCOMM_WITH_CUDA)

bool CudaCollectives::ipcEligible(c10::DeviceIndex dev) {
  if (!group_.ipcWanted()) return false;
  c10::DeviceIndex none = -1;
  ipcDevice_.compare_exchange_strong(none, dev);
  return ipcDevice_.load() == dev;
}

CollFn CudaCollectives::inPlace(std::vector<at::Tensor> tensors, std::vector<CollOp> ops, bool ipc,
                                size_t stageChunkBytes) {
  const c10::DeviceIndex dev = tensors[0].device().index();
  auto cs = std::make_shared<CudaStage>(streams_.get(dev));
  cs->ready.record(c10::cuda::getCurrentCUDAStream(dev));
  return [this, tensors, ops, cs, ipc, dev, stageChunkBytes](Collectives& c, const OpDesc& d, const Deadline& dl) {
    c10::cuda::CUDAGuard device(dev);
    c10::cuda::CUDAStreamGuard guard(cs->stream);
    cs->ready.block(cs->stream);  // after everything the caller queued before the call
    auto makeDevice = [&] { return makeCudaIpcDevice(dev, cs->stream.stream()); };
    IpcCollectives* ar = ipc ? group_.ipcCollectives(c, makeDevice, d, dl) : nullptr;
    const int rank = c.transport().rank();
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      at::Tensor work = t.is_contiguous() ? t : t.contiguous();  // on the comm stream
      const CollOp& op = ops[i];
      if (ar) {
        op.run(c, ar, work.data_ptr(), work.data_ptr(), d, dl);
        ipcCalls_.fetch_add(1);
      } else {
        const bool bcast = op.coll == CollType::kBroadcast;
        const bool in = !bcast || rank == op.root;
        const bool out = op.coll == CollType::kAllReduce || bcast != (rank == op.root);
        const size_t esz = work.element_size();
        stagedChunks(work, cs->stream, stageChunkBytes, in, out, [&](void* h, size_t, size_t cnt) {
          op.chunk(cnt, esz).run(c, nullptr, h, h, d, dl);
          stagedChunks_.fetch_add(1);
        });
      }
      if (!work.is_same(t)) t.copy_(work);
    }
    cs->stream.synchronize();
  };
}

CollFn CudaCollectives::outOfPlace(at::Tensor output, at::Tensor input, CollOp op,
                                   std::vector<at::Tensor> splitInto) {
  const c10::DeviceIndex dev = input.device().index();
  auto cs = std::make_shared<CudaStage>(streams_.get(dev));
  cs->ready.record(c10::cuda::getCurrentCUDAStream(dev));
  return [this, input, output, splitInto, cs, dev, op](Collectives& c, const OpDesc& d, const Deadline& dl) {
    c10::cuda::CUDAGuard device(dev);
    c10::cuda::CUDAStreamGuard guard(cs->stream);
    cs->ready.block(cs->stream);  // after everything the caller queued before the call
    at::Tensor in = input.contiguous();
    at::Tensor out = output.is_contiguous() ? output : at::empty_like(output, at::MemoryFormat::Contiguous);
    const char* a = static_cast<const char*>(in.data_ptr());
    const char* b = static_cast<const char*>(out.data_ptr());
    const bool overlap = a < b + out.nbytes() && b < a + in.nbytes();
    // all_gather's input may be this rank's block of its output; nothing else may overlap.
    if (op.coll != CollType::kAllGather && overlap && out.nbytes() > 0) in = in.clone();
    auto makeDevice = [&] { return makeCudaIpcDevice(dev, cs->stream.stream()); };
    if (IpcCollectives* ipc = group_.ipcCollectives(c, makeDevice, d, dl)) {
      op.run(c, ipc, in.data_ptr(), out.data_ptr(), d, dl);
      ipcCalls_.fetch_add(1);
    } else {  // IPC could not be set up on this group: whole tensors through pinned memory
      auto pinned = [](const at::Tensor& t) {
        return at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
      };
      at::Tensor hin = pinned(in), hout = pinned(out);
      hin.copy_(in, /*non_blocking=*/true);
      cs->stream.synchronize();
      op.run(c, nullptr, hin.data_ptr(), hout.data_ptr(), d, dl);
      out.copy_(hout, /*non_blocking=*/true);
    }
    if (!out.is_same(output)) output.copy_(out);
    if (!splitInto.empty()) {
      const at::Tensor whole = output.reshape({-1});
      int64_t off = 0;
      for (const at::Tensor& o : splitInto) {
        o.copy_(whole.narrow(0, off, o.numel()).view(o.sizes()));
        off += o.numel();
      }
    }
    cs->stream.synchronize();
  };
}

#endif

}  // namespace pycomm
