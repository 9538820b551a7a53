// The registered arena (core/shared_arena.h) and the shm collectives over registered
// buffers: allocation, coalescing, growth by new segments, the cap, and the direct
// all-reduce / reduce-scatter / all-gather with every rank registered, none, or some
// (peers map registered segments lazily; ranks are threads of one process here, so a
// "peer" maps this process's own memfd again, at another address).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>
#include <vector>

#include "algorithms/collectives.h"
#include "core/huge_pages.h"
#include "core/shared_arena.h"
#include "test_util.h"
#include "transport/shm.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::runRanks;

constexpr milliseconds kTimeout{20000};
constexpr size_t kMiB = size_t{1} << 20;

TEST(SharedArena, AllocatesAlignedDistinctBuffersAndCoalescesFreedOnes) {
  SharedArena a(2 * kMiB, 64 * kMiB);
  EXPECT_EQ(a.segmentCount(), 0u);
  void* z = a.allocate(0);
  void* s = a.allocate(10);
  void* p = a.allocate(5000);
  void* h = a.allocate(kMiB * 2);
  ASSERT_TRUE(z && s && p && h);
  EXPECT_NE(z, s);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(s) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 4096, 0u);
  SharedArena::Location loc;
  ASSERT_TRUE(a.locate(p, 5000, &loc));
  EXPECT_GE(loc.fd, 0);
  EXPECT_EQ(loc.base + loc.offset, reinterpret_cast<uint64_t>(p));
  EXPECT_EQ(loc.offset % 4096, 0u);
  (void)h;
  ASSERT_TRUE(a.locate(h, 2 * kMiB, &loc));
  EXPECT_EQ(loc.offset % kHugePageBytes, 0u);
  int probe = 0;
  EXPECT_FALSE(a.locate(&probe, sizeof(probe), &loc));
  // Writing every byte is safe (the memory is reserved).
  memset(p, 0xab, 5000);
  memset(h, 0xcd, 2 * kMiB);
  const size_t inUse = a.bytesInUse();
  EXPECT_GE(inUse, 2 * kMiB + 5000 + 10);
  a.free(p);
  a.free(s);
  a.free(z);
  a.free(h);
  a.free(nullptr);
  EXPECT_EQ(a.bytesInUse(), 0u);
  // Everything coalesced back: the same buffers fit again without a new segment, and a
  // buffer spanning what the first three took lands where they were.
  const size_t segments = a.segmentCount();
  void* h2 = a.allocate(kMiB * 2);
  void* p2 = a.allocate(5000);
  ASSERT_TRUE(h2 && p2);
  EXPECT_EQ(a.segmentCount(), segments);
  a.free(h2);
  a.free(p2);
  void* whole = a.allocate(kMiB * 2 - 4096);
  ASSERT_NE(whole, nullptr);
  EXPECT_EQ(a.segmentCount(), segments);
  a.free(whole);
  EXPECT_EQ(a.bytesInUse(), 0u);
}

TEST(SharedArena, GrowsByNewSegmentsAndStopsAtTheCap) {
  SharedArena a(2 * kMiB, 16 * kMiB);
  void* first = a.allocate(kMiB);
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(a.segmentCount(), 1u);
  void* second = a.allocate(3 * kMiB);  // does not fit the 2 MiB segment
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(a.segmentCount(), 2u);
  SharedArena::Location l1, l2;
  ASSERT_TRUE(a.locate(first, kMiB, &l1));
  ASSERT_TRUE(a.locate(second, 3 * kMiB, &l2));
  EXPECT_LT(l1.segment, l2.segment);
  EXPECT_NE(l1.fd, l2.fd);
  EXPECT_EQ(a.allocate(32 * kMiB), nullptr) << "over the cap";
  // trim() releases only empty segments; ids are not reused afterwards.
  a.free(first);
  a.trim();
  EXPECT_EQ(a.segmentCount(), 1u) << "the segment holding `second` stays";
  EXPECT_FALSE(a.locate(first, 64, &l1));
  a.free(second);
  a.trim();
  EXPECT_EQ(a.segmentCount(), 0u);
  EXPECT_EQ(a.bytesReserved(), 0u);
  void* again = a.allocate(100);
  ASSERT_NE(again, nullptr);
  SharedArena::Location l3;
  ASSERT_TRUE(a.locate(again, 100, &l3));
  EXPECT_GT(l3.segment, l2.segment);
  a.free(again);
  SharedArena off(2 * kMiB, 0);
  EXPECT_EQ(off.allocate(64), nullptr) << "a cap of 0 turns the arena off";
}

// ---- the shm collectives over registered buffers ---------------------------------------------

enum class Reg { kNone, kAll, kSome };

// A float32 buffer of `count` elements: in the process arena for registered ranks.
struct Buf {
  float* p = nullptr;
  std::vector<float> own;
  bool reg = false;
  Buf(size_t count, bool registered) {
    if (registered) p = static_cast<float*>(SharedArena::instance().allocate(count * sizeof(float)));
    reg = p != nullptr;
    if (!p) {
      own.resize(std::max<size_t>(count, 1));
      p = own.data();
    }
  }
  ~Buf() {
    if (reg) SharedArena::instance().free(p);
  }
};

float value(int rank, size_t i) { return static_cast<float>(((i * 37 + rank * 11) % 101)) * 0.25f - 7.0f; }

