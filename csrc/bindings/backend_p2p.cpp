// Point-to-point: send, recv and recv from any source, each on its own thread of the group.
#include "bindings/backend.h"
#include "bindings/work.h"

namespace pycomm {

c10::intrusive_ptr<c10d::Work> PycommBackend::send(std::vector<at::Tensor>& tensors, int dstRank, int tag) {
  TORCH_CHECK_VALUE(tensors.size() == 1, "pycomm rank ", rank_, ": send takes one tensor");
  TORCH_CHECK_VALUE(dstRank >= 0 && dstRank < size_ && dstRank != rank_, "pycomm rank ", rank_,
                    ": send to invalid rank ", dstRank, " (group size ", size_, ")");
  // A CUDA tensor is copied to pinned memory on the send thread, after the caller's
  // current stream (Staged::prepare): the caller's thread does not wait for the device.
  Staged s = stage(tensors[0], false, "send tensor");
  auto c = group_->submitSend(dstRank, s.data(), s.bytes(), static_cast<uint32_t>(tag), [s] {
    at::NoGradGuard noGrad;
    s.prepare();
  });
  return c10::make_intrusive<PycommWork>(rank_, c10d::OpType::SEND, "pycomm:send", tensors, c, 0);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::recv(std::vector<at::Tensor>& tensors, int srcRank, int tag) {
  TORCH_CHECK_VALUE(tensors.size() == 1, "pycomm rank ", rank_, ": recv takes one tensor");
  TORCH_CHECK_VALUE(srcRank >= 0 && srcRank < size_ && srcRank != rank_, "pycomm rank ", rank_,
                    ": recv from invalid rank ", srcRank, " (group size ", size_, ")");
  // What arrived is written into the tensor (a staged CUDA or non-contiguous one) on the
  // receive thread before the Work completes, so wait() returning means it is there.
  Staged s = stage(tensors[0], true, "recv tensor");
  auto c = group_->submitRecv(srcRank, s.data(), s.bytes(), static_cast<uint32_t>(tag), [s] {
    at::NoGradGuard noGrad;
    s.finish();
  });
  auto work = c10::make_intrusive<PycommWork>(rank_, c10d::OpType::RECV, "pycomm:recv", tensors, c, 0);
  work->setSource(std::make_shared<std::atomic<int>>(srcRank));
  return work;
}

c10::intrusive_ptr<c10d::Work> PycommBackend::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  TORCH_CHECK_VALUE(tensors.size() == 1, "pycomm rank ", rank_, ": recv takes one tensor");
  TORCH_CHECK_VALUE(size_ > 1, "pycomm rank ", rank_, ": recv from any source in a group of one rank");
  Staged s = stage(tensors[0], true, "recv tensor");
  auto source = std::make_shared<std::atomic<int>>(-1);
  auto c = group_->submitRecvAny(s.data(), s.bytes(), static_cast<uint32_t>(tag), source, [s] {
    at::NoGradGuard noGrad;
    s.finish();
  });
  auto work = c10::make_intrusive<PycommWork>(rank_, c10d::OpType::RECVANYSOURCE, "pycomm:recv_anysource", tensors,
                                              c, 0);
  work->setSource(std::move(source));
  return work;
}

}  // namespace pycomm
