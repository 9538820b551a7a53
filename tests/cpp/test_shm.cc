// Shared-memory transport and the collectives over it: ranks as threads of one
// process (cross-memory reads then target this process itself), rendezvous through
// a MemStore. Covers messaging, the one-shot / direct / ring all-reduce, mismatches
// (including sizes that must never size a copy), abort, timeouts and cleanup.
#include <dirent.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "algorithms/collectives.h"
#include "engine/group.h"
#include "test_util.h"
#include "transport/shm.h"
#include "transport/tcp.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::runRanks;
using Clock = std::chrono::steady_clock;

constexpr milliseconds kTimeout{20000};
constexpr char kPrefix[] = "grp0/shm/";

using testing::filled;
using testing::makeDesc;
using testing::matches;
using testing::messageOf;

std::vector<std::unique_ptr<ShmTransport>> makeShm(MemStore& store, int n,
                                                    const std::string& prefix = kPrefix) {
  return testing::makeTransports<ShmTransport>(store, prefix, n, kTimeout);
}

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// /dev/shm entries this process created (their names carry the creator's pid).
int ownSegments() {
  const std::string mine = "pycomm-" + std::to_string(getpid()) + "-";
  int n = 0;
  if (DIR* d = opendir("/dev/shm")) {
    while (struct dirent* e = readdir(d)) {
      if (strncmp(e->d_name, mine.c_str(), mine.size()) == 0) ++n;
    }
    closedir(d);
  }
  return n;
}

TEST(ShmTransport, SegmentIsUnlinkedOnceEveryRankMappedIt) {
  MemStore store;
  auto t = makeShm(store, 3);
  EXPECT_EQ(ownSegments(), 0);
  t.clear();
  EXPECT_EQ(ownSegments(), 0);
}

TEST(ShmTransport, SendRecvSizesWithContent) {
  MemStore store;
  auto t = makeShm(store, 2);
  const size_t sizes[] = {0, 1, 7, 4097, 64 * 1024 + 3, 3 << 20};
  runRanks(2, [&](int r) {
    uint64_t seq = 0;
    for (size_t n : sizes) {
      OpDesc d = makeDesc(CollType::kSend, ++seq, n);
      auto dl = Deadline::after(kTimeout);
      if (r == 0) {
        auto buf = filled(0, n);
        t[0]->send(1, buf.data(), n, d, dl);
      } else {
        std::vector<uint8_t> buf(n, 0);
        t[1]->recv(0, buf.data(), n, d, dl);
        EXPECT_TRUE(matches(buf, 0)) << n << " bytes";
      }
    }
  });
  EXPECT_EQ(t[0]->bytesSent(), t[1]->stats().bytesRecv.load());
}

class ShmRing : public ::testing::TestWithParam<int> {};

TEST_P(ShmRing, SendRecvRingStepDoesNotDeadlock) {
  const int n = GetParam();
  MemStore store;
  auto t = makeShm(store, n);
  runRanks(n, [&](int r) {
    const int next = (r + 1) % n, prev = (r + n - 1) % n;
    for (int step = 1; step <= 50; ++step) {
      const size_t bytes = 1000 + step * 97;
      auto out = filled(r, bytes);
      std::vector<uint8_t> in(bytes);
      t[r]->sendRecv(next, out.data(), bytes, prev, in.data(), bytes,
                     makeDesc(CollType::kAllGather, step, bytes), Deadline::after(kTimeout));
      ASSERT_TRUE(matches(in, prev)) << "step " << step;
    }
  });
}
INSTANTIATE_TEST_SUITE_P(Shm, ShmRing, ::testing::Values(2, 3, 5));

