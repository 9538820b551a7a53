// Receive from any source (Group::submitRecvAny over Transport::peekHeader), on shm and
// TCP, ranks as threads: the first matching message wins, tags and pair order hold.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "engine/group.h"
#include "test_util.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::messageOf;
using testing::runRanks;

class RecvAny : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override { setenv("PYCOMM_TRANSPORT", GetParam(), 1); }
  void TearDown() override { unsetenv("PYCOMM_TRANSPORT"); }
};

TEST_P(RecvAny, TakesTheFirstMatchingMessageAndKeepsPairOrder) {
  MemStore store;
  std::vector<std::unique_ptr<Group>> g(3);
  runRanks(3, [&](int r) { g[r] = std::make_unique<Group>(store, r, 3, milliseconds(10000)); });
  ASSERT_EQ(g[0]->transportName(), std::string(GetParam()));
  // Rank 1 sends tag 5 at once; rank 2 sends tag 7 later. Rank 0 asks for tag 7 first:
  // rank 1's message is there first but is not for that receive.
  int fromOne = 1, fromTwo = 2, fromOneAgain = 11;
  auto s1 = g[1]->submitSend(0, &fromOne, sizeof(int), 5, {});
  auto s1b = g[1]->submitSend(0, &fromOneAgain, sizeof(int), 9, {});
  int a = 0, b = 0, c = 0;
  auto srcA = std::make_shared<std::atomic<int>>(-1);
  auto srcB = std::make_shared<std::atomic<int>>(-1);
  auto ra = g[0]->submitRecvAny(&a, sizeof(int), 7, srcA, {});
  auto rb = g[0]->submitRecvAny(&b, sizeof(int), 5, srcB, {});
  auto rc = g[0]->submitRecv(1, &c, sizeof(int), 9, {});  // named, after: the pair's next message
  std::this_thread::sleep_for(milliseconds(200));
  EXPECT_FALSE(ra->finished());
  auto s2 = g[2]->submitSend(0, &fromTwo, sizeof(int), 7, {});
  for (auto* x : {&ra, &rb, &rc, &s1, &s1b, &s2}) {
    ASSERT_TRUE((*x)->waitFor(10000));
    ASSERT_FALSE((*x)->error()) << messageOf([&] { std::rethrow_exception((*x)->error()); });
  }
  EXPECT_EQ(srcA->load(), 2);
  EXPECT_EQ(a, 2);
  EXPECT_EQ(srcB->load(), 1);
  EXPECT_EQ(b, 1);
  EXPECT_EQ(c, 11);
  runRanks(3, [&](int r) { g[r].reset(); });
}

TEST_P(RecvAny, NothingMatchingIsATimeoutNamingTheTag) {
  MemStore store;
  std::vector<std::unique_ptr<Group>> g(2);
  runRanks(2, [&](int r) { g[r] = std::make_unique<Group>(store, r, 2, milliseconds(300)); });
  int x = 0;
  auto src = std::make_shared<std::atomic<int>>(-1);
  auto t0 = std::chrono::steady_clock::now();
  auto rx = g[0]->submitRecvAny(&x, sizeof(int), 3, src, {});
  ASSERT_TRUE(rx->waitFor(5000));
  EXPECT_GE(std::chrono::steady_clock::now() - t0, milliseconds(300));
  ASSERT_TRUE(rx->error());
  EXPECT_NE(messageOf([&] { std::rethrow_exception(rx->error()); }).find("no message with tag 3"),
            std::string::npos);
  EXPECT_EQ(src->load(), -1);
  runRanks(2, [&](int r) { g[r].reset(); });
}

INSTANTIATE_TEST_SUITE_P(Transports, RecvAny, ::testing::Values("shm", "tcp"));

}  // namespace
}  // namespace pycomm
