// Groups spanning several hosts with several ranks on some, ranks as threads: the
// mixed transport (shared memory between co-located ranks, TCP otherwise), the flat
// algorithms over it, and the hierarchical all-reduce, checked against float64
// references computed here, on layouts 2+2, 2+1+1, 3+2 and 1+2.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "algorithms/collectives.h"
#include "core/error.h"
#include "core/topology.h"
#include "test_util.h"
#include "transport/mixed.h"
#include "transport/shm.h"
#include "transport/subset.h"
#include "transport/tcp.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::runRanks;

constexpr milliseconds kTimeout{30000};

// One rank's transport as the engine builds it for a multi-host group.
struct RankTransport {
  std::unique_ptr<Transport> t;
  Transport* local = nullptr;
  Transport* tcp = nullptr;  // the TCP part (bytes over this rank's host link)
};

RankTransport makeMixed(MemStore& store, const Topology& topo, int rank, milliseconds timeout = kTimeout) {
  const int n = static_cast<int>(topo.hostOf.size());
  const int host = topo.hostOf[rank];
  const auto mine = topo.ranksOn(host);
  RankTransport out;
  std::unique_ptr<Transport> local;
  if (mine.size() > 1) {
    local = std::make_unique<ShmTransport>(store, "s" + std::to_string(host) + "/", topo.localIndex(rank),
                                           static_cast<int>(mine.size()), timeout);
  }
  auto tcp = std::make_unique<TcpTransport>(store, "t/", rank, n, timeout);
  out.tcp = tcp.get();
  if (local) {
    out.local = local.get();
    out.t = std::make_unique<MixedTransport>(mine, std::move(local), std::move(tcp));
  } else {
    out.t = std::move(tcp);
  }
  return out;
}

double value(int rank, size_t i) { return static_cast<double>((rank * 31 + i * 7) % 17) - 8.0 + 0.25 * rank; }

AlgoConfig config(const std::string& algo, size_t hierChunkBytes = 8192) {
  AlgoConfig c;
  c.algo = algo;
  c.segmentBytes = 4096;            // several segments per ring step even for small test buffers
  c.hierChunkBytes = hierChunkBytes;  // pipelined hierarchical all-reduce from 2 chunks on
  return c;
}

const std::vector<size_t> kCounts = {0, 1, 2, 3, 7, 13, 1009, 40009};

class Layouts : public ::testing::TestWithParam<std::vector<int>> {};

TEST(Topology, HostsLocalIndexAndShards) {
  const Topology t = Topology::fromKeys({"a", "a", "b", "c", "a"});
  EXPECT_EQ(t.hostOf, (std::vector<int>{0, 0, 1, 2, 0}));
  EXPECT_EQ(t.numHosts(), 3);
  EXPECT_EQ(t.ranksOn(0), (std::vector<int>{0, 1, 4}));
  EXPECT_EQ(t.localIndex(4), 2);
  EXPECT_EQ(t.localIndex(3), 0);
  EXPECT_EQ(t.minPerHost(), 1);
  EXPECT_EQ(t.maxPerHost(), 3);
  EXPECT_TRUE(t.hierarchical());
  EXPECT_EQ(t.str(), "3 hosts: [0 1 4] [2] [3]");
  EXPECT_FALSE(Topology::fromKeys({"a", "b"}).hierarchical());
  EXPECT_FALSE(Topology::fromKeys({"a", "a"}).hierarchical());
  EXPECT_FALSE(Topology().hierarchical());
}

