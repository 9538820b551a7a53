#include "core/heap_policy.h"

#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "core/env.h"
#include "core/error.h"

namespace pycomm {
namespace {

std::mutex gMu;
HeapPolicy gPolicy;

constexpr int64_t kMmapThreshold = int64_t{32} << 20;   // glibc's ceiling for its dynamic value
constexpr int64_t kTrimThreshold = int64_t{512} << 20;

// Why the process's own malloc choice should stand, or "" when it made none.
std::string ownChoice() {
  for (const char* name : {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"}) {
    if (std::getenv(name) != nullptr) return strCat(name, " is set");
  }
  const std::string tunables = envStr("GLIBC_TUNABLES");
  if (tunables.find("glibc.malloc.") != std::string::npos) return "GLIBC_TUNABLES sets glibc.malloc";
  const std::string preload = envStr("LD_PRELOAD");
  for (const char* lib : {"jemalloc", "tcmalloc", "mimalloc"}) {
    if (preload.find(lib) != std::string::npos) return strCat(lib, " is preloaded");
  }
  return "";
}

}  // namespace

std::string heapMode() {
  std::string mode = envStr("PYCOMM_HEAP", "auto");
  if (mode == "off") mode = "0";
  if (mode == "on") mode = "1";
  PYCOMM_CHECK_ARG(mode == "auto" || mode == "0" || mode == "1",
                   "PYCOMM_HEAP must be auto, 0 or 1 (got '", mode, "')");
  return mode;
}

HeapPolicy applyHeapPolicy() {
  std::lock_guard<std::mutex> lock(gMu);
  if (gPolicy.decided) return gPolicy;
  HeapPolicy p;
  p.mode = heapMode();
  p.decided = true;
  const std::string own = p.mode == "auto" ? ownChoice() : "";
  if (p.mode == "0") {
    p.reason = "PYCOMM_HEAP=0";
  } else if (!own.empty()) {
    p.reason = strCat("left to the process: ", own);
  } else {
#if defined(__GLIBC__)
    // M_MMAP_THRESHOLD first: setting either one ends glibc's dynamic adjustment of both.
    if (mallopt(M_MMAP_THRESHOLD, static_cast<int>(kMmapThreshold)) == 1 &&
        mallopt(M_TRIM_THRESHOLD, static_cast<int>(kTrimThreshold)) == 1) {
      p.applied = true;
      p.mmapThreshold = kMmapThreshold;
      p.trimThreshold = kTrimThreshold;
      p.reason = "glibc heap: mmap from 32 MiB, up to 512 MiB kept for reuse";
    } else {
      p.reason = "mallopt refused the thresholds";
    }
#else
    p.reason = "not glibc's malloc";
#endif
  }
  gPolicy = p;
  return p;
}

HeapPolicy heapPolicy() {
  std::lock_guard<std::mutex> lock(gMu);
  return gPolicy;
}

}  // namespace pycomm
