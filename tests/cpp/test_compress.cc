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

/// Sign bit of element j (inside its block) of a OneBit block starting at `block`.
uint32_t signBitAt(const uint8_t* block, size_t j) { return (block[4 + j / 8] >> (j % 8)) & 1u; }

/// The OneBit scale formula of compress_math.h applied to v[0:count).
float formulaScale(const float* v, size_t count) {
  float lanes[kOneBitLanes];
  for (unsigned l = 0; l < kOneBitLanes; ++l) lanes[l] = oneBitLaneSum(v, count, l);
  return oneBitScale(lanes, count);
}

TEST(CompressOneBit, PayloadLayoutSizes) {
  EXPECT_EQ(oneBitPayloadBytes(32), 4u + 4u);
  EXPECT_EQ(oneBitPayloadBytes(2048), 4u + 256u);
  EXPECT_EQ(oneBitPayloadBytes(2080), 2 * 4u + 260u);
  EXPECT_EQ(oneBitPayloadOffset(4096), 2 * 260u);
  for (size_t chunk : {32, 2048, 2080, 6144, 10016}) {
    EXPECT_EQ(oneBitPayloadBytes(chunk), 4 * ((chunk + 2047) / 2048) + chunk / 8) << chunk;
  }
  // Wire ratio vs float32 for a large chunk: within 2 % of 32x.
  const size_t chunk = 1 << 20;
  const double ratio = 4.0 * chunk / (double)oneBitPayloadBytes(chunk);
  EXPECT_NEAR(ratio / 32.0, 1.0, 0.02);
  EXPECT_EQ(qsgdPayloadOffset(1024, 8), 2 * 516u);
  EXPECT_EQ(qsgdPayloadOffset(1024, 4), 2 * 260u);
  EXPECT_EQ(qsgdPayloadBytes(1056, 8), qsgdPayloadOffset(1056, 8));
  EXPECT_EQ(qsgdPayloadBytes(1056, 4), qsgdPayloadOffset(1056, 4));
}

