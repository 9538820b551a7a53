#include "transport/tcp_handshake.h"

#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace pycomm {

namespace tcp_wire {

Sha256::Digest handshakeMac(const uint8_t* secret, size_t secretLen, bool acceptorSide,
                            int32_t connectRank, int32_t acceptRank, int32_t size,
                            const uint8_t* connectNonce, const uint8_t* acceptNonce, int streamIndex,
                            int streamCount) {
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
  if (streamCount > 1) {
    // Binds which connection of the pair this is: a proof for one stream is no
    // proof for another, and a changed count fails authentication.
    int32_t streams[2] = {streamIndex, streamCount};
    h.update(streams, sizeof(streams));
  }
  return h.finish();
}

}  // namespace tcp_wire

namespace tcp_detail {

namespace {

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

// Acceptor: the connector's Hello is in h.in; check it and queue the Challenge.
void onHello(Handshake& h, const MeshContext& ctx) {
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
  const int index = tcp_wire::streamIndex(hello.stream), count = tcp_wire::streamCount(hello.stream);
  if (count > ctx.maxStreams || index >= count) {
    throw HandshakeFailed{strCat("hello for stream ", index, " of ", count, " from rank ", hello.fromRank,
                                 " does not fit rank ", ctx.rank, "'s ", ctx.maxStreams, " stream(s)")};
  }
  h.peer = hello.fromRank;
  h.stream = index;
  h.streams = count;
  std::memcpy(h.theirNonce, hello.nonce, sizeof(h.theirNonce));
  tcp_wire::Challenge ch{};
  ch.magic = tcp_wire::kChallengeMagic;
  ch.version = tcp_wire::kVersion;
  ch.fromRank = ctx.rank;
  net::randomBytes(h.myNonce, sizeof(h.myNonce));
  std::memcpy(ch.nonce, h.myNonce, sizeof(ch.nonce));
  queueOut(h, &ch, sizeof(ch), Step::kSendChallenge);
}

// Connector: the acceptor's Challenge is in h.in; queue our proof.
void onChallenge(Handshake& h, const MeshContext& ctx) {
  tcp_wire::Challenge ch;
  std::memcpy(&ch, h.in, sizeof(ch));
  if (ch.magic != tcp_wire::kChallengeMagic || ch.version != tcp_wire::kVersion ||
      ch.fromRank != h.peer) {
    throw HandshakeFailed{strCat("invalid challenge from the listener of rank ", h.peer)};
  }
  std::memcpy(h.theirNonce, ch.nonce, sizeof(h.theirNonce));
  auto mac = tcp_wire::handshakeMac(ctx.secret, tcp_wire::kSecretSize, false, ctx.rank,
                                    h.peer, ctx.size, h.myNonce, h.theirNonce,
                                    h.stream, h.streams);
  queueOut(h, mac.data(), mac.size(), Step::kSendProof);
}

// Acceptor: the connector's proof is in h.in; verify it, then queue ours.
void onProof(Handshake& h, const MeshContext& ctx) {
  auto want = tcp_wire::handshakeMac(ctx.secret, tcp_wire::kSecretSize, false, h.peer,
                                     ctx.rank, ctx.size, h.theirNonce, h.myNonce, h.stream,
                                     h.streams);
  if (!constantTimeEqual(want.data(), h.in, want.size())) {
    throw HandshakeFailed{strCat(
        "authentication failed (wrong MAC from a client claiming rank ", h.peer, ")")};
  }
  auto mac = tcp_wire::handshakeMac(ctx.secret, tcp_wire::kSecretSize, true, h.peer, ctx.rank,
                                    ctx.size, h.theirNonce, h.myNonce, h.stream, h.streams);
  queueOut(h, mac.data(), mac.size(), Step::kSendAccept);
}

// Connector: the acceptor's proof is in h.in; verify it.
void onAccept(Handshake& h, const MeshContext& ctx) {
  auto want = tcp_wire::handshakeMac(ctx.secret, tcp_wire::kSecretSize, true, ctx.rank, h.peer,
                                     ctx.size, h.myNonce, h.theirNonce, h.stream, h.streams);
  if (!constantTimeEqual(want.data(), h.in, want.size())) {
    throw HandshakeFailed{strCat("rank ", h.peer, " at ", h.name,
                                 " failed authentication (wrong secret?)")};
  }
  h.step = Step::kDone;
}

// A complete message sits in h.in: check it and queue the reply.
void onMessage(Handshake& h, const MeshContext& ctx) {
  switch (h.step) {
    case Step::kRecvHello: return onHello(h, ctx);
    case Step::kRecvChallenge: return onChallenge(h, ctx);
    case Step::kRecvProof: return onProof(h, ctx);
    case Step::kRecvAccept: return onAccept(h, ctx);
    default: throw HandshakeFailed{"internal: message in an unexpected state"};
  }
}

}  // namespace

void startConnector(Handshake& h, const MeshContext& ctx) {
  tcp_wire::Hello hello{};
  hello.magic = tcp_wire::kHelloMagic;
  hello.version = tcp_wire::kVersion;
  hello.fromRank = ctx.rank;
  hello.toRank = h.peer;
  hello.size = ctx.size;
  hello.stream = tcp_wire::packStream(h.stream, h.streams);
  net::randomBytes(h.myNonce, sizeof(h.myNonce));
  std::memcpy(hello.nonce, h.myNonce, sizeof(hello.nonce));
  queueOut(h, &hello, sizeof(hello), Step::kSendHello);
}

void startAcceptor(Handshake& h) { expectIn(h, sizeof(tcp_wire::Hello), Step::kRecvHello); }

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

}  // namespace tcp_detail
}  // namespace pycomm
