// Compression on the cross-host hop only (algorithms/hier_compressed.cc), ranks as
// threads over the mixed transport (shared memory inside an emulated host, TCP across):
// with the float32 codec the result is the float64 sum itself (quarter-integer inputs:
// every float32 sum is exact) divided once by the group size, on layouts 2+2, 2+1+1 and 3+2, pipelined and not; with
// OneBit every rank ends with the same bits and the residuals the plan sized.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "algorithms/collectives.h"
#include "algorithms/compressed.h"
#include "core/error.h"
#include "core/topology.h"
#include "test_util.h"
#include "transport/mixed.h"
#include "transport/shm.h"
#include "transport/tcp.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::runRanks;

constexpr milliseconds kTimeout{30000};

struct RankTransport {
  std::unique_ptr<Transport> t;
  Transport* local = nullptr;
};

// One rank's transport as the engine builds it for a multi-host group.
RankTransport makeMixed(MemStore& store, const Topology& topo, int rank) {
  const int n = static_cast<int>(topo.hostOf.size());
  const int host = topo.hostOf[rank];
  const auto mine = topo.ranksOn(host);
  RankTransport out;
  std::unique_ptr<Transport> local;
  if (mine.size() > 1) {
    local = std::make_unique<ShmTransport>(store, "s" + std::to_string(host) + "/", topo.localIndex(rank),
                                           static_cast<int>(mine.size()), kTimeout);
  }
  auto tcp = std::make_unique<TcpTransport>(store, "t/", rank, n, kTimeout);
  if (local) {
    out.local = local.get();
    out.t = std::make_unique<MixedTransport>(mine, std::move(local), std::move(tcp));
  } else {
    out.t = std::move(tcp);
  }
  return out;
}

// Quarter-integers in [-4, 4]: float32 sums of a handful are exact.
double value(int rank, size_t i) { return static_cast<double>((rank * 5 + i * 7) % 33) * 0.25 - 4.0; }

AlgoConfig config(size_t hierChunkBytes) {
  AlgoConfig c;
  c.hierChunkBytes = hierChunkBytes;
  c.compressPieceBytes = 8192;  // several pieces per cross-host chunk
  return c;
}

const std::vector<size_t> kCounts = {0, 1, 13, 1009, 40009};

class HierCompressed : public ::testing::TestWithParam<std::vector<int>> {};

TEST_P(HierCompressed, FloatCodecIsTheExactAverage) {
  const Topology topo{GetParam()};
  const int n = static_cast<int>(topo.hostOf.size());
  MemStore store;
  runRanks(n, [&](int r) {
    RankTransport rt = makeMixed(store, topo, r);
    Collectives piped(*rt.t, config(16384), topo, rt.local);
    Collectives whole(*rt.t, config(size_t{1} << 30), topo, rt.local);
    auto codec = makeFloatCodec();
    uint64_t seq = 0;
    for (size_t count : kCounts) {
      for (Collectives* c : {&piped, &whole}) {
        const auto plan = c->hierCompressedPlan(count, codec.get());
        ASSERT_TRUE(plan.hierarchical);
        std::vector<float> x(count);
        for (size_t i = 0; i < count; ++i) x[i] = static_cast<float>(value(r, i));
        Collectives::HierCompressedArgs a;
        a.data = x.data();
        a.n = count;
        a.divisor = n;
        OpDesc d = testing::makeDesc(CollType::kCompressed, ++seq, count, DType::kFloat32);
        d.tag = codec->id();
        c->hierCompressedAllReduce(*codec, a, d, Deadline::after(kTimeout));
        for (size_t i = 0; i < count; ++i) {
          double ref = 0;
          for (int p = 0; p < n; ++p) ref += value(p, i);
          // The sum is exact in float32; the owner divides it once, in float32.
          ASSERT_EQ(x[i], static_cast<float>(ref) / static_cast<float>(n))
              << "rank " << r << " count " << count << " i " << i;
        }
      }
    }
  });
}

TEST_P(HierCompressed, OneBitRanksAgreeAndKeepTheirResiduals) {
  const Topology topo{GetParam()};
  const int n = static_cast<int>(topo.hostOf.size());
  const size_t count = 40009;
  MemStore store;
  std::vector<std::vector<float>> out(n);
  runRanks(n, [&](int r) {
    RankTransport rt = makeMixed(store, topo, r);
    Collectives c(*rt.t, config(16384), topo, rt.local);
    auto codec = makeOneBitCodec();
    const auto plan = c.hierCompressedPlan(count, codec.get());
    std::vector<float> worker(plan.workerElems), server(plan.serverElems);
    std::vector<float> x(count);
    for (int step = 0; step < 2; ++step) {
      for (size_t i = 0; i < count; ++i) x[i] = static_cast<float>(value(r + step, i));
      Collectives::HierCompressedArgs a;
      a.data = x.data();
      a.n = count;
      a.divisor = n;
      a.workerResidual = worker.data();
      a.serverResidual = server.data();
      OpDesc d = testing::makeDesc(CollType::kCompressed, step + 1, count, DType::kFloat32);
      d.tag = codec->id();
      c.hierCompressedAllReduce(*codec, a, d, Deadline::after(kTimeout));
    }
    // A rank that owns a shard keeps its worker error (non-zero: signs lose magnitude).
    double err = 0;
    for (float v : worker) err += std::fabs(v);
    if (plan.workerElems) {
      EXPECT_GT(err, 0.0) << "rank " << r;
      EXPECT_GT(plan.crossBytes, 0u);
    } else {
      EXPECT_EQ(plan.crossBytes, 0u);
    }
    out[r] = x;
  });
  for (int p = 1; p < n; ++p) {
    ASSERT_EQ(0, memcmp(out[p].data(), out[0].data(), count * sizeof(float))) << "rank " << p << " differs";
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, HierCompressed,
                         ::testing::Values(std::vector<int>{0, 0, 1, 1}, std::vector<int>{0, 0, 1, 2},
                                           std::vector<int>{0, 0, 0, 1, 1}));

TEST(HierCompressedPlan, OneHostIsNotHierarchical) {
  MemStore store;
  const Topology topo = Topology::singleHost(2);
  runRanks(2, [&](int r) {
    TcpTransport t(store, "t/", r, 2, kTimeout);
    Collectives c(t, AlgoConfig{}, topo);
    EXPECT_FALSE(c.hierCompressedPlan(100, nullptr).hierarchical);
    auto codec = makeOneBitCodec();
    std::vector<float> x(100, 1.0f);
    Collectives::HierCompressedArgs a;
    a.data = x.data();
    a.n = x.size();
    EXPECT_THROW(c.hierCompressedAllReduce(*codec, a, OpDesc{}, Deadline::after(kTimeout)), InvalidArgument);
  });
}

}  // namespace
}  // namespace pycomm