TEST(ShmTransport, FullDuplexFromTwoThreads) {
  // The backend's send and receive workers use one transport at once.
  MemStore store;
  auto t = makeShm(store, 2);
  const int kMsgs = 200;
  runRanks(4, [&](int w) {
    const int r = w / 2;
    const int peer = 1 - r;
    for (int i = 1; i <= kMsgs; ++i) {
      const size_t bytes = (i % 5) * 1000 + 1;
      OpDesc d = makeDesc(CollType::kSend, i, bytes);
      if (w % 2 == 0) {
        auto buf = filled(r, bytes);
        t[r]->send(peer, buf.data(), bytes, d, Deadline::after(kTimeout));
      } else {
        std::vector<uint8_t> buf(bytes);
        t[r]->recv(peer, buf.data(), bytes, d, Deadline::after(kTimeout));
        ASSERT_TRUE(matches(buf, peer));
      }
    }
  });
}

// ---- collectives over shm ----------------------------------------------------------------

struct AlgoCase {
  const char* algo;
  int ranks;
  size_t count;
};

class ShmAllReduce : public ::testing::TestWithParam<AlgoCase> {};

// Ranks alternate between the in-place and the out-of-place call (mixed within a call):
// the same bits either way, and the out-of-place input left untouched.
TEST_P(ShmAllReduce, SumIsExactAndBitwiseEqual) {
  const AlgoCase c = GetParam();
  MemStore store;
  auto t = makeShm(store, c.ranks);
  AlgoConfig cfg;
  cfg.algo = c.algo;
  std::vector<std::vector<float>> out(c.ranks);
  runRanks(c.ranks, [&](int r) {
    Collectives coll(*t[r], cfg);
    for (uint64_t it = 1; it <= 5; ++it) {
      std::vector<float> v(c.count);
      for (size_t i = 0; i < c.count; ++i) v[i] = static_cast<float>((i % 1000) + r * it);
      const OpDesc d = makeDesc(CollType::kAllReduce, it, c.count, DType::kFloat32);
      if ((r + it) % 2 == 1) {
        const std::vector<float> in = v;
        std::fill(v.begin(), v.end(), -1.0f);
        coll.allReduce(in.data(), v.data(), c.count, DType::kFloat32, ReduceOp::kSum, d, Deadline::after(kTimeout));
        for (size_t i = 0; i < c.count; ++i) {
          ASSERT_EQ(in[i], static_cast<float>((i % 1000) + r * it)) << "input changed at i=" << i;
        }
      } else {
        coll.allReduce(v.data(), c.count, DType::kFloat32, ReduceOp::kSum, d, Deadline::after(kTimeout));
      }
      const float rs = static_cast<float>(c.ranks * (c.ranks - 1) / 2 * it);
      for (size_t i = 0; i < c.count; ++i) {
        ASSERT_EQ(v[i], static_cast<float>(c.ranks * (i % 1000)) + rs) << "i=" << i;
      }
      out[r] = v;
    }
    if (std::string(c.algo) != "auto") {  // the forced algorithm ran, and no other
      for (const auto& [key, runs] : coll.stats()) {
        if (key.rfind("algo_all_reduce_", 0) == 0) {
          EXPECT_EQ(runs, key == std::string("algo_all_reduce_") + c.algo ? 5u : 0u) << key;
        }
      }
    }
  });
  for (int r = 1; r < c.ranks; ++r) {
    EXPECT_EQ(std::memcmp(out[0].data(), out[r].data(), c.count * sizeof(float)), 0);
  }
}
INSTANTIATE_TEST_SUITE_P(Shm, ShmAllReduce,
                         ::testing::Values(AlgoCase{"oneshot", 2, 1}, AlgoCase{"oneshot", 3, 1000},
                                           AlgoCase{"oneshot", 4, 16 * 1024},
                                           AlgoCase{"direct", 2, 3}, AlgoCase{"direct", 3, 100003},
                                           AlgoCase{"direct", 4, 1 << 20},
                                           AlgoCase{"ring", 3, 300001}, AlgoCase{"auto", 3, 77},
                                           AlgoCase{"auto", 3, 500000}));

