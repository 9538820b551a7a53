// reduce over the network path (pipelined chain ending at the root): exact sums on
// integer-valued doubles, MAX on int32, AVG on float32, every root, several segments
// per call, non-root buffers untouched. Ranks are threads over TCP (and shm with
// PYCOMM_ALGO=ring semantics through AlgoConfig).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "algorithms/collectives.h"
#include "test_util.h"
#include "transport/shm.h"
#include "transport/tcp.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::runRanks;

constexpr milliseconds kTimeout{30000};

double value(int rank, size_t i) { return static_cast<double>((rank * 7919 + static_cast<int>(i % 1009)) % 97) - 40; }

using Param = std::tuple<int, size_t, bool>;  // world size, count, tcp?

class ChainReduce : public ::testing::TestWithParam<Param> {};

TEST_P(ChainReduce, EveryRootExactAndOthersUntouched) {
  const auto [w, count, tcp] = GetParam();
  MemStore store;
  auto t = testing::makeTransports(store, tcp, tcp ? "r/t/" : "r/s/", w, kTimeout);
  AlgoConfig cfg;
  cfg.segmentBytes = 4096;  // several segments in flight along the chain
  cfg.smallBytes = 0;       // always the chain, even for one element
  cfg.algo = "ring";        // on shm too (its default reduce reads peers directly)
  for (int root = 0; root < w; ++root) {
    std::vector<std::string> errors(w);
    runRanks(w, [&](int r) {
      Collectives c(*t[r], cfg);
      // float64 SUM (exact: small integers)
      std::vector<double> d(count);
      for (size_t i = 0; i < count; ++i) d[i] = value(r, i);
      OpDesc desc = testing::makeDesc(CollType::kReduce, 3 * root + 1, count, DType::kFloat64);
      desc.root = root;
      c.reduce(d.data(), count, DType::kFloat64, ReduceOp::kSum, root, desc, Deadline::after(kTimeout));
      for (size_t i = 0; i < count; ++i) {
        double want = value(r, i);
        if (r == root) {
          want = 0;
          for (int q = 0; q < w; ++q) want += value(q, i);
        }
        if (d[i] != want) {
          errors[r] = "sum: element " + std::to_string(i) + " = " + std::to_string(d[i]) + ", want " +
                      std::to_string(want);
          return;
        }
      }
      // int32 MAX
      std::vector<int32_t> m(count);
      for (size_t i = 0; i < count; ++i) m[i] = static_cast<int32_t>(value(r, i));
      desc = testing::makeDesc(CollType::kReduce, 3 * root + 2, count, DType::kInt32);
      desc.root = root;
      desc.op = ReduceOp::kMax;
      c.reduce(m.data(), count, DType::kInt32, ReduceOp::kMax, root, desc, Deadline::after(kTimeout));
      for (size_t i = 0; i < count; ++i) {
        int32_t want = static_cast<int32_t>(value(r, i));
        if (r == root) {
          for (int q = 0; q < w; ++q) want = std::max(want, static_cast<int32_t>(value(q, i)));
        }
        if (m[i] != want) {
          errors[r] = "max: element " + std::to_string(i);
          return;
        }
      }
      // float32 AVG of exactly representable values
      std::vector<float> f(count);
      for (size_t i = 0; i < count; ++i) f[i] = static_cast<float>(value(r, i) * w);
      desc = testing::makeDesc(CollType::kReduce, 3 * root + 3, count, DType::kFloat32);
      desc.root = root;
      desc.op = ReduceOp::kAvg;
      c.reduce(f.data(), count, DType::kFloat32, ReduceOp::kAvg, root, desc, Deadline::after(kTimeout));
      for (size_t i = 0; i < count; ++i) {
        double want = value(r, i) * w;
        if (r == root) {
          want = 0;
          for (int q = 0; q < w; ++q) want += value(q, i);
        }
        if (f[i] != static_cast<float>(want)) {
          errors[r] = "avg: element " + std::to_string(i);
          return;
        }
      }
    });
    for (int r = 0; r < w; ++r) EXPECT_EQ(errors[r], "") << "root " << root << " rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Network, ChainReduce,
                         ::testing::Combine(::testing::Values(2, 3, 5),
                                            ::testing::Values(size_t{0}, size_t{1}, size_t{1021}, size_t{70001}),
                                            ::testing::Values(true, false)));

}  // namespace
}  // namespace pycomm
