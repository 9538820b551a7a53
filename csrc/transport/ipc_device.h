// The device side of the single-host IPC collectives (algorithms/ipc_collectives.h): memory
// that each rank allocates and its peers map into their own address space, one
// interprocess event per rank, and the stream-ordered operations the algorithm queues.
// transport/cuda_ipc.cu implements it with CUDA IPC (cudaIpcGetMemHandle, interprocess
// events, one CUDA stream); the C++ tests implement it on host memory with a worker
// thread per rank standing in for the stream, with the same ordering rules.
#pragma once

#include <cstddef>
#include <string>

#include "core/deadline.h"
#include "core/dtype.h"

namespace pycomm {

/// Stream-ordered device operations and cross-process memory of one rank.
///
/// Ordering contract (CUDA's): every queued operation runs after the ones queued before
/// it; record() marks this rank's event at the current end of the queue; waitPeers()
/// makes later operations wait until each peer's event has passed the record that peer
/// had made *when waitPeers() was called*, so a host barrier between a peer's record()
/// and this rank's waitPeers() is what orders the two ranks' device work.
class IpcDevice {
 public:
  virtual ~IpcDevice() = default;

  /// Allocates `bytes` of memory peers can map; `handle` receives what they pass to
  /// openPeer(). Owned by this object.
  virtual void* allocate(size_t bytes, std::string* handle) = 0;

  /// Maps a peer's allocation into this process (unmapped by closePeers() or when this
  /// object dies).
  virtual void* openPeer(const std::string& handle) = 0;

  /// Unmaps every peer allocation and event this rank opened.
  virtual void closePeers() = 0;

  /// Lets the destructor free this rank's allocations. Without it they stay allocated
  /// until the process exits: an owner must not free memory a peer still has mapped
  /// (CUDA: undefined behaviour), and a group's teardown is not collective. Call it once
  /// every peer has closed its mappings (create() does, after a failed setup).
  virtual void freeOnDestroy() = 0;

  /// The handle of this rank's interprocess event.
  virtual std::string eventHandle() = 0;

  /// Opens peer `peer`'s event from its handle.
  virtual void openPeerEvent(int peer, const std::string& handle) = 0;

  /// Records this rank's event after everything queued so far.
  virtual void record() = 0;

  /// Later operations wait for every opened peer event's latest record (as of now).
  virtual void waitPeers() = 0;

  /// Queues a copy of `bytes` bytes (local, peer-mapped or caller memory the device reaches).
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;

  /// Queues reduceMany (kernels/reduce.h): dst = srcs[0] (op) ... (op) srcs[n-1],
  /// element-wise over `count` elements, AVG divided by n.
  virtual void reduceMany(void* dst, const void* const* srcs, int n, size_t count, DType dtype,
                          ReduceOp op) = 0;

  /// Waits until everything queued has run; TimeoutError at `deadline` (a peer that
  /// died leaves this rank's queue waiting on its event forever).
  virtual void synchronize(const Deadline& deadline) = 0;

  /// Most ranks one reduceMany takes.
  virtual int maxSources() const = 0;

  /// "cuda:0 (IPC)" and the like, for messages.
  virtual std::string name() const = 0;
};

}  // namespace pycomm
