// CPU loops of the fused compression kernels. The inner loops work on fixed-size groups
// (32 elements for sign words, 16-lane float partial sums, kQsgdBlock blocks held in a
// stack buffer) so the compiler vectorises them and every buffer is streamed once or twice.
#include "kernels/compress.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYCOMM_X86 1
#endif

namespace pycomm {
namespace {

#if defined(PYCOMM_X86)
// Half conversions with the F16C instructions (round to nearest even, like floatToHalf;
// only NaN payload bits may differ), chosen at run time so the build needs no -mf16c.
const bool kHasF16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");

__attribute__((target("avx,f16c"))) void halfCompressF16c(const float* x, float* residual, size_t n,
                                                          uint16_t* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(residual + i));
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
    if (residual) _mm256_storeu_ps(residual + i, _mm256_sub_ps(v, _mm256_cvtph_ps(h)));
  }
  for (; i < n; ++i) {
    const float v = x[i] + (residual ? residual[i] : 0.0f);
    out[i] = floatToHalf(v);
    if (residual) residual[i] = v - halfToFloat(out[i]);
  }
}

__attribute__((target("avx,f16c"))) void halfDecompressF16c(const uint16_t* in, size_t n, float* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = halfToFloat(in[i]);
}
#endif

constexpr size_t kLanes = 16;

/// Sum over i < n of f(i), with 16 independent float lanes (vectorisable without
/// reassociation) flushed into a double every 1024 elements, so long chunks keep precision.
template <typename F>
double laneSum(size_t n, F&& f) {
  double total = 0.0;
  size_t i = 0;
  while (i < n) {
    const size_t end = std::min(n, i + 1024);
    float acc[kLanes] = {0};
    for (; i + kLanes <= end; i += kLanes) {
      for (size_t j = 0; j < kLanes; ++j) acc[j] += f(i + j);
    }
    for (; i < end; ++i) acc[0] += f(i);
    for (size_t j = 0; j < kLanes; ++j) total += acc[j];
  }
  return total;
}

/// Packs v[0:count) (count <= chunk) into one OneBit payload with scale = absSum / count and
/// stores the quantisation error back into v when `update` is set.
void packSigns(float* v, size_t count, size_t chunk, double absSum, bool update, uint8_t* out) {
  const float scale = count ? (float)(absSum / (double)count) : 0.0f;
  std::memcpy(out, &scale, 4);
  uint8_t* bits = out + 4;
  const size_t words = chunk / 32;
  const size_t full = count / 32;
  for (size_t w = 0; w < full; ++w) {
    float* p = v + 32 * w;
    uint32_t word = 0;
#if defined(PYCOMM_X86)
    // Same rule as oneBitSign: bit = !(x < 0), four lanes per movemask; the sent value is
    // scale with its sign flipped where x < 0.
    const __m128 zero = _mm_setzero_ps();
    const __m128 sv = _mm_set1_ps(scale);
    const __m128 signBit = _mm_set1_ps(-0.0f);
    uint32_t neg = 0;
    for (uint32_t j = 0; j < 32; j += 4) {
      const __m128 x = _mm_loadu_ps(p + j);
      const __m128 lt = _mm_cmplt_ps(x, zero);
      neg |= (uint32_t)_mm_movemask_ps(lt) << j;
      if (update) _mm_storeu_ps(p + j, _mm_sub_ps(x, _mm_xor_ps(sv, _mm_and_ps(lt, signBit))));
    }
    word = ~neg;
#else
    for (uint32_t j = 0; j < 32; ++j) word |= oneBitSign(p[j]) << j;
    if (update) {
      for (uint32_t j = 0; j < 32; ++j) p[j] -= oneBitValue((word >> j) & 1u, scale);
    }
#endif
    std::memcpy(bits + 4 * w, &word, 4);
  }
  for (size_t w = full; w < words; ++w) {
    uint32_t word = 0;
    for (size_t j = 0; j < 32 && 32 * w + j < count; ++j) {
      float& x = v[32 * w + j];
      const uint32_t b = oneBitSign(x);
      word |= b << j;
      if (update) x -= oneBitValue(b, scale);
    }
    std::memcpy(bits + 4 * w, &word, 4);
  }
}

