// One collective call on contiguous buffers, described once and run on whichever path
// the group takes for it: the host algorithms (Collectives, over the group's transport)
// or the group's IPC collectives (device buffers of ranks on one host). The backend
// builds one description per call instead of one lambda per path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "algorithms/collectives.h"
#include "algorithms/ipc_collectives.h"
#include "core/deadline.h"
#include "core/dtype.h"
#include "transport/transport.h"

namespace pycomm {

/// What a collective does, without its buffers. broadcast and reduce read and write
/// `out`; all_reduce reads `in` (in place: null or `out`; on the IPC path always in
/// place) and writes `out`; the others read `in` and write `out`.
struct CollOp {
  CollType coll = CollType::kBarrier;  ///< which collective
  size_t count = 0;                    ///< all_reduce / reduce: elements; reduce_scatter: elements per rank
  size_t bytes = 0;                    ///< broadcast: bytes; all_gather / gather / scatter: bytes per rank
  DType dtype = DType::kUInt8;         ///< element type of the reductions
  ReduceOp op = ReduceOp::kSum;        ///< reduction
  int root = -1;                       ///< rooted collectives
  std::vector<size_t> sendOffsets;     ///< all_to_all: where each peer's bytes start in `in`
  std::vector<size_t> sendBytes;       ///< all_to_all: bytes for each peer
  std::vector<size_t> recvOffsets;     ///< all_to_all: where each peer's bytes land in `out`
  std::vector<size_t> recvBytes;       ///< all_to_all: bytes from each peer

  /// This operation on `count` elements (`bytes` for broadcast) instead: one chunk of an
  /// in-place call that is run in pieces.
  CollOp chunk(size_t elems, size_t elemBytes) const;

  /// Runs it over `ipc` when given (device pointers), else over `host` (host pointers).
  /// Gather's `out` and scatter's `in` are used on the root only (null is passed elsewhere).
  void run(Collectives& host, IpcCollectives* ipc, const void* in, void* out, const OpDesc& desc,
           const Deadline& deadline) const;
};

}  // namespace pycomm