TEST_P(Layouts, HierarchicalAllReduceMatchesFloat64Reference) {
  const Topology topo{GetParam()};
  const int n = static_cast<int>(topo.hostOf.size());
  MemStore store;
  const ReduceOp ops[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax};
  runRanks(n, [&](int r) {
    RankTransport rt = makeMixed(store, topo, r);
    // Pipelined (small chunks) and one chunk at a time.
    Collectives piped(*rt.t, config("hier"), topo, rt.local);
    Collectives whole(*rt.t, config("hier", size_t{1} << 30), topo, rt.local);
    uint64_t seq = 0;
    for (size_t count : kCounts) for (Collectives* cp : {&piped, &whole}) {
      Collectives& hier = *cp;
      for (ReduceOp op : ops) {
        std::vector<float> x(count);
        for (size_t i = 0; i < count; ++i) x[i] = static_cast<float>(value(r, i));
        OpDesc d = testing::makeDesc(CollType::kAllReduce, ++seq, count, DType::kFloat32);
        d.op = op;
        hier.allReduce(x.data(), count, DType::kFloat32, op, d, Deadline::after(kTimeout));
        for (size_t i = 0; i < count; ++i) {
          double ref = op == ReduceOp::kMax ? -1e300 : 0.0;
          for (int p = 0; p < n; ++p) ref = op == ReduceOp::kMax ? std::max(ref, value(p, i)) : ref + value(p, i);
          if (op == ReduceOp::kAvg) ref /= n;
          ASSERT_NEAR(x[i], ref, 1e-5 * (1 + std::fabs(ref))) << "rank " << r << " count " << count << " i " << i
                                                              << " op " << reduceOpName(op);
        }
      }
      // float64 SUM, and every rank holds the same bits.
      std::vector<double> y(count);
      for (size_t i = 0; i < count; ++i) y[i] = value(r, i) / 3.0;
      OpDesc d = testing::makeDesc(CollType::kAllReduce, ++seq, count, DType::kFloat64);
      hier.allReduce(y.data(), count, DType::kFloat64, ReduceOp::kSum, d, Deadline::after(kTimeout));
      std::vector<double> all(count * n);
      OpDesc g = testing::makeDesc(CollType::kAllGather, ++seq, count * 8);
      hier.allGather(y.data(), all.data(), count * 8, g, Deadline::after(kTimeout));
      for (int p = 0; p < n; ++p) {
        if (count) {
          ASSERT_EQ(0, memcmp(all.data() + p * count, y.data(), count * 8)) << "rank " << p << " differs, count " << count;
        }
      }
      for (size_t i = 0; i < count; ++i) {
        double ref = 0;
        for (int p = 0; p < n; ++p) ref += value(p, i) / 3.0;
        ASSERT_NEAR(y[i], ref, 1e-12 * (1 + std::fabs(ref)));
      }
    }
    EXPECT_EQ(piped.stats().at("algo_all_reduce_hier"), kCounts.size() * 4);
    EXPECT_EQ(whole.stats().at("algo_all_reduce_hier"), kCounts.size() * 4);
  });
}

TEST_P(Layouts, HierarchicalReduceScatterAndAllGather) {
  const Topology topo{GetParam()};
  const int n = static_cast<int>(topo.hostOf.size());
  // Hierarchical when every host holds two or more ranks (equal or not: 2+2, 3+2); with a
  // host of one rank (2+1+1, 1+2) the flat ring, already at that host link's bound.
  const bool hier = topo.minPerHost() >= 2;
  // Bytes each rank sent over TCP (its host's link) in the largest calls.
  std::vector<uint64_t> rsSent(n, 0), agSent(n, 0);
  const size_t largest = kCounts.back();
  MemStore store;
  runRanks(n, [&](int r) {
    RankTransport rt = makeMixed(store, topo, r);
    Collectives c(*rt.t, config("hier"), topo, rt.local);
    uint64_t seq = 0;
    auto dl = [] { return Deadline::after(kTimeout); };
    for (size_t count : kCounts) {
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
        std::vector<double> in(count * n), out(count);
        for (size_t i = 0; i < in.size(); ++i) in[i] = value(r, i);
        OpDesc d = testing::makeDesc(CollType::kReduceScatter, ++seq, count * n, DType::kFloat64);
        d.op = op;
        const uint64_t before = rt.tcp->bytesSent();
        c.reduceScatter(in.data(), out.data(), count, DType::kFloat64, op, d, dl());
        if (count == largest) rsSent[r] += rt.tcp->bytesSent() - before;
        for (size_t i = 0; i < count; ++i) {
          double ref = 0;
          for (int p = 0; p < n; ++p) ref += value(p, r * count + i);
          if (op == ReduceOp::kAvg) ref /= n;
          ASSERT_NEAR(out[i], ref, 1e-9) << "rank " << r << " count " << count << " i " << i;
        }
      }
      // all_gather, in place (this rank's block inside the output) and out of place.
      std::vector<float> all(count * n, -1.0f);
      for (size_t i = 0; i < count; ++i) all[r * count + i] = static_cast<float>(value(r, i));
      const uint64_t before = rt.tcp->bytesSent();
      c.allGather(all.data() + r * count, all.data(), count * 4,
                  testing::makeDesc(CollType::kAllGather, ++seq, count * n), dl());
      std::vector<float> mine(count), all2(count * n);
      for (size_t i = 0; i < count; ++i) mine[i] = static_cast<float>(value(r, i));
      c.allGather(mine.data(), all2.data(), count * 4, testing::makeDesc(CollType::kAllGather, ++seq, count * n), dl());
      if (count == largest) agSent[r] += rt.tcp->bytesSent() - before;
      for (int p = 0; p < n; ++p) {
        for (size_t i = 0; i < count; ++i) {
          ASSERT_EQ(all[p * count + i], static_cast<float>(value(p, i))) << "rank " << r << " block " << p;
          ASSERT_EQ(all2[p * count + i], static_cast<float>(value(p, i))) << "rank " << r << " block " << p;
        }
      }
    }
    const auto s = c.stats();
    EXPECT_EQ(s.at("algo_reduce_scatter_hier"), hier ? kCounts.size() * 2 : 0u);
    EXPECT_EQ(s.at("algo_all_gather_hier"), hier ? kCounts.size() * 2 : 0u);
  });
  // No host link carries more than the busiest one must: (n - L_min)/n of the buffer
  // (two calls of `largest` elements per rank each). Hierarchical, every host sends
  // exactly its own bound for reduce_scatter: its contribution to blocks owned elsewhere.
  const size_t lmin = static_cast<size_t>(topo.minPerHost());
  for (int h = 0; h < topo.numHosts(); ++h) {
    uint64_t rs = 0, ag = 0;
    for (int r : topo.ranksOn(h)) rs += rsSent[r], ag += agSent[r];
    const size_t others = static_cast<size_t>(n) - topo.ranksOn(h).size();
    EXPECT_LE(rs, 2 * (n - lmin) * largest * 8) << "host " << h;
    EXPECT_LE(ag, 2 * (n - lmin) * largest * 4) << "host " << h;
    if (hier) EXPECT_EQ(rs, 2 * others * largest * 8) << "host " << h;
  }
}

