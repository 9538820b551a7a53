#include "transport/mixed.h"

#include "core/error.h"

namespace pycomm {

MixedTransport::MixedTransport(std::vector<int> localRanks, std::unique_ptr<Transport> local,
                               std::unique_ptr<Transport> remote)
    : local_(std::move(local)), remote_(std::move(remote)) {
  PYCOMM_ASSERT(local_ && remote_, "mixed transport needs both parts");
  PYCOMM_ASSERT(static_cast<int>(localRanks.size()) == local_->size(), "mixed transport: ", localRanks.size(),
                " local ranks for a local part of ", local_->size());
  localIndex_.assign(remote_->size(), -1);
  for (size_t i = 0; i < localRanks.size(); ++i) localIndex_.at(localRanks[i]) = static_cast<int>(i);
  PYCOMM_ASSERT(localIndex_[remote_->rank()] == local_->rank(), "mixed transport: rank ", remote_->rank(),
                " is local rank ", localIndex_[remote_->rank()], " but its local part says ", local_->rank());
  name_ = std::string(local_->name()) + "+" + remote_->name();
}

MixedTransport::~MixedTransport() {
  if (helper_) helper_->shutdown("pycomm: transport destroyed");
}

Transport& MixedTransport::route(int peer, int* partRank) const {
  PYCOMM_ASSERT(peer >= 0 && peer < size(), "mixed transport: peer ", peer, " out of range");
  if (localIndex_[peer] >= 0) {
    *partRank = localIndex_[peer];
    return *local_;
  }
  *partRank = peer;
  return *remote_;
}

void MixedTransport::send(int peer, const void* buf, size_t bytes, const OpDesc& desc, const Deadline& deadline) {
  int p;
  Transport& t = route(peer, &p);
  t.send(p, buf, bytes, desc, deadline);
}

void MixedTransport::recv(int peer, void* buf, size_t bytes, const OpDesc& desc, const Deadline& deadline) {
  int p;
  Transport& t = route(peer, &p);
  t.recv(p, buf, bytes, desc, deadline);
}

Transport::Peek MixedTransport::peekHeader(int peer, OpDesc* desc, size_t* bytes) {
  int p;
  Transport& t = route(peer, &p);
  return t.peekHeader(p, desc, bytes);
}

void MixedTransport::sendRecv(int sendPeer, const void* sendBuf, size_t sendBytes, int recvPeer, void* recvBuf,
                              size_t recvBytes, const OpDesc& desc, const Deadline& deadline) {
  int sp, rp;
  Transport& st = route(sendPeer, &sp);
  Transport& rt = route(recvPeer, &rp);
  if (&st == &rt) {
    st.sendRecv(sp, sendBuf, sendBytes, rp, recvBuf, recvBytes, desc, deadline);
    return;
  }
  // Different parts: the send runs on the helper thread, the receive here.
  if (!helper_) helper_ = std::make_unique<WorkQueue>("pycomm-mixed");
  auto sent = helper_->push([&st, sp, sendBuf, sendBytes, &desc, &deadline] {
    st.send(sp, sendBuf, sendBytes, desc, deadline);
  });
  try {
    rt.recv(rp, recvBuf, recvBytes, desc, deadline);
  } catch (const Error& e) {
    // The send may wait on a peer that will never read: fail it now (the group
    // aborts on any failed collective anyway), then report the receive's error.
    abort(e.what());
    sent->waitFor(-1);
    throw;
  }
  sent->waitFor(-1);  // bounded by the deadline inside the send
  if (auto err = sent->error()) std::rethrow_exception(err);
}

void MixedTransport::abort(const std::string& why) {
  local_->abort(why);
  remote_->abort(why);
}

}  // namespace pycomm
