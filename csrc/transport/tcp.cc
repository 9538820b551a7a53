// The TCP transport's data path: framed sends and receives over the mesh that
// tcp_mesh.cc sets up (handshake in tcp_handshake.cc), stall detection by status
// frames, and abort.
#include "transport/tcp.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <thread>

#include "core/error.h"
#include "core/net_util.h"
#include "transport/tcp_mesh.h"
#include "transport/tcp_socket.h"

namespace pycomm {

using tcp_detail::Clock;
using tcp_detail::isClosedError;
using tcp_detail::pollMs;
using std::chrono::milliseconds;

namespace {

// How long abort() waits for a sender to leave a frame boundary / to push the ABORT.
constexpr milliseconds kAbortLockWait{250};
constexpr milliseconds kAbortSendWait{100};
// A status frame (a FrameHeader with kind kStatusKind and no payload) carries the
// sender's current call. A rank stuck in a collective for kStatusAfter sends one to
// every peer, again every kStatusEvery, and meanwhile peeks at what its other peers
// sent: a call with the same sequence number that differs is a mismatch, found even
// when the mismatched ranks never exchange data directly (they would otherwise wait
// for each other until the timeout). Frames of kStatusKind are consumed wherever
// they are met; they never reach the caller.
constexpr uint16_t kStatusKind = 3;
constexpr milliseconds kStatusAfter{300};
constexpr milliseconds kStatusEvery{1000};

}  // namespace

struct TcpTransport::SendProgress {
  tcp_wire::FrameHeader hdr;
  const uint8_t* payload;
  size_t bytes;
  size_t done = 0;  // of sizeof(hdr) + bytes

  SendProgress(tcp_wire::FrameKind kind, const OpDesc& desc, const void* buf, size_t n)
      : payload(static_cast<const uint8_t*>(buf)), bytes(n) {
    // Zero everything first: OpDesc has tail padding, and no stack bytes go on the wire.
    std::memset(static_cast<void*>(&hdr), 0, sizeof(hdr));
    hdr.magic = tcp_wire::kFrameMagic;
    hdr.version = tcp_wire::kVersion;
    hdr.kind = static_cast<uint16_t>(kind);
    hdr.desc = desc;
    hdr.bytes = n;
  }
  bool finished() const { return done == sizeof(hdr) + bytes; }

