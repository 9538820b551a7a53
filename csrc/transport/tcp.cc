#include "transport/tcp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <thread>

#include "core/error.h"
#include "core/net_util.h"

namespace pycomm {

namespace tcp_wire {

Sha256::Digest handshakeMac(const uint8_t* secret, size_t secretLen, bool acceptorSide,
                            int32_t connectRank, int32_t acceptRank, int32_t size,
                            const uint8_t* connectNonce, const uint8_t* acceptNonce) {
  static const char kConnectorLabel[] = "pycomm-tcp-v1 connector proof";
  static const char kAcceptorLabel[] = "pycomm-tcp-v1 acceptor proof";
  HmacSha256 h(secret, secretLen);
  if (acceptorSide) {
    h.update(kAcceptorLabel, sizeof(kAcceptorLabel));
  } else {
    h.update(kConnectorLabel, sizeof(kConnectorLabel));
  }
  // Both ranks are bound in, so a proof recorded on one pair is useless on another.
  int32_t ints[3] = {connectRank, acceptRank, size};
  h.update(ints, sizeof(ints));
  h.update(connectNonce, kNonceSize);
  h.update(acceptNonce, kNonceSize);
  return h.finish();
}

}  // namespace tcp_wire

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Longest a stranger may hold a pending connection before it is dropped (capped by
// the setup timeout).
constexpr milliseconds kHandshakeTimeout{5000};
// Longest single poll(): waits re-check the deadline and the abort flag this often.
constexpr milliseconds kPollSlice{100};
// Pending (unauthenticated) inbound connections allowed at once during setup.
constexpr size_t kMaxPendingInbound = 64;
// Socket buffer we ask for when the kernel allows it (see socketBufferSize()).
constexpr int kSocketBuffer = 4 << 20;
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

int pollMs(const Deadline& d, milliseconds cap = kPollSlice) {
  auto left = std::chrono::duration_cast<milliseconds>(d.remaining()).count() + 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(left, cap.count())));
}

int64_t readProcInt(const char* path) {
  std::ifstream f(path);
  int64_t v = 0;
  if (f >> v) return v;
  return 0;
}

// Setting SO_RCVBUF turns off Linux's receive-buffer autotuning and is capped by
// net.core.rmem_max; asking for a buffer only pays when that cap is generous.
int socketBufferSize() {
  int64_t cap = std::min(readProcInt("/proc/sys/net/core/rmem_max"),
                         readProcInt("/proc/sys/net/core/wmem_max"));
  if (cap < (1 << 20)) return 0;
  return static_cast<int>(std::min<int64_t>(cap, kSocketBuffer));
}

void tuneSocket(int fd, int bufferBytes) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (bufferBytes > 0) {
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufferBytes, sizeof(bufferBytes));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufferBytes, sizeof(bufferBytes));
  }
}

bool isClosedError(int err) {
  return err == ECONNRESET || err == EPIPE || err == ENOTCONN || err == ESHUTDOWN ||
         err == ECONNABORTED;
}

// ---------------------------------------------------------------------------------
// Setup: one nonblocking handshake per pending connection, driven by connectMesh().

struct HandshakeFailed {
  std::string reason;
};

enum class Step {
  kConnecting,      // connector: waiting for connect() to finish
  kSendHello,       // connector
  kRecvChallenge,   // connector
  kSendProof,       // connector
  kRecvAccept,      // connector
  kRecvHello,       // acceptor
  kSendChallenge,   // acceptor
  kRecvProof,       // acceptor
  kSendAccept,      // acceptor
  kDone,
};

struct Handshake {
  net::Fd fd;
  bool acceptor = false;
  int peer = -1;  // acceptor: unknown until the Hello names it
  std::string name;  // "A.B.C.D:P" of the other end
  Step step = Step::kConnecting;
  Deadline deadline;
  uint8_t out[64];
  size_t outLen = 0, outOff = 0;
  uint8_t in[64];
  size_t inNeed = 0, inHave = 0;
  uint8_t myNonce[tcp_wire::kNonceSize];
  uint8_t theirNonce[tcp_wire::kNonceSize];
};

