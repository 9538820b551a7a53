// The small interface every transport implements (shared memory in shm.h, TCP in
// tcp.h): ordered point-to-point messages between the ranks of one group, plus one
// optional capability, DirectAccess (reading a peer's buffer where it lies), which a
// transport offers through directAccess(). Algorithms in csrc/algorithms/ are written
// against these two interfaces and never name a concrete transport.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/deadline.h"
#include "core/dtype.h"

namespace pycomm {

/// Which collective a message belongs to (carried in every message header so a
/// receiver can tell that its peer is running something else).
enum class CollType : uint8_t {
  kAllReduce = 1,
  kReduceScatter = 2,
  kAllGather = 3,
  kBroadcast = 4,
  kReduce = 5,
  kGather = 6,
  kScatter = 7,
  kAllToAll = 8,
  kBarrier = 9,
  kSend = 10,  // point-to-point (send on one side, recv on the other)
  kCompressed = 11,
};

/// Human name of a collective ("all_reduce", ...).
const char* collName(CollType c);

/// Describes the collective a message belongs to. Two ranks running the same call
/// produce equal descriptors; any difference is reported as a mismatch.
struct OpDesc {
  uint64_t seq = 0;        ///< per-group sequence number of the collective (p2p: per pair)
  uint64_t count = 0;      ///< element count of the whole call (as the caller sees it)
  int32_t root = -1;       ///< root rank, -1 if none
  uint32_t tag = 0;        ///< user tag for send/recv
  CollType coll = CollType::kBarrier;
  DType dtype = DType::kUInt8;
  ReduceOp op = ReduceOp::kSum;
  uint8_t pad = 0;

  /// "all_reduce #12 (count=100, float32, SUM)".
  std::string str() const;

  /// Fields that must agree between sender and receiver (seq, coll, count, dtype, op, root, tag).
  bool sameCall(const OpDesc& o) const {
    return seq == o.seq && coll == o.coll && count == o.count && dtype == o.dtype &&
           op == o.op && root == o.root && tag == o.tag;
  }
};
static_assert(sizeof(OpDesc) == 32, "OpDesc is a 32-byte wire header");

/// Byte counters of a transport (read by pycomm.stats()).
struct TransportStats {
  std::atomic<uint64_t> bytesSent{0};
  std::atomic<uint64_t> bytesRecv{0};
  std::atomic<uint64_t> messagesSent{0};
  std::atomic<uint64_t> messagesRecv{0};
};

/// Optional capability of a transport whose ranks can read each other's memory in
/// place (shared memory with cross-memory attach): a rank publishes a buffer, its peers
/// copy straight out of it. The single-copy algorithms (shm one-shot and direct
/// all-reduce, and the direct forms of the other collectives) use it.
class DirectAccess {
 public:
  /// A peer's published record for a direct operation.
  struct Peer {
    const void* inlineData = nullptr;  ///< the peer's inline bytes (one-shot), or null
    uint64_t addr = 0;                 ///< address of the peer's buffer in its process
    size_t bytes = 0;                  ///< bytes the peer published
    /// The peer's buffer mapped into this process (a registered buffer, see
    /// core/shared_arena.h), or null: then read it with readPeer.
    const void* mapped = nullptr;
  };

  virtual ~DirectAccess() = default;

  /// Most bytes post() can publish inline (the one-shot all-reduce limit).
  virtual size_t inlineCapacity() const = 0;

  /// Publishes this rank's buffer for the next direct operation: its address (for
  /// cross-memory reads) and, if `inlineBytes` > 0, a copy of the first inlineBytes
  /// bytes in shared memory. Returns the operation's direct sequence number.
  virtual uint64_t post(const OpDesc& desc, const void* addr, size_t bytes, size_t inlineBytes) = 0;

