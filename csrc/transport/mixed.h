// The transport of a group whose ranks span several hosts with several ranks on some:
// pairs on one host go over a transport of the co-located ranks (shared memory),
// every other pair over a transport of the whole group (TCP). Algorithms see one
// Transport; the engine picks the parts (engine/group.cc makeGroupTransport).
#pragma once

#include <memory>
#include <vector>

#include "core/work_queue.h"
#include "transport/transport.h"

namespace pycomm {

/// Routes each peer to one of two transports. `local` connects `localRanks` (the
/// group ranks on this host, ascending; local rank i = group rank localRanks[i]);
/// `remote` connects all `remote->size()` ranks of the group and carries every pair
/// not both in `localRanks`. A sendRecv whose two peers use different parts runs the
/// send on a helper thread while the caller receives, so a ring that crosses from
/// shared memory to TCP keeps both halves in flight.
class MixedTransport : public Transport {
 public:
  MixedTransport(std::vector<int> localRanks, std::unique_ptr<Transport> local, std::unique_ptr<Transport> remote);
  ~MixedTransport() override;

  int rank() const override { return remote_->rank(); }
  int size() const override { return remote_->size(); }
  /// "shm+tcp" (the parts' names).
  const char* name() const override { return name_.c_str(); }

  void send(int peer, const void* buf, size_t bytes, const OpDesc& desc, const Deadline& deadline) override;
  void recv(int peer, void* buf, size_t bytes, const OpDesc& desc, const Deadline& deadline) override;
  void sendRecv(int sendPeer, const void* sendBuf, size_t sendBytes, int recvPeer, void* recvBuf,
                size_t recvBytes, const OpDesc& desc, const Deadline& deadline) override;
  /// Peeks on the part that carries `peer`.
  Peek peekHeader(int peer, OpDesc* desc, size_t* bytes) override;
  /// Aborts both parts.
  void abort(const std::string& why) override;
  uint64_t bytesSent() const override { return local_->bytesSent() + remote_->bytesSent(); }

  /// The co-located part (its ranks are local indices) and the whole-group part.
  Transport& localPart() { return *local_; }
  const Transport& localPart() const { return *local_; }
  const Transport& remotePart() const { return *remote_; }

 private:
  // The part that carries `peer`, and the peer's rank in it.
  Transport& route(int peer, int* partRank) const;

  std::vector<int> localIndex_;  // per group rank: index in localRanks, or -1
  std::unique_ptr<Transport> local_;
  std::unique_ptr<Transport> remote_;
  std::string name_;
  std::unique_ptr<WorkQueue> helper_;  // sends of cross-part sendRecvs (started on first use)
};

}  // namespace pycomm
