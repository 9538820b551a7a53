#include "transport/tcp_mesh.h"

#include <arpa/inet.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "core/error.h"
#include "transport/tcp.h"
#include "transport/tcp_handshake.h"
#include "transport/tcp_socket.h"
#include "transport/tcp_streams.h"

namespace pycomm {
namespace tcp_detail {

namespace {

// Longest a stranger may hold a pending connection before it is dropped (capped by
// the setup timeout).
constexpr milliseconds kHandshakeTimeout{5000};
// Pending (unauthenticated) inbound connections allowed at once during setup.
constexpr size_t kMaxPendingInbound = 64;

/// One rank's mesh set-up: the steps of connectMesh() and the state they share.
class MeshBuilder {
  // One connection this rank dials: stream `stream` of `streams` to lower rank `peer`.
  struct Dial {
    int peer;
    int stream;
    int streams;
    bool dialing = false;
    Clock::time_point nextDial = Clock::now();
    int attempts = 0;
  };

 public:
  MeshBuilder(Store& store, const std::string& keyPrefix, int rank, int size, milliseconds timeout,
              int socketBuffer, int maxStreams)
      : store_(store),
        keyPrefix_(keyPrefix),
        rank_(rank),
        size_(size),
        timeout_(timeout),
        socketBuffer_(socketBuffer),
        maxStreams_(maxStreams),
        setup_(Deadline::after(timeout)),
        firstDial_(rank, 0),
        lastError_(size),
        missing_(size - 1),
        acceptsLeft_(size - 1 - rank) {
    mesh_.links.resize(size);
  }

  ~MeshBuilder() { std::memset(secret_, 0, sizeof(secret_)); }

  Mesh run() {
    listen();
    readSecret();
    readAddresses();
    // One poll loop: dial lower ranks, accept higher ranks, handshake all at once.
    while (missing_ > 0) {
      throwIfExpired();
      dialDue();
      const std::vector<pollfd> fds = pollOnce();
      const bool listening = !fds.empty() && fds[0].fd == listener_.get() && listener_.valid();
      if (listening && (fds[0].revents & POLLIN)) acceptAll();
      pumpPending(fds, listening ? 1 : 0);
      // Every higher rank is in: nobody legitimate will dial us again.
      if (acceptsLeft_ == 0 && listener_.valid()) listener_.reset();
    }
    for (auto& h : pending_) {
      if (h->acceptor) reject(*h, "setup finished before it authenticated");
    }
    return std::move(mesh_);
  }

 private:
  std::vector<uint8_t> storeGet(const std::string& key) {
    try {
      auto left = std::max(milliseconds(1), std::chrono::duration_cast<milliseconds>(setup_.remaining()));
      return store_.get(key, left);
    } catch (const TimeoutError& e) {
      throw TimeoutError(strCat("pycomm: timeout after ", timeout_.count(), " ms in tcp setup: rank ", rank_,
                                " waited for store key '", key, "' (did every rank start?): ", e.what()));
    }
  }

