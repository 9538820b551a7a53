// TCP transport: a full mesh of persistent, mutually authenticated TCP connections
// (one socket per pair of ranks, used full duplex), set up through the Store.
//
// Setup (constructor): listen on an ephemeral port, publish "host:port" in the store,
// dial every lower rank and accept every higher one (each pair over min of both ranks'
// PYCOMM_TCP_STREAMS connections, see tcp_streams.h), all in one poll() loop so that a
// stranger on the port (garbage, silence, connect-then-close) never delays a real
// peer. Each connection proves knowledge of a per-group secret (HMAC-SHA256 over
// fresh nonces from both sides, binding both ranks); the listening socket is closed
// once the mesh is complete.
//
// Data: every message is a FrameHeader (magic, version, OpDesc, byte count) and the
// payload. The receiver checks the header against what it expects before it touches
// the payload: it never sizes anything from a length read off the wire. A message of
// at least 2 x 256 KiB on a pair with several streams is cut into contiguous stripes,
// one per stream, all moving at once in the same poll loop; every stripe has its own
// header, and stream 0 carries the first stripe and every small message, status and
// ABORT frame, so ordering, tag matching and peekHeader() work on stream 0 alone.
//
// Files: tcp_handshake.{h,cc} (the per-connection state machine and its HMAC),
// tcp_mesh.{h,cc} (listen, rendezvous, dial/accept loop), tcp.cc (this class: the
// data path and abort), tcp_socket.h (socket helpers both use), tcp_streams.h (the
// stream setting and the stripe arithmetic).
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/sha256.h"
#include "core/store.h"
#include "transport/transport.h"

namespace pycomm {

/// Wire format of the TCP transport (native byte order: every supported host is
/// little-endian; a byte-order mismatch shows up as a bad magic). Public so tests and
/// diagnostics can speak the protocol; the transport is the only real user.
namespace tcp_wire {

/// Protocol version carried by the handshake and every frame.
constexpr uint16_t kVersion = 1;
/// Bytes of the group secret rank 0 draws from getrandom().
constexpr size_t kSecretSize = 32;
/// Bytes of each side's handshake nonce.
constexpr size_t kNonceSize = 32;
/// Bytes of a handshake MAC (HMAC-SHA256).
constexpr size_t kMacSize = Sha256::kDigestSize;
/// Magic of the connector's Hello ("PCH1" read as little-endian).
constexpr uint32_t kHelloMagic = 0x31484350;
/// Magic of the acceptor's Challenge ("PCC1").
constexpr uint32_t kChallengeMagic = 0x31434350;
/// Magic of every data/abort frame ("PCF1").
constexpr uint32_t kFrameMagic = 0x31464350;
/// Longest abort reason a frame may carry (longer ones are cut when sent).
constexpr size_t kMaxAbortReason = 1024;

/// Handshake step 1, connector -> acceptor.
struct Hello {
  uint32_t magic;               ///< kHelloMagic
  uint16_t version;             ///< kVersion
  uint16_t stream;              ///< index | (count - 1) << 8 of this connection among
                                ///< the pair's streams (0: the only one, as in v1)
  int32_t fromRank;             ///< the connecting rank
  int32_t toRank;               ///< the rank it believes it dialed
  int32_t size;                 ///< group size
  uint8_t nonce[kNonceSize];    ///< connector's fresh nonce
};
static_assert(sizeof(Hello) == 52, "Hello is a 52-byte wire message");

/// Handshake step 2, acceptor -> connector.
struct Challenge {
  uint32_t magic;               ///< kChallengeMagic
  uint16_t version;             ///< kVersion
  uint16_t reserved;            ///< zero
  int32_t fromRank;             ///< the accepting rank
  uint8_t nonce[kNonceSize];    ///< acceptor's fresh nonce
};
static_assert(sizeof(Challenge) == 44, "Challenge is a 44-byte wire message");

// Step 3, connector -> acceptor: kMacSize bytes, handshakeMac(connector side).
// Step 4, acceptor -> connector: kMacSize bytes, handshakeMac(acceptor side), sent only
// after step 3 verified, so an unauthenticated client never obtains a MAC.

/// Kind of a frame.
enum class FrameKind : uint16_t {
  kData = 1,   ///< payload of `bytes` bytes follows
  kAbort = 2,  ///< the sender aborted; `bytes` (<= kMaxAbortReason) of reason text follow
  // 3 is the status frame (tcp.cc)
  kStripe = 4,  ///< on stream i > 0: stripe i of a message of `bytes` bytes (tcp_streams.h)
};

/// Header in front of every message after the handshake.
struct FrameHeader {
  uint32_t magic;     ///< kFrameMagic
  uint16_t version;   ///< kVersion
  uint16_t kind;      ///< a FrameKind
  OpDesc desc;        ///< the sender's descriptor of the call
  uint64_t bytes;     ///< message bytes (a striped message: the whole message's, in
                      ///< every stripe's header; only the stripe's share follows)
};
static_assert(sizeof(FrameHeader) == 48, "FrameHeader is a 48-byte wire header");

/// Hello::stream of connection `index` of `count`.
inline uint16_t packStream(int index, int count) {
  return static_cast<uint16_t>(index | ((count - 1) << 8));
}
/// Index and count from a Hello::stream.
inline int streamIndex(uint16_t packed) { return packed & 0xff; }
inline int streamCount(uint16_t packed) { return (packed >> 8) + 1; }

/// HMAC-SHA256 under `secret` over a role label, both ranks, the group size and both
/// nonces, and, on a pair with several streams, this connection's index and the count
/// (a single-stream pair's MAC is exactly protocol v1's). `acceptorSide` selects the
/// label, so one side's MAC never serves as the other's.
Sha256::Digest handshakeMac(const uint8_t* secret, size_t secretLen, bool acceptorSide,
                            int32_t connectRank, int32_t acceptRank, int32_t size,
                            const uint8_t* connectNonce, const uint8_t* acceptNonce,
                            int streamIndex = 0, int streamCount = 1);

}  // namespace tcp_wire

/// Transport over a full mesh of TCP connections, for ranks on different hosts.
///
/// Environment: PYCOMM_SOCKET_IFNAME (listen on that interface's IPv4 address) or
/// PYCOMM_SOCKET_ADDR (listen on that address; "0.0.0.0" = every interface); default:
/// the host name's address if it is local, else 127.0.0.1. PYCOMM_TCP_STREAMS: most
/// connections per peer ("auto", the default: 2, 1 if the open-file limit is tight;
/// or 1 to 8).
class TcpTransport : public Transport {
 public:
  /// Connects rank `rank` of `size` to every other rank, rendezvousing through
  /// `store` under keys that start with `keyPrefix`. Gives up with TimeoutError after
  /// `timeout` (which is also the figure timeout messages quote); throws
  /// InvalidArgument for a bad rank/size or listen-address setting. `keyPrefix` must
  /// be fresh for every group instance: keys are never deleted, and a stale address
  /// or secret left by an earlier group would be read by this one.
  /// `hostShare`: ranks of the group on this rank's host (sets what
  /// PYCOMM_TCP_STREAMS=auto opens, tcp_streams::autoStreams).
  TcpTransport(Store& store, const std::string& keyPrefix, int rank, int size,
               std::chrono::milliseconds timeout, int hostShare = 1);

