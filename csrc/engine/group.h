// A torch-free process group: transports, algorithms and worker threads of one
// group of ranks. The c10d backend (bindings/backend.cpp) is a thin shell around it;
// the C++ tests drive it directly with ranks as threads.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "algorithms/collectives.h"
#include "algorithms/ipc_collectives.h"
#include "core/store.h"
#include "core/work_queue.h"
#include "transport/ipc_device.h"
#include "transport/transport.h"

namespace pycomm {

/// A group's transport and what the algorithms need to know about its layout.
struct GroupTransport {
  std::unique_ptr<Transport> transport;  ///< every pair of the group
  Topology topology;                     ///< which ranks share a host (as the transport sees it)
  Transport* local = nullptr;            ///< this host's ranks (shared memory) inside `transport`, or null
};

/// This rank's host key: localHostKey() (hostname, boot id, namespaces), prefixed with
/// PYCOMM_HOST_KEY when set (tests and emulation: it can split one host into several,
/// never join separate ones).
std::string groupHostKey();

/// The machine part of a host key (hostname and boot id, without namespaces or the
/// PYCOMM_HOST_KEY prefix): ranks with equal kernel keys share CPUs, whatever hosts they
/// act as. Rank-to-core binding (core/affinity.h) counts those.
std::string kernelKeyOf(const std::string& hostKey);

/// Creates the transport of a group (collectively). Ranks with equal host keys that pass
/// the shared-memory probe (cross-memory attach) are one host: shared memory between
/// them, TCP between hosts (a MixedTransport when both are in use). A host whose probe
/// fails counts as one host per rank. PYCOMM_TRANSPORT=tcp puts every pair on TCP
/// (the topology still follows the host keys); =shm requires one host.
GroupTransport makeGroupTransport(Store& store, const std::string& keyPrefix, int rank, int size,
                                  std::chrono::milliseconds timeout);

/// makeGroupTransport's transport alone.
std::unique_ptr<Transport> makeTransport(Store& store, const std::string& keyPrefix, int rank,
                                         int size, std::chrono::milliseconds timeout);

/// Settings of a group's IPC collectives (from the environment, see docs/USER_GUIDE.md).
struct IpcConfig {
  /// Device collectives may go over IPC (when every rank is on this host). PYCOMM_CUDA_IPC.
  bool enabled = true;
  /// Bytes of each of the two staging buffers per rank. PYCOMM_CUDA_IPC_BUFFER_BYTES.
  size_t bufferBytes = 8 << 20;
  /// Largest all-reduce (bytes) that runs one-shot. PYCOMM_CUDA_IPC_ONESHOT_BYTES.
  size_t oneShotBytes = 256 << 10;

  /// Reads the PYCOMM_CUDA_IPC* variables above.
  static IpcConfig fromEnv();
};

/// Makes the device a group's IPC collectives run on (e.g. makeCudaIpcDevice).
using IpcDeviceFactory = std::function<std::unique_ptr<IpcDevice>()>;

/// One group of ranks with its own transports and threads.
class Group {
 public:
  /// Rendezvous through `store`, which must outlive the group (the IPC collectives are
  /// set up through it on first use; the TCP transport leaves abort reasons in it).
  Group(Store& store, int rank, int size, std::chrono::milliseconds timeout);
  /// Aborts anything in flight, stops the threads, releases transports.
  ~Group();

  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  /// This rank.
  int rank() const { return rank_; }
  /// Number of ranks.
  int size() const { return size_; }
  /// Which ranks share a host.
  const Topology& topology() const { return topology_; }
  /// The group's host algorithms, for read-only planning queries from any thread (their
  /// configuration and hierarchy are fixed once the group exists).
  const Collectives& algorithms() const { return *algos_; }
  /// Per-operation timeout.
  std::chrono::milliseconds timeout() const { return timeout_; }
  /// Name of the transport in use ("shm", "tcp", or "shm+tcp" for a group with
  /// co-located ranks on several hosts).
  std::string transportName() const { return coll_->name(); }

  /// Store-key prefix private to this group instance (for setup that happens later,
  /// e.g. the CUDA IPC buffers, which go under keyPrefix() + "ipc/").
  const std::string& keyPrefix() const { return keyPrefix_; }