  // 1. Listen on an ephemeral port of the chosen address.
  void listen() {
    net::ListenAddress la = net::chooseListenAddress();
    listener_.reset(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!listener_.valid()) throw Error(strCat("pycomm: socket() failed: ", std::strerror(errno)));
    int one = 1;
    setsockopt(listener_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    // Accepted sockets inherit the buffers; they must be set before listen() to get
    // a matching TCP window scale.
    tuneSocket(listener_.get(), socketBuffer_);
    sockaddr_in bindAddr{};
    bindAddr.sin_family = AF_INET;
    bindAddr.sin_port = 0;
    inet_pton(AF_INET, la.bindHost.c_str(), &bindAddr.sin_addr);
    if (::bind(listener_.get(), reinterpret_cast<sockaddr*>(&bindAddr), sizeof(bindAddr)) != 0) {
      throw InvalidArgument(strCat("pycomm: cannot listen on ", la.bindHost, " (chosen by ", la.source,
                                   "): ", std::strerror(errno)));
    }
    if (::listen(listener_.get(), std::max(size_, 16) + 16) != 0) {
      throw Error(strCat("pycomm: listen() failed: ", std::strerror(errno)));
    }
    sockaddr_in bound{};
    socklen_t boundLen = sizeof(bound);
    getsockname(listener_.get(), reinterpret_cast<sockaddr*>(&bound), &boundLen);
    mesh_.listenAddress = strCat(la.advertiseHost, ":", ntohs(bound.sin_port));
  }

  // 2. The group secret: rank 0 draws it, the others read it. Published before our
  //    address, so whoever can dial us can also prove itself.
  void readSecret() {
    const std::string key = TcpTransport::secretKey(keyPrefix_);
    if (rank_ == 0) {
      net::randomBytes(secret_, sizeof(secret_));
      store_.set(key, std::vector<uint8_t>(secret_, secret_ + sizeof(secret_)));
      return;
    }
    std::vector<uint8_t> s = storeGet(key);
    if (s.size() != sizeof(secret_)) {
      throw PeerError(strCat("pycomm: tcp setup: store key '", key, "' holds ", s.size(), " bytes, expected ",
                             sizeof(secret_)));
    }
    std::memcpy(secret_, s.data(), sizeof(secret_));
  }

  // 3. Publish our stream count, then our address; read the addresses and stream
  //    counts of the ranks we dial (the lower ones). A pair opens the smaller count.
  void readAddresses() {
    store_.setString(TcpTransport::streamsKey(keyPrefix_, rank_), std::to_string(maxStreams_));
    store_.setString(TcpTransport::addressKey(keyPrefix_, rank_), mesh_.listenAddress);
    dialAddr_.resize(rank_);
    for (int p = 0; p < rank_; ++p) {
      auto v = storeGet(TcpTransport::addressKey(keyPrefix_, p));
      dialAddr_[p] = net::parseHostPort(std::string(v.begin(), v.end()));
      auto c = storeGet(TcpTransport::streamsKey(keyPrefix_, p));
      const int theirs = std::atoi(std::string(c.begin(), c.end()).c_str());
      if (theirs < 1 || theirs > tcp_streams::kMaxStreams) {
        throw PeerError(strCat("pycomm: tcp setup: rank ", p, " published ", theirs, " streams, expected 1 to ",
                               tcp_streams::kMaxStreams));
      }
      firstDial_[p] = static_cast<int>(dials_.size());
      const int streams = std::min(theirs, maxStreams_);
      for (int i = 0; i < streams; ++i) dials_.push_back(Dial{p, i, streams});
    }
  }

  MeshContext ctx() const { return MeshContext{rank_, size_, secret_, maxStreams_}; }

  void throwIfExpired() const {
    if (!setup_.expired()) return;
    std::string who;
    for (int p = 0; p < size_; ++p) {
      if (p == rank_ || connected(p)) continue;
      who += strCat(who.empty() ? "" : ", ", p);
      if (!lastError_[p].empty()) who += strCat(" (", lastError_[p], ")");
    }
    throw TimeoutError(strCat("pycomm: timeout after ", timeout_.count(), " ms setting up tcp connections: rank ",
                              rank_, " (listening on ", mesh_.listenAddress, ") has no connection to rank(s) ",
                              who));
  }

  // Every stream to peer p is authenticated.
  bool connected(int p) const {
    const auto& fds = mesh_.links[p].fds;
    return !fds.empty() && std::all_of(fds.begin(), fds.end(), [](const net::Fd& f) { return f.valid(); });
  }

  bool dialConnected(const Dial& d) const {
    const auto& fds = mesh_.links[d.peer].fds;
    return static_cast<int>(fds.size()) > d.stream && fds[d.stream].valid();
  }

  // Dials every stream to a lower rank that has no connection, none in progress, and
  // whose back-off has passed.
  void dialDue() {
    auto now = Clock::now();
    for (size_t i = 0; i < dials_.size(); ++i) {
      const Dial& d = dials_[i];
      if (!dialConnected(d) && !d.dialing && now >= d.nextDial) startDial(i);
    }
  }

  void startDial(size_t slot) {
    Dial& d = dials_[slot];
    const int p = d.peer;
    auto h = std::make_unique<Handshake>();
    h->peer = p;
    h->stream = d.stream;
    h->streams = d.streams;
    h->acceptor = false;
    h->name = net::formatAddr(dialAddr_[p]);
    h->deadline = setup_;
    h->fd.reset(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!h->fd.valid()) throw Error(strCat("pycomm: socket() failed: ", std::strerror(errno)));
    tuneSocket(h->fd.get(), socketBuffer_);
    d.dialing = true;
    if (::connect(h->fd.get(), reinterpret_cast<const sockaddr*>(&dialAddr_[p]), sizeof(dialAddr_[p])) == 0) {
      startConnector(*h, ctx());
    } else if (errno != EINPROGRESS && errno != EINTR) {
      redial(*h, strCat("connect to ", h->name, " failed: ", std::strerror(errno)));
      return;
    }
    pending_.push_back(std::move(h));
  }

  // Polls the listener (first, while higher ranks are missing) and every pending
  // handshake, until one is ready, the earliest handshake deadline or the next redial.
  std::vector<pollfd> pollOnce() {
    std::vector<pollfd> fds;
    if (listener_.valid() && acceptsLeft_ > 0) fds.push_back({listener_.get(), POLLIN, 0});
    Deadline wake = setup_;
    for (auto& h : pending_) {
      fds.push_back({h->fd.get(), wantedEvents(*h), 0});
      if (h->deadline.remaining() < wake.remaining()) wake = h->deadline;
    }
    int timeoutMs = pollMs(wake);
    const auto now = Clock::now();
    for (const Dial& d : dials_) {
      if (dialConnected(d) || d.dialing) continue;
      auto ms = std::chrono::duration_cast<milliseconds>(d.nextDial - now).count() + 1;
      timeoutMs = std::max(1, std::min<int>(timeoutMs, static_cast<int>(ms)));
    }
    int n = ::poll(fds.data(), fds.size(), timeoutMs);
    if (n < 0 && errno != EINTR) throw Error(strCat("pycomm: poll failed in tcp setup: ", std::strerror(errno)));
    if (n <= 0) {
      for (auto& f : fds) f.revents = 0;
    }
    return fds;
  }

  // Takes every connection waiting on the listener as a pending acceptor handshake.
  void acceptAll() {
    while (true) {
      sockaddr_in from{};
      socklen_t fromLen = sizeof(from);
      int fd = ::accept4(listener_.get(), reinterpret_cast<sockaddr*>(&from), &fromLen, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) break;  // EAGAIN, or a transient error: poll again
      auto h = std::make_unique<Handshake>();
      h->fd.reset(fd);
      h->acceptor = true;
      h->name = net::formatAddr(from);
      size_t inbound = std::count_if(pending_.begin(), pending_.end(), [](const auto& q) { return q->acceptor; });
      if (inbound >= kMaxPendingInbound) {
        reject(*h, "too many unauthenticated connections pending");
        continue;
      }
      tuneSocket(fd, 0);
      h->deadline =
          Deadline::after(std::min(kHandshakeTimeout, std::chrono::duration_cast<milliseconds>(setup_.remaining())));
      startAcceptor(*h);
      pending_.push_back(std::move(h));
    }
  }

  // Drives every pending handshake that poll() flagged (fds[i + first] belongs to
  // pending_[i]; later ones were accepted in this round and are tried right away),
  // then drops the failed and expired ones.
  void pumpPending(const std::vector<pollfd>& fds, size_t first) {
    std::vector<std::unique_ptr<Handshake>> still;
    for (size_t i = 0; i < pending_.size(); ++i) {
      auto& h = pending_[i];
      const bool fresh = i + first >= fds.size();
      const short revents = !fresh && fds[i + first].fd == h->fd.get() ? fds[i + first].revents : 0;
      if (pumpOne(*h, revents, fresh)) still.push_back(std::move(h));
    }
    pending_.swap(still);
  }

  // Advances one handshake; returns whether it is still pending.
  bool pumpOne(Handshake& h, short revents, bool fresh) {
    bool done = false;
    try {
      if (revents != 0 || fresh) done = pumpHandshake(h, ctx(), revents);
    } catch (const HandshakeFailed& f) {
      drop(h, f.reason);
      return false;
    }
    if (done) {
      finish(h);
      return false;
    }
    if (h.deadline.expired()) {
      drop(h, h.acceptor && h.inHave == 0 && h.step == Step::kRecvHello ? "sent nothing (handshake timed out)"
                                                                         : "handshake timed out");
      return false;
    }
    return true;
  }

  // A failed handshake: an inbound stranger is logged; our own dial is retried.
  void drop(const Handshake& h, const std::string& reason) {
    if (h.acceptor) {
      reject(h, reason);
    } else {
      redial(h, strCat(h.name, ": ", reason));
    }
  }

  void reject(const Handshake& h, const std::string& reason) {
    net::logLine(strCat("pycomm: rejected connection from ", h.name, ": ", reason, " (rank ", rank_, " setup)"));
  }

  // Our dial of h's stream failed: try again after a back-off.
  void redial(const Handshake& h, const std::string& reason) {
    Dial& d = dials_[static_cast<size_t>(firstDial_[h.peer] + h.stream)];
    lastError_[h.peer] = reason;
    d.dialing = false;
    int shift = std::min(d.attempts++, 6);
    d.nextDial = Clock::now() + milliseconds(10 << shift);
  }

  void finish(Handshake& h) {
    Link& link = mesh_.links[h.peer];
    if (link.fds.empty()) link.fds.resize(static_cast<size_t>(h.streams));
    if (static_cast<int>(link.fds.size()) != h.streams) {
      // Only an acceptor can meet this (a connector dials its own count): every
      // stream of a pair must carry the count its first one did.
      reject(h, strCat("stream ", h.stream, " of ", h.streams, " from rank ", h.peer, ", whose earlier streams said ",
                       link.fds.size()));
      return;
    }
    const bool was = connected(h.peer);
    // A newer authenticated connection for the same stream replaces an older one: the
    // peer only redials when its side of the old one failed.
    link.fds[static_cast<size_t>(h.stream)] = std::move(h.fd);
    if (h.stream == 0) link.addr = h.name;
    if (!was && connected(h.peer)) {
      --missing_;
      if (h.acceptor) --acceptsLeft_;
    }
    if (!h.acceptor) dials_[static_cast<size_t>(firstDial_[h.peer] + h.stream)].dialing = false;
  }

  Store& store_;
  const std::string keyPrefix_;
  const int rank_;
  const int size_;
  const milliseconds timeout_;
  const int socketBuffer_;
  const int maxStreams_;
  const Deadline setup_;
  uint8_t secret_[tcp_wire::kSecretSize] = {};
  Mesh mesh_;
  net::Fd listener_;
  std::vector<sockaddr_in> dialAddr_;
  std::vector<std::unique_ptr<Handshake>> pending_;
  std::vector<Dial> dials_;
  std::vector<int> firstDial_;  // per lower rank: index of its stream 0 in dials_
  std::vector<std::string> lastError_;
  int missing_;
  int acceptsLeft_;
};

}  // namespace

Mesh connectMesh(Store& store, const std::string& keyPrefix, int rank, int size, milliseconds timeout,
                 int socketBuffer, int maxStreams) {
  return MeshBuilder(store, keyPrefix, rank, size, timeout, socketBuffer, maxStreams).run();
}

}  // namespace tcp_detail
}  // namespace pycomm
