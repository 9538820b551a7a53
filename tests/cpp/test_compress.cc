// Fused compression kernels against straightforward double-precision references.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "core/error.h"
#include "kernels/compress.h"

namespace pycomm {
namespace {

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

size_t chunkFor(size_t n, size_t w) {
  size_t per = (n + w - 1) / w;
  return std::max(kCompressAlign, (per + kCompressAlign - 1) / kCompressAlign * kCompressAlign);
}

float payloadScale(const uint8_t* p) {
  float s;
  std::memcpy(&s, p, 4);
  return s;
}

TEST(CompressOneBit, WorkerStepMatchesReference) {
  const size_t n = 1000, w = 3, chunk = chunkFor(n, w);
  auto x = randn(n, 1);
  auto res = randn(n, 2, 0.1f);
  auto res0 = res;
  std::vector<uint8_t> out(oneBitPayloadBytes(chunk) * w);
  oneBitCompress(x.data(), res.data(), n, chunk, w, out.data());
  std::vector<float> dec(n);
  oneBitDecompress(out.data(), w, chunk, n, dec.data(), false);
  for (size_t c = 0; c < w; ++c) {
    const size_t start = c * chunk, count = std::min(chunk, n - start);
    double absSum = 0;
    for (size_t i = start; i < start + count; ++i) absSum += std::fabs((double)x[i] + res0[i]);
    const double scale = absSum / count;
    EXPECT_NEAR(payloadScale(out.data() + c * oneBitPayloadBytes(chunk)), scale, 1e-6 * scale);
    for (size_t i = start; i < start + count; ++i) {
      const double v = (double)x[i] + res0[i];
      const double q = v >= 0 ? scale : -scale;
      ASSERT_NEAR(dec[i], q, 1e-6) << i;
      ASSERT_NEAR(res[i], v - q, 1e-5) << i;  // error feedback: v = sent + new residual
    }
  }
}

TEST(CompressOneBit, DecompressAccumulates) {
  const size_t n = 70, chunk = 64;
  auto x = randn(n, 3);
  std::vector<float> res(n, 0.0f);
  std::vector<uint8_t> out(oneBitPayloadBytes(chunk) * 2);
  oneBitCompress(x.data(), res.data(), n, chunk, 2, out.data());
  std::vector<float> a(n, 1.0f), b(n);
  oneBitDecompress(out.data(), 2, chunk, n, b.data(), false);
  oneBitDecompress(out.data(), 2, chunk, n, a.data(), true);
  for (size_t i = 0; i < n; ++i) EXPECT_FLOAT_EQ(a[i], 1.0f + b[i]);
}

TEST(CompressOneBit, ServerReduceMatchesReference) {
  const int w = 4;
  const size_t chunk = 96, count = 80;  // last chunk partly padding
  const size_t payload = oneBitPayloadBytes(chunk);
  std::vector<uint8_t> in(payload * w);
  std::vector<std::vector<float>> sent(w, std::vector<float>(count));
  for (int r = 0; r < w; ++r) {
    auto x = randn(count, 10 + r);
    std::vector<float> res(count, 0.0f);
    oneBitCompress(x.data(), res.data(), count, chunk, 1, in.data() + r * payload);
    oneBitDecompress(in.data() + r * payload, 1, chunk, count, sent[r].data(), false);
  }
  auto server = randn(count, 20, 0.05f);
  auto server0 = server;
  std::vector<uint8_t> out(payload);
  oneBitServerReduce(in.data(), w, chunk, count, w, server.data(), out.data());
  std::vector<double> v(count);
  double absSum = 0;
  for (size_t i = 0; i < count; ++i) {
    double s = 0;
    for (int r = 0; r < w; ++r) s += sent[r][i];
    v[i] = s / w + server0[i];
    absSum += std::fabs(v[i]);
  }
  const double scale = absSum / count;
  EXPECT_NEAR(payloadScale(out.data()), scale, 1e-5 * scale);
  std::vector<float> dec(count);
  oneBitDecompress(out.data(), 1, chunk, count, dec.data(), false);
  for (size_t i = 0; i < count; ++i) {
    EXPECT_NEAR(dec[i], v[i] >= 0 ? scale : -scale, 1e-5);
    EXPECT_NEAR(server[i], v[i] - dec[i], 1e-5);
  }
}

TEST(CompressOneBit, RejectsBadChunk) {
  std::vector<float> x(10), r(10);
  std::vector<uint8_t> out(64);
  EXPECT_THROW(oneBitCompress(x.data(), r.data(), 10, 33, 1, out.data()), InvalidArgument);
  EXPECT_THROW(oneBitCompress(x.data(), r.data(), 10, 32, 0, out.data()), InvalidArgument);
}

class CompressQsgd : public ::testing::TestWithParam<int> {};

TEST_P(CompressQsgd, LevelsWithinOneStepAndUnbiased) {
  const int bits = GetParam();
  const int levels = qsgdLevels(bits);
  const size_t n = 1100, w = 2, chunk = chunkFor(n, w);  // partial blocks and chunks
  auto x = randn(n, 5);
  std::vector<uint8_t> out(qsgdPayloadBytes(chunk, bits) * w);
  std::vector<double> mean(n, 0.0);
  const int draws = 2000;
  std::vector<float> dec(n);
  for (int d = 0; d < draws; ++d) {
    qsgdCompress(x.data(), nullptr, n, chunk, w, bits, (uint32_t)(1000 + d), out.data());
    qsgdDecompress(out.data(), w, chunk, n, bits, dec.data(), false);
    for (size_t i = 0; i < n; ++i) mean[i] += dec[i] / (double)draws;
  }
  // Per element: within one quantisation step of x; mean within a few standard errors.
  const size_t payload = qsgdPayloadBytes(chunk, bits);
  for (size_t i = 0; i < n; ++i) {
    const size_t c = i / chunk, b = (i % chunk) / kQsgdBlock;
    const double scale = payloadScale(out.data() + c * payload + 4 * b);
    const double step = scale / levels;
    ASSERT_LE(std::fabs(dec[i] - x[i]), step * (1 + 1e-5)) << i;
    ASSERT_NEAR(mean[i], x[i], 5 * step / std::sqrt((double)draws) + 1e-6) << i;
  }
}

TEST_P(CompressQsgd, ErrorFeedbackKeepsWhatWasNotSent) {
  const int bits = GetParam();
  const size_t n = 700, chunk = 704;
  auto x = randn(n, 6);
  auto res = randn(n, 7, 0.01f);
  auto res0 = res;
  std::vector<uint8_t> out(qsgdPayloadBytes(chunk, bits));
  qsgdCompress(x.data(), res.data(), n, chunk, 1, bits, 42u, out.data());
  std::vector<float> dec(n);
  qsgdDecompress(out.data(), 1, chunk, n, bits, dec.data(), false);
  for (size_t i = 0; i < n; ++i) ASSERT_NEAR((double)dec[i] + res[i], (double)x[i] + res0[i], 1e-5);
}

TEST_P(CompressQsgd, SameSeedSameBits) {
  const int bits = GetParam();
  const size_t n = 600, chunk = 608;
  auto x = randn(n, 8);
  std::vector<uint8_t> a(qsgdPayloadBytes(chunk, bits)), b(a.size());
  qsgdCompress(x.data(), nullptr, n, chunk, 1, bits, 7u, a.data());
  qsgdCompress(x.data(), nullptr, n, chunk, 1, bits, 7u, b.data());
  EXPECT_EQ(a, b);
}

TEST_P(CompressQsgd, ServerReduceAveragesDequantised) {
  const int bits = GetParam();
  const int w = 3;
  const size_t chunk = 544, count = 530;
  const size_t payload = qsgdPayloadBytes(chunk, bits);
  std::vector<uint8_t> in(payload * w);
  std::vector<double> avg(count, 0.0);
  std::vector<float> dec(count);
  for (int r = 0; r < w; ++r) {
    auto x = randn(count, 30 + r);
    qsgdCompress(x.data(), nullptr, count, chunk, 1, bits, 9u + r, in.data() + r * payload);
    qsgdDecompress(in.data() + r * payload, 1, chunk, count, bits, dec.data(), false);
    for (size_t i = 0; i < count; ++i) avg[i] += dec[i] / (double)w;
  }
  std::vector<float> server(count, 0.0f);
  std::vector<uint8_t> out(payload);
  qsgdServerReduce(in.data(), w, chunk, count, w, server.data(), bits, 11u, out.data());
  qsgdDecompress(out.data(), 1, chunk, count, bits, dec.data(), false);
  for (size_t i = 0; i < count; ++i) ASSERT_NEAR((double)dec[i] + server[i], avg[i], 1e-5) << i;
}

INSTANTIATE_TEST_SUITE_P(CompressBits, CompressQsgd, ::testing::Values(8, 4));

TEST(CompressHalf, RepresentableValuesExactAndResidualIsRoundingError) {
  const size_t n = 300;
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = (float)((int)i - 150) * 0.25f;  // exact in fp16 and bf16
  for (bool bf16 : {false, true}) {
    std::vector<uint16_t> h(n + 4);
    halfCompress(x.data(), nullptr, n, n + 4, bf16, h.data());
    std::vector<float> back(n);
    halfDecompress(h.data(), n, bf16, back.data());
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(back[i], x[i]);
    for (size_t i = n; i < n + 4; ++i) ASSERT_EQ(h[i], 0);
  }
  auto y = randn(n, 12);
  std::vector<float> res(n, 0.0f);
  std::vector<uint16_t> h(n);
  halfCompress(y.data(), res.data(), n, n, false, h.data());
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(halfToFloat(h[i]) + res[i], y[i]);
}

TEST(CompressHalf, ServerSumsInFloatAndRoundsOnce) {
  // 2048 + 1 + 1 in fp16: summing in half gives 2048 twice (ties to even); float gives 2050.
  const int w = 3;
  const size_t chunk = 1;
  std::vector<uint16_t> in = {floatToHalf(2048.0f), floatToHalf(1.0f), floatToHalf(1.0f)};
  std::vector<uint16_t> out(1);
  halfServerReduce(in.data(), w, chunk, 1, 1, nullptr, false, out.data());
  EXPECT_EQ(halfToFloat(out[0]), 2050.0f);
  halfServerReduce(in.data(), w, chunk, 1, 2, nullptr, false, out.data());
  EXPECT_EQ(halfToFloat(out[0]), 1025.0f);
}

TEST(CompressFloat, ServerReduceInRankOrder) {
  const int w = 3;
  const size_t chunk = 5, count = 4;
  std::vector<float> in(w * chunk);
  for (size_t i = 0; i < in.size(); ++i) in[i] = (float)i;
  std::vector<float> out(chunk);
  floatServerReduce(in.data(), w, chunk, count, 3, out.data());
  for (size_t j = 0; j < count; ++j) EXPECT_FLOAT_EQ(out[j], (float)(j + j + 5 + j + 10) / 3.0f);
  EXPECT_EQ(out[4], 0.0f);
}

TEST(CompressTopk, SelectsLargestMagnitudesWithTiesByIndex) {
  const size_t n = 5000, k = 50;
  auto x = randn(n, 13);
  for (size_t i = 0; i < 40; ++i) x[i * 97] = (i % 2 ? 3.5f : -3.5f);  // ties across the boundary
  std::vector<float> res(n, 0.0f), vals(k);
  std::vector<int32_t> idx(k);
  topkCompress(x.data(), res.data(), n, k, vals.data(), idx.data());
  // Reference: stable sort by descending |x|.
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return std::fabs(x[a]) > std::fabs(x[b]); });
  std::vector<int32_t> want(order.begin(), order.begin() + k);
  std::sort(want.begin(), want.end());
  EXPECT_EQ(idx, want);
  for (size_t j = 0; j < k; ++j) EXPECT_EQ(vals[j], x[idx[j]]);
  for (size_t i = 0; i < n; ++i) {
    const bool sent = std::binary_search(want.begin(), want.end(), (int32_t)i);
    ASSERT_EQ(res[i], sent ? 0.0f : x[i]) << i;
  }
}