  // Writes what the socket takes. Returns true when the frame is out, false when the
  // socket is full; otherwise returns the errno in `err`.
  bool step(int fd, int* err) {
    while (!finished()) {
      iovec iov[2];
      int n = 0;
      if (done < sizeof(hdr)) {
        iov[n++] = {reinterpret_cast<uint8_t*>(&hdr) + done, sizeof(hdr) - done};
        if (bytes > 0) iov[n++] = {const_cast<uint8_t*>(payload), bytes};
      } else {
        size_t off = done - sizeof(hdr);
        iov[n++] = {const_cast<uint8_t*>(payload) + off, bytes - off};
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = n;
      ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
        *err = errno;
        return false;
      }
      done += static_cast<size_t>(w);
    }
    return true;
  }
};

struct TcpTransport::Pair {
  net::Fd fd;
  std::string addr;  // "A.B.C.D:P" of the peer's end
  // Held by whoever writes frames (the sending thread, abort()).
  std::mutex sendMu;
  bool sendMidFrame = false;  // guarded by sendMu: an unfinished frame is on the wire
  std::string sendBroken;     // guarded by sendMu: why the send side is unusable
  std::string recvBroken;     // receiving thread only: why the receive side is unusable
  // guarded by sendMu: a status frame the socket took only part of (sendMidFrame is
  // set until it is out; the next frame on this socket finishes it first)
  std::unique_ptr<SendProgress> pendingCtl;
};

std::string TcpTransport::addressKey(const std::string& keyPrefix, int rank) {
  return strCat(keyPrefix, "addr/", rank);
}

std::string TcpTransport::secretKey(const std::string& keyPrefix) { return keyPrefix + "secret"; }

TcpTransport::TcpTransport(Store& store, const std::string& keyPrefix, int rank, int size,
                           std::chrono::milliseconds timeout)
    : rank_(rank), size_(size), timeout_(timeout), store_(&store), keyPrefix_(keyPrefix) {
  PYCOMM_CHECK_ARG(size >= 1, "pycomm: tcp transport needs size >= 1, got ", size);
  PYCOMM_CHECK_ARG(rank >= 0 && rank < size, "pycomm: rank ", rank, " out of range for size ",
                   size);
  pairs_.resize(size);
  if (size == 1) return;
  socketBuffer_ = tcp_detail::socketBufferSize();
  connectMesh(store, keyPrefix);
}

TcpTransport::~TcpTransport() = default;  // the Fds close every socket

void TcpTransport::connectMesh(Store& store, const std::string& keyPrefix) {
  tcp_detail::Mesh mesh = tcp_detail::connectMesh(store, keyPrefix, rank_, size_, timeout_, socketBuffer_);
  listenAddress_ = mesh.listenAddress;
  for (int p = 0; p < size_; ++p) {
    if (!mesh.links[p].fd.valid()) continue;
    pairs_[p] = std::make_unique<Pair>();
    pairs_[p]->fd = std::move(mesh.links[p].fd);
    pairs_[p]->addr = std::move(mesh.links[p].addr);
  }
}

// ---------------------------------------------------------------------------------
// Data path.

struct TcpTransport::RecvProgress {
  enum class Phase { kHeader, kPayload, kAbortReason, kDone };
  Phase phase = Phase::kHeader;
  tcp_wire::FrameHeader hdr;
  size_t hdrHave = 0;
  uint8_t* buf;
  size_t bytes;
  size_t have = 0;
  OpDesc expected;
  char reason[tcp_wire::kMaxAbortReason];
  size_t reasonLen = 0, reasonHave = 0;