struct MeshContext {
  int rank;
  int size;
  const uint8_t* secret;
};

void queueOut(Handshake& h, const void* data, size_t n, Step next) {
  std::memcpy(h.out, data, n);
  h.outLen = n;
  h.outOff = 0;
  h.step = next;
}

void expectIn(Handshake& h, size_t n, Step next) {
  h.inNeed = n;
  h.inHave = 0;
  h.step = next;
}

void startConnector(Handshake& h, const MeshContext& ctx) {
  tcp_wire::Hello hello{};
  hello.magic = tcp_wire::kHelloMagic;
  hello.version = tcp_wire::kVersion;
  hello.fromRank = ctx.rank;
  hello.toRank = h.peer;
  hello.size = ctx.size;
  net::randomBytes(h.myNonce, sizeof(h.myNonce));
  std::memcpy(hello.nonce, h.myNonce, sizeof(hello.nonce));
  queueOut(h, &hello, sizeof(hello), Step::kSendHello);
}

// A complete message sits in h.in: check it and queue the reply.
void onMessage(Handshake& h, const MeshContext& ctx) {
  switch (h.step) {
    case Step::kRecvHello: {
      tcp_wire::Hello hello;
      std::memcpy(&hello, h.in, sizeof(hello));
      if (hello.magic != tcp_wire::kHelloMagic) {
        throw HandshakeFailed{strCat("bad magic 0x", std::hex, hello.magic, " in hello")};
      }
      if (hello.version != tcp_wire::kVersion) {
        throw HandshakeFailed{strCat("protocol version ", hello.version, ", expected ",
                                     tcp_wire::kVersion)};
      }
      if (hello.size != ctx.size || hello.toRank != ctx.rank || hello.fromRank <= ctx.rank ||
          hello.fromRank >= ctx.size) {
        throw HandshakeFailed{strCat("hello from rank ", hello.fromRank, " to rank ", hello.toRank,
                                     " of ", hello.size, " does not fit rank ", ctx.rank, " of ",
                                     ctx.size)};
      }
      h.peer = hello.fromRank;
      std::memcpy(h.theirNonce, hello.nonce, sizeof(h.theirNonce));
      tcp_wire::Challenge ch{};
      ch.magic = tcp_wire::kChallengeMagic;
      ch.version = tcp_wire::kVersion;
      ch.fromRank = ctx.rank;
      net::randomBytes(h.myNonce, sizeof(h.myNonce));
      std::memcpy(ch.nonce, h.myNonce, sizeof(ch.nonce));
      queueOut(h, &ch, sizeof(ch), Step::kSendChallenge);
      return;
    }
    case Step::kRecvChallenge: {
      tcp_wire::Challenge ch;
      std::memcpy(&ch, h.in, sizeof(ch));
      if (ch.magic != tcp_wire::kChallengeMagic || ch.version != tcp_wire::kVersion ||
          ch.fromRank != h.peer) {
        throw HandshakeFailed{strCat("invalid challenge from the listener of rank ", h.peer)};
      }
      std::memcpy(h.theirNonce, ch.nonce, sizeof(h.theirNonce));
      auto mac = tcp_wire::handshakeMac(ctx.secret, tcp_wire::kSecretSize, false, ctx.rank,
                                        h.peer, ctx.size, h.myNonce, h.theirNonce);
      queueOut(h, mac.data(), mac.size(), Step::kSendProof);
      return;
    }
    case Step::kRecvProof: {
      auto want = tcp_wire::handshakeMac(ctx.secret, tcp_wire::kSecretSize, false, h.peer,
                                         ctx.rank, ctx.size, h.theirNonce, h.myNonce);
      if (!constantTimeEqual(want.data(), h.in, want.size())) {
        throw HandshakeFailed{strCat(
            "authentication failed (wrong MAC from a client claiming rank ", h.peer, ")")};
      }
      auto mac = tcp_wire::handshakeMac(ctx.secret, tcp_wire::kSecretSize, true, h.peer, ctx.rank,
                                        ctx.size, h.theirNonce, h.myNonce);
      queueOut(h, mac.data(), mac.size(), Step::kSendAccept);
      return;
    }
    case Step::kRecvAccept: {
      auto want = tcp_wire::handshakeMac(ctx.secret, tcp_wire::kSecretSize, true, ctx.rank, h.peer,
                                         ctx.size, h.myNonce, h.theirNonce);
      if (!constantTimeEqual(want.data(), h.in, want.size())) {
        throw HandshakeFailed{strCat("rank ", h.peer, " at ", h.name,
                                     " failed authentication (wrong secret?)")};
      }
      h.step = Step::kDone;
      return;
    }
    default:
      throw HandshakeFailed{"internal: message in an unexpected state"};
  }
}

