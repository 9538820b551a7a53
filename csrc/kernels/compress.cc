// CPU loops of the fused compression kernels. The inner loops work on fixed-size groups
// (32 elements for sign words, 16-lane float partial sums, kQsgdBlock blocks held in a
// stack buffer) so the compiler vectorises them and every buffer is streamed once or twice.
// One job over ~700 lines: every codec's CPU loop (OneBit, QSGD, FP16/BF16, TopK) built
// on the block helpers at the top, which the codecs share (a split per codec would
// have to export those helpers to each file).
#include "kernels/compress.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "kernels/compress_avx2.h"

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

#if defined(PYCOMM_X86)
/// Whether the AVX2 paths run (CPU support, switchable by setCompressSimd for tests).
std::atomic<bool> gUseAvx2{__builtin_cpu_supports("avx2") != 0};
inline bool useAvx2() { return gUseAvx2.load(std::memory_order_relaxed); }
#define PYCOMM_INLINE inline __attribute__((always_inline))
#else
inline bool useAvx2() { return false; }
#define PYCOMM_INLINE inline
#endif

/// Elements of chunk c that hold real data.
size_t validCount(size_t n, size_t chunk, size_t c) {
  const size_t start = c * chunk;
  return start >= n ? 0 : std::min(chunk, n - start);
}

/// Valid elements of the block [first, first + len) when `count` elements are valid.
size_t validIn(size_t count, size_t first, size_t len) {
  return first >= count ? 0 : std::min(len, count - first);
}

void checkChunk(size_t chunk) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0, "compression chunk ", chunk, " is not a multiple of ",
                   kCompressAlign);
}

void checkBits(int bits) { PYCOMM_CHECK_ARG(bits == 8 || bits == 4, "QSGD bits must be 8 or 4, got ", bits); }

void checkDivisor(int divisor) { PYCOMM_CHECK_ARG(divisor >= 1, "divisor must be >= 1, got ", divisor); }

// ---------------------------------------------------------------- OneBit blocks
// One OneBit block (<= kOneBitBlock elements, 8 KiB of floats) is processed in two passes
// while it sits in L1: pass 1 forms v (x + residual, or the server sum) and the 16 lane
// sums of |v|; pass 2 packs the signs and writes the error into the residual. The block
// bodies below are plain loops plus SSE2 (x86 baseline) intrinsics; they are compiled
// twice, for the baseline and for AVX2 (wider auto-vectorised lane sums and VEX code),
// from the same always-inline source, so both give the same bits (no FMA in either).

/// Lane sums (kOneBitLanes float lanes, see oneBitLaneSum) of |v| for v = x + r (written
/// back to r) when both are given, else of |x| or |r|, over [0, valid).
PYCOMM_INLINE void oneBitLanes(const float* x, float* r, size_t valid, float (&lanes)[kOneBitLanes]) {
  constexpr size_t L = kOneBitLanes;
  float acc[L] = {0};
  const size_t full = valid / L * L;
  if (x && r) {
    for (size_t i = 0; i < full; i += L) {
      for (size_t j = 0; j < L; ++j) {
        const float v = r[i + j] + x[i + j];
        r[i + j] = v;
        acc[j] += std::fabs(v);
      }
    }
    for (size_t j = 0; full + j < valid; ++j) {
      const float v = r[full + j] + x[full + j];
      r[full + j] = v;
      acc[j] += std::fabs(v);
    }
  } else {
    const float* v = x ? x : r;
    for (size_t i = 0; i < full; i += L) {
      for (size_t j = 0; j < L; ++j) acc[j] += std::fabs(v[i + j]);
    }
    for (size_t j = 0; full + j < valid; ++j) acc[j] += std::fabs(v[full + j]);
  }
  for (size_t j = 0; j < L; ++j) lanes[j] = acc[j];
}