  RecvProgress(void* b, size_t n, const OpDesc& desc)
      : buf(static_cast<uint8_t*>(b)), bytes(n), expected(desc) {}
  bool started() const { return hdrHave > 0; }
};

void TcpTransport::checkPeer(int peer, const char* what) const {
  PYCOMM_CHECK_ARG(peer >= 0 && peer < size_ && peer != rank_, "pycomm: tcp ", what, " to/from ",
                   "rank ", peer, " invalid for rank ", rank_, " of ", size_);
}

void TcpTransport::throwIfFailed() const {
  if (!failed_.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> g(failMu_);
  throw PeerError(failReason_);
}

void TcpTransport::failRemote(const std::string& why) {
  std::lock_guard<std::mutex> g(failMu_);
  if (failed_.load()) return;
  failReason_ = why;
  failed_.store(true, std::memory_order_release);
}

void TcpTransport::throwIoError(int peer, int err, const OpDesc& desc) const {
  throwIfFailed();  // our own abort() shut the socket: report that instead
  const std::string& addr = pairs_[peer]->addr;
  if (err == 0 || isClosedError(err)) {
    // A peer that aborted leaves its reason in the store before closing its sockets.
    std::string reason;
    try {
      reason = store_->getString(strCat(keyPrefix_, "abort/", peer), milliseconds(300));
    } catch (...) {
      reason.clear();  // not aborted (dead or exited), or the store is gone with it
    }
    if (!reason.empty()) {
      throw PeerError(strCat("pycomm: rank ", peer, " aborted: ", reason, " [seen by rank ", rank_, " during ",
                             desc.str(), "]"));
    }
    throw PeerError(strCat("pycomm: rank ", peer, " closed the connection (dead or exited) during ",
                           desc.str(), " [seen by rank ", rank_, ", peer at ", addr, "]"));
  }
  throw PeerError(strCat("pycomm: connection to rank ", peer, " failed during ", desc.str(), ": ",
                         std::strerror(err), " [seen by rank ", rank_, ", peer at ", addr, "]"));
}

/// One sendRecv() in flight: drives the send and the receive over their sockets in one
/// poll loop, and, when a collective stalls, exchanges status frames with every peer
/// to find a mismatched call early (see kStatusKind).
class TcpTransport::Transfer {
 public:
  Transfer(TcpTransport& t, int sendPeer, SendProgress* s, int recvPeer, RecvProgress* r, const OpDesc& desc,
           const Deadline& deadline)
      : t_(t),
        sendPeer_(sendPeer),
        recvPeer_(recvPeer),
        s_(s),
        r_(r),
        desc_(desc),
        deadline_(deadline),
        sfd_(s ? t.pairs_[sendPeer]->fd.get() : -1),
        rfd_(r ? t.pairs_[recvPeer]->fd.get() : -1),
        spair_(s ? t.pairs_[sendPeer].get() : nullptr),
        sDone_(s == nullptr),
        rDone_(r == nullptr),
        // Stall handling: collectives only; p2p calls on different pairs are unordered
        // and their sequence numbers are per pair.
        collective_(desc.coll != CollType::kSend),
        nextStatus_(Clock::now() + kStatusAfter) {}

  void run() {
    while (true) {
      t_.throwIfFailed();
      if (!sDone_) pumpSend();
      while (!rDone_ && pumpRecv()) {
      }
      if (sDone_ && rDone_) return;
      if (deadline_.expired()) throwTimeout();
      if (collective_ && Clock::now() >= nextStatus_) onStall();
      if (stalled_) inspectWatched();
      waitReady();
    }
  }

 private:
  // Writes what the send socket takes: first a status frame left half out, then ours.
  void pumpSend() {
    int err = 0;
    if (spair_->pendingCtl && spair_->pendingCtl->step(sfd_, &err)) {
      spair_->pendingCtl.reset();  // a status frame goes out whole before our data
      spair_->sendMidFrame = false;
    }
    if (err == 0 && !spair_->pendingCtl) sDone_ = s_->step(sfd_, &err);
    if (err != 0) t_.throwIoError(sendPeer_, err, desc_);
  }

  // Receives into the current phase of the frame. Returns false when the socket has
  // nothing more for now; true to go on (a phase completed, or a partial read).
  bool pumpRecv() {
    uint8_t* dst = nullptr;
    size_t want = 0;
    switch (r_->phase) {
      case RecvProgress::Phase::kHeader:
        dst = reinterpret_cast<uint8_t*>(&r_->hdr) + r_->hdrHave;
        want = sizeof(r_->hdr) - r_->hdrHave;
        break;
      case RecvProgress::Phase::kPayload:
        dst = r_->buf + r_->have;
        want = r_->bytes - r_->have;
        break;
      case RecvProgress::Phase::kAbortReason:
        dst = reinterpret_cast<uint8_t*>(r_->reason) + r_->reasonHave;
        want = r_->reasonLen - r_->reasonHave;
        break;
      default:
        break;
    }
    if (want > 0) {
      ssize_t got = ::recv(rfd_, dst, want, MSG_DONTWAIT);
      if (got == 0) t_.throwIoError(recvPeer_, 0, desc_);
      if (got < 0) {
        if (errno == EINTR) return true;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
        t_.throwIoError(recvPeer_, errno, desc_);
      }
      size_t g = static_cast<size_t>(got);
      if (r_->phase == RecvProgress::Phase::kHeader) r_->hdrHave += g;
      else if (r_->phase == RecvProgress::Phase::kPayload) r_->have += g;
      else r_->reasonHave += g;
      if (g < want) return true;
    }
    completePhase();
    return true;
  }

  // The current receive phase is complete: move to the next one.
  void completePhase() {
    switch (r_->phase) {
      case RecvProgress::Phase::kHeader:
        return onHeader();
      case RecvProgress::Phase::kPayload:
        r_->phase = RecvProgress::Phase::kDone;
        rDone_ = true;
        return;
      case RecvProgress::Phase::kAbortReason: {
        std::string why = strCat("pycomm: rank ", recvPeer_, " aborted: ", std::string(r_->reason, r_->reasonLen));
        t_.failRemote(why);
        throw PeerError(why);
      }
      default:
        return;
    }
  }

  // A whole header arrived: check it before any payload byte is touched.
  void onHeader() {
    const auto& h = r_->hdr;
    if (h.magic != tcp_wire::kFrameMagic || h.version != tcp_wire::kVersion) {
      throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer_, " (magic 0x", std::hex, h.magic, std::dec,
                             ", version ", h.version, ") while rank ", t_.rank_, " expected ", r_->expected.str()));
    }
    if (h.kind == kStatusKind) {
      if (h.bytes != 0) {
        throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer_, " (status frame with ", h.bytes,
                               " bytes)"));
      }
      checkCall(recvPeer_, h.desc);
      r_->hdrHave = 0;  // not ours to deliver: read the next header
      return;
    }
    if (h.kind == static_cast<uint16_t>(tcp_wire::FrameKind::kAbort)) {
      if (h.bytes > tcp_wire::kMaxAbortReason) {
        throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer_, " (abort reason of ", h.bytes,
                               " bytes)"));
      }
      r_->reasonLen = static_cast<size_t>(h.bytes);
      r_->phase = RecvProgress::Phase::kAbortReason;
      return;
    }
    if (h.kind != static_cast<uint16_t>(tcp_wire::FrameKind::kData)) {
      throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer_, " (kind ", h.kind, ")"));
    }
    // The length on the wire is only compared, never used to size anything.
    if (!r_->expected.sameCall(h.desc) || h.bytes != r_->bytes) {
      throwMismatch(t_.rank_, recvPeer_, r_->expected, r_->bytes, h.desc, static_cast<size_t>(h.bytes));
    }
    r_->phase = RecvProgress::Phase::kPayload;
  }

  [[noreturn]] void throwTimeout() const {
    int peer = rDone_ ? sendPeer_ : recvPeer_;
    std::string detail =
        rDone_ ? strCat("rank ", t_.rank_, " sending, ", s_->done, " of ", sizeof(s_->hdr) + s_->bytes,
                        " frame bytes written")
               : strCat("rank ", t_.rank_, " receiving ", r_->bytes, " bytes, ",
                        r_->phase == RecvProgress::Phase::kHeader ? "header not yet received" : "header received");
    throw TimeoutError(strCat("pycomm: timeout after ", t_.timeout_.count(), " ms waiting for rank ", peer, " in ",
                              desc_.str(), " [", detail, "]"));
  }

  // A peer's call with our sequence number that differs from ours is a mismatch.
  void checkCall(int peer, const OpDesc& theirs) const {
    if (collective_ && theirs.coll != CollType::kSend && theirs.seq == desc_.seq && !theirs.sameCall(desc_)) {
      throw MismatchError(strCat("pycomm: collective mismatch between rank ", t_.rank_, " and rank ", peer,
                                 ": rank ", t_.rank_, " runs ", desc_.str(), ", rank ", peer, " runs ",
                                 theirs.str()));
    }
  }

  // The collective is taking long: watch every other peer (once) and tell all of them
  // what we run.
  void onStall() {
    if (!stalled_) {
      stalled_ = true;
      for (int p = 0; p < t_.size_; ++p) {
        if (p != t_.rank_ && !(!rDone_ && p == recvPeer_) && t_.pairs_[p] && t_.pairs_[p]->fd.valid()) {
          watch_.push_back(p);
        }
      }
    }
    sendStatus();
    nextStatus_ = Clock::now() + kStatusEvery;
  }

  // Writes a status frame to every peer whose send side is at a frame boundary.
  void sendStatus() {
    for (int p = 0; p < t_.size_; ++p) {
      Pair* pair = t_.pairs_[p].get();
      if (pair == nullptr || !pair->fd.valid()) continue;
      std::unique_lock<std::mutex> lk;
      if (pair == spair_) {
        if (!sDone_) continue;  // our data frame is still going out on this socket (lock held)
      } else {
        lk = std::unique_lock<std::mutex>(pair->sendMu, std::try_to_lock);
        if (!lk.owns_lock()) continue;
      }
      if (!pair->sendBroken.empty()) continue;
      int err = 0;
      if (pair->pendingCtl) {
        if (pair->pendingCtl->step(pair->fd.get(), &err)) {
          pair->pendingCtl.reset();
          pair->sendMidFrame = false;
        }
        continue;
      }
      if (pair->sendMidFrame) continue;
      SendProgress f(static_cast<tcp_wire::FrameKind>(kStatusKind), desc_, nullptr, 0);
      if (!f.step(pair->fd.get(), &err) && err == 0 && f.done > 0) {
        pair->pendingCtl = std::make_unique<SendProgress>(f);
        pair->sendMidFrame = true;
      }
      // A failed write is for the data path to report, if this peer matters to it.
    }
  }

  void inspectWatched() {
    for (size_t i = 0; i < watch_.size();) {
      if (inspect(watch_[i])) {
        ++i;
      } else {
        watch_.erase(watch_.begin() + static_cast<std::ptrdiff_t>(i));
      }
    }
  }

  // Looks at the frames waiting on peer p's socket without disturbing data frames.
  // Returns whether p is worth watching further.
  bool inspect(int p) {
    const int fd = t_.pairs_[p]->fd.get();
    tcp_wire::FrameHeader h;
    while (true) {
      ssize_t got = ::recv(fd, &h, sizeof(h), MSG_PEEK | MSG_DONTWAIT);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) return errno == EAGAIN || errno == EWOULDBLOCK;
      if (got == 0) return false;  // closed: the data path reports it if it waits on p
      if (static_cast<size_t>(got) < sizeof(h)) return true;  // the rest is on its way
      if (h.magic != tcp_wire::kFrameMagic || h.version != tcp_wire::kVersion) return false;
      if (h.kind == kStatusKind && h.bytes == 0) {
        ssize_t n;
        do {
          n = ::recv(fd, &h, sizeof(h), MSG_DONTWAIT);  // exactly the bytes peeked
        } while (n < 0 && errno == EINTR);
        checkCall(p, h.desc);
        continue;
      }
      if (h.kind == static_cast<uint16_t>(tcp_wire::FrameKind::kAbort) && h.bytes <= tcp_wire::kMaxAbortReason) {
        return inspectAbort(p, fd, h);
      }
      if (h.kind == static_cast<uint16_t>(tcp_wire::FrameKind::kData)) checkCall(p, h.desc);
      return false;  // a data frame: the data path takes it when its turn comes
    }
  }

  // An ABORT frame waits on peer p's socket: once its whole reason is there, fail.
  bool inspectAbort(int p, int fd, const tcp_wire::FrameHeader& h) {
    char buf[sizeof(h) + tcp_wire::kMaxAbortReason];
    const size_t want = sizeof(h) + static_cast<size_t>(h.bytes);
    ssize_t n = ::recv(fd, buf, want, MSG_PEEK | MSG_DONTWAIT);
    if (n < static_cast<ssize_t>(want)) return true;  // wait for the whole reason
    ::recv(fd, buf, want, MSG_DONTWAIT);
    std::string why =
        strCat("pycomm: rank ", p, " aborted: ", std::string(buf + sizeof(h), static_cast<size_t>(h.bytes)));
    t_.failRemote(why);
    throw PeerError(why);
  }

  // Waits until a socket we drive (or, stalled, one we watch) is ready, for at most
  // one slice of kPollSlice so the deadline and abort() are noticed.
  void waitReady() {
    pollfd fds[2];
    nfds_t n = 0;
    if (!sDone_) fds[n++] = {sfd_, POLLOUT, 0};
    if (!rDone_) {
      if (n == 1 && fds[0].fd == rfd_) {
        fds[0].events |= POLLIN;
      } else {
        fds[n++] = {rfd_, POLLIN, 0};
      }
    }
    int rc;
    if (stalled_ && !watch_.empty()) {
      std::vector<pollfd> all(fds, fds + n);
      for (int p : watch_) all.push_back({t_.pairs_[p]->fd.get(), POLLIN, 0});
      rc = ::poll(all.data(), all.size(), pollMs(deadline_));
    } else {
      rc = ::poll(fds, n, pollMs(deadline_));
    }
    if (rc < 0 && errno != EINTR) throw Error(strCat("pycomm: poll failed: ", std::strerror(errno)));
  }

  TcpTransport& t_;
  const int sendPeer_;
  const int recvPeer_;
  SendProgress* const s_;
  RecvProgress* const r_;
  const OpDesc& desc_;
  const Deadline& deadline_;
  const int sfd_;
  const int rfd_;
  Pair* const spair_;
  bool sDone_;
  bool rDone_;
  const bool collective_;
  Clock::time_point nextStatus_;
  bool stalled_ = false;
  std::vector<int> watch_;  // peers whose incoming frames we peek at (filled once stalled)
};

