// The TCP transport's streams: how many sockets a pair of ranks opens
// (PYCOMM_TCP_STREAMS) and how one message is cut into contiguous stripes across them.
// Both ends of a pair compute the same stripes from the message size and the pair's
// stream count (agreed in the handshake), so a stripe carries no offset on the wire.
#pragma once

#include <sys/resource.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/env.h"
#include "core/error.h"

namespace pycomm {
namespace tcp_streams {

/// Most sockets a pair may open (the handshake carries the count in one byte).
constexpr int kMaxStreams = 8;
/// Streams "auto" opens at most. Measured on emulated links (benchmarks/results/
/// tcp_streams_*.txt and docs/USER_GUIDE.md "TCP streams"): at 10 Gbit/s 2 streams were
/// 1.05x one on a quiet 2-core VM (one flow already reaches 90% of the link there) and
/// 1.54x under load (a stalled flow no longer stalls the message); at 1 Gbit/s, where one
/// flow fills the link, 2 streams cost nothing measurable when quiet (7% under load) and
/// 4 streams 23%; 2 is the compromise. Not tied to the core count: one thread drives all
/// of a pair's sockets in one poll loop, and the CPU time per byte measured the same for
/// 1, 2 and 4 streams.
constexpr int kAutoMaxStreams = 2;
/// Smallest stripe: a message shorter than two of these goes whole over stream 0, so
/// small-message latency is what it is with one stream.
constexpr size_t kMinStripe = size_t(256) << 10;

/// What "auto" opens per peer in a group of `size` whose `hostShare` ranks (this one
/// included) sit on this rank's host: kAutoMaxStreams flows per host link, divided among
/// the host's ranks (the hierarchical collectives run every local rank's cross-host
/// exchange at once, so a host with 2 ranks already puts 2 flows on its link: one socket
/// per pair then; measured, 2 x 2 ranks at 1 Gbit/s: 565 ms with one stream per pair vs
/// 576 ms with two, and 4 flows over one 1 Gbit/s link cost 23%). Fewer when the sockets
/// to every peer would take more than a quarter of the soft limit on open files.
inline int autoStreams(int size, uint64_t fileLimit, int hostShare = 1) {
  const uint64_t peers = static_cast<uint64_t>(std::max(1, size - 1));
  const uint64_t fit = fileLimit / 4 / peers;
  const int perRank = std::max(1, kAutoMaxStreams / std::max(1, hostShare));
  return static_cast<int>(std::max<uint64_t>(1, std::min<uint64_t>(static_cast<uint64_t>(perRank), fit)));
}

/// The PYCOMM_TCP_STREAMS setting of this process for a group of `size` (`hostShare` of
/// its ranks on this host): the most streams it opens per peer. "auto" (or unset):
/// autoStreams(size, RLIMIT_NOFILE, hostShare);
/// otherwise an integer in [1, kMaxStreams]. InvalidArgument naming the variable and
/// `rank` otherwise.
inline int configuredStreams(int rank, int size, int hostShare = 1) {
  std::string v = envStr("PYCOMM_TCP_STREAMS", "auto");
  if (v == "auto") {
    rlimit rl{};
    uint64_t limit = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY ? rl.rlim_cur : 1 << 20;
    return autoStreams(size, limit, hostShare);
  }
  char* end = nullptr;
  long n = std::strtol(v.c_str(), &end, 10);
  if (end == v.c_str() || *end != 0 || n < 1 || n > kMaxStreams) {
    throw InvalidArgument(strCat("pycomm: PYCOMM_TCP_STREAMS='", v, "' on rank ", rank,
                                 ": expected \"auto\" or an integer from 1 to ", kMaxStreams));
  }
  return static_cast<int>(n);
}

/// Stripes a message of `bytes` goes in over a pair with `streams` sockets: one below
/// 2 * kMinStripe, else one per kMinStripe, at most `streams`.
inline int stripeCount(size_t bytes, int streams) {
  if (streams <= 1 || bytes < 2 * kMinStripe) return 1;
  return static_cast<int>(std::min<size_t>(static_cast<size_t>(streams), bytes / kMinStripe));
}

/// Byte range [begin, begin + length) of stripe `i` of `count` of a `bytes` message:
/// contiguous, in order, lengths differing by at most one byte (the first
/// bytes % count stripes are one longer), together exactly the message.
struct Stripe {
  size_t begin;
  size_t length;
};
inline Stripe stripeOf(size_t bytes, int count, int i) {
  const size_t n = static_cast<size_t>(count), k = static_cast<size_t>(i);
  const size_t base = bytes / n, extra = bytes % n;
  return Stripe{k * base + std::min(k, extra), base + (k < extra ? 1 : 0)};
}

}  // namespace tcp_streams
}  // namespace pycomm