/// Packs the signs of v[0:valid) into the sign bits of a block of `len` elements (padding
/// encodes as 1) with `scale`; when `res` is given (it may alias v) writes res = v -
/// scale*sign(v) for the valid elements.
PYCOMM_INLINE void oneBitPack(const float* v, float* res, size_t valid, size_t len, float scale, uint8_t* bits) {
  const size_t full = valid / 32;
  for (size_t w = 0; w < full; ++w) {
    const float* p = v + 32 * w;
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
      if (res) _mm_storeu_ps(res + 32 * w + j, _mm_sub_ps(x, _mm_xor_ps(sv, _mm_and_ps(lt, signBit))));
    }
    word = ~neg;
#else
    for (uint32_t j = 0; j < 32; ++j) word |= oneBitSign(p[j]) << j;
    if (res) {
      for (uint32_t j = 0; j < 32; ++j) res[32 * w + j] = p[j] - oneBitValue((word >> j) & 1u, scale);
    }
#endif
    std::memcpy(bits + 4 * w, &word, 4);
  }
  for (size_t w = full; w < len / 32; ++w) {
    uint32_t word = 0;
    for (size_t j = 0; j < 32; ++j) {
      const size_t i = 32 * w + j;
      uint32_t b = 1u;  // padding is a zero: sign bit 1
      if (i < valid) {
        b = oneBitSign(v[i]);
        if (res) res[i] = v[i] - oneBitValue(b, scale);
      }
      word |= b << j;
    }
    std::memcpy(bits + 4 * w, &word, 4);
  }
}

/// Worker block: v = x + r (or x, or r), scale = mean |v| over `valid`, packs the block
/// [scale][len/8 sign bytes] at out; r (if given) becomes the error.
PYCOMM_INLINE void oneBitCompressBlockImpl(const float* x, float* r, size_t valid, size_t len, uint8_t* out) {
  float lanes[kOneBitLanes];
  oneBitLanes(x, r, valid, lanes);
  const float scale = oneBitScale(lanes, valid);
  std::memcpy(out, &scale, 4);
  oneBitPack(r ? r : x, r, valid, len, scale, out + 4);
}

/// Server block: r = r + (sum over the payload blocks `in[k]`, k < numPayloads, of
/// scale*sign) / div on `valid` elements, then compressed like a worker block into out.
PYCOMM_INLINE void oneBitServerBlockImpl(const uint8_t* const* in, int numPayloads, size_t valid, size_t len,
                                         float div, float* r, uint8_t* out, bool simd) {
  float lanes[kOneBitLanes] = {0};
  size_t start = 0;
#if defined(PYCOMM_X86)
  if (simd) {
    // Full 32-element groups vectorised by hand (same additions, same order).
    detail::oneBitServerAccumulateAvx2(in, numPayloads, valid, div, r, lanes);
    start = valid / 32 * 32;
  }
#else
  (void)simd;
#endif
  for (size_t base = start; base < valid; base += 32) {
    const size_t m = std::min<size_t>(32, valid - base);
    float acc[32] = {0};
    for (int k = 0; k < numPayloads; ++k) {
      float scale;
      std::memcpy(&scale, in[k], 4);
      uint32_t word;
      std::memcpy(&word, in[k] + 4 + base / 8, 4);
      for (uint32_t j = 0; j < 32; ++j) acc[j] += oneBitValue((word >> j) & 1u, scale);
    }
    float* v = r + base;
    for (size_t j = 0; j < m; ++j) {
      v[j] += acc[j] / div;
      lanes[j % kOneBitLanes] += std::fabs(v[j]);
    }
  }
  const float scale = oneBitScale(lanes, valid);
  std::memcpy(out, &scale, 4);
  oneBitPack(r, r, valid, len, scale, out + 4);
}

#if defined(PYCOMM_X86)
__attribute__((target("avx2"))) void oneBitCompressBlockAvx2(const float* x, float* r, size_t valid, size_t len,
                                                             uint8_t* out) {
  oneBitCompressBlockImpl(x, r, valid, len, out);
}
__attribute__((target("avx2"))) void oneBitServerBlockAvx2(const uint8_t* const* in, int numPayloads, size_t valid,
                                                           size_t len, float div, float* r, uint8_t* out) {
  oneBitServerBlockImpl(in, numPayloads, valid, len, div, r, out, true);
}
#endif

