#include "core/huge_pages.h"

#include <sys/mman.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <fstream>
#include <string>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

namespace pycomm {

namespace {

struct Range {
  uintptr_t lo = 0;
  uintptr_t hi = 0;
};

// The last ranges handled by this thread (a buffer is usually all-reduced many times).
thread_local std::array<Range, 16> tRecent;
thread_local size_t tNext = 0;

bool seen(uintptr_t lo, uintptr_t hi) {
  for (const Range& r : tRecent) {
    if (r.lo <= lo && hi <= r.hi) return true;
  }
  return false;
}

}  // namespace

bool adviseHugePages(void* p, size_t bytes, bool collapse) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (start + kHugePageBytes - 1) & ~(uintptr_t{kHugePageBytes} - 1);
  const uintptr_t hi = (start + bytes) & ~(uintptr_t{kHugePageBytes} - 1);
  if (p == nullptr || hi <= lo) return false;
  if (seen(lo, hi)) return true;
  void* a = reinterpret_cast<void*>(lo);
  const size_t n = hi - lo;
  if (madvise(a, n, MADV_HUGEPAGE) != 0) return false;
  // MADV_COLLAPSE copies the resident 4 KiB pages of each 2 MiB piece into a huge page
  // (pieces already huge are skipped). Not-yet-touched pieces fault in as huge pages
  // anyway now that the range is advised. EINVAL: a kernel without MADV_COLLAPSE.
  if (collapse) (void)madvise(a, n, MADV_COLLAPSE);
  tRecent[tNext] = Range{lo, hi};
  tNext = (tNext + 1) % tRecent.size();
  return true;
}

bool hugePagesAvailable() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string s;
  std::getline(f, s);
  return s.find("[always]") != std::string::npos || s.find("[madvise]") != std::string::npos;
}

}  // namespace pycomm
