#include "bindings/work.h"

#include <algorithm>

namespace pycomm {

namespace {
// The CUDA devices of `ts`, each once (the future's devices).
std::vector<c10::Device> cudaDevices(const std::vector<at::Tensor>& ts) {
  std::vector<c10::Device> d;
  for (const auto& t : ts) {
    if (t.device().is_cuda() && std::find(d.begin(), d.end(), t.device()) == d.end()) d.push_back(t.device());
  }
  return d;
}
}  // namespace

PycommWork::PycommWork(int rank, c10d::OpType type, const char* name, std::vector<at::Tensor> outputs,
                       std::shared_ptr<Completion> completion, uint64_t seq)
    : c10d::Work(rank, type, name), outputs_(std::move(outputs)), completion_(std::move(completion)), seq_(seq) {
  future_ = c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()),
                                                     cudaDevices(outputs_));
  auto fut = future_;
  auto outs = outputs_;
  completion_->onFinish([fut, outs](std::exception_ptr err) {
    if (err) {
      fut->setError(err);
    } else {
      fut->markCompleted(c10::IValue(outs));
    }
  });
}

bool PycommWork::isCompleted() { return completion_->finished(); }

bool PycommWork::isSuccess() const { return completion_->finished() && !completion_->error(); }

std::exception_ptr PycommWork::exception() const { return completion_->error(); }

std::vector<at::Tensor> PycommWork::result() { return outputs_; }

uint64_t PycommWork::getSequencenumber() const { return seq_; }

bool PycommWork::wait(std::chrono::milliseconds timeout) {
  const long ms = timeout == kNoTimeout ? -1 : static_cast<long>(timeout.count());
  if (!completion_->waitFor(ms)) {
    TORCH_CHECK(false, "pycomm: Work.wait timed out after ", timeout.count(), " ms");
  }
  if (auto err = completion_->error()) std::rethrow_exception(err);
  return true;
}

void PycommWork::synchronize() {}

int PycommWork::sourceRank() const {
  TORCH_CHECK(source_, "pycomm: sourceRank() is only defined for the Work of a recv");
  return source_->load();
}

c10::intrusive_ptr<c10::ivalue::Future> PycommWork::getFuture() { return future_; }

}  // namespace pycomm
