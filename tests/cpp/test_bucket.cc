// Fusion-bucket planning (DDP's rule) and the flatten / unflatten span copies.
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "engine/bucket.h"

namespace pycomm {
namespace {

std::vector<BucketParam> floats(const std::vector<int64_t>& numels, int64_t key = 0) {
  std::vector<BucketParam> out;
  for (int64_t n : numels) out.push_back({n, 4, key});
  return out;
}

std::vector<std::vector<int64_t>> members(const std::vector<Bucket>& buckets) {
  std::vector<std::vector<int64_t>> out;
  for (const auto& b : buckets) out.push_back(b.params);
  return out;
}

TEST(BucketPlan, ReverseOrderFirstBucketThenCap) {
  // 10 params of 100 floats (400 B); first bucket closes at >= 800 B, later ones at >= 1200 B.
  auto plan = planBuckets(floats(std::vector<int64_t>(10, 100)), 1200, 800);
  using V = std::vector<int64_t>;
  EXPECT_EQ(members(plan), (std::vector<V>{{9, 8}, {7, 6, 5}, {4, 3, 2}, {1, 0}}));
  for (const auto& b : plan) {
    int64_t off = 0;
    for (size_t i = 0; i < b.params.size(); ++i) {
      EXPECT_EQ(b.offsets[i], off);
      off += 100;
    }
    EXPECT_EQ(b.numel, off);
    EXPECT_EQ(b.elementSize, 4u);
  }
}

TEST(BucketPlan, LargeParameterGetsItsOwnBucketAndZeroLimitSplitsAll) {
  auto plan = planBuckets(floats({10, 1000000, 10, 10}), 1024, 1024);
  using V = std::vector<int64_t>;
  EXPECT_EQ(members(plan), (std::vector<V>{{3, 2, 1}, {0}}));  // 3,2 then 1 overflows: closes with it
  auto each = planBuckets(floats({1, 2, 3}), 0, 0);
  EXPECT_EQ(members(each), (std::vector<V>{{2}, {1}, {0}}));
  EXPECT_TRUE(planBuckets({}, 100, 100).empty());
}

TEST(BucketPlan, DtypeClassesNeverShareABucket) {
  std::vector<BucketParam> params = {{100, 4, 0}, {100, 8, 1}, {100, 4, 0}, {100, 8, 1}};
  auto plan = planBuckets(params, 1 << 20, 1 << 20);
  ASSERT_EQ(plan.size(), 2u);
  // Ordered by the visit position of their first member (reverse order: 3 first).
  EXPECT_EQ(plan[0].key, 1);
  EXPECT_EQ(plan[0].params, (std::vector<int64_t>{3, 1}));
  EXPECT_EQ(plan[0].elementSize, 8u);
  EXPECT_EQ(plan[1].params, (std::vector<int64_t>{2, 0}));
  // Each class has its own first-bucket limit.
  auto small = planBuckets(params, 1 << 20, 400);
  using V = std::vector<int64_t>;
  EXPECT_EQ(members(small), (std::vector<V>{{3}, {2}, {1}, {0}}));
}

TEST(BucketPlan, RebuildFollowsReadyOrder) {
  auto params = floats(std::vector<int64_t>(6, 100));
  auto order = rebuildOrder(6, {2, 5, 4});  // 3, 1, 0 never became ready: reverse index order
  EXPECT_EQ(order, (std::vector<int64_t>{2, 5, 4, 3, 1, 0}));
  auto plan = planBuckets(params, 800, 400, order);
  using V = std::vector<int64_t>;
  EXPECT_EQ(members(plan), (std::vector<V>{{2}, {5, 4}, {3, 1}, {0}}));
}

TEST(BucketPlan, RejectsBadOrders) {
  auto params = floats({1, 2, 3});
  EXPECT_THROW(planBuckets(params, 10, 10, {0, 1}), InvalidArgument);
  EXPECT_THROW(planBuckets(params, 10, 10, {0, 1, 1}), InvalidArgument);
  EXPECT_THROW(planBuckets(params, 10, 10, {0, 1, 3}), InvalidArgument);
  EXPECT_THROW(rebuildOrder(3, {0, 0}), InvalidArgument);
  EXPECT_THROW(rebuildOrder(3, {-1}), InvalidArgument);
  std::vector<BucketParam> mixed = {{1, 4, 0}, {1, 8, 0}};
  EXPECT_THROW(planBuckets(mixed, 10, 10), InvalidArgument);
}

TEST(BucketCopy, FlattenUnflattenRoundTripWithZeroFill) {
  std::vector<float> a(5), b(7, 9.0f), c(3);
  std::iota(a.begin(), a.end(), 1.0f);
  std::iota(c.begin(), c.end(), 100.0f);
  std::vector<float> flat(15, -1.0f);
  std::vector<CopySpan> in = {{a.data(), flat.data(), 5 * 4}, {nullptr, flat.data() + 5, 7 * 4},
                              {c.data(), flat.data() + 12, 3 * 4}};
  copySpans(in);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(flat[i], a[i]);
  for (int i = 5; i < 12; ++i) EXPECT_EQ(flat[i], 0.0f);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(flat[12 + i], c[i]);
  for (auto& v : flat) v *= 2;
  copySpans({{flat.data(), a.data(), 5 * 4}, {flat.data() + 12, c.data(), 3 * 4}});
  for (int i = 0; i < 5; ++i) EXPECT_EQ(a[i], 2.0f * (i + 1));
  for (int i = 0; i < 3; ++i) EXPECT_EQ(c[i], 2.0f * (100 + i));
}

TEST(BucketCopy, ThreadedCopyMatchesSerial) {
  // Big enough to take the threaded path; span sizes chosen to straddle the seams.
  std::vector<size_t> sizes = {3u << 20, 1, 5u << 20, 777, 2u << 20};
  size_t total = 0;
  for (size_t s : sizes) total += s;
  std::vector<uint8_t> src(total), dst(total, 0);
  for (size_t i = 0; i < total; ++i) src[i] = static_cast<uint8_t>(i * 2654435761u >> 13);
  std::vector<CopySpan> spans;
  size_t off = 0;
  for (size_t s : sizes) {
    spans.push_back({src.data() + off, dst.data() + off, s});
    off += s;
  }
  spans.push_back({nullptr, nullptr, 0});  // empty spans are allowed
  for (int threads : {1, 2, 3, 8}) {
    std::fill(dst.begin(), dst.end(), 0);
    copySpans(spans, threads);
    EXPECT_EQ(std::memcmp(src.data(), dst.data(), total), 0) << threads;
  }
}

}  // namespace
}  // namespace pycomm