TEST_P(Layouts, AutoPicksHierarchicalForLargeCallsOnly) {
  const Topology topo{GetParam()};
  const int n = static_cast<int>(topo.hostOf.size());
  MemStore store;
  runRanks(n, [&](int r) {
    RankTransport rt = makeMixed(store, topo, r);
    Collectives c(*rt.t, config("auto"), topo, rt.local);
    for (size_t count : {size_t{4}, size_t{1} << 16}) {
      std::vector<float> x(count, 1.0f);
      OpDesc d = testing::makeDesc(CollType::kAllReduce, count, count, DType::kFloat32);
      c.allReduce(x.data(), count, DType::kFloat32, ReduceOp::kSum, d, Deadline::after(kTimeout));
      for (float v : x) ASSERT_EQ(v, static_cast<float>(n));
    }
    const auto s = c.stats();
    EXPECT_EQ(s.at("algo_all_reduce_hier"), 1u);
    EXPECT_EQ(s.at("algo_all_reduce_hier_rd"), 1u);
    EXPECT_EQ(s.at("algo_all_reduce_rd"), 0u);
  });
}

// Broadcast and reduce from every root, pipelined (small chunks) and whole, and the
// small-message all-reduce (recursive doubling among host leaders), against float64
// references; the counters show the hierarchical algorithms ran.
TEST_P(Layouts, HierarchicalBroadcastReduceAndSmallAllReduce) {
  const Topology topo{GetParam()};
  const int n = static_cast<int>(topo.hostOf.size());
  MemStore store;
  const std::vector<size_t> counts = {0, 1, 3, 13, 1009, 40009};
  runRanks(n, [&](int r) {
    RankTransport rt = makeMixed(store, topo, r);
    Collectives piped(*rt.t, config("auto"), topo, rt.local);
    Collectives whole(*rt.t, config("hier", size_t{1} << 30), topo, rt.local);
    uint64_t seq = 0;
    auto dl = [] { return Deadline::after(kTimeout); };
    size_t rooted = 0;
    for (size_t count : counts) for (Collectives* cp : {&piped, &whole}) {
      Collectives& c = *cp;
      for (int root = 0; root < n; ++root) {
        std::vector<uint8_t> b = r == root ? testing::filled(root, count * 3) : std::vector<uint8_t>(count * 3, 0);
        OpDesc bd = testing::makeDesc(CollType::kBroadcast, ++seq, count * 3);
        bd.root = root;
        c.broadcast(b.data(), count * 3, root, bd, dl());
        ASSERT_TRUE(testing::matches(b, root)) << "rank " << r << " root " << root << " bytes " << count * 3;
        for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
          std::vector<double> y(count);
          for (size_t i = 0; i < count; ++i) y[i] = value(r, i) / 3.0;
          OpDesc rd = testing::makeDesc(CollType::kReduce, ++seq, count, DType::kFloat64);
          rd.root = root;
          rd.op = op;
          c.reduce(y.data(), count, DType::kFloat64, op, root, rd, dl());
          for (size_t i = 0; i < count; ++i) {
            double ref = op == ReduceOp::kMax ? -1e300 : 0.0;
            for (int p = 0; p < n; ++p) ref = op == ReduceOp::kMax ? std::max(ref, value(p, i) / 3.0) : ref + value(p, i) / 3.0;
            if (op == ReduceOp::kAvg) ref /= n;
            ASSERT_NEAR(y[i], r == root ? ref : value(r, i) / 3.0, 1e-12 * (1 + std::fabs(ref)))
                << "rank " << r << " root " << root << " count " << count << " op " << reduceOpName(op);
          }
        }
        ++rooted;
      }
      if (count * 4 > 64 * 1024) continue;
      // Small all-reduce (auto: below the small-message threshold).
      for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin}) {
        std::vector<float> x(count);
        for (size_t i = 0; i < count; ++i) x[i] = static_cast<float>(value(r, i));
        OpDesc d = testing::makeDesc(CollType::kAllReduce, ++seq, count, DType::kFloat32);
        d.op = op;
        c.allReduce(x.data(), count, DType::kFloat32, op, d, dl());
        for (size_t i = 0; i < count; ++i) {
          double ref = op == ReduceOp::kMin ? 1e300 : 0.0;
          for (int p = 0; p < n; ++p) ref = op == ReduceOp::kMin ? std::min(ref, value(p, i)) : ref + value(p, i);
          if (op == ReduceOp::kAvg) ref /= n;
          ASSERT_NEAR(x[i], ref, 1e-5 * (1 + std::fabs(ref))) << "rank " << r << " count " << count;
        }
      }
    }
    const auto a = piped.stats();
    const auto w = whole.stats();
    EXPECT_EQ(a.at("algo_broadcast_hier") + w.at("algo_broadcast_hier"), rooted);
    EXPECT_EQ(a.at("algo_reduce_hier") + w.at("algo_reduce_hier"), rooted * 3);
    EXPECT_EQ(a.at("algo_broadcast_chain") + a.at("algo_reduce_chain") + a.at("algo_reduce_all_reduce"), 0u);
    EXPECT_EQ(a.at("algo_all_reduce_hier_rd"), (counts.size() - 1) * 3);  // auto: small calls
    EXPECT_EQ(a.at("algo_all_reduce_rd"), 0u);
    EXPECT_EQ(w.at("algo_all_reduce_hier"), (counts.size() - 1) * 3);  // PYCOMM_ALGO=hier: the bandwidth scheme
  });
}

