// Probes of this machine's limits for the in-host transport: memory-copy bandwidth,
// cross-memory-attach (process_vm_readv) bandwidth with 4 KiB and 2 MiB pages, and the
// futex wake-up round trip between two processes. pycomm-bench runs them in the same
// run as the collectives it times, and prints each collective's time as a fraction of
// the bound these figures allow (docs/BENCHMARKING.md). Torch-free; each probe takes
// well under a second on the CI machine.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace pycomm {

/// Bandwidth of one probe: bytes copied per second (each byte read once and written
/// once counts once), the best and the median over repetitions.
struct BandwidthProbe {
  double bestGBps = 0;    ///< 1e9 bytes/s, best repetition (the limit)
  double medianGBps = 0;  ///< median repetition
  int threads = 1;        ///< copying threads (each on its own part)
  size_t bytes = 0;       ///< bytes per repetition, all threads together
  int reps = 0;
  bool hugePages = false; ///< buffers advised MADV_HUGEPAGE before first touch
  bool hugeBacked = false;///< the source really sat on huge pages (AnonHugePages > 0)
  std::string error;      ///< non-empty: the probe could not run (why)
};

/// Latency of a futex wake-up round trip between this process and a child: the parent
/// bumps a shared word and wakes the child, the child wakes the parent back; neither
/// spins. Microseconds per round trip.
struct LatencyProbe {
  double p50us = 0;
  double p99us = 0;
  double minus = 0;
  int iters = 0;
  std::string error;
};

/// memcpy between two private buffers of `bytes` (split over `threads` threads).
BandwidthProbe probeMemcpy(size_t bytes, int threads, int reps, bool hugePages);

/// process_vm_readv from a forked child's buffer of `bytes` into a local one (split over
/// `threads` threads, each its own part), buffers on huge pages or not.
BandwidthProbe probeCrossMemory(size_t bytes, int threads, int reps, bool hugePages);

/// Futex round trip between this process and a forked child, `iters` round trips.
LatencyProbe probeFutexRoundTrip(int iters);

/// CPUs this process may run on (sched_getaffinity; before pycomm bound it to a share,
/// core/affinity.h), at least 1.
int availableCpus();

}  // namespace pycomm
