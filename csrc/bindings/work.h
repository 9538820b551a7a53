// PycommWork: the c10d::Work a pycomm operation returns at once. It completes (and
// its future is marked) from the thread that ran the operation, so DDP's comm hooks
// and .then() chains run without the caller polling.
#pragma once

#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/extension.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/work_queue.h"

namespace pycomm {

/// The Work of one queued operation, backed by its Completion.
class PycommWork : public c10d::Work {
 public:
  /// `outputs` are the Work's result (and the future's value); `seq` its sequence number.
  PycommWork(int rank, c10d::OpType type, const char* name, std::vector<at::Tensor> outputs,
             std::shared_ptr<Completion> completion, uint64_t seq);

  bool isCompleted() override;
  bool isSuccess() const override;
  std::exception_ptr exception() const override;
  std::vector<at::Tensor> result() override;
  uint64_t getSequencenumber() const override;
  /// Blocks until the operation finished (RuntimeError after `timeout`); rethrows its failure.
  bool wait(std::chrono::milliseconds timeout) override;
  /// Nothing to do: device outputs are written on the comm stream, which the operation
  /// synchronises before it completes.
  void synchronize() override;
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;
  /// A receive's source rank (for a receive from any source: -1 until it completed).
  int sourceRank() const override;
  /// Makes this the Work of a receive whose source `source` holds.
  void setSource(std::shared_ptr<std::atomic<int>> source) { source_ = std::move(source); }

 private:
  std::shared_ptr<std::atomic<int>> source_;
  std::vector<at::Tensor> outputs_;
  std::shared_ptr<Completion> completion_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
  uint64_t seq_;
};

}  // namespace pycomm
