// The TCP transport's data path: framed sends and receives over the mesh that
// tcp_mesh.cc sets up (handshake in tcp_handshake.cc), striped across a pair's streams
// when large (tcp_streams.h), stall detection by status frames, and abort.
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
#include "transport/tcp_streams.h"

namespace pycomm {

using tcp_detail::Clock;
using tcp_detail::isClosedError;
using tcp_detail::pollMs;
using std::chrono::milliseconds;
using tcp_streams::kMaxStreams;

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

// One frame going out on one socket: the header, then `bytes` of payload (a whole
// message, a stripe of one, a status or an ABORT frame).
struct TcpTransport::SendProgress {
  tcp_wire::FrameHeader hdr;
  const uint8_t* payload = nullptr;
  size_t bytes = 0;
  size_t done = 0;  // of sizeof(hdr) + bytes

  SendProgress() = default;
  SendProgress(tcp_wire::FrameKind kind, const OpDesc& desc, const void* buf, size_t n) {
    start(kind, desc, buf, n, n);
  }
  // `n` payload bytes at `buf`; the header announces `announced` (the whole message's
  // size when this is one stripe of it).
  void start(tcp_wire::FrameKind kind, const OpDesc& desc, const void* buf, size_t n, size_t announced) {
    payload = static_cast<const uint8_t*>(buf);
    bytes = n;
    done = 0;
    // Zero everything first: OpDesc has tail padding, and no stack bytes go on the wire.
    std::memset(static_cast<void*>(&hdr), 0, sizeof(hdr));
    hdr.magic = tcp_wire::kFrameMagic;
    hdr.version = tcp_wire::kVersion;
    hdr.kind = static_cast<uint16_t>(kind);
    hdr.desc = desc;
    hdr.bytes = announced;
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
  std::vector<net::Fd> fds;  // the pair's streams; [0] carries headers of every kind
  std::string addr;          // "A.B.C.D:P" of the peer's end of stream 0
  // Held by whoever writes frames (the sending thread, abort()).
  std::mutex sendMu;
  bool sendMidFrame = false;  // guarded by sendMu: an unfinished frame is on the wire
  std::string sendBroken;     // guarded by sendMu: why the send side is unusable
  std::string recvBroken;     // receiving thread only: why the receive side is unusable
  // guarded by sendMu: a status frame stream 0 took only part of (sendMidFrame is
  // set until it is out; the next frame on stream 0 finishes it first)
  std::unique_ptr<SendProgress> pendingCtl;
};

std::string TcpTransport::addressKey(const std::string& keyPrefix, int rank) {
  return strCat(keyPrefix, "addr/", rank);
}

std::string TcpTransport::streamsKey(const std::string& keyPrefix, int rank) {
  return strCat(keyPrefix, "streams/", rank);
}

std::string TcpTransport::secretKey(const std::string& keyPrefix) { return keyPrefix + "secret"; }

int TcpTransport::streams(int peer) const {
  checkPeer(peer, "streams");
  return static_cast<int>(pairs_[peer]->fds.size());
}

TcpTransport::TcpTransport(Store& store, const std::string& keyPrefix, int rank, int size,
                           std::chrono::milliseconds timeout, int hostShare)
    : rank_(rank), size_(size), timeout_(timeout), store_(&store), keyPrefix_(keyPrefix) {
  PYCOMM_CHECK_ARG(size >= 1, "pycomm: tcp transport needs size >= 1, got ", size);
  PYCOMM_CHECK_ARG(rank >= 0 && rank < size, "pycomm: rank ", rank, " out of range for size ",
                   size);
  pairs_.resize(size);
  const int streams = tcp_streams::configuredStreams(rank, size, hostShare);  // checked even alone
  if (size == 1) return;
  socketBuffer_ = tcp_detail::socketBufferSize();
  connectMesh(store, keyPrefix, streams);
}

TcpTransport::~TcpTransport() = default;  // the Fds close every socket

void TcpTransport::connectMesh(Store& store, const std::string& keyPrefix, int streams) {
  tcp_detail::Mesh mesh =
      tcp_detail::connectMesh(store, keyPrefix, rank_, size_, timeout_, socketBuffer_, streams);
  listenAddress_ = mesh.listenAddress;
  for (int p = 0; p < size_; ++p) {
    if (mesh.links[p].fds.empty()) continue;
    pairs_[p] = std::make_unique<Pair>();
    pairs_[p]->fds = std::move(mesh.links[p].fds);
    pairs_[p]->addr = std::move(mesh.links[p].addr);
  }
}

// ---------------------------------------------------------------------------------
// Data path.

// One frame coming in on one socket: a whole message, or one stripe of it.
struct TcpTransport::RecvProgress {
  enum class Phase { kHeader, kPayload, kAbortReason, kDone };
  Phase phase = Phase::kHeader;
  tcp_wire::FrameHeader hdr;
  size_t hdrHave = 0;
  uint8_t* buf = nullptr;
  size_t bytes = 0;      // payload bytes this socket delivers
  size_t announced = 0;  // the message size its header must carry
  size_t have = 0;
  OpDesc expected;
  char reason[tcp_wire::kMaxAbortReason];
  size_t reasonLen = 0, reasonHave = 0;

