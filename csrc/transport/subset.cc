#include "transport/subset.h"

#include "core/error.h"

namespace pycomm {

SubsetTransport::SubsetTransport(Transport& parent, std::vector<int> members)
    : parent_(parent), members_(std::move(members)) {
  for (size_t i = 0; i < members_.size(); ++i) {
    PYCOMM_CHECK_ARG(members_[i] >= 0 && members_[i] < parent.size(), "subset transport: rank ", members_[i],
                     " is not in the parent group of ", parent.size());
    if (members_[i] == parent.rank()) rank_ = static_cast<int>(i);
  }
  PYCOMM_CHECK_ARG(rank_ >= 0, "subset transport: rank ", parent.rank(), " is not a member");
}

void SubsetTransport::send(int peer, const void* buf, size_t bytes, const OpDesc& desc, const Deadline& deadline) {
  parent_.send(parentRank(peer), buf, bytes, desc, deadline);
}

void SubsetTransport::recv(int peer, void* buf, size_t bytes, const OpDesc& desc, const Deadline& deadline) {
  parent_.recv(parentRank(peer), buf, bytes, desc, deadline);
}

void SubsetTransport::sendRecv(int sendPeer, const void* sendBuf, size_t sendBytes, int recvPeer, void* recvBuf,
                               size_t recvBytes, const OpDesc& desc, const Deadline& deadline) {
  parent_.sendRecv(parentRank(sendPeer), sendBuf, sendBytes, parentRank(recvPeer), recvBuf, recvBytes, desc,
                   deadline);
}

}  // namespace pycomm