void TcpTransport::transfer(int sendPeer, SendProgress* s, int recvPeer, RecvProgress* r, const OpDesc& desc,
                            const Deadline& deadline) {
  Transfer(*this, sendPeer, s, recvPeer, r, desc, deadline).run();
}

void TcpTransport::send(int peer, const void* buf, size_t bytes, const OpDesc& desc,
                        const Deadline& deadline) {
  sendRecv(peer, buf, bytes, -1, nullptr, 0, desc, deadline);
}

void TcpTransport::recv(int peer, void* buf, size_t bytes, const OpDesc& desc,
                        const Deadline& deadline) {
  sendRecv(-1, nullptr, 0, peer, buf, bytes, desc, deadline);
}

void TcpTransport::sendRecv(int sendPeer, const void* sendBuf, size_t sendBytes, int recvPeer,
                            void* recvBuf, size_t recvBytes, const OpDesc& desc,
                            const Deadline& deadline) {
  // send() and recv() pass -1 for the direction they do not use.
  if (sendPeer != -1) checkPeer(sendPeer, "send");
  if (recvPeer != -1) checkPeer(recvPeer, "recv");
  PYCOMM_CHECK_ARG(sendPeer == -1 || sendBytes == 0 || sendBuf != nullptr,
                   "pycomm: tcp send of ", sendBytes, " bytes from a null buffer");
  PYCOMM_CHECK_ARG(recvPeer == -1 || recvBytes == 0 || recvBuf != nullptr,
                   "pycomm: tcp recv of ", recvBytes, " bytes into a null buffer");
  throwIfFailed();

  std::unique_lock<std::mutex> sendLock;
  // On the stack: no allocation per message.
  std::optional<SendProgress> s;
  std::optional<RecvProgress> r;
  Pair* sp = nullptr;
  Pair* rp = nullptr;
  if (sendPeer != -1) {
    sp = pairs_[sendPeer].get();
    sendLock = std::unique_lock<std::mutex>(sp->sendMu);
    if (!sp->sendBroken.empty()) {
      throw PeerError(strCat("pycomm: connection to rank ", sendPeer,
                             " is unusable after an earlier error: ", sp->sendBroken));
    }
    s.emplace(tcp_wire::FrameKind::kData, desc, sendBuf, sendBytes);
  }
  if (recvPeer != -1) {
    rp = pairs_[recvPeer].get();
    if (!rp->recvBroken.empty()) {
      throw PeerError(strCat("pycomm: connection from rank ", recvPeer,
                             " is unusable after an earlier error: ", rp->recvBroken));
    }
    r.emplace(recvBuf, recvBytes, desc);
  }
  try {
    transfer(sendPeer, s ? &*s : nullptr, recvPeer, r ? &*r : nullptr, desc, deadline);
  } catch (const std::exception& e) {
    // A frame cut in the middle leaves the stream out of step: refuse to reuse it. A
    // timeout before any byte moved leaves it intact.
    if (s && s->done > 0 && !s->finished()) {
      sp->sendMidFrame = true;
      sp->sendBroken = e.what();
    }
    if (r && r->started() && r->phase != RecvProgress::Phase::kDone) rp->recvBroken = e.what();
    throw;
  }
  if (s) {
    stats_.bytesSent.fetch_add(sendBytes, std::memory_order_relaxed);
    stats_.messagesSent.fetch_add(1, std::memory_order_relaxed);
  }
  if (r) {
    stats_.bytesRecv.fetch_add(recvBytes, std::memory_order_relaxed);
    stats_.messagesRecv.fetch_add(1, std::memory_order_relaxed);
  }
}