// PYCOMM_ALGO=hier_rd forces the leaders' recursive doubling at any size.
TEST_P(Layouts, ForcedHierRd) {
  const Topology topo{GetParam()};
  const int n = static_cast<int>(topo.hostOf.size());
  MemStore store;
  runRanks(n, [&](int r) {
    RankTransport rt = makeMixed(store, topo, r);
    Collectives c(*rt.t, config("hier_rd"), topo, rt.local);
    uint64_t seq = 0;
    for (size_t count : {size_t{2}, size_t{40009}}) {
      std::vector<double> x(count);
      for (size_t i = 0; i < count; ++i) x[i] = value(r, i);
      c.allReduce(x.data(), count, DType::kFloat64, ReduceOp::kSum,
                  testing::makeDesc(CollType::kAllReduce, ++seq, count, DType::kFloat64), Deadline::after(kTimeout));
      for (size_t i = 0; i < count; ++i) {
        double ref = 0;
        for (int p = 0; p < n; ++p) ref += value(p, i);
        ASSERT_NEAR(x[i], ref, 1e-9);
      }
    }
    EXPECT_EQ(c.stats().at("algo_all_reduce_hier_rd"), 2u);
  });
}

TEST_P(Layouts, FlatCollectivesOverTheMixedTransport) {
  const Topology topo{GetParam()};
  const int n = static_cast<int>(topo.hostOf.size());
  MemStore store;
  runRanks(n, [&](int r) {
    RankTransport rt = makeMixed(store, topo, r);
    Collectives c(*rt.t, config("ring"), topo, rt.local);
    uint64_t seq = 0;
    auto dl = [] { return Deadline::after(kTimeout); };
    for (size_t count : {size_t{0}, size_t{1}, size_t{13}, size_t{4099}}) {
      // ring all-reduce
      std::vector<double> x(count);
      for (size_t i = 0; i < count; ++i) x[i] = value(r, i);
      c.allReduce(x.data(), count, DType::kFloat64, ReduceOp::kSum,
                  testing::makeDesc(CollType::kAllReduce, ++seq, count, DType::kFloat64), dl());
      for (size_t i = 0; i < count; ++i) {
        double ref = 0;
        for (int p = 0; p < n; ++p) ref += value(p, i);
        ASSERT_NEAR(x[i], ref, 1e-9);
      }
      // reduce_scatter: block b of rank p's input is value(p, b * count + i)
      std::vector<double> in(count * n), out(count);
      for (size_t i = 0; i < in.size(); ++i) in[i] = value(r, i);
      c.reduceScatter(in.data(), out.data(), count, DType::kFloat64, ReduceOp::kSum,
                      testing::makeDesc(CollType::kReduceScatter, ++seq, count * n, DType::kFloat64), dl());
      for (size_t i = 0; i < count; ++i) {
        double ref = 0;
        for (int p = 0; p < n; ++p) ref += value(p, r * count + i);
        ASSERT_NEAR(out[i], ref, 1e-9);
      }
      // all_gather
      std::vector<uint8_t> mine = testing::filled(r, count), all(count * n);
      c.allGather(mine.data(), all.data(), count, testing::makeDesc(CollType::kAllGather, ++seq, count * n), dl());
      for (int p = 0; p < n; ++p) {
        ASSERT_TRUE(testing::matches(std::vector<uint8_t>(all.begin() + p * count, all.begin() + (p + 1) * count), p));
      }
      for (int root = 0; root < n; ++root) {
        // broadcast
        std::vector<uint8_t> b = r == root ? testing::filled(root, count) : std::vector<uint8_t>(count, 0);
        OpDesc bd = testing::makeDesc(CollType::kBroadcast, ++seq, count);
        bd.root = root;
        c.broadcast(b.data(), count, root, bd, dl());
        ASSERT_TRUE(testing::matches(b, root));
        // reduce
        std::vector<double> y(count);
        for (size_t i = 0; i < count; ++i) y[i] = value(r, i);
        OpDesc rd = testing::makeDesc(CollType::kReduce, ++seq, count, DType::kFloat64);
        rd.root = root;
        c.reduce(y.data(), count, DType::kFloat64, ReduceOp::kSum, root, rd, dl());
        for (size_t i = 0; i < count; ++i) {
          double ref = 0;
          for (int p = 0; p < n; ++p) ref += value(p, i);
          ASSERT_NEAR(y[i], r == root ? ref : value(r, i), 1e-9);
        }
      }
      // all_to_all: rank p sends count bytes of pattern(p) to every rank
      std::vector<size_t> offs(n), sizes(n, count);
      for (int p = 0; p < n; ++p) offs[p] = p * count;
      std::vector<uint8_t> src(count * n), dst(count * n);
      for (int p = 0; p < n && count > 0; ++p) memcpy(src.data() + p * count, testing::filled(r, count).data(), count);
      c.allToAll(src.data(), offs, sizes, dst.data(), offs, sizes,
                 testing::makeDesc(CollType::kAllToAll, ++seq, count * n), dl());
      for (int p = 0; p < n; ++p) {
        ASSERT_TRUE(testing::matches(std::vector<uint8_t>(dst.begin() + p * count, dst.begin() + (p + 1) * count), p));
      }
      c.barrier(testing::makeDesc(CollType::kBarrier, ++seq, 0), dl());
    }
  });
}