  void start(void* b, size_t n, size_t whole, const OpDesc& desc) {
    buf = static_cast<uint8_t*>(b);
    bytes = n;
    announced = whole;
    expected = desc;
  }
  bool started() const { return hdrHave > 0; }
  bool done() const { return phase == Phase::kDone; }
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

/// One sendRecv() in flight: drives the send and the receive, each over one or more
/// streams (the stripes of a large message), in one poll loop, and, when a collective
/// stalls, exchanges status frames with every peer to find a mismatched call early
/// (see kStatusKind). Status and ABORT frames only ever travel on stream 0.
class TcpTransport::Transfer {
 public:
  Transfer(TcpTransport& t, int sendPeer, SendProgress* s, int ns, int recvPeer, RecvProgress* r, int nr,
           const OpDesc& desc, const Deadline& deadline)
      : t_(t),
        sendPeer_(sendPeer),
        recvPeer_(recvPeer),
        s_(s),
        r_(r),
        ns_(ns),
        nr_(nr),
        desc_(desc),
        deadline_(deadline),
        spair_(ns > 0 ? t.pairs_[sendPeer].get() : nullptr),
        sLeft_(ns),
        rLeft_(nr),
        // Stall handling: collectives only; p2p calls on different pairs are unordered
        // and their sequence numbers are per pair.
        collective_(desc.coll != CollType::kSend),
        nextStatus_(Clock::now() + kStatusAfter) {
    for (int i = 0; i < ns; ++i) sfd_[i] = spair_->fds[i].get();
    for (int i = 0; i < nr; ++i) rfd_[i] = t.pairs_[recvPeer]->fds[i].get();
  }

  void run() {
    while (true) {
      t_.throwIfFailed();
      if (sLeft_ > 0) pumpSend();
      for (int i = 0; i < nr_; ++i) {
        while (!r_[i].done() && pumpRecv(i)) {
        }
      }
      if (sLeft_ == 0 && rLeft_ == 0) return;
      if (deadline_.expired()) throwTimeout();
      if (collective_ && Clock::now() >= nextStatus_) onStall();
      if (stalled_) inspectWatched();
      waitReady();
    }
  }

 private:
  // Writes what each send socket takes; on stream 0 first a status frame left half out.
  void pumpSend() {
    for (int i = 0; i < ns_; ++i) {
      if (s_[i].finished()) continue;
      int err = 0;
      if (i == 0 && spair_->pendingCtl && spair_->pendingCtl->step(sfd_[0], &err)) {
        spair_->pendingCtl.reset();  // a status frame goes out whole before our data
        spair_->sendMidFrame = false;
      }
      if (err == 0 && !(i == 0 && spair_->pendingCtl) && s_[i].step(sfd_[i], &err)) --sLeft_;
      if (err != 0) t_.throwIoError(sendPeer_, err, desc_);
    }
  }