// Advances `h` as far as it goes without blocking. Returns true once it is done;
// throws HandshakeFailed when the connection must be dropped.
bool pumpHandshake(Handshake& h, const MeshContext& ctx, short revents) {
  if (h.step == Step::kConnecting) {
    if ((revents & (POLLOUT | POLLERR | POLLHUP)) == 0) return false;
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(h.fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) throw HandshakeFailed{strCat("connect failed: ", std::strerror(err))};
    startConnector(h, ctx);
  }
  while (true) {
    if (h.outOff < h.outLen) {
      ssize_t w = ::send(h.fd.get(), h.out + h.outOff, h.outLen - h.outOff,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
        throw HandshakeFailed{strCat("send failed: ", std::strerror(errno))};
      }
      h.outOff += static_cast<size_t>(w);
      if (h.outOff < h.outLen) continue;
      // Whole message out: move to the step after it.
      switch (h.step) {
        case Step::kSendHello:
          expectIn(h, sizeof(tcp_wire::Challenge), Step::kRecvChallenge);
          break;
        case Step::kSendProof: expectIn(h, tcp_wire::kMacSize, Step::kRecvAccept); break;
        case Step::kSendChallenge: expectIn(h, tcp_wire::kMacSize, Step::kRecvProof); break;
        case Step::kSendAccept: h.step = Step::kDone; return true;
        default: throw HandshakeFailed{"internal: send in an unexpected state"};
      }
    }
    if (h.step == Step::kDone) return true;
    // Read exactly the message: bytes beyond it belong to the data stream.
    ssize_t r = ::recv(h.fd.get(), h.in + h.inHave, h.inNeed - h.inHave, MSG_DONTWAIT);
    if (r == 0) throw HandshakeFailed{"closed the connection during the handshake"};
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
      throw HandshakeFailed{strCat("recv failed: ", std::strerror(errno))};
    }
    h.inHave += static_cast<size_t>(r);
    if (h.inHave < h.inNeed) continue;
    onMessage(h, ctx);
    if (h.step == Step::kDone) return true;
  }
}

short wantedEvents(const Handshake& h) {
  if (h.step == Step::kConnecting || h.outOff < h.outLen) return POLLOUT;
  return POLLIN;
}

}  // namespace

// ---------------------------------------------------------------------------------

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
  socketBuffer_ = socketBufferSize();
  connectMesh(store, keyPrefix);
}

TcpTransport::~TcpTransport() = default;  // the Fds close every socket

