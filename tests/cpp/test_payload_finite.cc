// kernels/payload_finite: the finiteness read off a payload agrees with the decoded
// values, for every codec, on awkward lengths and with inf / NaN anywhere.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/compress.h"
#include "kernels/payload_finite.h"

namespace pycomm {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNan = std::numeric_limits<float>::quiet_NaN();

size_t padded(size_t n) { return (n + kCompressAlign - 1) / kCompressAlign * kCompressAlign; }

bool allFinite(const std::vector<float>& v, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(v[i])) return false;
  }
  return true;
}

std::vector<float> values(size_t n, size_t bad, float what) {
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * 3.0f;
  if (bad < n) x[bad] = what;
  return x;
}

struct Case {
  size_t n;
  size_t bad;  // index of the inf / NaN (>= n: none)
  float what;
};

std::vector<Case> cases() {
  std::vector<Case> out;
  for (size_t n : {size_t{1}, size_t{31}, size_t{2049}, size_t{5003}}) {
    out.push_back({n, n, 0.0f});
    for (size_t bad : {size_t{0}, n / 2, n - 1}) {
      out.push_back({n, bad, kInf});
      out.push_back({n, bad, -kInf});
      out.push_back({n, bad, kNan});
    }
  }
  return out;
}

TEST(PayloadFinite, OneBitScalesDecide) {
  for (const Case& c : cases()) {
    const size_t chunk = padded(c.n);
    auto x = values(c.n, c.bad, c.what);
    std::vector<uint8_t> payload(oneBitPayloadBytes(chunk));
    oneBitCompress(x.data(), nullptr, c.n, chunk, 1, payload.data());
    std::vector<float> out(c.n);
    oneBitDecompress(payload.data(), 1, chunk, c.n, out.data(), false);
    EXPECT_EQ(oneBitPayloadFinite(payload.data(), c.n), allFinite(out, c.n)) << c.n << " " << c.bad;
    EXPECT_EQ(oneBitPayloadFinite(payload.data(), c.n), c.bad >= c.n) << c.n << " " << c.bad;
  }
}

TEST(PayloadFinite, QsgdScalesDecide) {
  for (int bits : {8, 4}) {
    for (const Case& c : cases()) {
      const size_t chunk = padded(c.n);
      auto x = values(c.n, c.bad, c.what);
      std::vector<uint8_t> payload(qsgdPayloadBytes(chunk, bits));
      qsgdCompress(x.data(), nullptr, c.n, chunk, 1, bits, 5u, payload.data());
      std::vector<float> out(c.n);
      qsgdDecompress(payload.data(), 1, chunk, c.n, bits, out.data(), false);
      EXPECT_EQ(qsgdPayloadFinite(payload.data(), c.n, bits), allFinite(out, c.n))
          << bits << " " << c.n << " " << c.bad;
    }
  }
}

TEST(PayloadFinite, HalfAndFloatScanExponents) {
  for (bool bf16 : {false, true}) {
    for (const Case& c : cases()) {
      auto x = values(c.n, c.bad, c.what);
      std::vector<uint16_t> payload(c.n);
      halfCompress(x.data(), nullptr, c.n, c.n, bf16, payload.data());
      std::vector<float> out(c.n);
      halfDecompress(payload.data(), c.n, bf16, out.data());
      EXPECT_EQ(halfPayloadFinite(payload.data(), c.n, bf16), allFinite(out, c.n)) << bf16 << " " << c.n;
      EXPECT_EQ(halfPayloadFinite(payload.data(), c.n, bf16), c.bad >= c.n) << bf16 << " " << c.n;
    }
  }
  for (const Case& c : cases()) {
    auto x = values(c.n, c.bad, c.what);
    EXPECT_EQ(floatPayloadFinite(x.data(), c.n), c.bad >= c.n) << c.n << " " << c.bad;
  }
  // Overflow to half: finite in float32, inf once rounded.
  std::vector<float> big{1.0f, 70000.0f};
  std::vector<uint16_t> h(2);
  halfCompress(big.data(), nullptr, 2, 2, false, h.data());
  EXPECT_FALSE(halfPayloadFinite(h.data(), 2, false));
  halfCompress(big.data(), nullptr, 2, 2, true, h.data());
  EXPECT_TRUE(halfPayloadFinite(h.data(), 2, true));
  EXPECT_TRUE(floatPayloadFinite(nullptr, 0));
}

}  // namespace
}  // namespace pycomm
