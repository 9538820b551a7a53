// Shared-memory transport for ranks on one host.
//
// One control segment per transport (created by rank 0, named per job, unlinked as
// soon as every rank has mapped it, so nothing is left in /dev/shm even after
// SIGKILL). It holds, per rank, a futex doorbell and a post record, and per ordered
// pair a mailbox. Payloads never pass through the segment: the receiver copies the
// sender's bytes straight out of the sender's address space with process_vm_readv
// (cross-memory attach), so every message costs one copy. Small all-reduces use
// inline slots in the segment instead (one-shot, latency-optimised). A buffer that
// lies in the process's registered arena (core/shared_arena.h) is published with its
// segment, and peers map that segment once and read the buffer with plain loads (no
// system call, no pinning): Peer::mapped, and readPeer becomes a memcpy.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "core/store.h"
#include "transport/transport.h"

namespace pycomm {

/// Bytes a rank can publish inline in its post record (one-shot all-reduce limit).
constexpr size_t kShmInlineBytes = 64 * 1024;
/// Spin iterations of a wait before it sleeps: ranks <= usable cores, and more ranks
/// than cores (then every iteration yields the core). PYCOMM_SPIN overrides both.
constexpr int kSpinDefault = 2000;
constexpr int kSpinOversubscribed = 64;
/// PYCOMM_HUGE_PAGES_MIN=N: buffers of at least N bytes that peers read are advised onto
/// huge pages once (MADV_HUGEPAGE + MADV_COLLAPSE, core/huge_pages.h). Off by default:
/// on the CI machine kind (kernel 6.18) process_vm_readv pinned 4 KiB pages as fast as
/// huge ones and 64 MiB all_reduces ran slower with the advice (issue 17's measurements,
/// docs/BENCHMARKING.md).
constexpr size_t kHugeAdviseDefault = 0;

struct ShmHeader;
struct ShmRankSlot;
struct ShmMailbox;
struct ShmPostRecord;

/// Transport over a shared control segment plus cross-memory reads.
class ShmTransport : public Transport, public DirectAccess {
 public:
  /// Creates/opens the group's segment through `store` (keys under `keyPrefix`).
  /// Throws Error if cross-memory attach is not permitted (the caller falls back to TCP).
  ShmTransport(Store& store, const std::string& keyPrefix, int rank, int size,
               std::chrono::milliseconds timeout);
  ~ShmTransport() override;

  ShmTransport(const ShmTransport&) = delete;
  ShmTransport& operator=(const ShmTransport&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* name() const override { return "shm"; }

  void send(int peer, const void* buf, size_t bytes, const OpDesc& desc,
            const Deadline& deadline) override;
  void recv(int peer, void* buf, size_t bytes, const OpDesc& desc,
            const Deadline& deadline) override;
  void sendRecv(int sendPeer, const void* sendBuf, size_t sendBytes, int recvPeer, void* recvBuf,
                size_t recvBytes, const OpDesc& desc, const Deadline& deadline) override;
  /// The mailbox from `peer` holds a posted message this rank has not taken yet.
  Peek peekHeader(int peer, OpDesc* desc, size_t* bytes) override;
  void abort(const std::string& why) override;
  /// Bytes peers have copied out of this rank's buffers (what this rank "sent").
  uint64_t bytesSent() const override;

  // ---- DirectAccess (transport.h), used by the single-copy algorithms in
  // ---- algorithms/collectives.cc through Transport::directAccess().

  DirectAccess* directAccess() override { return this; }
  size_t inlineCapacity() const override { return kShmInlineBytes; }
  uint64_t post(const OpDesc& desc, const void* addr, size_t bytes, size_t inlineBytes) override;
  Peer peerRecord(int peer, uint64_t dseq, const OpDesc& desc, size_t bytes,
                  const Deadline& deadline) override;
  void readPeer(int peer, uint64_t remote, void* local, size_t bytes) override;
  void countMappedRead(int peer, size_t bytes) override;
  /// Peers' registered segments this rank has mapped (for tests and stats).
  size_t mappedSegments() const;
  /// Counted per transport.
  void barrier(const OpDesc& desc, const Deadline& deadline) override;

 private:
  void release();  // closes the pidfds and unmaps the segment (idempotent)
  void ring(int peer);
  template <typename Pred>
  void waitFor(Pred done, int peer, const OpDesc& desc, const Deadline& deadline, const char* what);
  void checkAbort() const;
  void adviseHuge(const void* buf, size_t bytes);
  void checkPeerAlive(int peer, const OpDesc& desc, const char* what);
  void postSend(int peer, const void* buf, size_t bytes, const OpDesc& desc);
  void waitSendDone(int peer, const OpDesc& desc, const Deadline& deadline);
  void completeRecv(int peer, void* buf, size_t bytes, const OpDesc& desc, const Deadline& deadline);
  ShmRankSlot* slot(int r) const;
  const void* mapPeerSegment(int peer, const ShmPostRecord& rec);
  void readPeerCma(int peer, uint64_t remote, void* local, size_t bytes);

  ShmMailbox* mailbox(int from, int to) const;

  int rank_;
  int size_;
  std::string segName_;
  void* base_ = nullptr;
  size_t mapBytes_ = 0;
  ShmHeader* header_ = nullptr;
  std::vector<pid_t> pids_;
  std::vector<int> pidfds_;
  std::vector<uint64_t> sendSeq_;  // per peer, messages posted to it
  std::vector<uint64_t> recvSeq_;  // per peer, messages taken from it
  uint64_t directSeq_ = 0;
  uint64_t barrierSeq_ = 0;
  int spinIters_;
  int yieldEvery_ = 128;
  bool oversubscribed_ = false;
  size_t hugeAdviseBytes_ = kHugeAdviseDefault;
  std::chrono::steady_clock::time_point lastLiveCheck_{};

  /// A peer's registered segment as mapped here (`local` null: mapping it failed,
  /// so its buffers are read with process_vm_readv).
  struct PeerSegment {
    int32_t segment = -1;
    uint64_t remoteBase = 0;
    size_t bytes = 0;
    void* local = nullptr;
  };
  std::vector<std::vector<PeerSegment>> peerSegs_;  // per peer
  // Per peer, the segment the current direct operation's buffer lies in (index into
  // peerSegs_[peer]) or -1; set by peerRecord, used by readPeer.
  std::vector<int> curSeg_;
  bool registered_ = true;  // PYCOMM_REGISTERED=0 turns publication and mapping off
};

/// A string identifying this host and namespace: ranks with equal keys can use
/// shared memory and cross-memory attach with each other. Differs across network
/// namespaces too, so ranks placed in separate namespaces behave as separate hosts.
std::string localHostKey();

}  // namespace pycomm