TEST_P(Layouts, AbortOnOneHostFailsEveryRankFast) {
  const Topology topo{GetParam()};
  const int n = static_cast<int>(topo.hostOf.size());
  const int victim = n - 1;  // on the last host
  MemStore store;
  const auto start = std::chrono::steady_clock::now();
  runRanks(n, [&](int r) {
    RankTransport rt = makeMixed(store, topo, r, milliseconds(60000));
    Collectives c(*rt.t, config("hier"), topo, rt.local);
    std::vector<float> x(50000, 1.0f);
    OpDesc d = testing::makeDesc(CollType::kAllReduce, 1, x.size(), DType::kFloat32);
    if (r == victim) {
      rt.t->abort("pycomm test: rank " + std::to_string(r) + " died");
      return;
    }
    try {
      c.allReduce(x.data(), x.size(), DType::kFloat32, ReduceOp::kSum, d, Deadline::after(milliseconds(60000)));
      ADD_FAILURE() << "rank " << r << " finished an all-reduce its peer never joined";
    } catch (const Error& e) {
      // Rank r failed; make sure its own peers learn too (the engine does this).
      rt.t->abort(e.what());
    }
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
}

// A rank on the last host dies before a hierarchical broadcast / reduce (pipelined) or a
// small all-reduce: every other rank fails within the timeout, none hangs.
TEST_P(Layouts, DeadRankFailsRootedAndSmallCollectivesFast) {
  const Topology topo{GetParam()};
  const int n = static_cast<int>(topo.hostOf.size());
  const int victim = n - 1;
  for (int kind = 0; kind < 3; ++kind) {
    MemStore store;
    const auto start = std::chrono::steady_clock::now();
    runRanks(n, [&](int r) {
      RankTransport rt = makeMixed(store, topo, r, milliseconds(60000));
      Collectives c(*rt.t, config("auto"), topo, rt.local);
      std::vector<float> x(kind == 2 ? 3 : 50000, 1.0f);
      if (r == victim) {
        rt.t->abort("pycomm test: rank " + std::to_string(r) + " died");
        return;
      }
      const Deadline dl = Deadline::after(milliseconds(60000));
      try {
        if (kind == 0) {
          OpDesc d = testing::makeDesc(CollType::kBroadcast, 1, x.size() * 4);
          c.broadcast(x.data(), x.size() * 4, 0, d, dl);
        } else if (kind == 1) {
          OpDesc d = testing::makeDesc(CollType::kReduce, 1, x.size(), DType::kFloat32);
          c.reduce(x.data(), x.size(), DType::kFloat32, ReduceOp::kSum, 0, d, dl);
        } else {
          OpDesc d = testing::makeDesc(CollType::kAllReduce, 1, x.size(), DType::kFloat32);
          c.allReduce(x.data(), x.size(), DType::kFloat32, ReduceOp::kSum, d, dl);
        }
        // A rank whose part never touches the victim (a broadcast leaf on another host)
        // may finish; it must not hang either.
      } catch (const Error& e) {
        rt.t->abort(e.what());
      }
    });
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20)) << "kind " << kind;
  }
}