  /// Next collective sequence number (call in issue order, on the caller's thread).
  uint64_t nextSeq() { return ++seq_; }
  /// The last sequence number handed out (0 before the first collective).
  uint64_t lastSeq() const { return seq_.load(); }

  /// Queues a collective; `fn` runs on the communication thread with the group's
  /// algorithms and a deadline of now + timeout. Failures abort the group's
  /// transport so every rank's pending and future operations fail too.
  /// With `runInline`, the collective runs on the calling thread if no other
  /// collective is queued or running (issue order is kept either way).
  /// `desc` (the collective's header) goes into the flight recorder (engine/
  /// flight_recorder.h) with its state; a default one (seq 0) is not recorded.
  std::shared_ptr<Completion> submitCollective(
      bool runInline, std::function<void(Collectives&, const Deadline&)> fn, const OpDesc& desc = OpDesc{});

  /// Queues a point-to-point send (on the send thread) or receive (on the receive
  /// thread); sends and receives progress independently, so any order that matches
  /// between the two ranks completes. `before` runs on the send thread just before the
  /// send (it fills `buf`, e.g. from device memory); `after` on the receive thread once
  /// the data is in `buf`, before the operation completes (e.g. copies it out). Both
  /// may be empty; what they capture lives until the operation ends.
  std::shared_ptr<Completion> submitSend(int peer, const void* buf, size_t bytes, uint32_t tag,
                                         std::function<void()> before);
  /// See submitSend.
  std::shared_ptr<Completion> submitRecv(int peer, void* buf, size_t bytes, uint32_t tag,
                                         std::function<void()> after);

  /// A receive from whichever of the other ranks first sends a message with `tag`
  /// (pairs stay in order: a peer whose next message has another tag is passed over
  /// until a later receive takes it). The source is stored in `*source` before the
  /// operation completes; `after` as for submitRecv. TimeoutError if none arrives.
  std::shared_ptr<Completion> submitRecvAny(void* buf, size_t bytes, uint32_t tag, std::shared_ptr<std::atomic<int>> source,
                                            std::function<void()> after);

  /// True if device collectives of this group may go over IPC: more than one rank, all
  /// on this host (the group runs over shared memory), and IPC not turned off.
  bool ipcWanted() const;

  /// The group's IPC collectives, set up on first use with a device from `makeDevice`
  /// (collectively: every rank's first IPC collective is the same operation, `desc`).
  /// Null, on every rank, if any rank cannot map its peers' memory: the group then
  /// keeps to the host path for good (the reason is printed once). Call only inside a
  /// collective (on the thread that runs it), with the `coll` it was given.
  IpcCollectives* ipcCollectives(Collectives& coll, const IpcDeviceFactory& makeDevice, const OpDesc& desc,
                                 const Deadline& deadline);

  /// Counters: collectives run, bytes sent/received per transport, calls per algorithm
  /// (Collectives::stats(), IpcCollectives::stats()).
  std::map<std::string, uint64_t> stats() const;

  /// Fails everything in flight with `why`, on every rank.
  void abort(const std::string& why);

 private:
  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  Store& store_;
  std::string keyPrefix_;
  IpcConfig ipcConfig_;
  bool ipcTried_ = false;                          // collectives only (one at a time)
  std::unique_ptr<IpcCollectives> ipc_;            // set up on first use
  std::atomic<const IpcCollectives*> ipcView_{nullptr};  // ipc_, for stats() on other threads
  std::unique_ptr<Transport> coll_;
  std::unique_ptr<Transport> p2p_;
  Topology topology_;
  std::unique_ptr<Collectives> algos_;
  std::atomic<uint64_t> seq_{0};
  std::atomic<uint64_t> collectivesRun_{0};
  std::vector<uint64_t> sendSeq_;  // p2p sequence per peer (caller thread)
  std::vector<uint64_t> recvSeq_;  // receive thread
  std::unique_ptr<WorkQueue> collQueue_;
  std::unique_ptr<WorkQueue> sendQueue_;
  std::unique_ptr<WorkQueue> recvQueue_;
  int frGroup_ = -1;  // this group in the flight recorder
};

}  // namespace pycomm
