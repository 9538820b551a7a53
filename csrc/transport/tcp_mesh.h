// The TCP transport's set-up: listen on an ephemeral port, share the group secret and
// every rank's address through the store, then dial every lower rank and accept every
// higher one in one poll() loop, each connection authenticated by the handshake
// (tcp_handshake.h), so a stranger on the port (garbage, silence, connect-then-close)
// never delays a real peer. The listening socket is closed once the mesh is complete.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "core/net_util.h"
#include "core/store.h"

namespace pycomm {
namespace tcp_detail {

/// The authenticated connections (streams) to one peer.
struct Link {
  std::vector<net::Fd> fds;  ///< connected, nonblocking; [0] carries every frame header
  std::string addr;          ///< "A.B.C.D:P" of the peer's end of stream 0
};

/// A complete mesh for one rank.
struct Mesh {
  std::string listenAddress;  ///< "host:port" this rank listened on (as published)
  std::vector<Link> links;    ///< indexed by peer rank; this rank's entry is empty
};

/// Connects rank `rank` of `size` (> 1) to every other rank through `store` under
/// `keyPrefix` (keys TcpTransport::secretKey / addressKey / streamsKey), asking for
/// socket buffers of `socketBuffer` bytes (0: kernel autotuning). Each pair opens
/// min(both ranks' `maxStreams`) connections, every one authenticated. TimeoutError
/// after `timeout` naming the ranks still missing; InvalidArgument for a bad
/// listen-address setting.
Mesh connectMesh(Store& store, const std::string& keyPrefix, int rank, int size, std::chrono::milliseconds timeout,
                 int socketBuffer, int maxStreams);

}  // namespace tcp_detail
}  // namespace pycomm