  // Receives into the current phase of stream i's frame. Returns false when the socket
  // has nothing more for now; true to go on (a phase completed, or a partial read).
  bool pumpRecv(int i) {
    RecvProgress& r = r_[i];
    uint8_t* dst = nullptr;
    size_t want = 0;
    switch (r.phase) {
      case RecvProgress::Phase::kHeader:
        dst = reinterpret_cast<uint8_t*>(&r.hdr) + r.hdrHave;
        want = sizeof(r.hdr) - r.hdrHave;
        break;
      case RecvProgress::Phase::kPayload:
        dst = r.buf + r.have;
        want = r.bytes - r.have;
        break;
      case RecvProgress::Phase::kAbortReason:
        dst = reinterpret_cast<uint8_t*>(r.reason) + r.reasonHave;
        want = r.reasonLen - r.reasonHave;
        break;
      default:
        break;
    }
    if (want > 0) {
      ssize_t got = ::recv(rfd_[i], dst, want, MSG_DONTWAIT);
      if (got == 0) t_.throwIoError(recvPeer_, 0, desc_);
      if (got < 0) {
        if (errno == EINTR) return true;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
        t_.throwIoError(recvPeer_, errno, desc_);
      }
      size_t g = static_cast<size_t>(got);
      if (r.phase == RecvProgress::Phase::kHeader) r.hdrHave += g;
      else if (r.phase == RecvProgress::Phase::kPayload) r.have += g;
      else r.reasonHave += g;
      if (g < want) return true;
    }
    completePhase(i);
    return true;
  }

  // The current receive phase of stream i is complete: move to the next one.
  void completePhase(int i) {
    RecvProgress& r = r_[i];
    switch (r.phase) {
      case RecvProgress::Phase::kHeader:
        return onHeader(i);
      case RecvProgress::Phase::kPayload:
        r.phase = RecvProgress::Phase::kDone;
        --rLeft_;
        return;
      case RecvProgress::Phase::kAbortReason: {
        std::string why = strCat("pycomm: rank ", recvPeer_, " aborted: ", std::string(r.reason, r.reasonLen));
        t_.failRemote(why);
        throw PeerError(why);
      }
      default:
        return;
    }
  }