Transport::Peek TcpTransport::peekHeader(int peer, OpDesc* desc, size_t* bytes) {
  checkPeer(peer, "recv");
  throwIfFailed();
  Pair* p = pairs_[peer].get();
  if (!p->recvBroken.empty()) return Peek::kBroken;
  const int fd = p->fd.get();
  tcp_wire::FrameHeader h;
  while (true) {
    ssize_t got = ::recv(fd, &h, sizeof(h), MSG_PEEK | MSG_DONTWAIT);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? Peek::kNothing : Peek::kBroken;
    if (got == 0) return Peek::kBroken;
    if (static_cast<size_t>(got) < sizeof(h)) return Peek::kNothing;
    if (h.magic != tcp_wire::kFrameMagic || h.version != tcp_wire::kVersion) return Peek::kBroken;
    if (h.kind == kStatusKind && h.bytes == 0) {
      ssize_t n;
      do {
        n = ::recv(fd, &h, sizeof(h), MSG_DONTWAIT);  // exactly the bytes peeked
      } while (n < 0 && errno == EINTR);
      continue;
    }
    if (h.kind != static_cast<uint16_t>(tcp_wire::FrameKind::kData)) return Peek::kBroken;
    *desc = h.desc;
    *bytes = static_cast<size_t>(h.bytes);
    return Peek::kMessage;
  }
}