  /// Waits for `peer`'s record of direct operation `dseq` and checks it matches
  /// `desc`/`bytes` (MismatchError otherwise).
  virtual Peer peerRecord(int peer, uint64_t dseq, const OpDesc& desc, size_t bytes,
                          const Deadline& deadline) = 0;

  /// Copies `bytes` from address `remote` in `peer`'s process into `local`.
  virtual void readPeer(int peer, uint64_t remote, void* local, size_t bytes) = 0;

  /// Counts `bytes` this rank read straight out of `peer`'s mapping (Peer::mapped, no
  /// readPeer call), so pycomm.stats() reports every byte moved between ranks.
  virtual void countMappedRead(int peer, size_t bytes) = 0;

  /// Returns once every rank has reached the same barrier.
  virtual void barrier(const OpDesc& desc, const Deadline& deadline) = 0;
};

/// Point-to-point messaging between the ranks of one group. Messages between an
/// ordered pair of ranks are delivered in order. Every call blocks until its buffer
/// may be reused, gives up with TimeoutError at `deadline` (naming the peer and
/// the call), and raises PeerError when the peer dies or sends something invalid.
///
/// Thread safety: one thread may send while another receives on the same
/// transport (the backend's send and receive workers do this for p2p); two threads
/// must not both send (or both receive) at once.
class Transport {
 public:
  virtual ~Transport() = default;

  /// This rank within the group.
  virtual int rank() const = 0;

  /// Number of ranks in the group.
  virtual int size() const = 0;

  /// "shm" or "tcp".
  virtual const char* name() const = 0;

  /// Sends `bytes` bytes of `buf` to `peer`; the header carries `desc`.
  virtual void send(int peer, const void* buf, size_t bytes, const OpDesc& desc,
                    const Deadline& deadline) = 0;

  /// Receives exactly `bytes` bytes from `peer` into `buf`. The sender's descriptor
  /// and size must match `desc` and `bytes`, or MismatchError names both sides.
  virtual void recv(int peer, void* buf, size_t bytes, const OpDesc& desc,
                    const Deadline& deadline) = 0;

  /// Sends to `sendPeer` while receiving from `recvPeer`, both in flight at once
  /// (a ring step or a pairwise exchange). Either size may be zero.
  virtual void sendRecv(int sendPeer, const void* sendBuf, size_t sendBytes, int recvPeer,
                        void* recvBuf, size_t recvBytes, const OpDesc& desc,
                        const Deadline& deadline) = 0;

  /// What peekHeader() found at the head of a peer's stream.
  enum class Peek {
    kNothing,  ///< no whole header has arrived yet
    kMessage,  ///< a message's header: `desc` and `bytes` are filled in
    kBroken,   ///< the stream failed (closed, garbage): a recv() from the peer reports why
  };

  /// Looks, without blocking and without consuming anything, at the next message
  /// `peer` sent to this rank: lets a receiver choose among several peers (receive
  /// from any source) while every pair stays in order. Called on the receiving thread
  /// only. Throws PeerError if the transport failed.
  virtual Peek peekHeader(int peer, OpDesc* desc, size_t* bytes) = 0;

  /// Marks the transport failed with `why`: every current and future wait on any
  /// rank of the group raises PeerError carrying `why` (best effort for remote ranks).
  virtual void abort(const std::string& why) = 0;

  /// The transport's direct-access capability, or null if it has none (the default).
  virtual DirectAccess* directAccess() { return nullptr; }

  /// Payload bytes this rank has sent (for shm: bytes its peers copied out of it).
  virtual uint64_t bytesSent() const { return stats_.bytesSent.load(); }

  /// Counters of what went over this transport.
  const TransportStats& stats() const { return stats_; }

 protected:
  TransportStats stats_;
};

/// Throws MismatchError describing `mine` vs `theirs` as seen by `rank` from `peer`.
[[noreturn]] void throwMismatch(int rank, int peer, const OpDesc& mine, size_t myBytes,
                                const OpDesc& theirs, size_t theirBytes);

}  // namespace pycomm