TEST(ShmCollectives, BroadcastAllGatherReduceScatter) {
  const int n = 3;
  MemStore store;
  auto t = makeShm(store, n);
  runRanks(n, [&](int r) {
    Collectives coll(*t[r], AlgoConfig{});
    uint64_t seq = 0;
    // broadcast from each root
    for (int root = 0; root < n; ++root) {
      auto buf = r == root ? filled(root, 100000) : std::vector<uint8_t>(100000, 0);
      coll.broadcast(buf.data(), buf.size(), root,
                     [&] { auto d = makeDesc(CollType::kBroadcast, ++seq, 100000); d.root = root; return d; }(),
                     Deadline::after(kTimeout));
      ASSERT_TRUE(matches(buf, root));
    }
    // all_gather
    auto mine = filled(r, 5000);
    std::vector<uint8_t> all(5000 * n);
    coll.allGather(mine.data(), all.data(), 5000, makeDesc(CollType::kAllGather, ++seq, 5000),
                   Deadline::after(kTimeout));
    for (int p = 0; p < n; ++p) {
      ASSERT_TRUE(matches(std::vector<uint8_t>(all.begin() + p * 5000, all.begin() + (p + 1) * 5000), p));
    }
    // reduce_scatter of int32 ones: every element becomes n
    std::vector<int32_t> in(n * 1000, 1), o(1000, 0);
    coll.reduceScatter(in.data(), o.data(), 1000, DType::kInt32, ReduceOp::kSum,
                       makeDesc(CollType::kReduceScatter, ++seq, 1000, DType::kInt32),
                       Deadline::after(kTimeout));
    for (int32_t v : o) ASSERT_EQ(v, n);
  });
}

// ---- mismatches ---------------------------------------------------------------------------

TEST(ShmTransport, CountMismatchNamesBothRanksAndAbortsTheSender) {
  MemStore store;
  auto t = makeShm(store, 2);
  std::string recvMsg, sendMsg;
  runRanks(2, [&](int r) {
    std::vector<uint8_t> buf(40, 1);
    auto dl = Deadline::after(kTimeout);
    if (r == 0) {
      sendMsg = messageOf([&] { t[0]->send(1, buf.data(), 40, makeDesc(CollType::kAllReduce, 7, 10), dl); });
    } else {
      recvMsg = messageOf([&] { t[1]->recv(0, buf.data(), 40, makeDesc(CollType::kAllReduce, 7, 11), dl); });
    }
  });
  EXPECT_NE(recvMsg.find("mismatch between rank 1 and rank 0"), std::string::npos) << recvMsg;
  EXPECT_NE(recvMsg.find("count=10"), std::string::npos) << recvMsg;
  EXPECT_NE(recvMsg.find("count=11"), std::string::npos) << recvMsg;
  // The sender was waiting for its buffer to be consumed: the abort reaches it.
  EXPECT_NE(sendMsg.find("mismatch"), std::string::npos) << sendMsg;
}

// The shm equivalent of a length from the wire: a peer announcing more bytes than the
// receiver expects is a mismatch, and not a byte is copied.
TEST(ShmTransport, SizeMismatchNeverOverflows) {
  MemStore store;
  auto t = makeShm(store, 2);
  OpDesc d = makeDesc(CollType::kSend, 1, 0);
  auto small = std::make_unique<uint8_t[]>(16);
  std::memset(small.get(), 0x5a, 16);
  std::string msg, sendMsg;
  runRanks(2, [&](int r) {
    auto dl = Deadline::after(milliseconds(5000));
    if (r == 0) {
      auto big = filled(0, 1 << 20);
      sendMsg = messageOf([&] { t[0]->send(1, big.data(), big.size(), d, dl); });
    } else {
      msg = messageOf([&] { t[1]->recv(0, small.get(), 16, d, dl); });
    }
  });
  EXPECT_NE(msg.find("1048576"), std::string::npos) << msg;
  EXPECT_NE(msg.find("mismatch"), std::string::npos) << msg;
  EXPECT_FALSE(sendMsg.empty());
  for (int i = 0; i < 16; ++i) EXPECT_EQ(small[i], 0x5a);
  EXPECT_EQ(t[1]->stats().bytesRecv.load(), 0u);
}