INSTANTIATE_TEST_SUITE_P(Hier, Layouts,
                         ::testing::Values(std::vector<int>{0, 0, 1, 1}, std::vector<int>{0, 0, 1, 2},
                                           std::vector<int>{0, 0, 0, 1, 1}, std::vector<int>{0, 1, 1},
                                           std::vector<int>{0, 1, 0, 1, 0, 1},      // interleaved 3+3
                                           std::vector<int>{0, 1, 0, 2, 1, 2, 0},   // interleaved 3+2+2
                                           std::vector<int>{0, 0, 0, 0, 1, 1, 1}));  // 4+3: three pieces

TEST(SubsetTransport, MapsRanksOntoTheParent) {
  MemStore store;
  runRanks(4, [&](int r) {
    TcpTransport t(store, "t/", r, 4, kTimeout);
    if (r % 2 != 1) return;
    SubsetTransport odd(t, {1, 3});
    EXPECT_EQ(odd.size(), 2);
    EXPECT_EQ(odd.rank(), r / 2);
    EXPECT_EQ(odd.parentRank(1), 3);
    std::vector<uint8_t> mine = testing::filled(r, 100), theirs(100);
    odd.sendRecv(1 - odd.rank(), mine.data(), 100, 1 - odd.rank(), theirs.data(), 100,
                 testing::makeDesc(CollType::kSend, 1, 100), Deadline::after(kTimeout));
    EXPECT_TRUE(testing::matches(theirs, 4 - r));
  });
}

}  // namespace
}  // namespace pycomm
