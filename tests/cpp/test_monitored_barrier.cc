// monitoredBarrier (engine/monitored_barrier.h) over an in-memory store, ranks as threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "engine/monitored_barrier.h"
#include "test_util.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::messageOf;
using testing::runRanks;

// Runs barrier `id` on 4 ranks; ranks in `late` arrive after `lateBy`. Returns each
// rank's error message ("" if it passed).
std::vector<std::string> run(MemStore& store, uint64_t id, std::vector<int> late, bool waitAll,
                             milliseconds lateBy = milliseconds(600)) {
  std::vector<std::string> msg(4);
  runRanks(4, [&](int r) {
    if (std::find(late.begin(), late.end(), r) != late.end()) std::this_thread::sleep_for(lateBy);
    msg[r] = messageOf(
        [&] { monitoredBarrier(store, "g1/", r, 4, id, milliseconds(300), waitAll, milliseconds(2000)); });
  });
  return msg;
}

TEST(MonitoredBarrier, PassesWhenAllArriveInTime) {
  MemStore store;
  auto msg = run(store, 1, {3}, false, milliseconds(100));
  for (const auto& m : msg) EXPECT_EQ(m, "");
}

TEST(MonitoredBarrier, NamesTheFirstMissingRankAndFailsEveryRank) {
  MemStore store;
  auto msg = run(store, 1, {2, 3}, false);
  EXPECT_NE(msg[0].find("[Rank 0]: Rank 2 failed to pass monitoredBarrier in 300 ms"), std::string::npos) << msg[0];
  for (int r = 1; r < 4; ++r) {
    EXPECT_NE(msg[r].find(strCat("Rank ", r, " successfully reached monitoredBarrier")), std::string::npos) << msg[r];
    EXPECT_NE(msg[r].find("Rank 2 failed"), std::string::npos) << msg[r];
  }
}

TEST(MonitoredBarrier, WaitAllRanksNamesEveryMissingRank) {
  MemStore store;
  auto msg = run(store, 1, {1, 3}, true);
  EXPECT_NE(msg[0].find("[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 300 ms"), std::string::npos)
      << msg[0];
  // The next barrier on the same store passes: ids keep barriers apart.
  auto next = run(store, 2, {}, true);
  for (const auto& m : next) EXPECT_EQ(m, "");
}

TEST(MonitoredBarrier, NoAnswerFromRankZeroIsATimeout) {
  MemStore store;
  std::string m = messageOf([&] { monitoredBarrier(store, "g1/", 1, 2, 1, milliseconds(100), false, milliseconds(100)); });
  EXPECT_NE(m.find("no answer from rank 0"), std::string::npos) << m;
}

}  // namespace
}  // namespace pycomm