TEST(ShmTransport, ShorterMessageThanExpectedIsMismatch) {
  MemStore store;
  auto t = makeShm(store, 2);
  OpDesc d = makeDesc(CollType::kSend, 1, 0);
  std::string msg;
  runRanks(2, [&](int r) {
    auto dl = Deadline::after(milliseconds(5000));
    if (r == 0) {
      uint8_t b[16] = {};
      messageOf([&] { t[0]->send(1, b, sizeof(b), d, dl); });
    } else {
      std::vector<uint8_t> big(1 << 20);
      msg = messageOf([&] { t[1]->recv(0, big.data(), big.size(), d, dl); });
    }
  });
  EXPECT_NE(msg.find("16 bytes"), std::string::npos) << msg;
}

// Every rank of a mismatched collective fails, whichever rank noticed first.
struct MismatchCase {
  const char* name;
  int ranks;
  bool tcp = false;  // the same calls over the TCP transport
};

class ShmCollectiveMismatch : public ::testing::TestWithParam<MismatchCase> {};

TEST_P(ShmCollectiveMismatch, EveryRankRaises) {
  const MismatchCase c = GetParam();
  const std::string what = c.name;
  MemStore store;
  auto t = testing::makeTransports(store, c.tcp, kPrefix, c.ranks, kTimeout);
  std::vector<std::string> msgs(c.ranks);
  auto start = Clock::now();
  runRanks(c.ranks, [&](int r) {
    Collectives coll(*t[r], AlgoConfig{});
    const bool odd = r == c.ranks - 1;  // the last rank differs
    msgs[r] = messageOf([&] {
     // As the engine does (Group::submitCollective): a failed collective aborts the
     // transport, so that the failure reaches every rank.
     try {
      auto dl = Deadline::after(kTimeout);
      if (what == "count_small" || what == "count_large") {
        size_t n = what == "count_small" ? 100 : 300000;
        if (odd) n += 1;
        std::vector<float> v(n, 1.0f);
        coll.allReduce(v.data(), n, DType::kFloat32, ReduceOp::kSum,
                       makeDesc(CollType::kAllReduce, 1, n, DType::kFloat32), dl);
      } else if (what == "dtype") {
        std::vector<int32_t> v(64, 1);
        DType dt = odd ? DType::kInt32 : DType::kFloat32;
        coll.allReduce(v.data(), 64, dt, ReduceOp::kSum, makeDesc(CollType::kAllReduce, 1, 64, dt), dl);
      } else if (what == "op") {
        std::vector<float> v(64, 1.0f);
        ReduceOp op = odd ? ReduceOp::kMax : ReduceOp::kSum;
        OpDesc d = makeDesc(CollType::kAllReduce, 1, 64, DType::kFloat32);
        d.op = op;
        coll.allReduce(v.data(), 64, DType::kFloat32, op, d, dl);
      } else if (what == "root") {
        std::vector<uint8_t> v(1000, static_cast<uint8_t>(r));
        int root = odd ? 1 : 0;
        OpDesc d = makeDesc(CollType::kBroadcast, 1, 1000);
        d.root = root;
        coll.broadcast(v.data(), v.size(), root, d, dl);
      } else if (what == "gather") {
        // The odd rank posts a direct record; the others use mailboxes: they never meet
        // in one place, and only the published calls of stuck ranks show the mismatch.
        std::vector<float> v(64, 1.0f), all(64 * c.ranks);
        if (odd) {
          coll.allReduce(v.data(), 64, DType::kFloat32, ReduceOp::kSum,
                         makeDesc(CollType::kAllReduce, 1, 64, DType::kFloat32), dl);
        } else {
          OpDesc d = makeDesc(CollType::kGather, 1, 256);
          d.root = 0;
          coll.gather(v.data(), all.data(), 256, 0, d, dl);
        }
      } else if (what == "coll") {
        std::vector<float> v(64, 1.0f);
        if (odd) {
          OpDesc d = makeDesc(CollType::kBroadcast, 1, 256);
          d.root = 0;
          coll.broadcast(v.data(), 256, 0, d, dl);
        } else {
          coll.allReduce(v.data(), 64, DType::kFloat32, ReduceOp::kSum,
                         makeDesc(CollType::kAllReduce, 1, 64, DType::kFloat32), dl);
        }
      }
      // A rank whose part of the call never involved the odd rank may complete it;
      // its next call must fail with the mismatch then.
      coll.barrier(makeDesc(CollType::kBarrier, 2, 0), dl);
     } catch (const Error& e) {
      t[r]->abort(e.what());
      throw;
     }
    });
  });
  for (int r = 0; r < c.ranks; ++r) {
    EXPECT_NE(msgs[r].find("mismatch"), std::string::npos) << what << " rank " << r << ": " << msgs[r];
  }
  EXPECT_LT(since(start), 5.0);
}
INSTANTIATE_TEST_SUITE_P(Shm, ShmCollectiveMismatch,
                         ::testing::Values(MismatchCase{"count_small", 2}, MismatchCase{"count_small", 3},
                                           MismatchCase{"count_large", 3}, MismatchCase{"dtype", 3},
                                           MismatchCase{"op", 3}, MismatchCase{"root", 2},
                                           MismatchCase{"root", 3}, MismatchCase{"coll", 3},
                                           MismatchCase{"gather", 3},
                                           // Over TCP the mismatched ranks below never exchange
                                           // data directly: only status frames reveal it.
                                           MismatchCase{"coll", 3, true}, MismatchCase{"gather", 3, true},
                                           MismatchCase{"root", 3, true}, MismatchCase{"op", 3, true},
                                           MismatchCase{"count_large", 3, true}),
                         [](const auto& info) {
                           return std::string(info.param.tcp ? "tcp_" : "") + info.param.name + "_" +
                                  std::to_string(info.param.ranks);
                         });