void runAllReduce(int n, Reg reg, size_t copyMax) {
  const size_t counts[] = {0, 1, 2, 97, 16411, 262147};  // 262147 floats: > 1 MiB
  MemStore store;
  auto t = testing::makeTransports<ShmTransport>(store, "arena/", n, kTimeout);
  AlgoConfig cfg;
  cfg.algo = "direct";
  cfg.registeredCopyMax = copyMax;
  runRanks(n, [&](int r) {
    Collectives coll(*t[r], cfg);
    const bool mine = reg == Reg::kAll || (reg == Reg::kSome && r % 2 == 0);
    uint64_t seq = 0;
    for (size_t count : counts) {
      Buf b(count, mine);
      for (size_t i = 0; i < count; ++i) b.p[i] = value(r, i);
      OpDesc d = testing::makeDesc(CollType::kAllReduce, ++seq, count, DType::kFloat32);
      coll.allReduce(b.p, count, DType::kFloat32, ReduceOp::kSum, d, Deadline::after(kTimeout));
      for (size_t i = 0; i < count; ++i) {
        double want = 0;
        for (int q = 0; q < n; ++q) want += value(q, i);
        ASSERT_NEAR(b.p[i], want, 1e-3 * (1 + std::fabs(want))) << "rank " << r << " count " << count << " i " << i;
      }
    }
  });
  size_t mapped = 0;
  for (auto& tr : t) mapped += tr->mappedSegments();
  if (reg == Reg::kNone && copyMax == 0) {
    EXPECT_EQ(mapped, 0u) << "nothing registered, nothing mapped";
  } else {
    EXPECT_GT(mapped, 0u) << "registered peers were read through their mapping";
  }
}

TEST(ShmRegistered, DirectAllReduceRegisteredUnregisteredAndMixed) {
  for (int n : {3, 5}) {
    runAllReduce(n, Reg::kAll, 0);
    runAllReduce(n, Reg::kNone, 0);            // process_vm_readv throughout
    runAllReduce(n, Reg::kNone, size_t{1} << 40);  // user buffers copied into registered scratch
    runAllReduce(n, Reg::kSome, 0);            // some ranks registered: per-peer fallback
  }
}

TEST(ShmRegistered, ReduceScatterAndAllGatherReadRegisteredPeersDirectly) {
  const int n = 3;
  MemStore store;
  auto t = testing::makeTransports<ShmTransport>(store, "arena-rs/", n, kTimeout);
  runRanks(n, [&](int r) {
    Collectives coll(*t[r], AlgoConfig{});
    uint64_t seq = 0;
    for (size_t per : {size_t{0}, size_t{1}, size_t{13}, size_t{70001}}) {
      Buf in(per * n, r != 1);  // rank 1 unregistered
      std::vector<float> out(std::max<size_t>(per, 1));
      for (size_t i = 0; i < per * n; ++i) in.p[i] = value(r, i);
      coll.reduceScatter(in.p, out.data(), per, DType::kFloat32, ReduceOp::kSum,
                         testing::makeDesc(CollType::kReduceScatter, ++seq, per * n, DType::kFloat32),
                         Deadline::after(kTimeout));
      for (size_t i = 0; i < per; ++i) {
        double want = 0;
        for (int q = 0; q < n; ++q) want += value(q, r * per + i);
        ASSERT_NEAR(out[i], want, 1e-3 * (1 + std::fabs(want)));
      }
      Buf g(per, r != 2);
      for (size_t i = 0; i < per; ++i) g.p[i] = value(r, i);
      std::vector<float> all(std::max<size_t>(per * n, 1));
      coll.allGather(g.p, all.data(), per * sizeof(float),
                     testing::makeDesc(CollType::kAllGather, ++seq, per * n, DType::kFloat32),
                     Deadline::after(kTimeout));
      for (int q = 0; q < n; ++q) {
        for (size_t i = 0; i < per; ++i) ASSERT_EQ(all[q * per + i], value(q, i));
      }
    }
  });
  for (auto& tr : t) EXPECT_GT(tr->mappedSegments(), 0u);
}

TEST(ShmRegistered, PeersMapASegmentAddedByGrowth) {
  const int n = 3;
  MemStore store;
  auto t = testing::makeTransports<ShmTransport>(store, "arena-grow/", n, kTimeout);
  AlgoConfig cfg;
  cfg.algo = "direct";
  cfg.registeredCopyMax = 0;
  std::vector<size_t> before(n), after(n);
  // Larger than all the arena holds so far: it must add a segment.
  const size_t big = (SharedArena::instance().bytesReserved() + (8 << 20)) / 4;
  runRanks(n, [&](int r) {
    Collectives coll(*t[r], cfg);
    uint64_t seq = 0;
    for (size_t count : {size_t{5000}, big}) {
      Buf b(count, true);
      ASSERT_TRUE(b.reg);
      for (size_t i = 0; i < count; ++i) b.p[i] = value(r, i);
      coll.allReduce(b.p, count, DType::kFloat32, ReduceOp::kSum,
                     testing::makeDesc(CollType::kAllReduce, ++seq, count, DType::kFloat32), Deadline::after(kTimeout));
      for (size_t i = 0; i < count; i += 997) {
        double want = 0;
        for (int q = 0; q < n; ++q) want += value(q, i);
        ASSERT_NEAR(b.p[i], want, 1e-3 * (1 + std::fabs(want)));
      }
      (seq == 1 ? before : after)[r] = t[r]->mappedSegments();
    }
  });
  for (int r = 0; r < n; ++r) EXPECT_GT(after[r], before[r]) << "rank " << r << " mapped the new segment";
}

}  // namespace
}  // namespace pycomm