void oneBitCompressBlock(const float* x, float* r, size_t valid, size_t len, uint8_t* out) {
#if defined(PYCOMM_X86)
  if (useAvx2()) return oneBitCompressBlockAvx2(x, r, valid, len, out);
#endif
  oneBitCompressBlockImpl(x, r, valid, len, out);
}

void oneBitServerBlock(const uint8_t* const* in, int numPayloads, size_t valid, size_t len, float div, float* r,
                       uint8_t* out) {
#if defined(PYCOMM_X86)
  if (useAvx2()) return oneBitServerBlockAvx2(in, numPayloads, valid, len, div, r, out);
#endif
  oneBitServerBlockImpl(in, numPayloads, valid, len, div, r, out, false);
}

/// Unpacks one OneBit block (scale + sign bits) into out[0:count).
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

// ---------------------------------------------------------------- QSGD blocks
// A QSGD block (<= kQsgdBlock elements) is handled in two passes over L1: pass 1 forms v
// (x + residual, written back) and max |v|; pass 2 draws the counter RNG, rounds, packs
// and writes the error. The scalar version uses the element functions of compress_math.h
// as they are; the AVX2 version evaluates the same integer hash and the same float
// operations (one rounding each, no FMA) eight lanes at a time, so both give the same bits.

/// max |v| with v = x + r (written to r) when both are given, else v = x or r.
PYCOMM_INLINE float qsgdPrepare(const float* x, float* r, size_t m) {
  float maxAbs = 0.0f;
  if (x && r) {
    for (size_t j = 0; j < m; ++j) {
      r[j] += x[j];
      maxAbs = std::max(maxAbs, std::fabs(r[j]));
    }
  } else {
    const float* v = x ? x : r;
    for (size_t j = 0; j < m; ++j) maxAbs = std::max(maxAbs, std::fabs(v[j]));
  }
  return maxAbs;
}

/// Quantises v[from:m) (scalar), writing levels into the block's level bytes `q` and the
/// error into res (if given, may alias v); levels in [m, padded) are 0.
void qsgdQuantizeTail(const float* v, float* res, size_t from, size_t m, size_t padded, int bits, float maxAbs,
                      float inv, uint32_t seed, uint32_t index0, uint8_t* q) {
  const int levels = qsgdLevels(bits);
  for (size_t j = from; j < padded; ++j) {
    int l = 0;
    if (j < m) {
      l = qsgdQuantize(v[j], inv, levels, counterUniform(seed, index0 + (uint32_t)j));
      if (res) res[j] = v[j] - qsgdDequantize(l, maxAbs, levels);
    }
    if (bits == 8) {
      q[j] = (uint8_t)(int8_t)l;
    } else if (j % 2 == 0) {
      q[j / 2] = (uint8_t)qsgdNibble(l);
    } else {
      q[j / 2] = (uint8_t)(q[j / 2] | (qsgdNibble(l) << 4));
    }
  }
}

/// Scalar QSGD block: [scale][levels] at out for v = x + r (r becomes the error).
void qsgdBlockScalar(const float* x, float* r, size_t m, size_t padded, int bits, uint32_t seed, uint32_t index0,
                     uint8_t* out) {
  const float maxAbs = qsgdPrepare(x, r, m);
  std::memcpy(out, &maxAbs, 4);
  const float inv = maxAbs > 0.0f ? (float)qsgdLevels(bits) / maxAbs : 0.0f;
  qsgdQuantizeTail(r ? r : x, r, 0, m, padded, bits, maxAbs, inv, seed, index0, out + 4);
}