// ---- abort and timeouts ----------------------------------------------------------------------

TEST(ShmTransport, AbortReachesEveryWaiter) {
  MemStore store;
  auto t = makeShm(store, 3);
  std::vector<std::string> msgs(3);
  std::vector<double> waited(3, 0);
  runRanks(3, [&](int r) {
    uint8_t b[8];
    auto start = Clock::now();
    if (r == 0) {
      std::this_thread::sleep_for(milliseconds(200));
      t[0]->abort("loss went NaN");
      return;
    }
    // Rank 1 waits on rank 0 (the aborting rank), rank 2 on rank 1 (a bystander).
    msgs[r] = messageOf([&] {
      t[r]->recv(r - 1, b, sizeof(b), makeDesc(CollType::kBarrier, 1, 0), Deadline::after(kTimeout));
    });
    waited[r] = since(start);
  });
  for (int r = 1; r < 3; ++r) {
    EXPECT_NE(msgs[r].find("loss went NaN"), std::string::npos) << msgs[r];
    EXPECT_LT(waited[r], 3.0);
  }
  uint8_t b[1] = {};
  EXPECT_THROW(t[0]->send(1, b, 1, OpDesc{}, Deadline::after(kTimeout)), PeerError);
  EXPECT_THROW(t[2]->recv(0, b, 1, OpDesc{}, Deadline::after(kTimeout)), PeerError);
}