  // A whole header arrived on stream i: check it before any payload byte is touched.
  void onHeader(int i) {
    RecvProgress& r = r_[i];
    const auto& h = r.hdr;
    if (h.magic != tcp_wire::kFrameMagic || h.version != tcp_wire::kVersion) {
      throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer_, " (magic 0x", std::hex, h.magic, std::dec,
                             ", version ", h.version, ") while rank ", t_.rank_, " expected ", r.expected.str()));
    }
    const auto wantKind = i == 0 ? tcp_wire::FrameKind::kData : tcp_wire::FrameKind::kStripe;
    if (i == 0 && h.kind == kStatusKind) {
      if (h.bytes != 0) {
        throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer_, " (status frame with ", h.bytes,
                               " bytes)"));
      }
      checkCall(recvPeer_, h.desc);
      r.hdrHave = 0;  // not ours to deliver: read the next header
      return;
    }
    if (i == 0 && h.kind == static_cast<uint16_t>(tcp_wire::FrameKind::kAbort)) {
      if (h.bytes > tcp_wire::kMaxAbortReason) {
        throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer_, " (abort reason of ", h.bytes,
                               " bytes)"));
      }
      r.reasonLen = static_cast<size_t>(h.bytes);
      r.phase = RecvProgress::Phase::kAbortReason;
      return;
    }
    if (h.kind != static_cast<uint16_t>(wantKind)) {
      throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer_, " (kind ", h.kind, " on stream ", i,
                             ")"));
    }
    // The length on the wire is only compared, never used to size anything.
    if (!r.expected.sameCall(h.desc) || h.bytes != r.announced) {
      throwMismatch(t_.rank_, recvPeer_, r.expected, r.announced, h.desc, static_cast<size_t>(h.bytes));
    }
    r.phase = RecvProgress::Phase::kPayload;
  }

  [[noreturn]] void throwTimeout() const {
    std::string detail;
    int peer = sendPeer_;
    for (int i = 0; i < nr_ && detail.empty(); ++i) {
      if (r_[i].done()) continue;
      peer = recvPeer_;
      detail = strCat("rank ", t_.rank_, " receiving ", r_[0].announced, " bytes",
                      nr_ > 1 ? strCat(" (stripe ", i, " of ", nr_, ")") : std::string(), ", ",
                      r_[i].phase == RecvProgress::Phase::kHeader ? "header not yet received" : "header received");
    }
    if (detail.empty()) {
      size_t done = 0, total = 0;
      for (int i = 0; i < ns_; ++i) {
        done += s_[i].done;
        total += sizeof(s_[i].hdr) + s_[i].bytes;
      }
      detail = strCat("rank ", t_.rank_, " sending, ", done, " of ", total, " frame bytes written",
                      ns_ > 1 ? strCat(" over ", ns_, " streams") : std::string());
    }
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
        if (p != t_.rank_ && !(rLeft_ > 0 && p == recvPeer_) && t_.pairs_[p] && t_.pairs_[p]->fds[0].valid()) {
          watch_.push_back(p);
        }
      }
    }
    sendStatus();
    nextStatus_ = Clock::now() + kStatusEvery;
  }

  // Writes a status frame on stream 0 to every peer whose send side is at a frame
  // boundary.
  void sendStatus() {
    for (int p = 0; p < t_.size_; ++p) {
      Pair* pair = t_.pairs_[p].get();
      if (pair == nullptr || !pair->fds[0].valid()) continue;
      std::unique_lock<std::mutex> lk;
      if (pair == spair_) {
        if (sLeft_ > 0) continue;  // our data frames are still going out to this peer (lock held)
      } else {
        lk = std::unique_lock<std::mutex>(pair->sendMu, std::try_to_lock);
        if (!lk.owns_lock()) continue;
      }
      if (!pair->sendBroken.empty()) continue;
      const int fd = pair->fds[0].get();
      int err = 0;
      if (pair->pendingCtl) {
        if (pair->pendingCtl->step(fd, &err)) {
          pair->pendingCtl.reset();
          pair->sendMidFrame = false;
        }
        continue;
      }
      if (pair->sendMidFrame) continue;
      SendProgress f(static_cast<tcp_wire::FrameKind>(kStatusKind), desc_, nullptr, 0);
      if (!f.step(fd, &err) && err == 0 && f.done > 0) {
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

  // Looks at the frames waiting on peer p's stream 0 without disturbing data frames.
  // Returns whether p is worth watching further.
  bool inspect(int p) {
    const int fd = t_.pairs_[p]->fds[0].get();
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
  // one slice of kPollSlice so the deadline and abort() are noticed. (When we send to
  // and receive from the same peer, its sockets appear twice, once per direction.)
  void waitReady() {
    pollfd fds[2 * kMaxStreams];
    nfds_t n = 0;
    for (int i = 0; i < ns_; ++i) {
      if (!s_[i].finished()) fds[n++] = {sfd_[i], POLLOUT, 0};
    }
    for (int i = 0; i < nr_; ++i) {
      if (!r_[i].done()) fds[n++] = {rfd_[i], POLLIN, 0};
    }
    int rc;
    if (stalled_ && !watch_.empty()) {
      std::vector<pollfd> all(fds, fds + n);
      for (int p : watch_) all.push_back({t_.pairs_[p]->fds[0].get(), POLLIN, 0});
      rc = ::poll(all.data(), all.size(), pollMs(deadline_));
    } else {
      rc = ::poll(fds, n, pollMs(deadline_));
    }
    if (rc < 0 && errno != EINTR) throw Error(strCat("pycomm: poll failed: ", std::strerror(errno)));
  }

  TcpTransport& t_;
  const int sendPeer_;
  const int recvPeer_;
  SendProgress* const s_;  // ns_ stripes, one per stream
  RecvProgress* const r_;  // nr_ stripes, one per stream
  const int ns_;
  const int nr_;
  const OpDesc& desc_;
  const Deadline& deadline_;
  int sfd_[kMaxStreams] = {};
  int rfd_[kMaxStreams] = {};
  Pair* const spair_;
  int sLeft_;  // stripes not yet sent
  int rLeft_;  // stripes not yet received
  const bool collective_;
  Clock::time_point nextStatus_;
  bool stalled_ = false;
  std::vector<int> watch_;  // peers whose incoming frames we peek at (filled once stalled)
};

void TcpTransport::transfer(int sendPeer, SendProgress* s, int sendStripes, int recvPeer, RecvProgress* r,
                            int recvStripes, const OpDesc& desc, const Deadline& deadline) {
  Transfer(*this, sendPeer, s, sendStripes, recvPeer, r, recvStripes, desc, deadline).run();
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
  // On the stack: no allocation per message. Stripe i of a message travels on stream i
  // (a small message is its own single stripe, on stream 0).
  SendProgress s[kMaxStreams];
  RecvProgress r[kMaxStreams];
  int ns = 0, nr = 0;
  Pair* sp = nullptr;
  Pair* rp = nullptr;
  if (sendPeer != -1) {
    sp = pairs_[sendPeer].get();
    sendLock = std::unique_lock<std::mutex>(sp->sendMu);
    if (!sp->sendBroken.empty()) {
      throw PeerError(strCat("pycomm: connection to rank ", sendPeer,
                             " is unusable after an earlier error: ", sp->sendBroken));
    }
    ns = tcp_streams::stripeCount(sendBytes, static_cast<int>(sp->fds.size()));
    const auto* base = static_cast<const uint8_t*>(sendBuf);
    for (int i = 0; i < ns; ++i) {
      auto st = tcp_streams::stripeOf(sendBytes, ns, i);
      s[i].start(i == 0 ? tcp_wire::FrameKind::kData : tcp_wire::FrameKind::kStripe, desc,
                 base == nullptr ? nullptr : base + st.begin, st.length, sendBytes);
    }
  }
  if (recvPeer != -1) {
    rp = pairs_[recvPeer].get();
    if (!rp->recvBroken.empty()) {
      throw PeerError(strCat("pycomm: connection from rank ", recvPeer,
                             " is unusable after an earlier error: ", rp->recvBroken));
    }
    nr = tcp_streams::stripeCount(recvBytes, static_cast<int>(rp->fds.size()));
    auto* base = static_cast<uint8_t*>(recvBuf);
    for (int i = 0; i < nr; ++i) {
      auto st = tcp_streams::stripeOf(recvBytes, nr, i);
      r[i].start(base == nullptr ? nullptr : base + st.begin, st.length, recvBytes, desc);
    }
  }
  try {
    transfer(sendPeer, s, ns, recvPeer, r, nr, desc, deadline);
  } catch (const std::exception& e) {
    // A message cut in the middle (any stripe) leaves the streams out of step: refuse
    // to reuse them. A timeout before any byte moved leaves them intact.
    bool sentSome = false, sentAll = true, gotSome = false, gotAll = true;
    for (int i = 0; i < ns; ++i) {
      sentSome = sentSome || s[i].done > 0;
      sentAll = sentAll && s[i].finished();
    }
    for (int i = 0; i < nr; ++i) {
      gotSome = gotSome || r[i].started();
      gotAll = gotAll && r[i].done();
    }
    if (sentSome && !sentAll) {
      sp->sendMidFrame = true;
      sp->sendBroken = e.what();
    }
    if (gotSome && !gotAll) rp->recvBroken = e.what();
    throw;
  }
  if (ns > 0) {
    stats_.bytesSent.fetch_add(sendBytes, std::memory_order_relaxed);
    stats_.messagesSent.fetch_add(1, std::memory_order_relaxed);
  }
  if (nr > 0) {
    stats_.bytesRecv.fetch_add(recvBytes, std::memory_order_relaxed);
    stats_.messagesRecv.fetch_add(1, std::memory_order_relaxed);
  }
}

Transport::Peek TcpTransport::peekHeader(int peer, OpDesc* desc, size_t* bytes) {
  checkPeer(peer, "recv");
  throwIfFailed();
  Pair* p = pairs_[peer].get();
  if (!p->recvBroken.empty()) return Peek::kBroken;
  // Every message's first header is on stream 0, carrying the whole message's size.
  const int fd = p->fds[0].get();
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
    if (pair == nullptr || !pair->fds[0].valid()) continue;
    // Senders notice the flag within one poll slice and leave the lock; only at a
    // frame boundary may the ABORT frame go out (on stream 0) without corrupting the
    // stream. (A try_lock() loop rather than timed_mutex::try_lock_for, which TSan of
    // GCC 12 does not model and reports as a bad unlock.)
    std::unique_lock<std::mutex> lk(pair->sendMu, std::defer_lock);
    Deadline lockWait = Deadline::after(kAbortLockWait);
    while (!lk.try_lock() && !lockWait.expired()) std::this_thread::sleep_for(milliseconds(1));
    const int fd0 = pair->fds[0].get();
    if (lk.owns_lock() && !pair->sendMidFrame) {
      SendProgress f(tcp_wire::FrameKind::kAbort, OpDesc{}, reason.data(), reason.size());
      Deadline d = Deadline::after(kAbortSendWait);
      int err = 0;
      while (!f.step(fd0, &err) && err == 0 && !d.expired()) {
        pollfd pfd{fd0, POLLOUT, 0};
        ::poll(&pfd, 1, pollMs(d, milliseconds(10)));
      }
      pair->sendMidFrame = true;
      pair->sendBroken = "the transport was aborted";
    }
    // Wakes every local wait on these sockets; the peer reads the ABORT frame, then EOF.
    for (auto& fd : pair->fds) ::shutdown(fd.get(), SHUT_RDWR);
  }
}

}  // namespace pycomm