#if defined(PYCOMM_X86)
/// Eight lanes of counterUniform(seed, idx).
__attribute__((target("avx2"))) inline __m256 counterUniform8(__m256i seed, __m256i idx) {
  __m256i h = _mm256_xor_si256(seed, _mm256_mullo_epi32(idx, _mm256_set1_epi32((int)0x9E3779B9u)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x85EBCA6Bu));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0xC2B2AE35u));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(5.9604644775390625e-08f));
}

/// AVX2 QSGD block, same bits as qsgdBlockScalar.
__attribute__((target("avx2"))) void qsgdBlockAvx2(const float* x, float* r, size_t m, size_t padded, int bits,
                                                   uint32_t seed, uint32_t index0, uint8_t* out) {
  const __m256 absMask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  // Pass 1: v = x + r, max |v| (max_ps(|v|, acc) keeps acc for a NaN |v|, like std::max).
  __m256 mx = _mm256_setzero_ps();
  size_t j = 0;
  if (x && r) {
    for (; j + 8 <= m; j += 8) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(r + j), _mm256_loadu_ps(x + j));
      _mm256_storeu_ps(r + j, v);
      mx = _mm256_max_ps(_mm256_and_ps(v, absMask), mx);
    }
    for (size_t k = j; k < m; ++k) r[k] += x[k];
  } else {
    const float* v = x ? x : r;
    for (; j + 8 <= m; j += 8) mx = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(v + j), absMask), mx);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, mx);
  float maxAbs = 0.0f;
  for (float l : lanes) maxAbs = std::max(maxAbs, l);
  const float* v = r ? r : x;
  for (; j < m; ++j) maxAbs = std::max(maxAbs, std::fabs(v[j]));
  std::memcpy(out, &maxAbs, 4);
  const int levels = qsgdLevels(bits);
  const float inv = maxAbs > 0.0f ? (float)levels / maxAbs : 0.0f;
  uint8_t* q = out + 4;
  // Pass 2: 32 elements per step -> 32 level bytes (8 bits) or 16 nibble bytes (4 bits).
  const __m256 invV = _mm256_set1_ps(inv), levelsV = _mm256_set1_ps((float)levels);
  const __m256 stepV = _mm256_set1_ps(maxAbs / (float)levels);
  const __m256 signMask = _mm256_set1_ps(-0.0f);
  const __m256i seedV = _mm256_set1_epi32((int)seed);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  size_t i = 0;
  for (; i + 32 <= m; i += 32) {
    __m256i lv[4];
    for (int k = 0; k < 4; ++k) {
      const size_t e = i + 8 * (size_t)k;
      const __m256 val = _mm256_loadu_ps(v + e);
      const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(index0 + (uint32_t)e)), iota);
      const __m256 u = counterUniform8(seedV, idx);
      // qsgdQuantize: a = |x|*inv + u; q = min(trunc(a), levels) (min_ps returns levels
      // for a NaN, like fminf); level = copysign(q, x).
      const __m256 a = _mm256_add_ps(_mm256_mul_ps(_mm256_and_ps(val, absMask), invV), u);
      const __m256 t = _mm256_min_ps(_mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC), levelsV);
      const __m256i l = _mm256_cvttps_epi32(_mm256_or_ps(t, _mm256_and_ps(val, signMask)));
      lv[k] = l;
      if (r) _mm256_storeu_ps(r + e, _mm256_sub_ps(val, _mm256_mul_ps(_mm256_cvtepi32_ps(l), stepV)));
    }
    // int32 -> int8 in element order (levels fit, so the saturating packs are exact).
    const __m256i b = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(lv[0], lv[1]), _mm256_packs_epi32(lv[2], lv[3])), order);
    if (bits == 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), b);
    } else {
      // 16-bit lane = (odd << 8) | even -> even nibble | odd nibble << 4 in its low byte.
      const __m256i nib = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi16(0x000F)),
                                          _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi16(0x00F0)));
      const __m128i packed = _mm_packus_epi16(_mm256_castsi256_si128(nib), _mm256_extracti128_si256(nib, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i / 2), packed);
    }
  }
  qsgdQuantizeTail(v, r, i, m, padded, bits, maxAbs, inv, seed, index0, q);
}
#endif

