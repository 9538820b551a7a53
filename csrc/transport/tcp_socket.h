// Socket helpers shared by the TCP transport's set-up (tcp_mesh.cc) and data path
// (tcp.cc): poll slices, socket options, and which errors mean "connection closed".
#pragma once

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <fstream>

#include "core/deadline.h"

namespace pycomm {
namespace tcp_detail {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

/// Longest single poll(): waits re-check the deadline and the abort flag this often.
constexpr milliseconds kPollSlice{100};
/// Socket buffer we ask for when the kernel allows it (see socketBufferSize()).
constexpr int kSocketBuffer = 4 << 20;

/// Milliseconds to poll before `d` (at least 1, at most `cap`).
inline int pollMs(const Deadline& d, milliseconds cap = kPollSlice) {
  auto left = std::chrono::duration_cast<milliseconds>(d.remaining()).count() + 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(left, cap.count())));
}

/// The integer in a /proc file, or 0.
inline int64_t readProcInt(const char* path) {
  std::ifstream f(path);
  int64_t v = 0;
  if (f >> v) return v;
  return 0;
}

/// The socket buffer to request, or 0 to leave the kernel's autotuning. Setting
/// SO_RCVBUF turns off Linux's receive-buffer autotuning and is capped by
/// net.core.rmem_max; asking for a buffer only pays when that cap is generous.
inline int socketBufferSize() {
  int64_t cap = std::min(readProcInt("/proc/sys/net/core/rmem_max"), readProcInt("/proc/sys/net/core/wmem_max"));
  if (cap < (1 << 20)) return 0;
  return static_cast<int>(std::min<int64_t>(cap, kSocketBuffer));
}

/// TCP_NODELAY, and send/receive buffers of `bufferBytes` when > 0.
inline void tuneSocket(int fd, int bufferBytes) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (bufferBytes > 0) {
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufferBytes, sizeof(bufferBytes));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufferBytes, sizeof(bufferBytes));
  }
}

/// True for the errnos of a connection the peer closed or reset.
inline bool isClosedError(int err) {
  return err == ECONNRESET || err == EPIPE || err == ENOTCONN || err == ESHUTDOWN || err == ECONNABORTED;
}

}  // namespace tcp_detail
}  // namespace pycomm