TEST(CompressTopk, KAtLeastNSendsEverything) {
  std::vector<float> x = {1, -2, 0, 3}, vals(4);
  std::vector<int32_t> idx(4);
  topkCompress(x.data(), nullptr, 4, 10, vals.data(), idx.data());
  EXPECT_EQ(idx, (std::vector<int32_t>{0, 1, 2, 3}));
}

TEST(CompressTopk, DecompressSumsDifferentIndexSets) {
  const size_t k = 2, n = 5;
  // Rank 0 sends {1: 1.0, 3: 2.0}; rank 1 sends {3: 4.0, 4: -1.0}.
  std::vector<int32_t> in(4 * k);
  auto put = [&](int r, size_t j, float v, int32_t i) {
    std::memcpy(&in[r * 2 * k + j], &v, 4);
    in[r * 2 * k + k + j] = i;
  };
  put(0, 0, 1.0f, 1);
  put(0, 1, 2.0f, 3);
  put(1, 0, 4.0f, 3);
  put(1, 1, -1.0f, 4);
  std::vector<float> out(n, 9.0f);
  topkDecompress(in.data(), 2, k, n, 2, out.data());
  EXPECT_EQ(out, (std::vector<float>{0.0f, 0.5f, 0.0f, 3.0f, -0.5f}));
  in[k] = 7;  // out of range
  EXPECT_THROW(topkDecompress(in.data(), 2, k, n, 1, out.data()), InvalidArgument);
}

TEST(CompressMath, CounterHashIsUniformish) {
  double sum = 0;
  const int m = 100000;
  for (int i = 0; i < m; ++i) sum += counterUniform(123u, (uint32_t)i);
  EXPECT_NEAR(sum / m, 0.5, 0.005);
  EXPECT_NE(counterHash(1u, 0u), counterHash(2u, 0u));
}

}  // namespace
}  // namespace pycomm
