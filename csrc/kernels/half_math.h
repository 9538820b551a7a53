// float16 / bfloat16 storage types and their conversions, shared by CPU and CUDA code.
// Conversions round to nearest even, keep NaN a NaN and saturate to +-inf like IEEE.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/hd.h"

namespace pycomm {

/// IEEE binary16 storage (bit pattern only; arithmetic happens in float).
struct Half {
  uint16_t bits;
};

/// bfloat16 storage (upper half of a float32).
struct BFloat16 {
  uint16_t bits;
};

/// Bit pattern of a float.
PYCOMM_HD uint32_t floatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

/// Float with the given bit pattern.
PYCOMM_HD float bitsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

/// binary16 -> float32 (exact).
PYCOMM_HD float halfToFloat(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bitsFloat(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bitsFloat(sign);
    // subnormal: value = mant * 2^-24
    float v = (float)mant * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}

/// float32 -> binary16, round to nearest even.
PYCOMM_HD uint16_t floatToHalf(float f) {
  uint32_t x = floatBits(f);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) {  // inf or nan
    return (uint16_t)(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));
  }
  if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (x < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // value / 2^-24, rounded to nearest even by the float unit's own rounding.
    float v = bitsFloat(x) * 16777216.0f;  // exact scaling by 2^24
    // round half to even
    float r = v + 12582912.0f;  // 1.5 * 2^23 forces rounding at integer position
    uint32_t m = floatBits(r) - 0x4b400000u;
    return (uint16_t)(sign | m);
  }
  uint32_t mant = x & 0x7fffffu;
  uint32_t exp = (x >> 23) - 112u;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1u;  // may carry into exp: fine
  return (uint16_t)(sign | h);
}

/// bfloat16 -> float32 (exact).
PYCOMM_HD float bf16ToFloat(uint16_t b) { return bitsFloat((uint32_t)b << 16); }

/// float32 -> bfloat16, round to nearest even, NaN stays NaN.
PYCOMM_HD uint16_t floatToBf16(float f) {
  uint32_t x = floatBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  uint32_t lsb = (x >> 16) & 1u;
  x += 0x7fffu + lsb;
  return (uint16_t)(x >> 16);
}

}  // namespace pycomm
