// The process heap's policy for the large buffers a training step frees and allocates
// again every iteration (glibc's malloc).
//
// glibc hands memory at the top of its heap back to the OS once more than
// M_TRIM_THRESHOLD of it is free, and serves blocks above M_MMAP_THRESHOLD with a fresh
// mmap each time; both start low and adapt. A training step frees and re-requests the
// same tens of MB (weight gradients computed before they are added into the buckets,
// activations) every iteration; once the buckets live outside the heap (pycomm's
// registered arena) nothing keeps the top of the heap in use, so those pages go back to
// the OS at every step and the kernel faults and zeroes them again at the next one
// (DataParallel+OneBit, 4 ranks, 27M parameters: ~6,000-10,000 page faults and ~25 ms of
// CPU per rank per step; docs/ARCHITECTURE.md). So, once per process (the first pycomm
// group), pycomm fixes both thresholds at glibc's own steady-state ceiling: mmap only for
// blocks of 32 MiB and more, and keep up to 512 MiB free at the top of the heap for the
// next step (memory the step used anyway; nothing is held that was not in use).
//
// PYCOMM_HEAP: "auto" (default: apply, unless the process chose its malloc settings:
// glibc's MALLOC_TRIM_THRESHOLD_ / MMAP_THRESHOLD_ / TOP_PAD_ / MMAP_MAX_ or
// GLIBC_TUNABLES' glibc.malloc, or jemalloc / tcmalloc / mimalloc preloaded),
// "0" (never), "1" (apply even then).
#pragma once

#include <cstdint>
#include <string>

namespace pycomm {

struct HeapPolicy {
  bool decided = false;       ///< a group has run the policy in this process
  bool applied = false;       ///< the thresholds below were set (mallopt)
  int64_t mmapThreshold = 0;  ///< bytes (when applied)
  int64_t trimThreshold = 0;  ///< bytes (when applied)
  std::string mode;           ///< PYCOMM_HEAP as read: auto, 0 or 1
  std::string reason;         ///< why applied or not, in words
};

/// PYCOMM_HEAP as "auto", "0" or "1" ("off"/"on" accepted); throws InvalidArgument otherwise.
std::string heapMode();

/// Runs the policy once per process (later calls return the first result). Throws
/// InvalidArgument on a bad PYCOMM_HEAP.
HeapPolicy applyHeapPolicy();

/// What the policy decided (decided == false before any group ran it).
HeapPolicy heapPolicy();

}  // namespace pycomm