/// Unpacks one OneBit payload into out[0:count).
void unpackSigns(const uint8_t* in, size_t count, float* out, bool accumulate) {
  float scale;
  std::memcpy(&scale, in, 4);
  const uint8_t* bits = in + 4;
  const size_t full = count / 32;
  for (size_t w = 0; w < full; ++w) {
    uint32_t word;
    std::memcpy(&word, bits + 4 * w, 4);
    float* p = out + 32 * w;
#if defined(PYCOMM_X86)
    // Four lanes at a time: lane j's bit selects +scale (set) or -scale (clear).
    const __m128i laneBits = _mm_set_epi32(8, 4, 2, 1);
    const __m128 sv = _mm_set1_ps(scale);
    const __m128 signBit = _mm_set1_ps(-0.0f);
    for (uint32_t j = 0; j < 32; j += 4) {
      const __m128i nib = _mm_set1_epi32((int)((word >> j) & 0xFu));
      const __m128 set = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_and_si128(nib, laneBits), laneBits));
      const __m128 val = _mm_xor_ps(sv, _mm_andnot_ps(set, signBit));
      _mm_storeu_ps(p + j, accumulate ? _mm_add_ps(_mm_loadu_ps(p + j), val) : val);
    }
#else
    if (accumulate) {
      for (uint32_t j = 0; j < 32; ++j) p[j] += oneBitValue((word >> j) & 1u, scale);
    } else {
      for (uint32_t j = 0; j < 32; ++j) p[j] = oneBitValue((word >> j) & 1u, scale);
    }
#endif
  }
  if (full * 32 < count) {
    uint32_t word;
    std::memcpy(&word, bits + 4 * full, 4);
    for (size_t i = full * 32; i < count; ++i) {
      const float v = oneBitValue((word >> (i - full * 32)) & 1u, scale);
      out[i] = accumulate ? out[i] + v : v;
    }
  }
}

/// Elements of chunk c that hold real data.
size_t validCount(size_t n, size_t chunk, size_t c) {
  const size_t start = c * chunk;
  return start >= n ? 0 : std::min(chunk, n - start);
}

void checkChunk(size_t chunk) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0, "compression chunk ", chunk, " is not a multiple of ",
                   kCompressAlign);
}

void checkBits(int bits) { PYCOMM_CHECK_ARG(bits == 8 || bits == 4, "QSGD bits must be 8 or 4, got ", bits); }

void checkDivisor(int divisor) { PYCOMM_CHECK_ARG(divisor >= 1, "divisor must be >= 1, got ", divisor); }

/// Quantises block v[0:count) (count <= kQsgdBlock; zeros past count up to `padded`) and
/// writes levels at `levelsOut` (byte or nibble layout, relative to the block start `first`
/// inside the chunk, `first` even). Updates v to the quantisation error when `update`.
// The hash-based stochastic rounding vectorises well only with 32-bit integer
// multiplies (SSE4.1/AVX2): build an AVX2 clone next to the baseline one, picked at
// load time by the CPU (GCC function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(__SANITIZE_THREAD__)
__attribute__((target_clones("avx2", "default")))
#endif
float quantizeBlock(float* v, size_t count, size_t padded, size_t first, int bits, uint32_t seed,
                    uint32_t indexBase, bool update, uint8_t* data) {
  float maxAbs = 0.0f;
  for (size_t j = 0; j < count; ++j) maxAbs = std::max(maxAbs, std::fabs(v[j]));
  const int levels = qsgdLevels(bits);
  const float inv = maxAbs > 0.0f ? (float)levels / maxAbs : 0.0f;
  if (bits == 8) {
    int8_t* __restrict__ q = reinterpret_cast<int8_t*>(data) + first;
    float* __restrict__ w = v;
    // Two branch-free loops (with and without the residual update) so both vectorise.
    if (update) {
      for (size_t j = 0; j < count; ++j) {
        const int l = qsgdQuantize(w[j], inv, levels, counterUniform(seed, indexBase + (uint32_t)j));
        q[j] = (int8_t)l;
        w[j] -= qsgdDequantize(l, maxAbs, levels);
      }
    } else {
      for (size_t j = 0; j < count; ++j) {
        q[j] = (int8_t)qsgdQuantize(w[j], inv, levels, counterUniform(seed, indexBase + (uint32_t)j));
      }
    }
    for (size_t j = count; j < padded; ++j) q[j] = 0;
  } else {
    uint8_t* q = data + first / 2;
    for (size_t j = 0; j < padded; j += 2) {
      int l0 = 0, l1 = 0;
      if (j < count) {
        l0 = qsgdQuantize(v[j], inv, levels, counterUniform(seed, indexBase + (uint32_t)j));
        if (update) v[j] -= qsgdDequantize(l0, maxAbs, levels);
      }
      if (j + 1 < count) {
        l1 = qsgdQuantize(v[j + 1], inv, levels, counterUniform(seed, indexBase + (uint32_t)(j + 1)));
        if (update) v[j + 1] -= qsgdDequantize(l1, maxAbs, levels);
      }
      q[j / 2] = (uint8_t)(qsgdNibble(l0) | (qsgdNibble(l1) << 4));
    }
  }
  return maxAbs;
}

