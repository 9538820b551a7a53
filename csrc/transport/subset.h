// A view of some ranks of a transport as a transport of their own: rank i of the view
// is rank members[i] of the parent. The hierarchical algorithms run their inter-host
// step over one of these (the ranks that own the same shard on every host), and their
// intra-host step over one when no shared-memory transport is at hand. Messages go
// over the parent unchanged, so its errors name the parent's (the group's) ranks.
#pragma once

#include <vector>

#include "transport/transport.h"

namespace pycomm {

/// Transport over `members` (ascending or not, no repeats) of `parent`; the parent's
/// own rank must be one of them. The parent must outlive the view. Byte counters stay
/// on the parent.
class SubsetTransport : public Transport {
 public:
  SubsetTransport(Transport& parent, std::vector<int> members);

  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(members_.size()); }
  const char* name() const override { return parent_.name(); }

  void send(int peer, const void* buf, size_t bytes, const OpDesc& desc, const Deadline& deadline) override;
  void recv(int peer, void* buf, size_t bytes, const OpDesc& desc, const Deadline& deadline) override;
  void sendRecv(int sendPeer, const void* sendBuf, size_t sendBytes, int recvPeer, void* recvBuf,
                size_t recvBytes, const OpDesc& desc, const Deadline& deadline) override;
  Peek peekHeader(int peer, OpDesc* desc, size_t* bytes) override {
    return parent_.peekHeader(parentRank(peer), desc, bytes);
  }
  void abort(const std::string& why) override { parent_.abort(why); }
  uint64_t bytesSent() const override { return 0; }

  /// Parent rank of view rank `r`.
  int parentRank(int r) const { return members_.at(static_cast<size_t>(r)); }

 private:
  Transport& parent_;
  std::vector<int> members_;
  int rank_ = -1;
};

}  // namespace pycomm
