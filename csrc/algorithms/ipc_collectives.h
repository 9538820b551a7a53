// Collectives on device buffers for ranks on one host, over memory the ranks map into
// each other (CUDA IPC; see transport/ipc_device.h). Every rank owns two staging buffers
// that all peers have mapped; a call moves the caller's data through them in chunks:
//
//  - all_reduce = reduce-scatter + all-gather, both by direct reads of the peers'
//    buffers: rank r reduces slice r of every rank's copy in one fused pass, then copies
//    every other slice from its owner. Each rank moves 2(n-1)/n of the data across the
//    interconnect, as a ring would, in two steps instead of 2(n-1). Small calls run
//    one-shot: every rank reduces everything from every buffer, one step.
//  - reduce_scatter: every rank's buffer holds its input blocks' chunk; rank r reduces
//    block r of all of them straight into its output.
//  - all_gather: every rank's buffer holds its input's chunk; everyone copies all of them.
//  - broadcast: the root's buffer holds the chunk; everyone copies it.
//  - reduce: every rank's buffer holds its chunk; the root reduces all of them.
//  - gather: every rank's buffer holds its chunk; the root copies all of them.
//  - scatter: the root's buffer is one slot per rank, slot p holding p's next piece.
//  - all_to_all: a buffer is one slot per peer; slot p holds the next piece of what this
//    rank sends to p, and p copies it from there into its output.
//
// The host only orders API calls (barriers over the group's host transport) and never
// waits on the device until the end of a call. Results are bitwise identical on every
// rank: each reduced element is computed once, by its owner, over the ranks in rank
// order, and everyone copies that result.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "algorithms/collectives.h"
#include "core/deadline.h"
#include "core/dtype.h"
#include "core/store.h"
#include "transport/ipc_device.h"

namespace pycomm {

/// One group's IPC collectives on one device of each rank. Every call is collective
/// (all ranks, same order, same arguments) and complete on return; pointers are device
/// memory of this rank, already written by work queued before the call on the device.
class IpcCollectives {
 public:
  /// Collective over `coll`'s ranks (all call it in the same operation, with the same
  /// `desc`): allocates two staging buffers of `bufferBytes` each, publishes their handles
  /// and this rank's event under `keyPrefix` in `store`, maps every peer's, then agrees
  /// with the others (also on the buffer size and `oneShotBytes`, the largest all-reduce
  /// that takes the one-shot form: the smallest any rank asked for). Returns null on every rank if any rank failed (its reason in
  /// `whyNot`), so the group falls back together; throws only if the host transport fails.
  /// `makeDevice` runs inside that protection too (a device that cannot be opened is a
  /// failed setup like any other).
  static std::unique_ptr<IpcCollectives> create(const std::function<std::unique_ptr<IpcDevice>()>& makeDevice,
                                                Store& store, const std::string& keyPrefix, Collectives& coll,
                                                size_t bufferBytes, size_t oneShotBytes, const OpDesc& desc,
                                                const Deadline& deadline,
                                                std::string* whyNot);

  /// In-place all-reduce of `count` elements at `data`: one-shot (every rank reduces all
  /// of it from every buffer) up to oneShotBytes(), else reduce-scatter + all-gather.
  void allReduce(void* data, size_t count, DType dtype, ReduceOp op, Collectives& coll, const OpDesc& desc,
                 const Deadline& deadline);

  /// out (countPerRank elements) = reduction of block `rank` of every rank's `in`
  /// (size() * countPerRank elements). `in` and `out` must not overlap.
  void reduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op, Collectives& coll,
                     const OpDesc& desc, const Deadline& deadline);

  /// out (size() * bytesPerRank) = every rank's `in`, in rank order. `in` may be this
  /// rank's block of `out`.
  void allGather(const void* in, void* out, size_t bytesPerRank, Collectives& coll, const OpDesc& desc,
                 const Deadline& deadline);

  /// Root's `data` = reduction of every rank's `data` (count elements); the other ranks'
  /// data is unchanged.
  void reduce(void* data, size_t count, DType dtype, ReduceOp op, int root, Collectives& coll, const OpDesc& desc,
              const Deadline& deadline);

  /// Every rank's `buf` = root's `buf`.
  void broadcast(void* buf, size_t bytes, int root, Collectives& coll, const OpDesc& desc,
                 const Deadline& deadline);

  /// Root's `out` (size() * bytesPerRank) = every rank's `in`, in rank order; `out` is
  /// only read on the root (null elsewhere).
  void gather(const void* in, void* out, size_t bytesPerRank, int root, Collectives& coll, const OpDesc& desc,
              const Deadline& deadline);

  /// Every rank's `out` (bytesPerRank) = block `rank` of the root's `in` (size() *
  /// bytesPerRank); `in` is only read on the root (null elsewhere).
  void scatter(const void* in, void* out, size_t bytesPerRank, int root, Collectives& coll, const OpDesc& desc,
               const Deadline& deadline);

  /// Personalised exchange: rank p gets bytes [sendOffsets[p], +sendBytes[p]) of this
  /// rank's `in` at its own recvOffsets[this rank] of `out`. The ranks first exchange all
  /// their split sizes over the host transport, so every rank checks every pair (a
  /// mismatch raises MismatchError on every rank, before any device work) and all agree
  /// on the number of rounds. `in` and `out` must not overlap.
  void allToAll(const void* in, const std::vector<size_t>& sendOffsets, const std::vector<size_t>& sendBytes,
                void* out, const std::vector<size_t>& recvOffsets, const std::vector<size_t>& recvBytes,
                Collectives& coll, const OpDesc& desc, const Deadline& deadline);

  /// All-reduces run one-shot ("algo_all_reduce_ipc_oneshot") and as reduce-scatter
  /// + all-gather ("algo_all_reduce_ipc"); safe to call from any thread.
  std::map<std::string, uint64_t> stats() const;

  /// The device, for messages.
  IpcDevice& device() { return *device_; }

  /// Bytes per staging buffer (a call larger than this runs in chunks of it).
  size_t bufferBytes() const { return bufferBytes_; }

  /// Largest all-reduce (bytes) that runs one-shot.
  size_t oneShotBytes() const { return oneShotBytes_; }

 private:
  IpcCollectives(int rank, int size, size_t bufferBytes) : rank_(rank), size_(size), bufferBytes_(bufferBytes) {}

  /// The staging buffer for the next chunk. Buffers alternate, and before a chunk is
  /// written into one the device waits for the peers' records made before the previous
  /// chunk's barrier, which cover their reads of this buffer two chunks ago (or in an
  /// earlier call, which ended with a device sync and a barrier). Returns its index.
  int beginChunk();
  /// A buffer cut into one slot per rank (scatter, all_to_all): the slot's bytes.
  size_t slotBytes() const;
  /// End of a call: this rank's device work is done, then nobody reads our buffers any
  /// more, so the next call (or the group's destruction) may overwrite or free them.
  void endCall(Collectives& coll, const OpDesc& desc, const Deadline& deadline);

  std::unique_ptr<IpcDevice> device_;
  int rank_;
  int size_;
  size_t bufferBytes_;
  size_t oneShotBytes_ = 0;
  char* mine_[2] = {nullptr, nullptr};  // this rank's two staging buffers
  std::vector<const char*> peers_[2];   // every rank's buffer b, mapped here (own at rank_)
  uint64_t chunks_ = 0;                 // chunks run so far: picks the buffer
  std::atomic<uint64_t> oneShotRuns_{0};  // all-reduces run one-shot
  std::atomic<uint64_t> twoStepRuns_{0};  // all-reduces run as reduce-scatter + all-gather
};

}  // namespace pycomm
