// The CUDA paths of the backend's collectives: what runs on the communication thread
// for CUDA tensors. On a one-host group they go over the group's IPC collectives
// (Group::ipcCollectives, on a CUDA IpcDevice); otherwise in-place collectives are
// staged through pinned host memory in overlapped chunks (stagedChunks), and the
// out-of-place ones by the backend's ordinary staging.
#pragma once

#include <torch/extension.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "bindings/staging.h"
#include "engine/coll_op.h"
#include "engine/group.h"

namespace pycomm {

/// The body of a collective, run on the group's communication thread.
using CollFn = std::function<void(Collectives&, const OpDesc&, const Deadline&)>;

/// Header tag of collectives that take the CUDA IPC path: a rank that stages instead
/// (its tensor on another device, PYCOMM_CUDA_IPC set differently) is a mismatch.
constexpr uint32_t kCudaIpcTag = 0x43495043;  // "CIPC"

/// CUDA collectives of one group (counters exist, at zero, in builds without CUDA).
class CudaCollectives {
 public:
  /// `group` and `streams` must outlive this object.
  CudaCollectives(Group& group, CommStreams& streams);

  /// "cuda_ipc_collectives" (tensors that went over CUDA IPC) and "cuda_staged_chunks"
  /// (chunks of CUDA tensors staged through host memory).
  std::map<std::string, uint64_t> stats() const;

#if defined(PYCOMM_WITH_CUDA)
  /// True if a collective on `dev` takes the CUDA IPC path: the group's ranks share one
  /// host and `dev` is the group's IPC device, which the first CUDA collective that could
  /// take the path picks (the same call on every rank, so every rank decides alike).
  bool ipcEligible(c10::DeviceIndex dev);

  /// all_reduce, broadcast or reduce of `tensors` (one device; ops[i] describes
  /// tensors[i]) in place, on the group's comm stream for the device, after the caller's
  /// current stream (captured now): over CUDA IPC when `ipc`, else staged in chunks of
  /// `stageChunkBytes`.
  CollFn inPlace(std::vector<at::Tensor> tensors, std::vector<CollOp> ops, bool ipc, size_t stageChunkBytes);

  /// An out-of-place collective `op` from `input` into `output` (both on the group's IPC
  /// device), over CUDA IPC (or, if IPC could not be set up on this group, whole tensors
  /// through pinned host memory). `splitInto`: output's consecutive parts are copied
  /// into these tensors afterwards.
  CollFn outOfPlace(at::Tensor output, at::Tensor input, CollOp op, std::vector<at::Tensor> splitInto);
#endif

 private:
  Group& group_;
  CommStreams& streams_;
  std::atomic<uint64_t> ipcCalls_{0};      // tensors whose collective ran over CUDA IPC
  std::atomic<uint64_t> stagedChunks_{0};  // chunks of CUDA tensors staged through host memory
#if defined(PYCOMM_WITH_CUDA)
  std::atomic<c10::DeviceIndex> ipcDevice_{-1};  // picked by the first IPC-capable CUDA collective
#endif
};

}  // namespace pycomm