/// One QSGD block of `padded` elements (m valid) into out = [scale][levels]: v = x + r
/// (or x, or r); r, if given, becomes the error. Element j draws index0 + j.
void qsgdBlock(const float* x, float* r, size_t m, size_t padded, int bits, uint32_t seed, uint32_t index0,
               uint8_t* out) {
#if defined(PYCOMM_X86)
  if (useAvx2()) return qsgdBlockAvx2(x, r, m, padded, bits, seed, index0, out);
#endif
  qsgdBlockScalar(x, r, m, padded, bits, seed, index0, out);
}

/// Dequantises count levels of a block (`q` its level bytes) into out (= or +=).
template <bool kAccumulate>
void dequantizeBlock(const uint8_t* q, size_t count, float scale, int bits, float* out) {
  const int levels = qsgdLevels(bits);
  const float step = scale / (float)levels;
  if (bits == 8) {
    const int8_t* l = reinterpret_cast<const int8_t*>(q);
    for (size_t j = 0; j < count; ++j) {
      const float v = (float)l[j] * step;
      out[j] = kAccumulate ? out[j] + v : v;
    }
  } else {
    size_t j = 0;
#if defined(PYCOMM_X86)
    if (useAvx2()) {
      detail::qsgd4DequantizeAvx2(q, count, step, out, kAccumulate);
      j = count / 32 * 32;
    }
#endif
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

bool setCompressSimd(bool enabled) {
#if defined(PYCOMM_X86)
  const bool was = gUseAvx2.load();
  gUseAvx2.store(enabled && __builtin_cpu_supports("avx2"));
  return was;
#else
  (void)enabled;
  return false;
#endif
}

// ---------------------------------------------------------------- OneBit

void oneBitCompress(const float* x, float* residual, size_t n, size_t chunk, size_t numChunks,
                    uint8_t* out) {
  checkChunk(chunk);
  PYCOMM_CHECK_ARG(n <= chunk * numChunks, "oneBitCompress: ", n, " elements do not fit ", numChunks,
                   " chunks of ", chunk);
  PYCOMM_CHECK_ARG(x || residual, "oneBitCompress: no input");
  const size_t payload = oneBitPayloadBytes(chunk);
  for (size_t c = 0; c < numChunks; ++c) {
    const size_t count = validCount(n, chunk, c);
    const size_t start = c * chunk;
    for (size_t first = 0; first < chunk; first += kOneBitBlock) {
      const size_t len = std::min(kOneBitBlock, chunk - first);
      const size_t g = start + first;
      oneBitCompressBlock(x ? x + g : nullptr, residual ? residual + g : nullptr, validIn(count, first, len), len,
                          out + c * payload + oneBitPayloadOffset(first));
    }
  }
}

void oneBitServerReduce(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                        float* residual, uint8_t* out) {
  checkChunk(chunk);
  checkDivisor(divisor);
  PYCOMM_CHECK_ARG(count <= chunk && residual, "oneBitServerReduce: bad count or no residual");
  PYCOMM_CHECK_ARG(numPayloads >= 0, "oneBitServerReduce: negative payload count");
  const size_t payload = oneBitPayloadBytes(chunk);
  std::vector<const uint8_t*> blocks((size_t)numPayloads);
  for (size_t first = 0; first < chunk; first += kOneBitBlock) {
    const size_t len = std::min(kOneBitBlock, chunk - first);
    const size_t off = oneBitPayloadOffset(first);
    for (int r = 0; r < numPayloads; ++r) blocks[(size_t)r] = in + (size_t)r * payload + off;
    oneBitServerBlock(blocks.data(), numPayloads, validIn(count, first, len), len, (float)divisor, residual + first,
                      out + off);
  }
}

void oneBitDecompress(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, float* out,
                      bool accumulate) {
  checkChunk(chunk);
  PYCOMM_CHECK_ARG(n <= chunk * numChunks, "oneBitDecompress: ", n, " elements do not fit");
  const size_t payload = oneBitPayloadBytes(chunk);
  for (size_t c = 0; c < numChunks; ++c) {
    const size_t count = validCount(n, chunk, c);
    for (size_t first = 0; first < count; first += kOneBitBlock) {
      unpackSigns(in + c * payload + oneBitPayloadOffset(first), std::min(kOneBitBlock, count - first),
                  out + c * chunk + first, accumulate);
    }
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
  for (size_t c = 0; c < numChunks; ++c) {
    const size_t count = validCount(n, chunk, c);
    for (size_t first = 0; first < chunk; first += kQsgdBlock) {
      const size_t padded = std::min(kQsgdBlock, chunk - first);
      const size_t g = c * chunk + first;  // global index of the block's first element
      qsgdBlock(x ? x + g : nullptr, residual ? residual + g : nullptr, validIn(count, first, padded), padded, bits,
                seed, indexBase + (uint32_t)g, out + c * payload + qsgdPayloadOffset(first, bits));
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
  const float div = (float)divisor;
  float buf[kQsgdBlock];
  for (size_t first = 0; first < chunk; first += kQsgdBlock) {
    const size_t padded = std::min(kQsgdBlock, chunk - first);
    const size_t m = validIn(count, first, padded);
    const size_t off = qsgdPayloadOffset(first, bits);
    std::fill(buf, buf + m, 0.0f);
    for (int r = 0; r < numPayloads; ++r) {
      const uint8_t* p = in + (size_t)r * payload + off;
      float scale;
      std::memcpy(&scale, p, 4);
      dequantizeBlock<true>(p + 4, m, scale, bits, buf);
    }
    if (residual) {
      float* v = residual + first;
      for (size_t j = 0; j < m; ++j) v[j] += buf[j] / div;
      qsgdBlock(nullptr, v, m, padded, bits, seed, indexBase + (uint32_t)first, out + off);
    } else {
      for (size_t j = 0; j < m; ++j) buf[j] /= div;
      qsgdBlock(buf, nullptr, m, padded, bits, seed, indexBase + (uint32_t)first, out + off);
    }
  }
}

void qsgdDecompress(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, int bits, float* out,
                    bool accumulate) {
  checkChunk(chunk);
  checkBits(bits);
  PYCOMM_CHECK_ARG(n <= chunk * numChunks, "qsgdDecompress: ", n, " elements do not fit");
  const size_t payload = qsgdPayloadBytes(chunk, bits);
  for (size_t c = 0; c < numChunks; ++c) {
    const size_t count = validCount(n, chunk, c);
    for (size_t first = 0; first < count; first += kQsgdBlock) {
      const uint8_t* p = in + c * payload + qsgdPayloadOffset(first, bits);
      const size_t m = std::min(kQsgdBlock, count - first);
      float scale;
      std::memcpy(&scale, p, 4);
      float* o = out + c * chunk + first;
      if (accumulate) {
        dequantizeBlock<true>(p + 4, m, scale, bits, o);
      } else {
        dequantizeBlock<false>(p + 4, m, scale, bits, o);
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
    // Only entries some payload touched can be non-zero (0 / div is +0, what the fill
    // wrote): divide each of them once instead of sweeping all n.
    const float div = (float)divisor;
    std::vector<uint64_t> done((n + 63) / 64, 0);
    for (int r = 0; r < numPayloads; ++r) {
      const int32_t* idx = in + (size_t)r * 2 * k + k;
      for (size_t j = 0; j < k; ++j) {
        const size_t i = (size_t)idx[j];
        const uint64_t bit = uint64_t{1} << (i % 64);
        if (!(done[i / 64] & bit)) {
          done[i / 64] |= bit;
          out[i] /= div;
        }
      }
    }
  }
}

}  // namespace pycomm
