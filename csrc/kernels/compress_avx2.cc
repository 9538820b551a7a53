// Hand-vectorised AVX2 loops of the CPU compression kernels (see compress_avx2.h); each
// is bitwise equal to the portable loop in compress.cc it replaces.
#include "kernels/compress_avx2.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstring>

namespace pycomm {
namespace detail {
namespace {

// Lane j: +s where bit j of `byte` is set, -s where it is clear.
__attribute__((target("avx2"))) inline __m256 signedScale(uint32_t byte, __m256 s, __m256i laneBits,
                                                          __m256 signBit) {
  const __m256i b = _mm256_and_si256(_mm256_set1_epi32((int)byte), laneBits);
  const __m256 set = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, laneBits));
  return _mm256_xor_ps(s, _mm256_andnot_ps(set, signBit));
}

}  // namespace

__attribute__((target("avx2"))) void oneBitServerAccumulateAvx2(const uint8_t* const* in, int numPayloads,
                                                                 size_t valid, float div, float* r,
                                                                 float* lanes) {
  const __m256i laneBits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 signBit = _mm256_set1_ps(-0.0f);
  const __m256 divv = _mm256_set1_ps(div);
  __m256 lanesLo = _mm256_loadu_ps(lanes);
  __m256 lanesHi = _mm256_loadu_ps(lanes + 8);
  const size_t full = valid / 32 * 32;
  for (size_t base = 0; base < full; base += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    for (int k = 0; k < numPayloads; ++k) {
      float scale;
      std::memcpy(&scale, in[k], 4);
      uint32_t word;
      std::memcpy(&word, in[k] + 4 + base / 8, 4);
      const __m256 s = _mm256_set1_ps(scale);
      // Lane j of quarter q holds bit 8q+j.
      a0 = _mm256_add_ps(a0, signedScale(word & 0xFFu, s, laneBits, signBit));
      a1 = _mm256_add_ps(a1, signedScale((word >> 8) & 0xFFu, s, laneBits, signBit));
      a2 = _mm256_add_ps(a2, signedScale((word >> 16) & 0xFFu, s, laneBits, signBit));
      a3 = _mm256_add_ps(a3, signedScale(word >> 24, s, laneBits, signBit));
    }
    float* v = r + base;
    const __m256 v0 = _mm256_add_ps(_mm256_loadu_ps(v), _mm256_div_ps(a0, divv));
    const __m256 v1 = _mm256_add_ps(_mm256_loadu_ps(v + 8), _mm256_div_ps(a1, divv));
    const __m256 v2 = _mm256_add_ps(_mm256_loadu_ps(v + 16), _mm256_div_ps(a2, divv));
    const __m256 v3 = _mm256_add_ps(_mm256_loadu_ps(v + 24), _mm256_div_ps(a3, divv));
    _mm256_storeu_ps(v, v0);
    _mm256_storeu_ps(v + 8, v1);
    _mm256_storeu_ps(v + 16, v2);
    _mm256_storeu_ps(v + 24, v3);
    // Elements 0-15 of the group go to lanes 0-15, then elements 16-31: index order per lane.
    lanesLo = _mm256_add_ps(lanesLo, _mm256_andnot_ps(signBit, v0));
    lanesHi = _mm256_add_ps(lanesHi, _mm256_andnot_ps(signBit, v1));
    lanesLo = _mm256_add_ps(lanesLo, _mm256_andnot_ps(signBit, v2));
    lanesHi = _mm256_add_ps(lanesHi, _mm256_andnot_ps(signBit, v3));
  }
  _mm256_storeu_ps(lanes, lanesLo);
  _mm256_storeu_ps(lanes + 8, lanesHi);
}

template <bool kAccumulate>
__attribute__((target("avx2"))) void qsgd4DequantizeT(const uint8_t* q, size_t count, float step, float* out) {
  // Nibble -> two's-complement level through a 16-entry table (0..7, then -8..-1).
  const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m256 s = _mm256_set1_ps(step);
  const size_t full = count / 32 * 32;
  for (size_t j = 0; j < full; j += 32) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j / 2));
    const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, low4));                     // even elements
    const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), low4));  // odd elements
    const __m128i e0 = _mm_unpacklo_epi8(lo, hi);  // elements j .. j+15
    const __m128i e1 = _mm_unpackhi_epi8(lo, hi);  // elements j+16 .. j+31
    const __m128i parts[4] = {e0, _mm_srli_si128(e0, 8), e1, _mm_srli_si128(e1, 8)};
    for (int k = 0; k < 4; ++k) {
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k])), s);
      float* o = out + j + 8 * k;
      _mm256_storeu_ps(o, kAccumulate ? _mm256_add_ps(_mm256_loadu_ps(o), v) : v);
    }
  }
}

void qsgd4DequantizeAvx2(const uint8_t* q, size_t count, float step, float* out, bool accumulate) {
  if (accumulate) {
    qsgd4DequantizeT<true>(q, count, step, out);
  } else {
    qsgd4DequantizeT<false>(q, count, step, out);
  }
}

}  // namespace detail
}  // namespace pycomm
#endif
