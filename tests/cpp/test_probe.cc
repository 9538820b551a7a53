// The machine-limit probes (transport/probe.h) and the huge-page advice
// (core/huge_pages.h): every probe runs and reports a positive figure or an error, and
// advised memory really ends up on huge pages where the kernel offers them.
#include <sys/mman.h>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "core/huge_pages.h"
#include "transport/probe.h"

namespace pycomm {
namespace {

constexpr size_t kBytes = size_t{8} << 20;

TEST(Probe, MemcpyBandwidthIsPositive) {
  for (int threads : {1, 2}) {
    BandwidthProbe p = probeMemcpy(kBytes, threads, 2, true);
    ASSERT_TRUE(p.error.empty()) << p.error;
    EXPECT_GT(p.bestGBps, 0.0);
    EXPECT_GE(p.bestGBps, p.medianGBps);
    EXPECT_EQ(p.threads, threads);
    EXPECT_EQ(p.reps, 2);
  }
}

TEST(Probe, CrossMemoryBandwidthWithBothPageSizes) {
  for (bool huge : {false, true}) {
    BandwidthProbe p = probeCrossMemory(kBytes, 2, 2, huge);
    if (!p.error.empty()) GTEST_SKIP() << "process_vm_readv not permitted here: " << p.error;
    EXPECT_GT(p.bestGBps, 0.0);
    EXPECT_EQ(p.hugePages, huge);
    if (!huge) EXPECT_FALSE(p.hugeBacked);  // MADV_NOHUGEPAGE was honoured
  }
}

TEST(Probe, FutexRoundTripPercentilesAreOrdered) {
  LatencyProbe p = probeFutexRoundTrip(200);
  ASSERT_TRUE(p.error.empty()) << p.error;
  EXPECT_GT(p.minus, 0.0);
  EXPECT_LE(p.minus, p.p50us);
  EXPECT_LE(p.p50us, p.p99us);
  EXPECT_EQ(p.iters, 200);
}

TEST(Probe, AvailableCpusIsAtLeastOne) { EXPECT_GE(availableCpus(), 1); }

// kB of AnonHugePages in the mapping that contains `p`.
long anonHugeKb(const void* p) {
  std::ifstream f("/proc/self/smaps");
  std::string line;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  bool inside = false;
  while (std::getline(f, line)) {
    unsigned long lo = 0, hi = 0;
    if (sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find(':') > line.find('-')) {
      inside = lo <= a && a < hi;
      continue;
    }
    long kb = 0;
    if (inside && sscanf(line.c_str(), "AnonHugePages: %ld", &kb) == 1) return kb;
  }
  return 0;
}

TEST(HugePages, AdviceCollapsesResidentPages) {
  if (!hugePagesAvailable()) GTEST_SKIP() << "transparent huge pages disabled on this kernel";
  const size_t bytes = 3 * kHugePageBytes;
  void* m = mmap(nullptr, bytes + kHugePageBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(m, MAP_FAILED);
  char* base = static_cast<char*>(m) + 4096;  // not aligned: only the 2 MiB interior is advised
  madvise(m, bytes + kHugePageBytes, MADV_NOHUGEPAGE);
  memset(base, 7, bytes);  // resident on 4 KiB pages
  ASSERT_EQ(anonHugeKb(base + kHugePageBytes), 0);
  EXPECT_TRUE(adviseHugePages(base, bytes, true));
  const long kb = anonHugeKb(base + kHugePageBytes);
  for (size_t i = 0; i < bytes; ++i) ASSERT_EQ(base[i], 7) << i;  // contents survive the collapse
  munmap(m, bytes + kHugePageBytes);
  if (kb == 0) GTEST_SKIP() << "the kernel did not collapse (no MADV_COLLAPSE or no free huge pages)";
  EXPECT_GE(kb, 2048);
}

TEST(HugePages, TooSmallOrNullIsLeftAlone) {
  char small[4096];
  EXPECT_FALSE(adviseHugePages(small, sizeof(small), true));
  EXPECT_FALSE(adviseHugePages(nullptr, kBytes, true));
}

}  // namespace
}  // namespace pycomm
