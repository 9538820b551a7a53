// All-reduce of device buffers for ranks on one host, over memory the ranks map into
// each other (CUDA IPC; see transport/ipc_device.h). Reduce-scatter then all-gather,
// both done by direct reads of the peers' mapped buffers: rank r reduces slice r of
// every rank's copy in one fused pass, then copies every other slice from its owner.
// Each rank moves 2(n-1)/n of the data across the interconnect, as a ring would, but in
// two steps instead of 2(n-1), with the host only ordering API calls (barriers over the
// group's host transport) and never waiting on the device in between.
//
// Results are bitwise identical on every rank: each slice is reduced once, by its owner,
// over the ranks in rank order, and everyone copies that result.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "algorithms/collectives.h"
#include "core/deadline.h"
#include "core/dtype.h"
#include "core/store.h"
#include "transport/ipc_device.h"

namespace pycomm {

/// One group's IPC all-reduce on one device of each rank.
class IpcAllReduce {
 public:
  /// Collective over `coll`'s ranks (all call it in the same operation, with the same
  /// `desc`): allocates two staging buffers of `bufferBytes` each, publishes their handles
  /// and this rank's event under `keyPrefix` in `store`, maps every peer's, then agrees
  /// with the others. Returns null on every rank if any rank failed (its reason in
  /// `whyNot`), so the group falls back together; throws only if the host transport fails.
  static std::unique_ptr<IpcAllReduce> create(std::unique_ptr<IpcDevice> device, Store& store,
                                              const std::string& keyPrefix, Collectives& coll,
                                              size_t bufferBytes, const OpDesc& desc,
                                              const Deadline& deadline, std::string* whyNot);

  /// In-place all-reduce of `count` elements at `data` (device memory of this rank),
  /// after everything already queued on the device; complete on return. Collective.
  void run(void* data, size_t count, DType dtype, ReduceOp op, Collectives& coll, const OpDesc& desc,
           const Deadline& deadline);

  /// The device, for messages.
  IpcDevice& device() { return *device_; }

  /// Bytes per staging buffer (a call larger than this runs in chunks of it).
  size_t bufferBytes() const { return bufferBytes_; }

 private:
  IpcAllReduce(std::unique_ptr<IpcDevice> device, int rank, int size, size_t bufferBytes)
      : device_(std::move(device)), rank_(rank), size_(size), bufferBytes_(bufferBytes) {}

  std::unique_ptr<IpcDevice> device_;
  int rank_;
  int size_;
  size_t bufferBytes_;
  char* mine_[2] = {nullptr, nullptr};      // this rank's two staging buffers
  std::vector<const char*> peers_[2];       // every rank's buffer b, mapped here (own at rank_)
  uint64_t chunks_ = 0;                     // chunks run so far: picks the buffer
};

}  // namespace pycomm