void TcpTransport::connectMesh(Store& store, const std::string& keyPrefix) {
  const Deadline setup = Deadline::after(timeout_);
  auto storeTimeout = [&] {
    return std::max(milliseconds(1), std::chrono::duration_cast<milliseconds>(setup.remaining()));
  };
  auto storeGet = [&](const std::string& key) {
    try {
      return store.get(key, storeTimeout());
    } catch (const TimeoutError& e) {
      throw TimeoutError(strCat("pycomm: timeout after ", timeout_.count(),
                                " ms in tcp setup: rank ", rank_, " waited for store key '", key,
                                "' (did every rank start?): ", e.what()));
    }
  };

  // 1. Listen on an ephemeral port of the chosen address.
  net::ListenAddress la = net::chooseListenAddress();
  net::Fd listener(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listener.valid()) throw Error(strCat("pycomm: socket() failed: ", std::strerror(errno)));
  int one = 1;
  setsockopt(listener.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  // Accepted sockets inherit the buffers; they must be set before listen() to get
  // a matching TCP window scale.
  tuneSocket(listener.get(), socketBuffer_);
  sockaddr_in bindAddr{};
  bindAddr.sin_family = AF_INET;
  bindAddr.sin_port = 0;
  inet_pton(AF_INET, la.bindHost.c_str(), &bindAddr.sin_addr);
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&bindAddr), sizeof(bindAddr)) != 0) {
    throw InvalidArgument(strCat("pycomm: cannot listen on ", la.bindHost, " (chosen by ",
                                 la.source, "): ", std::strerror(errno)));
  }
  if (::listen(listener.get(), std::max(size_, 16) + 16) != 0) {
    throw Error(strCat("pycomm: listen() failed: ", std::strerror(errno)));
  }
  sockaddr_in bound{};
  socklen_t boundLen = sizeof(bound);
  getsockname(listener.get(), reinterpret_cast<sockaddr*>(&bound), &boundLen);
  listenAddress_ = strCat(la.advertiseHost, ":", ntohs(bound.sin_port));

  // 2. The group secret: rank 0 draws it, the others read it. Published before our
  //    address, so whoever can dial us can also prove itself.
  uint8_t secret[tcp_wire::kSecretSize];
  if (rank_ == 0) {
    net::randomBytes(secret, sizeof(secret));
    store.set(secretKey(keyPrefix), std::vector<uint8_t>(secret, secret + sizeof(secret)));
  } else {
    std::vector<uint8_t> s = storeGet(secretKey(keyPrefix));
    if (s.size() != sizeof(secret)) {
      throw PeerError(strCat("pycomm: tcp setup: store key '", secretKey(keyPrefix), "' holds ",
                             s.size(), " bytes, expected ", sizeof(secret)));
    }
    std::memcpy(secret, s.data(), sizeof(secret));
  }
  const MeshContext ctx{rank_, size_, secret};

  // 3. Publish our address, read the addresses of the ranks we dial (the lower ones).
  store.setString(addressKey(keyPrefix, rank_), listenAddress_);
  std::vector<sockaddr_in> dialAddr(rank_);
  for (int p = 0; p < rank_; ++p) {
    auto v = storeGet(addressKey(keyPrefix, p));
    dialAddr[p] = net::parseHostPort(std::string(v.begin(), v.end()));
  }

  // 4. One poll loop: dial lower ranks, accept higher ranks, handshake all at once.
  std::vector<std::unique_ptr<Handshake>> pending;
  std::vector<bool> dialing(rank_, false);
  std::vector<Clock::time_point> nextDial(rank_, Clock::now());
  std::vector<int> dialAttempts(rank_, 0);
  std::vector<std::string> lastError(size_);
  int missing = size_ - 1;
  int acceptsLeft = size_ - 1 - rank_;

  auto reject = [&](const Handshake& h, const std::string& reason) {
    net::logLine(strCat("pycomm: rejected connection from ", h.name, ": ", reason, " (rank ",
                        rank_, " setup)"));
  };
  auto redial = [&](int p, const std::string& reason) {
    lastError[p] = reason;
    dialing[p] = false;
    int shift = std::min(dialAttempts[p]++, 6);
    nextDial[p] = Clock::now() + milliseconds(10 << shift);
  };
  auto finish = [&](Handshake& h) {
    auto& pair = pairs_[h.peer];
    if (!pair) {
      pair = std::make_unique<Pair>();
      --missing;
      if (h.acceptor) --acceptsLeft;
    }
    // A newer authenticated connection from the same rank replaces an older one: the
    // peer only redials when its side of the old one failed.
    pair->fd = std::move(h.fd);
    pair->addr = h.name;
    if (!h.acceptor) dialing[h.peer] = false;
  };
  auto startDial = [&](int p) {
    auto h = std::make_unique<Handshake>();
    h->peer = p;
    h->acceptor = false;
    h->name = net::formatAddr(dialAddr[p]);
    h->deadline = setup;
    h->fd.reset(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!h->fd.valid()) throw Error(strCat("pycomm: socket() failed: ", std::strerror(errno)));
    tuneSocket(h->fd.get(), socketBuffer_);
    dialing[p] = true;
    if (::connect(h->fd.get(), reinterpret_cast<const sockaddr*>(&dialAddr[p]),
                  sizeof(dialAddr[p])) == 0) {
      startConnector(*h, ctx);
    } else if (errno != EINPROGRESS && errno != EINTR) {
      redial(p, strCat("connect to ", h->name, " failed: ", std::strerror(errno)));
      return;
    }
    pending.push_back(std::move(h));
  };

  while (missing > 0) {
    if (setup.expired()) {
      std::string who;
      for (int p = 0; p < size_; ++p) {
        if (p == rank_ || pairs_[p]) continue;
        who += strCat(who.empty() ? "" : ", ", p);
        if (!lastError[p].empty()) who += strCat(" (", lastError[p], ")");
      }
      throw TimeoutError(strCat("pycomm: timeout after ", timeout_.count(),
                                " ms setting up tcp connections: rank ", rank_, " (listening on ",
                                listenAddress_, ") has no connection to rank(s) ", who));
    }
    auto now = Clock::now();
    for (int p = 0; p < rank_; ++p) {
      if (!pairs_[p] && !dialing[p] && now >= nextDial[p]) startDial(p);
    }

    std::vector<pollfd> fds;
    bool listening = listener.valid() && acceptsLeft > 0;
    if (listening) fds.push_back({listener.get(), POLLIN, 0});
    Deadline wake = setup;
    for (auto& h : pending) {
      fds.push_back({h->fd.get(), wantedEvents(*h), 0});
      if (h->deadline.remaining() < wake.remaining()) wake = h->deadline;
    }
    int timeoutMs = pollMs(wake);
    for (int p = 0; p < rank_; ++p) {
      if (pairs_[p] || dialing[p]) continue;
      auto ms = std::chrono::duration_cast<milliseconds>(nextDial[p] - now).count() + 1;
      timeoutMs = std::max(1, std::min<int>(timeoutMs, static_cast<int>(ms)));
    }
    int n = ::poll(fds.data(), fds.size(), timeoutMs);
    if (n < 0 && errno != EINTR) {
      throw Error(strCat("pycomm: poll failed in tcp setup: ", std::strerror(errno)));
    }

    size_t idx = 0;
    if (listening) {
      if (n > 0 && (fds[0].revents & POLLIN)) {
        while (true) {
          sockaddr_in from{};
          socklen_t fromLen = sizeof(from);
          int fd = ::accept4(listener.get(), reinterpret_cast<sockaddr*>(&from), &fromLen,
                             SOCK_NONBLOCK | SOCK_CLOEXEC);
          if (fd < 0) break;  // EAGAIN, or a transient error: poll again
          auto h = std::make_unique<Handshake>();
          h->fd.reset(fd);
          h->acceptor = true;
          h->name = net::formatAddr(from);
          size_t inbound = std::count_if(pending.begin(), pending.end(),
                                         [](const auto& q) { return q->acceptor; });
          if (inbound >= kMaxPendingInbound) {
            reject(*h, "too many unauthenticated connections pending");
            continue;
          }
          tuneSocket(fd, 0);
          h->deadline = Deadline::after(std::min(
              kHandshakeTimeout, std::chrono::duration_cast<milliseconds>(setup.remaining())));
          expectIn(*h, sizeof(tcp_wire::Hello), Step::kRecvHello);
          pending.push_back(std::move(h));
        }
      }
      idx = 1;
    }

    // Drive every pending handshake that poll() flagged, then drop the expired ones.
    std::vector<std::unique_ptr<Handshake>> still;
    for (size_t i = 0; i < pending.size(); ++i) {
      auto& h = pending[i];
      short revents = (i + idx < fds.size() && fds[i + idx].fd == h->fd.get())
                          ? fds[i + idx].revents
                          : 0;
      bool fresh = i + idx >= fds.size();  // accepted in this round: try it right away
      bool done = false;
      try {
        if (revents != 0 || fresh) done = pumpHandshake(*h, ctx, revents);
      } catch (const HandshakeFailed& f) {
        if (h->acceptor) {
          reject(*h, f.reason);
        } else {
          redial(h->peer, strCat(h->name, ": ", f.reason));
        }
        continue;
      }
      if (done) {
        finish(*h);
        continue;
      }
      if (h->deadline.expired()) {
        if (h->acceptor) {
          reject(*h, h->inHave == 0 && h->step == Step::kRecvHello
                         ? "sent nothing (handshake timed out)"
                         : "handshake timed out");
        } else {
          redial(h->peer, strCat(h->name, ": handshake timed out"));
        }
        continue;
      }
      still.push_back(std::move(h));
    }
    pending.swap(still);
    // Every higher rank is in: nobody legitimate will dial us again.
    if (acceptsLeft == 0 && listener.valid()) listener.reset();
  }
  for (auto& h : pending) {
    if (h->acceptor) reject(*h, "setup finished before it authenticated");
  }
  std::memset(secret, 0, sizeof(secret));
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