TEST(ShmTransport, TimeoutNamesPeerAndCall) {
  MemStore store;
  auto t = makeShm(store, 2);
  uint8_t b[4] = {};
  OpDesc d = makeDesc(CollType::kAllReduce, 7, 1);
  auto start = Clock::now();
  std::string msg;
  try {
    t[1]->recv(0, b, sizeof(b), d, Deadline::after(milliseconds(300)));
  } catch (const TimeoutError& e) {
    msg = e.what();
  }
  const double waited = since(start);
  EXPECT_NE(msg.find("rank 1 timed out waiting for rank 0 in all_reduce #7"), std::string::npos) << msg;
  EXPECT_GE(waited, 0.29);
  EXPECT_LT(waited, 2.0);
}

TEST(ShmCollectives, TimeoutOfACollectiveNamesTheMissingRank) {
  MemStore store;
  auto t = makeShm(store, 3);
  std::vector<std::string> msgs(3);
  runRanks(2, [&](int r) {  // rank 2 never calls
    Collectives coll(*t[r], AlgoConfig{});
    std::vector<float> v(1 << 18, 1.0f);
    msgs[r] = messageOf([&] {
      coll.allReduce(v.data(), v.size(), DType::kFloat32, ReduceOp::kSum,
                     makeDesc(CollType::kAllReduce, 4, v.size(), DType::kFloat32),
                     Deadline::after(milliseconds(400)));
    });
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(msgs[r].find("timed out waiting for rank 2 in all_reduce #4"), std::string::npos) << msgs[r];
  }
}

// ---- the engine's group over shm ----------------------------------------------------------

TEST(ShmGroup, RebuiltOnTheSameStoreAndFailedCollectiveAbortsEveryRank) {
  setenv("PYCOMM_TRANSPORT", "shm", 1);
  MemStore store;  // reused by every generation, as torch reuses its store prefix
  for (int gen = 0; gen < 3; ++gen) {
    std::vector<std::unique_ptr<Group>> g(3);
    runRanks(3, [&](int r) { g[r] = std::make_unique<Group>(store, r, 3, milliseconds(5000)); });
    EXPECT_EQ(g[0]->transportName(), "shm");
    std::vector<float> v[3];
    std::vector<std::shared_ptr<Completion>> c(3);
    for (int r = 0; r < 3; ++r) {
      v[r].assign(1000, 1.0f);
      const uint64_t seq = g[r]->nextSeq();
      float* p = v[r].data();
      c[r] = g[r]->submitCollective(false, [p, seq](Collectives& cs, const Deadline& dl) {
        cs.allReduce(p, 1000, DType::kFloat32, ReduceOp::kSum,
                     makeDesc(CollType::kAllReduce, seq, 1000, DType::kFloat32), dl);
      });
    }
    for (int r = 0; r < 3; ++r) {
      ASSERT_TRUE(c[r]->waitFor(10000));
      ASSERT_FALSE(c[r]->error());
      ASSERT_EQ(v[r][999], 3.0f);
    }
    if (gen == 2) {
      // Rank 2 runs a different count: all three completions fail with the mismatch.
      for (int r = 0; r < 3; ++r) {
        const uint64_t seq = g[r]->nextSeq();
        float* p = v[r].data();
        size_t n = r == 2 ? 999 : 1000;
        c[r] = g[r]->submitCollective(false, [p, seq, n](Collectives& cs, const Deadline& dl) {
          cs.allReduce(p, n, DType::kFloat32, ReduceOp::kSum,
                       makeDesc(CollType::kAllReduce, seq, n, DType::kFloat32), dl);
        });
      }
      for (int r = 0; r < 3; ++r) {
        ASSERT_TRUE(c[r]->waitFor(10000));
        ASSERT_TRUE(c[r]->error());
        EXPECT_NE(messageOf([&] { std::rethrow_exception(c[r]->error()); }).find("mismatch"),
                  std::string::npos);
      }
    }
    runRanks(3, [&](int r) { g[r].reset(); });
  }
  unsetenv("PYCOMM_TRANSPORT");
  EXPECT_EQ(ownSegments(), 0);
}

}  // namespace
}  // namespace pycomm
