// The flight recorder's ring buffer (engine/flight_recorder.h) and its hooks in Group.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "engine/flight_recorder.h"
#include "engine/group.h"
#include "test_util.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::runRanks;

OpDesc desc(CollType c, uint64_t seq, uint64_t count, DType dt = DType::kFloat32) {
  OpDesc d;
  d.coll = c;
  d.seq = seq;
  d.count = count;
  d.dtype = dt;
  return d;
}

TEST(FlightRecorder, RecordsStatesAndCountsOfEachCollective) {
  FlightRecorder fr(8);
  FlightRecorder::setNextGroupInfo({"7", "tp", {4, 6, 9}});
  const int g = fr.addGroup(1, 3);
  const uint64_t a = fr.recordCollective(g, 3, desc(CollType::kAllReduce, 1, 5), 3000);
  const uint64_t b = fr.recordCollective(g, 3, desc(CollType::kAllGather, 2, 5, DType::kInt64), 3000);
  const uint64_t c = fr.recordCollective(g, 3, desc(CollType::kReduceScatter, 3, 2), 3000);
  const uint64_t s = fr.recordP2P(g, true, 2, 40, 3000);
  fr.started(a);
  fr.finished(a, true);
  fr.started(b);
  fr.finished(b, false);  // failed: stays started, retired
  fr.started(s);
  FlightSnapshot snap = fr.snapshot("why");
  EXPECT_EQ(snap.reason, "why");
  EXPECT_EQ(snap.globalRank, 6);  // group rank 1 of ranks {4, 6, 9}
  ASSERT_EQ(snap.groups.size(), 1u);
  EXPECT_EQ(snap.groups[0].name, "7");
  EXPECT_EQ(snap.groups[0].desc, "tp");
  EXPECT_EQ(snap.groups[0].lastEnqueued, 3u);
  EXPECT_EQ(snap.groups[0].lastStarted, 2u);
  EXPECT_EQ(snap.groups[0].lastCompleted, 1u);
  ASSERT_EQ(snap.entries.size(), 4u);
  const FlightEntry& e0 = snap.entries[0];
  EXPECT_EQ(e0.recordId, a);
  EXPECT_EQ(e0.collSeq, 1u);
  EXPECT_EQ(e0.state, FlightEntry::State::kCompleted);
  EXPECT_TRUE(e0.retired);
  EXPECT_GT(e0.createdNs, 0);
  EXPECT_GE(e0.startedNs, e0.createdNs);
  EXPECT_GE(e0.completedNs, e0.startedNs);
  EXPECT_EQ(e0.inCount, 5u);
  EXPECT_EQ(e0.outCount, 5u);
  EXPECT_EQ(e0.timeoutMs, 3000);
  const FlightEntry& e1 = snap.entries[1];
  EXPECT_EQ(e1.state, FlightEntry::State::kStarted);
  EXPECT_TRUE(e1.retired);
  EXPECT_EQ(e1.completedNs, 0);
  EXPECT_EQ(e1.dtype, DType::kInt64);
  EXPECT_EQ(e1.inCount, 5u);
  EXPECT_EQ(e1.outCount, 15u);  // all_gather: count x 3 ranks out
  const FlightEntry& e2 = snap.entries[2];
  EXPECT_EQ(e2.recordId, c);
  EXPECT_EQ(e2.state, FlightEntry::State::kScheduled);
  EXPECT_FALSE(e2.retired);
  EXPECT_EQ(e2.inCount, 6u);  // reduce_scatter: count x 3 ranks in
  EXPECT_EQ(e2.outCount, 2u);
  const FlightEntry& e3 = snap.entries[3];
  EXPECT_TRUE(e3.isP2P);
  EXPECT_TRUE(e3.isSend);
  EXPECT_EQ(e3.peer, 2);
  EXPECT_EQ(e3.p2pSeq, 1u);
  EXPECT_EQ(e3.collSeq, 3u);  // the last collective's, as torch records p2p
  EXPECT_EQ(e3.inCount, 40u);
}