void TcpTransport::transfer(int sendPeer, SendProgress* s, int recvPeer, RecvProgress* r,
                            const OpDesc& desc, const Deadline& deadline) {
  const int sfd = s ? pairs_[sendPeer]->fd.get() : -1;
  const int rfd = r ? pairs_[recvPeer]->fd.get() : -1;
  Pair* const spair = s ? pairs_[sendPeer].get() : nullptr;
  bool sDone = (s == nullptr);
  bool rDone = (r == nullptr);
  // Stall handling (see kStatusKind): collectives only; p2p calls on different pairs
  // are unordered and their sequence numbers are per pair.
  const bool collective = desc.coll != CollType::kSend;
  auto nextStatus = Clock::now() + kStatusAfter;
  bool stalled = false;
  std::vector<int> watch;  // peers whose incoming frames we peek at (allocated once stalled)

  auto checkCall = [&](int peer, const OpDesc& theirs) {
    if (collective && theirs.coll != CollType::kSend && theirs.seq == desc.seq &&
        !theirs.sameCall(desc)) {
      throw MismatchError(strCat("pycomm: collective mismatch between rank ", rank_, " and rank ",
                                 peer, ": rank ", rank_, " runs ", desc.str(), ", rank ", peer,
                                 " runs ", theirs.str()));
    }
  };
  // Writes a status frame to every peer whose send side is at a frame boundary.
  auto sendStatus = [&] {
    for (int p = 0; p < size_; ++p) {
      Pair* pair = pairs_[p].get();
      if (pair == nullptr || !pair->fd.valid()) continue;
      std::unique_lock<std::mutex> lk;
      if (pair == spair) {
        if (!sDone) continue;  // our data frame is still going out on this socket (lock held)
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
      SendProgress f(static_cast<tcp_wire::FrameKind>(kStatusKind), desc, nullptr, 0);
      if (!f.step(pair->fd.get(), &err) && err == 0 && f.done > 0) {
        pair->pendingCtl = std::make_unique<SendProgress>(f);
        pair->sendMidFrame = true;
      }
      // A failed write is for the data path to report, if this peer matters to it.
    }
  };
  // Looks at the frames waiting on peer p's socket without disturbing data frames.
  // Returns whether p is worth watching further.
  auto inspect = [&](int p) -> bool {
    const int fd = pairs_[p]->fd.get();
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
      if (h.kind == static_cast<uint16_t>(tcp_wire::FrameKind::kAbort) &&
          h.bytes <= tcp_wire::kMaxAbortReason) {
        char buf[sizeof(h) + tcp_wire::kMaxAbortReason];
        const size_t want = sizeof(h) + static_cast<size_t>(h.bytes);
        ssize_t n = ::recv(fd, buf, want, MSG_PEEK | MSG_DONTWAIT);
        if (n < static_cast<ssize_t>(want)) return true;  // wait for the whole reason
        ::recv(fd, buf, want, MSG_DONTWAIT);
        std::string why = strCat("pycomm: rank ", p, " aborted: ",
                                 std::string(buf + sizeof(h), static_cast<size_t>(h.bytes)));
        failRemote(why);
        throw PeerError(why);
      }
      if (h.kind == static_cast<uint16_t>(tcp_wire::FrameKind::kData)) checkCall(p, h.desc);
      return false;  // a data frame: the data path takes it when its turn comes
    }
  };

  while (true) {
    throwIfFailed();
    if (!sDone) {
      int err = 0;
      if (spair->pendingCtl && spair->pendingCtl->step(sfd, &err)) {
        spair->pendingCtl.reset();  // a status frame goes out whole before our data
        spair->sendMidFrame = false;
      }
      if (err == 0 && !spair->pendingCtl) sDone = s->step(sfd, &err);
      if (err != 0) throwIoError(sendPeer, err, desc);
    }
    while (!rDone) {
      // Receive what is there; stop at EAGAIN.
      uint8_t* dst;
      size_t want;
      switch (r->phase) {
        case RecvProgress::Phase::kHeader:
          dst = reinterpret_cast<uint8_t*>(&r->hdr) + r->hdrHave;
          want = sizeof(r->hdr) - r->hdrHave;
          break;
        case RecvProgress::Phase::kPayload:
          dst = r->buf + r->have;
          want = r->bytes - r->have;
          break;
        case RecvProgress::Phase::kAbortReason:
          dst = reinterpret_cast<uint8_t*>(r->reason) + r->reasonHave;
          want = r->reasonLen - r->reasonHave;
          break;
        default:
          dst = nullptr;
          want = 0;
      }
      if (want > 0) {
        ssize_t got = ::recv(rfd, dst, want, MSG_DONTWAIT);
        if (got == 0) throwIoError(recvPeer, 0, desc);
        if (got < 0) {
          if (errno == EINTR) continue;
          if (errno == EAGAIN || errno == EWOULDBLOCK) break;
          throwIoError(recvPeer, errno, desc);
        }
        size_t g = static_cast<size_t>(got);
        if (r->phase == RecvProgress::Phase::kHeader) r->hdrHave += g;
        else if (r->phase == RecvProgress::Phase::kPayload) r->have += g;
        else r->reasonHave += g;
        if (g < want) continue;
      }
      // The current phase is complete.
      if (r->phase == RecvProgress::Phase::kHeader) {
        const auto& h = r->hdr;
        if (h.magic != tcp_wire::kFrameMagic || h.version != tcp_wire::kVersion) {
          throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer, " (magic 0x",
                                 std::hex, h.magic, std::dec, ", version ", h.version,
                                 ") while rank ", rank_, " expected ", r->expected.str()));
        }
        if (h.kind == kStatusKind) {
          if (h.bytes != 0) {
            throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer,
                                   " (status frame with ", h.bytes, " bytes)"));
          }
          checkCall(recvPeer, h.desc);
          r->hdrHave = 0;  // not ours to deliver: read the next header
          continue;
        }
        if (h.kind == static_cast<uint16_t>(tcp_wire::FrameKind::kAbort)) {
          if (h.bytes > tcp_wire::kMaxAbortReason) {
            throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer,
                                   " (abort reason of ", h.bytes, " bytes)"));
          }
          r->reasonLen = static_cast<size_t>(h.bytes);
          r->phase = RecvProgress::Phase::kAbortReason;
          continue;
        }
        if (h.kind != static_cast<uint16_t>(tcp_wire::FrameKind::kData)) {
          throw PeerError(strCat("pycomm: invalid frame from rank ", recvPeer, " (kind ", h.kind,
                                 ")"));
        }
        // The length on the wire is only compared, never used to size anything.
        if (!r->expected.sameCall(h.desc) || h.bytes != r->bytes) {
          throwMismatch(rank_, recvPeer, r->expected, r->bytes, h.desc,
                        static_cast<size_t>(h.bytes));
        }
        r->phase = RecvProgress::Phase::kPayload;
      } else if (r->phase == RecvProgress::Phase::kPayload) {
        r->phase = RecvProgress::Phase::kDone;
        rDone = true;
      } else if (r->phase == RecvProgress::Phase::kAbortReason) {
        std::string why = strCat("pycomm: rank ", recvPeer, " aborted: ",
                                 std::string(r->reason, r->reasonLen));
        failRemote(why);
        throw PeerError(why);
      }
    }
    if (sDone && rDone) return;

    if (deadline.expired()) {
      int peer = rDone ? sendPeer : recvPeer;
      std::string detail =
          rDone ? strCat("rank ", rank_, " sending, ", s->done, " of ", sizeof(s->hdr) + s->bytes,
                         " frame bytes written")
                : strCat("rank ", rank_, " receiving ", r->bytes, " bytes, ",
                         r->phase == RecvProgress::Phase::kHeader ? "header not yet received"
                                                                   : "header received");
      throw TimeoutError(strCat("pycomm: timeout after ", timeout_.count(),
                                " ms waiting for rank ", peer, " in ", desc.str(), " [", detail,
                                "]"));
    }
    if (collective && Clock::now() >= nextStatus) {
      if (!stalled) {
        stalled = true;
        for (int p = 0; p < size_; ++p) {
          if (p != rank_ && !(!rDone && p == recvPeer) && pairs_[p] && pairs_[p]->fd.valid()) {
            watch.push_back(p);
          }
        }
      }
      sendStatus();
      nextStatus = Clock::now() + kStatusEvery;
    }
    if (stalled) {
      for (size_t i = 0; i < watch.size();) {
        if (inspect(watch[i])) {
          ++i;
        } else {
          watch.erase(watch.begin() + static_cast<std::ptrdiff_t>(i));
        }
      }
    }
    pollfd fds[2];
    nfds_t n = 0;
    if (!sDone) fds[n++] = {sfd, POLLOUT, 0};
    if (!rDone) {
      if (n == 1 && fds[0].fd == rfd) {
        fds[0].events |= POLLIN;
      } else {
        fds[n++] = {rfd, POLLIN, 0};
      }
    }
    // Slices of at most kPollSlice so the deadline and abort() are noticed.
    int rc;
    if (stalled && !watch.empty()) {
      std::vector<pollfd> all(fds, fds + n);
      for (int p : watch) all.push_back({pairs_[p]->fd.get(), POLLIN, 0});
      rc = ::poll(all.data(), all.size(), pollMs(deadline));
    } else {
      rc = ::poll(fds, n, pollMs(deadline));
    }
    if (rc < 0 && errno != EINTR) {
      throw Error(strCat("pycomm: poll failed: ", std::strerror(errno)));
    }
  }
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