void TcpTransport::abort(const std::string& why) {
  {
    std::lock_guard<std::mutex> g(failMu_);
    if (!aborted_.load()) {
      failReason_ = strCat("pycomm: tcp transport of rank ", rank_, " was aborted: ", why);
      aborted_.store(true);
      failed_.store(true, std::memory_order_release);
    }
  }
  std::string reason = why.substr(0, tcp_wire::kMaxAbortReason);
  // Out of band first, so it is there before any peer sees our sockets close.
  try {
    store_->setString(strCat(keyPrefix_, "abort/", rank_), reason);
  } catch (...) {
    // The store may be gone (its host died); the ABORT frames below still go out.
  }
  for (int p = 0; p < size_; ++p) {
    Pair* pair = pairs_[p].get();
    if (pair == nullptr || !pair->fd.valid()) continue;
    // Senders notice the flag within one poll slice and leave the lock; only at a
    // frame boundary may the ABORT frame go out without corrupting the stream.
    // (A try_lock() loop rather than timed_mutex::try_lock_for, which TSan of GCC 12
    // does not model and reports as a bad unlock.)
    std::unique_lock<std::mutex> lk(pair->sendMu, std::defer_lock);
    Deadline lockWait = Deadline::after(kAbortLockWait);
    while (!lk.try_lock() && !lockWait.expired()) std::this_thread::sleep_for(milliseconds(1));
    if (lk.owns_lock() && !pair->sendMidFrame) {
      SendProgress f(tcp_wire::FrameKind::kAbort, OpDesc{}, reason.data(), reason.size());
      Deadline d = Deadline::after(kAbortSendWait);
      int err = 0;
      while (!f.step(pair->fd.get(), &err) && err == 0 && !d.expired()) {
        pollfd pfd{pair->fd.get(), POLLOUT, 0};
        ::poll(&pfd, 1, pollMs(d, milliseconds(10)));
      }
      pair->sendMidFrame = true;
      pair->sendBroken = "the transport was aborted";
    }
    // Wakes every local wait on this socket; the peer reads the ABORT frame, then EOF.
    ::shutdown(pair->fd.get(), SHUT_RDWR);
  }
}

}  // namespace pycomm