TEST(FlightRecorder, RingKeepsTheLastEntriesAndIgnoresOverwrittenIds) {
  FlightRecorder fr(3);
  const int g = fr.addGroup(0, 2);  // unnamed: "pycomm_0", ranks 0..1
  std::vector<uint64_t> ids;
  for (uint64_t seq = 1; seq <= 7; ++seq) ids.push_back(fr.recordCollective(g, 2, desc(CollType::kBroadcast, seq, 1), 10));
  fr.finished(ids[0], true);  // long overwritten: no effect on its slot's new owner
  FlightSnapshot snap = fr.snapshot("");
  EXPECT_EQ(snap.groups[0].name, "pycomm_0");
  EXPECT_EQ(snap.groups[0].ranks, (std::vector<int>{0, 1}));
  ASSERT_EQ(snap.entries.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(snap.entries[i].collSeq, 5 + i);
    EXPECT_EQ(snap.entries[i].recordId, 4 + i);
    EXPECT_EQ(snap.entries[i].state, FlightEntry::State::kScheduled);
  }
}

TEST(FlightRecorder, OffRecordsNothingAndWriterRunsOncePerFailedGroup) {
  FlightRecorder off(0);
  const int g0 = off.addGroup(0, 1);
  EXPECT_EQ(off.recordCollective(g0, 1, desc(CollType::kAllReduce, 1, 1), 1), UINT64_MAX);
  EXPECT_TRUE(off.snapshot("").entries.empty());
  EXPECT_EQ(off.dump("x"), "");

  FlightRecorder fr(4);
  const int g = fr.addGroup(0, 2);
  const int h = fr.addGroup(1, 2);
  EXPECT_EQ(fr.dump("no writer"), "");
  std::vector<std::string> reasons;
  fr.setWriter([&](const FlightSnapshot& s, const std::string& path) {
    reasons.push_back(s.reason);
    return path.empty() ? std::string("default") : path;
  });
  fr.recordCollective(g, 2, desc(CollType::kAllReduce, 1, 1), 1);
  EXPECT_EQ(fr.dump("asked", "/some/file"), "/some/file");
  fr.onGroupError(g, "timeout");
  fr.onGroupError(g, "the abort that followed");
  fr.onGroupError(h, "other group");
  EXPECT_EQ(reasons, (std::vector<std::string>{"asked", "timeout", "other group"}));
}

TEST(FlightRecorder, GroupRecordsCollectivesAndPointToPointOps) {
  setenv("PYCOMM_TRANSPORT", "tcp", 1);
  MemStore store;
  std::vector<std::unique_ptr<Group>> g(2);
  runRanks(2, [&](int r) { g[r] = std::make_unique<Group>(store, r, 2, milliseconds(5000)); });
  FlightRecorder& fr = FlightRecorder::get();
  const uint64_t before = fr.snapshot("").entries.empty() ? 0 : fr.snapshot("").entries.back().recordId + 1;
  std::vector<float> v[2];
  std::vector<std::shared_ptr<Completion>> c(2);
  uint64_t seqs[2];
  for (int r = 0; r < 2; ++r) {
    v[r].assign(7, 1.0f);
    seqs[r] = g[r]->nextSeq();
    float* p = v[r].data();
    const OpDesc d = desc(CollType::kAllReduce, seqs[r], 7);
    c[r] = g[r]->submitCollective(
        false, [p, d](Collectives& cs, const Deadline& dl) { cs.allReduce(p, 7, DType::kFloat32, ReduceOp::kSum, d, dl); },
        d);
  }
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(c[r]->waitFor(10000) && !c[r]->error());
  auto s = g[0]->submitSend(1, v[0].data(), 28, 0, nullptr);
  auto rcv = g[1]->submitRecv(0, v[1].data(), 28, 0, nullptr);
  ASSERT_TRUE(s->waitFor(10000) && !s->error());
  ASSERT_TRUE(rcv->waitFor(10000) && !rcv->error());
  FlightSnapshot snap = fr.snapshot("");
  int colls = 0, sends = 0, recvs = 0;
  for (const FlightEntry& e : snap.entries) {
    if (e.recordId < before) continue;
    EXPECT_EQ(e.state, FlightEntry::State::kCompleted);
    EXPECT_TRUE(e.retired);
    if (e.isP2P) {
      (e.isSend ? sends : recvs) += 1;
      EXPECT_EQ(e.inCount, 28u);
    } else {
      ++colls;
      EXPECT_EQ(e.coll, CollType::kAllReduce);
      EXPECT_EQ(e.inCount, 7u);
      EXPECT_EQ(e.timeoutMs, 5000);
    }
  }
  EXPECT_EQ(colls, 2);  // one per rank (the ranks are threads of this process)
  EXPECT_EQ(sends, 1);
  EXPECT_EQ(recvs, 1);
  runRanks(2, [&](int r) { g[r].reset(); });
  unsetenv("PYCOMM_TRANSPORT");
}

}  // namespace
}  // namespace pycomm
