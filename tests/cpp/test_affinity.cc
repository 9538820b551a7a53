// Rank-to-core binding (core/affinity.h): the share arithmetic, and that ranks which are
// threads of one process (as in these tests) are never bound.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <vector>

#include "core/affinity.h"
#include "engine/group.h"
#include "transport/shm.h"
#include "test_util.h"

namespace pycomm {
namespace {

using V = std::vector<int>;

TEST(Affinity, OversubscribedRanksGetOneCpuRoundRobin) {
  const V allowed{2, 5};
  EXPECT_EQ(cpuShare(allowed, 0, 4), V{2});
  EXPECT_EQ(cpuShare(allowed, 1, 4), V{5});
  EXPECT_EQ(cpuShare(allowed, 2, 4), V{2});
  EXPECT_EQ(cpuShare(allowed, 3, 4), V{5});
  EXPECT_EQ(cpuShare(V{7}, 2, 3), V{7});
  EXPECT_EQ(cpuShare(allowed, 1, 2), V{5});  // as many ranks as CPUs: one each
}

TEST(Affinity, FewerRanksThanCpusGetContiguousSharesCoveringAll) {
  const V allowed{0, 1, 2, 3, 4, 5, 6};
  V all;
  for (int i = 0; i < 3; ++i) {
    const V s = cpuShare(allowed, i, 3);
    EXPECT_GE(s.size(), 2u);
    EXPECT_LE(s.size(), 3u);
    all.insert(all.end(), s.begin(), s.end());
  }
  EXPECT_EQ(all, allowed);  // disjoint, in order, nothing left out
  EXPECT_EQ(cpuShare(allowed, 0, 3), (V{0, 1, 2}));
}

TEST(Affinity, BadArgumentsGiveNoShare) {
  EXPECT_TRUE(cpuShare(V{}, 0, 2).empty());
  EXPECT_TRUE(cpuShare(V{0, 1}, 2, 2).empty());
  EXPECT_TRUE(cpuShare(V{0, 1}, -1, 2).empty());
  EXPECT_TRUE(cpuShare(V{0, 1}, 0, 0).empty());
}

TEST(Affinity, KernelKeyDropsNamespacesAndHostKeyOverride) {
  EXPECT_EQ(kernelKeyOf("box|b00t|net:[1]|pid:[2]|ipc:[3]"), "box|b00t");
  EXPECT_EQ(kernelKeyOf("h1#box|b00t|net:[9]|pid:[2]|ipc:[3]"), "box|b00t");
  EXPECT_EQ(kernelKeyOf("a#b#box|b00t|net:[9]"), "box|b00t");
  EXPECT_EQ(kernelKeyOf(groupHostKey()), kernelKeyOf(localHostKey()));
}

TEST(Affinity, ProcessCpuCountIsPositive) { EXPECT_GE(processCpuCount(), 1); }

TEST(Affinity, RanksThatAreThreadsOfOneProcessAreNeverBound) {
  if (bindingResult().decided) GTEST_SKIP() << "an earlier test in this process already ran the policy";
  setenv("PYCOMM_BIND", "1", 1);  // would bind, were the ranks processes
  testing::MemStore store;
  std::vector<std::unique_ptr<Group>> g(3);
  testing::runRanks(3, [&](int r) {
    g[r] = std::make_unique<Group>(store, r, 3, std::chrono::milliseconds(10000));
  });
  unsetenv("PYCOMM_BIND");
  const BindResult b = bindingResult();
  EXPECT_TRUE(b.decided);
  EXPECT_FALSE(b.bound);
  EXPECT_EQ(b.reason, "the host's ranks are threads of one process");
  EXPECT_EQ(b.localSize, 3);
}

}  // namespace
}  // namespace pycomm