/// Dequantises block [first, first+count) of a chunk payload, adding into acc (+= ) or
/// writing it, each level times `mul` (1 or 1/divisor handled by the caller).
template <bool kAccumulate>
void dequantizeBlock(const uint8_t* data, size_t first, size_t count, float scale, int bits, float* out) {
  const int levels = qsgdLevels(bits);
  const float step = scale / (float)levels;
  if (bits == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(data) + first;
    for (size_t j = 0; j < count; ++j) {
      const float v = (float)q[j] * step;
      out[j] = kAccumulate ? out[j] + v : v;
    }
  } else {
    const uint8_t* q = data + first / 2;
    size_t j = 0;
    for (; j + 2 <= count; j += 2) {
      const uint32_t b = q[j / 2];
      const float v0 = (float)qsgdLowLevel(b) * step;
      const float v1 = (float)qsgdHighLevel(b) * step;
      out[j] = kAccumulate ? out[j] + v0 : v0;
      out[j + 1] = kAccumulate ? out[j + 1] + v1 : v1;
    }
    if (j < count) {
      const float v0 = (float)qsgdLowLevel(q[j / 2]) * step;
      out[j] = kAccumulate ? out[j] + v0 : v0;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- OneBit

void oneBitCompress(const float* x, float* residual, size_t n, size_t chunk, size_t numChunks,
                    uint8_t* out) {
  checkChunk(chunk);
  PYCOMM_CHECK_ARG(n <= chunk * numChunks, "oneBitCompress: ", n, " elements do not fit ", numChunks,
                   " chunks of ", chunk);
  PYCOMM_CHECK_ARG(x || residual, "oneBitCompress: no input");
  std::vector<float> scratch;
  const size_t payload = oneBitPayloadBytes(chunk);
  for (size_t c = 0; c < numChunks; ++c) {
    const size_t count = validCount(n, chunk, c);
    const size_t start = c * chunk;
    float* v;
    double absSum;
    if (residual) {
      v = residual + start;
      const float* xs = x ? x + start : nullptr;
      absSum = xs ? laneSum(count, [&](size_t i) { return std::fabs(v[i] += xs[i]); })
                  : laneSum(count, [&](size_t i) { return std::fabs(v[i]); });
    } else {
      // No error feedback: pack straight from x (scratch only holds x, never written back).
      scratch.assign(x + start, x + start + count);
      v = scratch.data();
      absSum = laneSum(count, [&](size_t i) { return std::fabs(v[i]); });
    }
    packSigns(v, count, chunk, absSum, residual != nullptr, out + c * payload);
  }
}

void oneBitServerReduce(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                        float* residual, uint8_t* out) {
  checkChunk(chunk);
  checkDivisor(divisor);
  PYCOMM_CHECK_ARG(count <= chunk && residual, "oneBitServerReduce: bad count or no residual");
  const size_t payload = oneBitPayloadBytes(chunk);
  const float div = (float)divisor;
  // Pass 1: residual += (sum of the ranks' scale*sign) / divisor, 32 elements at a time.
  double absSum = 0.0;
  for (size_t base = 0; base < count; base += 32) {
    const size_t m = std::min<size_t>(32, count - base);
    float acc[32] = {0};
    for (int r = 0; r < numPayloads; ++r) {
      const uint8_t* p = in + (size_t)r * payload;
      float scale;
      std::memcpy(&scale, p, 4);
      uint32_t word;
      std::memcpy(&word, p + 4 + base / 8, 4);
      for (uint32_t j = 0; j < 32; ++j) acc[j] += oneBitValue((word >> j) & 1u, scale);
    }
    float* v = residual + base;
    float part = 0.0f;
    for (size_t j = 0; j < m; ++j) {
      v[j] += acc[j] / div;
      part += std::fabs(v[j]);
    }
    absSum += part;
  }
  // Pass 2: re-compress with the server error (written back into residual).
  packSigns(residual, count, chunk, absSum, true, out);
}

void oneBitDecompress(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, float* out,
                      bool accumulate) {
  checkChunk(chunk);
  PYCOMM_CHECK_ARG(n <= chunk * numChunks, "oneBitDecompress: ", n, " elements do not fit");
  const size_t payload = oneBitPayloadBytes(chunk);
  for (size_t c = 0; c < numChunks; ++c) {
    const size_t count = validCount(n, chunk, c);
    if (count) unpackSigns(in + c * payload, count, out + c * chunk, accumulate);
  }
}

// ---------------------------------------------------------------- QSGD

void qsgdCompress(const float* x, float* residual, size_t n, size_t chunk, size_t numChunks, int bits,
                  uint32_t seed, uint8_t* out, uint32_t indexBase) {
  checkChunk(chunk);
  checkBits(bits);
  PYCOMM_CHECK_ARG(n <= chunk * numChunks, "qsgdCompress: ", n, " elements do not fit");
  PYCOMM_CHECK_ARG(x || residual, "qsgdCompress: no input");
  const size_t payload = qsgdPayloadBytes(chunk, bits);
  const size_t blocks = qsgdNumBlocks(chunk);
  float buf[kQsgdBlock];
  for (size_t c = 0; c < numChunks; ++c) {
    uint8_t* p = out + c * payload;
    uint8_t* data = p + 4 * blocks;
    const size_t count = validCount(n, chunk, c);
    for (size_t b = 0; b < blocks; ++b) {
      const size_t first = b * kQsgdBlock;
      const size_t padded = std::min(kQsgdBlock, chunk - first);
      const size_t m = first >= count ? 0 : std::min(padded, count - first);
      const size_t g = c * chunk + first;  // global index of the block's first element
      float* v = residual ? residual + g : buf;
      if (residual && x) {
        for (size_t j = 0; j < m; ++j) v[j] += x[g + j];
      } else if (!residual) {
        std::memcpy(buf, x + g, m * sizeof(float));
      }
      const float scale = quantizeBlock(v, m, padded, first, bits, seed, indexBase + (uint32_t)g, residual != nullptr, data);
      std::memcpy(p + 4 * b, &scale, 4);
    }
  }
}

void qsgdServerReduce(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                      float* residual, int bits, uint32_t seed, uint8_t* out, uint32_t indexBase) {
  checkChunk(chunk);
  checkBits(bits);
  checkDivisor(divisor);
  PYCOMM_CHECK_ARG(count <= chunk, "qsgdServerReduce: count > chunk");
  const size_t payload = qsgdPayloadBytes(chunk, bits);
  const size_t blocks = qsgdNumBlocks(chunk);
  uint8_t* data = out + 4 * blocks;
  const float div = (float)divisor;
  float buf[kQsgdBlock];
  for (size_t b = 0; b < blocks; ++b) {
    const size_t first = b * kQsgdBlock;
    const size_t padded = std::min(kQsgdBlock, chunk - first);
    const size_t m = first >= count ? 0 : std::min(padded, count - first);
    std::fill(buf, buf + m, 0.0f);
    for (int r = 0; r < numPayloads; ++r) {
      const uint8_t* p = in + (size_t)r * payload;
      float scale;
      std::memcpy(&scale, p + 4 * b, 4);
      dequantizeBlock<true>(p + 4 * blocks, first, m, scale, bits, buf);
    }
    float* v = residual ? residual + first : buf;
    if (residual) {
      for (size_t j = 0; j < m; ++j) v[j] += buf[j] / div;
    } else {
      for (size_t j = 0; j < m; ++j) v[j] = buf[j] / div;
    }
    const float scale = quantizeBlock(v, m, padded, first, bits, seed, indexBase + (uint32_t)first, residual != nullptr, data);
    std::memcpy(out + 4 * b, &scale, 4);
  }
}

void qsgdDecompress(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, int bits, float* out,
                    bool accumulate) {
  checkChunk(chunk);
  checkBits(bits);
  PYCOMM_CHECK_ARG(n <= chunk * numChunks, "qsgdDecompress: ", n, " elements do not fit");
  const size_t payload = qsgdPayloadBytes(chunk, bits);
  const size_t blocks = qsgdNumBlocks(chunk);
  for (size_t c = 0; c < numChunks; ++c) {
    const uint8_t* p = in + c * payload;
    const size_t count = validCount(n, chunk, c);
    for (size_t b = 0; b < blocks; ++b) {
      const size_t first = b * kQsgdBlock;
      if (first >= count) break;
      const size_t m = std::min(kQsgdBlock, count - first);
      float scale;
      std::memcpy(&scale, p + 4 * b, 4);
      float* o = out + c * chunk + first;
      if (accumulate) {
        dequantizeBlock<true>(p + 4 * blocks, first, m, scale, bits, o);
      } else {
        dequantizeBlock<false>(p + 4 * blocks, first, m, scale, bits, o);
      }
    }
  }
}

// ---------------------------------------------------------------- FP16 / BF16

namespace {
template <bool kBf16>
void halfCompressT(const float* x, float* residual, size_t n, uint16_t* out) {
  if (residual) {
    for (size_t i = 0; i < n; ++i) {
      const float v = x[i] + residual[i];
      const uint16_t h = kBf16 ? floatToBf16(v) : floatToHalf(v);
      out[i] = h;
      residual[i] = v - (kBf16 ? bf16ToFloat(h) : halfToFloat(h));
    }
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = kBf16 ? floatToBf16(x[i]) : floatToHalf(x[i]);
  }
}

template <bool kBf16>
void halfServerReduceT(const uint16_t* in, int numPayloads, size_t chunk, size_t count, float div,
                       float* residual, uint16_t* out) {
  constexpr size_t kGroup = 64;
  for (size_t base = 0; base < count; base += kGroup) {
    const size_t m = std::min(kGroup, count - base);
    float acc[kGroup] = {0};
    for (int r = 0; r < numPayloads; ++r) {
      const uint16_t* p = in + (size_t)r * chunk + base;
      for (size_t j = 0; j < m; ++j) acc[j] += kBf16 ? bf16ToFloat(p[j]) : halfToFloat(p[j]);
    }
    for (size_t j = 0; j < m; ++j) {
      float v = acc[j] / div;
      if (residual) v += residual[base + j];
      const uint16_t h = kBf16 ? floatToBf16(v) : floatToHalf(v);
      out[base + j] = h;
      if (residual) residual[base + j] = v - (kBf16 ? bf16ToFloat(h) : halfToFloat(h));
    }
  }
  for (size_t i = count; i < chunk; ++i) out[i] = 0;
}
}  // namespace

void halfCompress(const float* x, float* residual, size_t n, size_t outCount, bool bf16, uint16_t* out) {
  PYCOMM_CHECK_ARG(outCount >= n, "halfCompress: outCount < n");
#if defined(PYCOMM_X86)
  if (!bf16 && kHasF16c) {
    halfCompressF16c(x, residual, n, out);
    for (size_t i = n; i < outCount; ++i) out[i] = 0;
    return;
  }
#endif
  if (bf16) {
    halfCompressT<true>(x, residual, n, out);
  } else {
    halfCompressT<false>(x, residual, n, out);
  }
  for (size_t i = n; i < outCount; ++i) out[i] = 0;
}

void halfServerReduce(const uint16_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                      float* residual, bool bf16, uint16_t* out) {
  checkDivisor(divisor);
  PYCOMM_CHECK_ARG(count <= chunk, "halfServerReduce: count > chunk");
  if (bf16) {
    halfServerReduceT<true>(in, numPayloads, chunk, count, (float)divisor, residual, out);
  } else {
    halfServerReduceT<false>(in, numPayloads, chunk, count, (float)divisor, residual, out);
  }
}

void halfDecompress(const uint16_t* in, size_t n, bool bf16, float* out) {
#if defined(PYCOMM_X86)
  if (!bf16 && kHasF16c) {
    halfDecompressF16c(in, n, out);
    return;
  }
#endif
  if (bf16) {
    for (size_t i = 0; i < n; ++i) out[i] = bf16ToFloat(in[i]);
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = halfToFloat(in[i]);
  }
}

void floatServerReduce(const float* in, int numPayloads, size_t chunk, size_t count, int divisor,
                       float* out) {
  checkDivisor(divisor);
  PYCOMM_CHECK_ARG(count <= chunk, "floatServerReduce: count > chunk");
  const float div = (float)divisor;
  constexpr size_t kGroup = 64;
  for (size_t base = 0; base < count; base += kGroup) {
    const size_t m = std::min(kGroup, count - base);
    float acc[kGroup] = {0};
    for (int r = 0; r < numPayloads; ++r) {
      const float* p = in + (size_t)r * chunk + base;
      for (size_t j = 0; j < m; ++j) acc[j] += p[j];
    }
    if (divisor == 1) {
      std::memcpy(out + base, acc, m * sizeof(float));
    } else {
      for (size_t j = 0; j < m; ++j) out[base + j] = acc[j] / div;
    }
  }
  for (size_t i = count; i < chunk; ++i) out[i] = 0.0f;
}

// ---------------------------------------------------------------- TopK

void topkCompress(const float* x, float* residual, size_t n, size_t k, float* values, int32_t* indices) {
  PYCOMM_CHECK_ARG(x || residual, "topkCompress: no input");
  PYCOMM_CHECK_ARG(n <= (size_t)INT32_MAX, "topkCompress: ", n, " elements exceed int32 indices");
  k = std::min(k, n);
  // Pass 1: v = x + residual, histogram of the top 16 magnitude bits.
  std::vector<uint32_t> hist(65536, 0);
  const float* v = residual ? residual : x;
  if (residual && x) {
    for (size_t i = 0; i < n; ++i) {
      residual[i] += x[i];
      hist[magnitudeKey(residual[i]) >> 16]++;
    }
  } else {
    for (size_t i = 0; i < n; ++i) hist[magnitudeKey(v[i]) >> 16]++;
  }
  if (k == 0) return;
  // Highest bucket H such that at least k keys lie in buckets >= H.
  size_t above = 0;
  uint32_t hi = 65535;
  for (;; --hi) {
    if (above + hist[hi] >= k) break;
    above += hist[hi];
  }
  // Pass 2: histogram of the low 16 bits inside bucket H.
  std::fill(hist.begin(), hist.end(), 0u);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t key = magnitudeKey(v[i]);
    if ((key >> 16) == hi) hist[key & 0xffffu]++;
  }
  uint32_t lo = 65535;
  for (;; --lo) {
    if (above + hist[lo] >= k) break;
    above += hist[lo];
  }
  const uint32_t threshold = (hi << 16) | lo;
  size_t ties = k - above;  // keys equal to the threshold still to take, lowest index first
  // Pass 3: emit in index order, zero what was sent in the residual.
  size_t o = 0;
  for (size_t i = 0; i < n && o < k; ++i) {
    const uint32_t key = magnitudeKey(v[i]);
    if (key > threshold || (key == threshold && ties > 0)) {
      if (key == threshold) --ties;
      values[o] = v[i];
      indices[o] = (int32_t)i;
      ++o;
      if (residual) residual[i] = 0.0f;
    }
  }
}

void topkDecompress(const int32_t* in, int numPayloads, size_t k, size_t n, int divisor, float* out) {
  checkDivisor(divisor);
  std::fill(out, out + n, 0.0f);
  for (int r = 0; r < numPayloads; ++r) {
    const int32_t* p = in + (size_t)r * 2 * k;
    const int32_t* idx = p + k;
    for (size_t j = 0; j < k; ++j) {
      PYCOMM_CHECK_ARG(idx[j] >= 0 && (size_t)idx[j] < n, "topkDecompress: index ", idx[j], " outside [0, ",
                       n, ")");
      out[idx[j]] += bitsFloat((uint32_t)p[j]);  // values travel as their bit patterns
    }
  }
  if (divisor > 1) {
    const float div = (float)divisor;
    for (size_t i = 0; i < n; ++i) out[i] /= div;
  }
}

}  // namespace pycomm
