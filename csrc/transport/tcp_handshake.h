// The TCP transport's connection handshake: a nonblocking state machine per pending
// connection (connector: Hello -> Challenge -> proof -> accept; acceptor the mirror),
// each side proving knowledge of the group secret with an HMAC-SHA256 over both
// nonces (tcp_wire::handshakeMac, tcp.h). Driven by the mesh set-up (tcp_mesh.cc).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "core/deadline.h"
#include "core/net_util.h"
#include "transport/tcp.h"

namespace pycomm {
namespace tcp_detail {

/// Thrown when a connection must be dropped; `reason` goes into the log / redial note.
struct HandshakeFailed {
  std::string reason;
};

/// Where a handshake is.
enum class Step {
  kConnecting,      ///< connector: waiting for connect() to finish
  kSendHello,       ///< connector
  kRecvChallenge,   ///< connector
  kSendProof,       ///< connector
  kRecvAccept,      ///< connector
  kRecvHello,       ///< acceptor
  kSendChallenge,   ///< acceptor
  kRecvProof,       ///< acceptor
  kSendAccept,      ///< acceptor
  kDone,
};

/// One pending connection and its handshake state.
struct Handshake {
  net::Fd fd;
  bool acceptor = false;
  int peer = -1;     ///< acceptor: unknown until the Hello names it
  int stream = 0;    ///< which of the pair's connections (acceptor: from the Hello)
  int streams = 1;   ///< how many the pair has (acceptor: from the Hello)
  std::string name;  ///< "A.B.C.D:P" of the other end
  Step step = Step::kConnecting;
  Deadline deadline;
  uint8_t out[64];
  size_t outLen = 0, outOff = 0;
  uint8_t in[64];
  size_t inNeed = 0, inHave = 0;
  uint8_t myNonce[tcp_wire::kNonceSize];
  uint8_t theirNonce[tcp_wire::kNonceSize];
};

/// What every handshake of one rank's set-up shares.
struct MeshContext {
  int rank;
  int size;
  const uint8_t* secret;  ///< tcp_wire::kSecretSize bytes
  int maxStreams;         ///< most streams this rank accepts per peer (PYCOMM_TCP_STREAMS)
};

/// Connector, once connected: queues the Hello.
void startConnector(Handshake& h, const MeshContext& ctx);

/// Acceptor, once accepted: waits for the Hello.
void startAcceptor(Handshake& h);

/// Advances `h` as far as it goes without blocking (`revents`: what poll() reported).
/// Returns true once it is done; throws HandshakeFailed when the connection must be
/// dropped.
bool pumpHandshake(Handshake& h, const MeshContext& ctx, short revents);

/// The poll() events `h` waits for.
short wantedEvents(const Handshake& h);

}  // namespace tcp_detail
}  // namespace pycomm
