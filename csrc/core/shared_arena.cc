#include "core/shared_arena.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "core/env.h"
#include "core/huge_pages.h"

namespace pycomm {

namespace {

size_t alignFor(size_t bytes) {
  if (bytes >= kHugePageBytes) return kHugePageBytes;
  if (bytes >= 4096) return 4096;
  return 64;
}

size_t roundUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

}  // namespace

SharedArena::SharedArena(size_t minSegmentBytes, size_t maxBytes)
    : minSegment_(roundUp(std::max<size_t>(minSegmentBytes, kHugePageBytes), kHugePageBytes)),
      max_(maxBytes) {}

SharedArena::~SharedArena() {
  for (Segment& s : segments_) {
    if (s.base) munmap(s.base, s.bytes);
    if (s.fd >= 0) close(s.fd);
  }
}

SharedArena& SharedArena::instance() {
  static SharedArena* arena = new SharedArena(
      static_cast<size_t>(std::max<int64_t>(0, envInt("PYCOMM_REGISTERED_SEGMENT", kArenaSegmentDefault))),
      static_cast<size_t>(std::max<int64_t>(0, envInt("PYCOMM_REGISTERED_MAX", kArenaMaxDefault))));
  return *arena;
}

bool SharedArena::grow(size_t atLeast) {
  // A new segment doubles what the arena holds, up to 64 MiB at a time (its memory is
  // committed at once, so a large arena does not double past what it is asked for):
  // a growing user sees few segments, and peers map as few.
  size_t bytes = roundUp(std::max({atLeast, minSegment_, std::min(reserved_, size_t{64} << 20)}), kHugePageBytes);
  if (reserved_ + bytes > max_) {
    bytes = roundUp(std::max(atLeast, minSegment_), kHugePageBytes);
    if (reserved_ + bytes > max_) return false;
  }
  const int fd = memfd_create("pycomm-registered", MFD_CLOEXEC);
  if (fd < 0) return false;
  // Reserve the memory now: a shared mapping that runs out of memory later faults
  // with SIGBUS instead of failing an allocation.
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0 || posix_fallocate(fd, 0, static_cast<off_t>(bytes)) != 0) {
    close(fd);
    return false;
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    close(fd);
    return false;
  }
  (void)madvise(p, bytes, MADV_HUGEPAGE);  // best effort (shmem_enabled decides)
  Segment s;
  s.base = static_cast<char*>(p);
  s.bytes = bytes;
  s.fd = fd;
  s.freeBlocks[0] = bytes;
  segments_.push_back(std::move(s));
  reserved_ += bytes;
  return true;
}

void* SharedArena::allocate(size_t bytes) {
  if (max_ == 0) return nullptr;
  const size_t align = alignFor(bytes);
  const size_t len = roundUp(std::max<size_t>(bytes, 1), 64);
  std::lock_guard<std::mutex> g(mu_);
  for (int attempt = 0; attempt < 2; ++attempt) {
    for (size_t si = 0; si < segments_.size(); ++si) {
      Segment& s = segments_[si];
      if (!s.base) continue;
      for (auto it = s.freeBlocks.begin(); it != s.freeBlocks.end(); ++it) {
        const size_t off = it->first, flen = it->second;
        const size_t start = roundUp(off, align);
        if (start + len > off + flen) continue;
        s.freeBlocks.erase(it);
        if (start > off) s.freeBlocks[off] = start - off;
        if (off + flen > start + len) s.freeBlocks[start + len] = off + flen - (start + len);
        char* p = s.base + start;
        live_[reinterpret_cast<uintptr_t>(p)] = {static_cast<int>(si), len};
        inUse_ += len;
        return p;
      }
    }
    if (attempt == 0 && !grow(len + align)) return nullptr;
  }
  return nullptr;
}

void SharedArena::free(void* p) {
  if (!p) return;
  std::lock_guard<std::mutex> g(mu_);
  auto it = live_.find(reinterpret_cast<uintptr_t>(p));
  if (it == live_.end()) return;
  Segment& s = segments_[it->second.first];
  size_t off = static_cast<size_t>(static_cast<char*>(p) - s.base);
  size_t len = it->second.second;
  inUse_ -= len;
  live_.erase(it);
  // Coalesce with the free neighbours.
  auto next = s.freeBlocks.lower_bound(off);
  if (next != s.freeBlocks.end() && next->first == off + len) {
    len += next->second;
    next = s.freeBlocks.erase(next);
  }
  if (next != s.freeBlocks.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      prev->second += len;
      return;
    }
  }
  s.freeBlocks[off] = len;
}

void SharedArena::trim() {
  std::lock_guard<std::mutex> g(mu_);
  for (Segment& s : segments_) {
    if (!s.base || s.freeBlocks.size() != 1 || s.freeBlocks.begin()->second != s.bytes) continue;
    munmap(s.base, s.bytes);
    close(s.fd);
    reserved_ -= s.bytes;
    s.base = nullptr;  // the slot (and its id) stays, dead
    s.bytes = 0;
    s.fd = -1;
    s.freeBlocks.clear();
  }
}

bool SharedArena::locate(const void* p, size_t bytes, Location* out) const {
  const char* c = static_cast<const char*>(p);
  std::lock_guard<std::mutex> g(mu_);
  for (size_t si = 0; si < segments_.size(); ++si) {
    const Segment& s = segments_[si];
    if (s.base && c >= s.base && c + bytes <= s.base + s.bytes && c < s.base + s.bytes) {
      out->segment = static_cast<int32_t>(si);
      out->fd = s.fd;
      out->base = reinterpret_cast<uint64_t>(s.base);
      out->segBytes = s.bytes;
      out->offset = static_cast<uint64_t>(c - s.base);
      return true;
    }
  }
  return false;
}

size_t SharedArena::segmentCount() const {
  std::lock_guard<std::mutex> g(mu_);
  size_t n = 0;
  for (const Segment& s : segments_) n += s.base != nullptr;
  return n;
}

size_t SharedArena::bytesReserved() const {
  std::lock_guard<std::mutex> g(mu_);
  return reserved_;
}

size_t SharedArena::bytesInUse() const {
  std::lock_guard<std::mutex> g(mu_);
  return inUse_;
}

}  // namespace pycomm
