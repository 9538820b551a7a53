// Registered buffers: memory pycomm owns that the other ranks on the host can map.
//
// The arena hands out buffers from memfd segments (anonymous shared memory: never a
// name in /dev/shm, so nothing is left behind whatever way the process ends). A peer
// maps a segment once, by duplicating the owner's descriptor (pidfd_getfd, the same
// permission as the cross-memory reads the shm transport already needs) and from then
// on reads the owner's buffers with plain loads: no system call and no page pinning
// per collective, as NCCL's user-buffer registration and vLLM's custom all-reduce do.
//
// Growth adds a segment (a higher segment id, which is the epoch peers compare: a post
// naming a segment a peer has not mapped yet makes it map it first). Ids are never
// reused; trim() (a group's teardown) releases the segments no buffer uses any more. Huge pages are requested on every segment
// (MADV_HUGEPAGE; shared memory gets them only where
// /sys/kernel/mm/transparent_hugepage/shmem_enabled allows it).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

namespace pycomm {

/// Default smallest segment: 16 MiB (PYCOMM_REGISTERED_SEGMENT overrides).
constexpr size_t kArenaSegmentDefault = size_t{16} << 20;
/// Default cap on the bytes all segments of the process reserve: 8 GiB
/// (PYCOMM_REGISTERED_MAX; 0 turns registered buffers off).
constexpr size_t kArenaMaxDefault = size_t{8} << 30;

class SharedArena {
 public:
  /// Where a buffer lies: enough for a peer to map its segment and find it.
  struct Location {
    int32_t segment = -1;    ///< segment id (0, 1, ... in creation order)
    int32_t fd = -1;         ///< the segment's descriptor in the owning process
    uint64_t base = 0;       ///< the segment's address in the owning process
    uint64_t segBytes = 0;   ///< the segment's size
    uint64_t offset = 0;     ///< the buffer's offset inside the segment
  };

  /// `minSegmentBytes`: smallest segment created; `maxBytes`: cap on all segments.
  SharedArena(size_t minSegmentBytes, size_t maxBytes);
  /// Unmaps and closes every segment (buffers must not be used afterwards).
  ~SharedArena();
  SharedArena(const SharedArena&) = delete;
  SharedArena& operator=(const SharedArena&) = delete;

  /// The process's arena (sizes from the environment). Never destroyed: tensors over
  /// its buffers may outlive every other static.
  static SharedArena& instance();

  /// A buffer of `bytes` (aligned to 64 bytes, 4 KiB from 4 KiB, 2 MiB from 2 MiB), or
  /// nullptr when the cap is reached or the system refuses memory (the caller then
  /// uses ordinary memory). Zero bytes get a valid, distinct pointer. Thread-safe.
  void* allocate(size_t bytes);
  /// Returns a buffer from allocate() (nullptr is ignored). Thread-safe.
  void free(void* p);
  /// Unmaps and closes every segment with no buffer in use (a group's teardown calls it,
  /// so a destroyed group leaves no descriptor behind). Ids are never reused: a later
  /// segment gets a new id, which peers map afresh. Thread-safe.
  void trim();
  /// Whether [p, p + bytes) lies inside one segment; fills `out` if so. Thread-safe.
  bool locate(const void* p, size_t bytes, Location* out) const;

  size_t segmentCount() const;
  /// Bytes reserved by all segments / handed out and not yet freed.
  size_t bytesReserved() const;
  size_t bytesInUse() const;

 private:
  struct Segment {
    char* base = nullptr;
    size_t bytes = 0;
    int fd = -1;
    std::map<size_t, size_t> freeBlocks;  // offset -> length, coalesced
  };
  bool grow(size_t atLeast);

  const size_t minSegment_;
  const size_t max_;
  mutable std::mutex mu_;
  std::vector<Segment> segments_;
  std::map<uintptr_t, std::pair<int, size_t>> live_;  // address -> (segment, length)
  size_t reserved_ = 0;
  size_t inUse_ = 0;
};

/// A growable buffer from the process's arena (SharedArena::instance()), for scratch
/// that peers read. data() is null when the arena refused the size.
class ArenaBuffer {
 public:
  ArenaBuffer() = default;
  ~ArenaBuffer() { reset(); }
  /// Returns the buffer to the arena.
  void reset() {
    SharedArena::instance().free(p_);
    p_ = nullptr;
    bytes_ = 0;
  }
  ArenaBuffer(const ArenaBuffer&) = delete;
  ArenaBuffer& operator=(const ArenaBuffer&) = delete;
  /// At least `bytes` (contents not kept across growth), or null.
  char* get(size_t bytes) {
    if (bytes > bytes_ || !p_) {
      SharedArena::instance().free(p_);
      bytes_ = std::max(bytes, bytes_ * 2);
      p_ = static_cast<char*>(SharedArena::instance().allocate(bytes_));
      if (!p_) bytes_ = 0;
    }
    return p_;
  }

 private:
  char* p_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace pycomm