TEST(CompressOneBit, WorkerStepMatchesReference) {
  // Chunks of 2688 = a 2048-block + a 640-block; n ends inside the last chunk's first
  // block, so that block is partial and the chunk's second block has no valid element.
  const size_t w = 3, chunk = 2688, n = 2 * chunk + 1500;
  auto x = randn(n, 1);
  auto res = randn(n, 2, 0.1f);
  auto res0 = res;
  const size_t payload = oneBitPayloadBytes(chunk);
  std::vector<uint8_t> out(payload * w);
  oneBitCompress(x.data(), res.data(), n, chunk, w, out.data());
  std::vector<float> dec(n);
  oneBitDecompress(out.data(), w, chunk, n, dec.data(), false);
  int emptyBlocks = 0;
  for (size_t c = 0; c < w; ++c) {
    for (size_t first = 0; first < chunk; first += kOneBitBlock) {
      const size_t len = std::min(kOneBitBlock, chunk - first);
      const size_t start = c * chunk + first;
      const size_t count = start >= n ? 0 : std::min(len, n - start);
      const uint8_t* block = out.data() + c * payload + oneBitPayloadOffset(first);
      ASSERT_EQ(block, out.data() + c * payload + first / 2048 * 260);
      std::vector<float> vf(count);
      double absSum = 0;
      for (size_t i = 0; i < count; ++i) {
        vf[i] = x[start + i] + res0[start + i];
        absSum += std::fabs((double)x[start + i] + res0[start + i]);
      }
      const double scale = count ? absSum / count : 0.0;
      emptyBlocks += count == 0;
      EXPECT_NEAR(payloadScale(block), scale, 2e-6 * scale) << c << " " << first;
      EXPECT_EQ(payloadScale(block), formulaScale(vf.data(), count)) << c << " " << first;
      for (size_t j = 0; j < len; ++j) {
        if (j >= count) {
          ASSERT_EQ(signBitAt(block, j), 1u) << "padding encodes as a zero";
          continue;
        }
        const size_t i = start + j;
        const double v = (double)x[i] + res0[i];
        ASSERT_EQ(signBitAt(block, j), v >= 0 ? 1u : 0u) << i;
        const double q = v >= 0 ? scale : -scale;
        ASSERT_NEAR(dec[i], q, 1e-6) << i;
        ASSERT_NEAR(res[i], v - q, 1e-5) << i;  // error feedback: v = sent + new residual
      }
    }
  }
  EXPECT_EQ(emptyBlocks, 1);
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

TEST(CompressOneBit, NoResidualPacksX) {
  const size_t n = 3000, chunk = 3008;
  auto x = randn(n, 4);
  std::vector<float> res(n, 0.0f);
  std::vector<uint8_t> a(oneBitPayloadBytes(chunk)), b(a.size());
  oneBitCompress(x.data(), nullptr, n, chunk, 1, a.data());
  oneBitCompress(x.data(), res.data(), n, chunk, 1, b.data());  // zero residual: same payload
  EXPECT_EQ(a, b);
}

TEST(CompressOneBit, ServerReduceMatchesReference) {
  const int w = 4;
  const size_t chunk = 2048 + 96, count = 2100;  // second block partly padding
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
  for (size_t i = 0; i < count; ++i) {
    double s = 0;
    for (int r = 0; r < w; ++r) s += sent[r][i];
    v[i] = s / w + server0[i];
  }
  std::vector<float> dec(count);
  oneBitDecompress(out.data(), 1, chunk, count, dec.data(), false);
  for (size_t first = 0; first < chunk; first += kOneBitBlock) {
    const size_t m = std::min(kOneBitBlock, count - first);
    double absSum = 0;
    for (size_t i = first; i < first + m; ++i) absSum += std::fabs(v[i]);
    const double scale = absSum / m;
    const uint8_t* block = out.data() + oneBitPayloadOffset(first);
    EXPECT_NEAR(payloadScale(block), scale, 1e-5 * scale);
    for (size_t j = m; j < std::min(kOneBitBlock, chunk - first); ++j) ASSERT_EQ(signBitAt(block, j), 1u);
    for (size_t i = first; i < first + m; ++i) {
      EXPECT_NEAR(dec[i], v[i] >= 0 ? scale : -scale, 1e-5);
      EXPECT_NEAR(server[i], v[i] - dec[i], 1e-5);
    }
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
    const double scale = payloadScale(out.data() + c * payload + qsgdPayloadOffset(b * kQsgdBlock, bits));
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

// ---------------------------------------------------------------- piecewise == whole

/// Piecewise compression as the pipelined all-reduce does it: pieces of P elements
/// (P a multiple of 2048) of every chunk, the last piece of a chunk shorter.
struct Piece {
  size_t start;  // element offset inside the chunk
  size_t len;    // elements in the piece
  size_t valid;  // valid elements in the piece
};

std::vector<Piece> piecesOf(size_t chunk, size_t count, size_t P) {
  std::vector<Piece> out;
  for (size_t s = 0; s < chunk; s += P) {
    const size_t len = std::min(P, chunk - s);
    out.push_back({s, len, s >= count ? 0 : std::min(len, count - s)});
  }
  return out;
}

bool sameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class CompressPieces : public ::testing::TestWithParam<size_t> {
 protected:
  // 3 chunks of 9376 = 4 * 2048 + 1184 elements (not a multiple of P); n ends inside the
  // last chunk, in its second 2048-block.
  static constexpr size_t kW = 3, kChunk = 9376, kN = 2 * kChunk + 3000;
};

TEST_P(CompressPieces, OneBitCompressAndDecompress) {
  const size_t P = GetParam();
  auto x = randn(kN, 40);
  auto resA = randn(kN, 41, 0.1f);
  auto resB = resA;
  const size_t payload = oneBitPayloadBytes(kChunk);
  std::vector<uint8_t> a(payload * kW), b(a.size(), 0xAB);
  oneBitCompress(x.data(), resA.data(), kN, kChunk, kW, a.data());
  std::vector<float> decA(kN), decB(kN, 5.0f);
  oneBitDecompress(a.data(), kW, kChunk, kN, decA.data(), false);
  for (size_t c = 0; c < kW; ++c) {
    const size_t count = std::min(kChunk, kN - c * kChunk);
    for (const Piece& p : piecesOf(kChunk, count, P)) {
      const size_t g = c * kChunk + p.start;
      uint8_t* o = b.data() + c * payload + oneBitPayloadOffset(p.start);
      // Valid-free pieces need no input pointers past n.
      oneBitCompress(p.valid ? x.data() + g : x.data(), p.valid ? resB.data() + g : resB.data(), p.valid, p.len, 1, o);
      if (p.valid) oneBitDecompress(o, 1, p.len, p.valid, decB.data() + g, false);
    }
  }
  EXPECT_EQ(a, b);
  EXPECT_TRUE(sameBits(resA, resB));
  EXPECT_TRUE(sameBits(decA, decB));
}

TEST_P(CompressPieces, OneBitServerReduce) {
  const size_t P = GetParam();
  const int w = 3;
  const size_t count = kChunk - 1000;  // the last piece and its last block are partly padding
  const size_t payload = oneBitPayloadBytes(kChunk);
  std::vector<uint8_t> in(payload * w);
  for (int r = 0; r < w; ++r) {
    auto x = randn(count, 50 + r);
    oneBitCompress(x.data(), nullptr, count, kChunk, 1, in.data() + r * payload);
  }
  auto resA = randn(count, 60, 0.05f);
  auto resB = resA;
  std::vector<uint8_t> a(payload), b(payload, 0xCD);
  oneBitServerReduce(in.data(), w, kChunk, count, w, resA.data(), a.data());
  for (const Piece& p : piecesOf(kChunk, count, P)) {
    // The pieces of every rank's payload, contiguous in rank order.
    const size_t off = oneBitPayloadOffset(p.start), bytes = oneBitPayloadBytes(p.len);
    std::vector<uint8_t> pin(bytes * w);
    for (int r = 0; r < w; ++r) std::memcpy(pin.data() + r * bytes, in.data() + r * payload + off, bytes);
    oneBitServerReduce(pin.data(), w, p.len, p.valid, w, p.valid ? resB.data() + p.start : resB.data(), b.data() + off);
  }
  EXPECT_EQ(a, b);
  EXPECT_TRUE(sameBits(resA, resB));
}

TEST_P(CompressPieces, QsgdCompressAndDecompress) {
  const size_t P = GetParam();
  const uint32_t indexBase = 123457u;
  auto x = randn(kN, 70);
  for (int bits : {8, 4}) {
    for (bool ef : {true, false}) {
      auto resA = randn(kN, 71, 0.01f);
      auto resB = resA;
      float* ra = ef ? resA.data() : nullptr;
      const size_t payload = qsgdPayloadBytes(kChunk, bits);
      std::vector<uint8_t> a(payload * kW), b(a.size(), 0xEF);
      qsgdCompress(x.data(), ra, kN, kChunk, kW, bits, 99u, a.data(), indexBase);
      std::vector<float> decA(kN), decB(kN, 5.0f);
      qsgdDecompress(a.data(), kW, kChunk, kN, bits, decA.data(), false);
      for (size_t c = 0; c < kW; ++c) {
        const size_t count = std::min(kChunk, kN - c * kChunk);
        for (const Piece& p : piecesOf(kChunk, count, P)) {
          const size_t g = c * kChunk + p.start;
          uint8_t* o = b.data() + c * payload + qsgdPayloadOffset(p.start, bits);
          float* rb = ef ? (p.valid ? resB.data() + g : resB.data()) : nullptr;
          qsgdCompress(p.valid ? x.data() + g : x.data(), rb, p.valid, p.len, 1, bits, 99u, o,
                       indexBase + (uint32_t)g);
          if (p.valid) qsgdDecompress(o, 1, p.len, p.valid, bits, decB.data() + g, false);
        }
      }
      EXPECT_EQ(a, b) << bits << " " << ef;
      EXPECT_TRUE(sameBits(resA, resB)) << bits << " " << ef;
      EXPECT_TRUE(sameBits(decA, decB)) << bits << " " << ef;
    }
  }
}

TEST_P(CompressPieces, QsgdServerReduce) {
  const size_t P = GetParam();
  const int w = 3;
  const size_t count = kChunk - 1000;
  const uint32_t indexBase = 777u;
  for (int bits : {8, 4}) {
    const size_t payload = qsgdPayloadBytes(kChunk, bits);
    std::vector<uint8_t> in(payload * w);
    for (int r = 0; r < w; ++r) {
      auto x = randn(count, 80 + r);
      qsgdCompress(x.data(), nullptr, count, kChunk, 1, bits, 5u + r, in.data() + r * payload);
    }
    auto resA = randn(count, 90, 0.01f);
    auto resB = resA;
    std::vector<uint8_t> a(payload), b(payload, 0x11);
    qsgdServerReduce(in.data(), w, kChunk, count, w, resA.data(), bits, 31u, a.data(), indexBase);
    for (const Piece& p : piecesOf(kChunk, count, P)) {
      const size_t off = qsgdPayloadOffset(p.start, bits), bytes = qsgdPayloadBytes(p.len, bits);
      std::vector<uint8_t> pin(bytes * w);
      for (int r = 0; r < w; ++r) std::memcpy(pin.data() + r * bytes, in.data() + r * payload + off, bytes);
      qsgdServerReduce(pin.data(), w, p.len, p.valid, w, p.valid ? resB.data() + p.start : resB.data(), bits, 31u,
                       b.data() + off, indexBase + (uint32_t)p.start);
    }
    EXPECT_EQ(a, b) << bits;
    EXPECT_TRUE(sameBits(resA, resB)) << bits;
  }
}

INSTANTIATE_TEST_SUITE_P(CompressPieceSizes, CompressPieces, ::testing::Values(2048, 4096));

// ---------------------------------------------------------------- AVX2 == scalar

/// Runs fn with the AVX2 paths on and off; returns false (skip) without AVX2.
template <typename F>
bool bothPaths(F&& fn) {
  const bool was = setCompressSimd(true);
  if (!setCompressSimd(true)) {
    setCompressSimd(was);
    return false;
  }
  fn(true);
  setCompressSimd(false);
  fn(false);
  setCompressSimd(was);
  return true;
}

TEST(CompressSimd, Avx2MatchesScalarBitwise) {
  // Sizes with every kind of tail (8-, 16-, 32-element groups, partial blocks), zeros,
  // negative zeros and exact ties.
  for (size_t n : {1, 7, 33, 517, 2049, 5000, 12000}) {
    const size_t chunk = chunkFor(n, 2);
    auto x = randn(n, 100 + (uint32_t)n);
    for (size_t i = 0; i < n; i += 13) x[i] = 0.0f;
    for (size_t i = 5; i < n; i += 17) x[i] = -0.0f;
    for (size_t i = 3; i < n; i += 19) x[i] = 1.5f;
    const auto res0 = randn(n, 200 + (uint32_t)n, 0.1f);
    struct Out {
      std::vector<uint8_t> bytes;
      std::vector<float> res;
    };
    Out got[2];
    const bool ran = bothPaths([&](bool avx) {
      Out& o = got[avx ? 1 : 0];
      std::vector<float> r = res0;
      std::vector<uint8_t> b(oneBitPayloadBytes(chunk) * 2);
      oneBitCompress(x.data(), r.data(), n, chunk, 2, b.data());
      o.bytes = b;
      const size_t count = std::min(n, chunk);
      std::vector<uint8_t> s(oneBitPayloadBytes(chunk));
      oneBitServerReduce(b.data(), 2, chunk, count, 2, r.data(), s.data());
      o.bytes.insert(o.bytes.end(), s.begin(), s.end());
      // Five payloads (the server's hand-vectorised sum over an odd rank count).
      const size_t pb = oneBitPayloadBytes(chunk);
      std::vector<uint8_t> b5(pb * 5);
      for (int k = 0; k < 5; ++k) std::memcpy(b5.data() + k * pb, b.data() + (k % 2) * pb, pb);
      oneBitServerReduce(b5.data(), 5, chunk, count, 5, r.data(), s.data());
      o.bytes.insert(o.bytes.end(), s.begin(), s.end());
      for (int bits : {8, 4}) {
        for (bool ef : {true, false}) {
          std::vector<uint8_t> q(qsgdPayloadBytes(chunk, bits) * 2);
          qsgdCompress(x.data(), ef ? r.data() : nullptr, n, chunk, 2, bits, 17u, q.data(), 3u);
          o.bytes.insert(o.bytes.end(), q.begin(), q.end());
          std::vector<uint8_t> sq(qsgdPayloadBytes(chunk, bits));
          qsgdServerReduce(q.data(), 2, chunk, count, 2, ef ? r.data() : nullptr, bits, 19u, sq.data(), 5u);
          o.bytes.insert(o.bytes.end(), sq.begin(), sq.end());
          // Decode (plain and accumulating): the 4-bit path has its own AVX2 loop.
          std::vector<float> dq(chunk * 2, 0.5f);
          qsgdDecompress(q.data(), 2, chunk, n, bits, dq.data(), false);
          qsgdDecompress(q.data(), 2, chunk, n, bits, dq.data(), true);
          const auto* db = reinterpret_cast<const uint8_t*>(dq.data());
          o.bytes.insert(o.bytes.end(), db, db + dq.size() * sizeof(float));
        }
      }
      o.res = r;
    });
    if (!ran) GTEST_SKIP() << "no AVX2 on this CPU";
    EXPECT_EQ(got[0].bytes, got[1].bytes) << n;
    EXPECT_TRUE(sameBits(got[0].res, got[1].res)) << n;
  }
}

TEST(CompressSimd, QsgdLevelsFollowTheElementFormula) {
  // The fast paths against compress_math.h applied element by element (whichever path
  // this CPU runs): scale = max |x|, level = qsgdQuantize with counterUniform(seed, base + j).
  const size_t n = 1000, chunk = 1024;
  auto x = randn(n, 300);
  for (int bits : {8, 4}) {
    std::vector<uint8_t> q(qsgdPayloadBytes(chunk, bits));
    qsgdCompress(x.data(), nullptr, n, chunk, 1, bits, 23u, q.data(), 1000u);
    for (size_t first = 0; first < chunk; first += kQsgdBlock) {
      const uint8_t* block = q.data() + qsgdPayloadOffset(first, bits);
      float mx = 0.0f;
      for (size_t i = first; i < std::min(n, first + kQsgdBlock); ++i) mx = std::max(mx, std::fabs(x[i]));
      ASSERT_EQ(payloadScale(block), mx);
      const float inv = (float)qsgdLevels(bits) / mx;
      for (size_t j = 0; j < kQsgdBlock; ++j) {
        const size_t i = first + j;
        const int want = i < n ? qsgdQuantize(x[i], inv, qsgdLevels(bits), counterUniform(23u, 1000u + (uint32_t)i)) : 0;
        const int got = bits == 8 ? (int)(int8_t)block[4 + j]
                                  : (j % 2 ? qsgdHighLevel(block[4 + j / 2]) : qsgdLowLevel(block[4 + j / 2]));
        ASSERT_EQ(got, want) << bits << " " << i;
      }
    }
  }
}

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