  /// Closes every socket (peers then see the connection closed).
  ~TcpTransport() override;

  TcpTransport(const TcpTransport&) = delete;
  TcpTransport& operator=(const TcpTransport&) = delete;

  /// This rank within the group.
  int rank() const override { return rank_; }

  /// Number of ranks in the group.
  int size() const override { return size_; }

  /// "tcp".
  const char* name() const override { return "tcp"; }

  /// Sends `bytes` bytes of `buf` to `peer`; the header carries `desc`.
  void send(int peer, const void* buf, size_t bytes, const OpDesc& desc,
            const Deadline& deadline) override;

  /// Receives exactly `bytes` bytes from `peer` into `buf`, after checking that the
  /// sender's descriptor and size equal `desc` and `bytes` (MismatchError otherwise).
  void recv(int peer, void* buf, size_t bytes, const OpDesc& desc,
            const Deadline& deadline) override;

  /// Sends to `sendPeer` and receives from `recvPeer` at once (one poll loop drives both).
  void sendRecv(int sendPeer, const void* sendBuf, size_t sendBytes, int recvPeer,
                void* recvBuf, size_t recvBytes, const OpDesc& desc,
                const Deadline& deadline) override;

  /// Peeks at the frame header waiting on `peer`'s socket (status frames, which only
  /// carry diagnostics, are taken off first); a closed socket, a bad frame or an ABORT
  /// frame is kBroken, for recv() to report.
  Peek peekHeader(int peer, OpDesc* desc, size_t* bytes) override;

  /// Fails the transport: best-effort ABORT frame carrying `why` to every peer, then
  /// shuts every socket down so that current waits return; every later call throws
  /// PeerError.
  void abort(const std::string& why) override;

  /// The "host:port" this rank listened on during setup (as published in the store).
  const std::string& listenAddress() const { return listenAddress_; }

  /// Store key under which rank `rank` publishes its listen address.
  static std::string addressKey(const std::string& keyPrefix, int rank);

  /// Store key under which rank `rank` publishes its PYCOMM_TCP_STREAMS count.
  static std::string streamsKey(const std::string& keyPrefix, int rank);

  /// Connections (streams) to `peer` (0 for this rank itself).
  int streams(int peer) const;

  /// Store key of the group secret rank 0 publishes.
  static std::string secretKey(const std::string& keyPrefix);

 private:
  struct Pair;
  struct SendProgress;
  struct RecvProgress;
  class Transfer;  // one sendRecv() in flight (tcp.cc)

  void connectMesh(Store& store, const std::string& keyPrefix, int streams);
  void checkPeer(int peer, const char* what) const;
  void throwIfFailed() const;
  void failRemote(const std::string& why);
  void transfer(int sendPeer, SendProgress* s, int sendStripes, int recvPeer, RecvProgress* r,
                int recvStripes, const OpDesc& desc, const Deadline& deadline);
  [[noreturn]] void throwIoError(int peer, int err, const OpDesc& desc) const;

  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  // The rendezvous store, kept (it outlives the transport: the backend owns it) so an
  // aborting rank can leave its reason where peers that only see its socket close
  // can read it, even when no ABORT frame could be sent (a frame was half sent).
  Store* store_ = nullptr;
  std::string keyPrefix_;
  std::string listenAddress_;
  int socketBuffer_ = 0;  // SO_SNDBUF/SO_RCVBUF to request (0: leave kernel autotuning)
  std::vector<std::unique_ptr<Pair>> pairs_;  // indexed by peer rank; null for self

  // Failure state: set by abort() (aborted_) or by an ABORT frame from a peer.
  std::atomic<bool> failed_{false};
  std::atomic<bool> aborted_{false};
  mutable std::mutex failMu_;
  std::string failReason_;  // guarded by failMu_
};

}  // namespace pycomm
