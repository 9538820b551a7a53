// Element math of the gradient compressors, shared by the CPU loops (compress.cc) and
// the CUDA kernels (compress_cuda.cu): the same formulas, so the CPU tests check the
// bits the GPU produces. Everything here is header-only, torch-free and branch-light.
//
// Payload layouts (all little-endian, every chunk a multiple of kCompressAlign elements
// so each chunk's payload is a whole number of 4-byte words):
//   OneBit: [float scale][chunk/8 bytes of sign bits, bit j of byte b = element 8b+j, 1 = >= 0]
//   QSGD:   [ceil(chunk/kQsgdBlock) float scales][chunk int8 levels]      (bits = 8)
//           [ceil(chunk/kQsgdBlock) float scales][chunk/2 bytes, 2 nibbles] (bits = 4,
//           low nibble = even element, two's-complement level in [-7, 7])
//   FP16/BF16: plain uint16 arrays.
//   TopK:   [k float values][k int32 indices].
#pragma once

#include <cstddef>
#include <cmath>
#include <cstdint>

#include "kernels/half_math.h"
#include "kernels/hd.h"

namespace pycomm {

/// Elements per compression chunk are rounded up to a multiple of this.
constexpr size_t kCompressAlign = 32;

/// Elements sharing one QSGD scale.
constexpr size_t kQsgdBlock = 512;

/// Bytes of one OneBit chunk payload (scale + packed signs) for `chunk` elements.
PYCOMM_HD size_t oneBitPayloadBytes(size_t chunk) { return 4 + (chunk + 7) / 8; }

/// Number of QSGD scale blocks in a chunk.
PYCOMM_HD size_t qsgdNumBlocks(size_t chunk) { return (chunk + kQsgdBlock - 1) / kQsgdBlock; }

/// Bytes of one QSGD chunk payload for `chunk` elements at `bits` (8 or 4) per element.
PYCOMM_HD size_t qsgdPayloadBytes(size_t chunk, int bits) {
  return 4 * qsgdNumBlocks(chunk) + (bits == 8 ? chunk : (chunk + 1) / 2);
}

/// Largest quantisation level for `bits` (127 for 8 bits, 7 for 4 bits).
PYCOMM_HD int qsgdLevels(int bits) { return bits == 8 ? 127 : 7; }

/// +scale or -scale from a sign bit (bit set = non-negative element).
PYCOMM_HD float oneBitValue(uint32_t bit, float scale) { return bit ? scale : -scale; }

/// Sign bit of a value: 1 for x >= 0 (and +0/-0), 0 for x < 0. NaN maps to 1.
PYCOMM_HD uint32_t oneBitSign(float x) { return x < 0.0f ? 0u : 1u; }

/// Counter-based hash of (seed, index): murmur3's 32-bit finaliser over a Weyl-mixed
/// counter. Stateless, so any element's random number is available in any order and
/// the CPU and CUDA paths draw identical bits.
PYCOMM_HD uint32_t counterHash(uint32_t seed, uint32_t index) {
  uint32_t h = seed ^ (index * 0x9E3779B9u);
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

/// Uniform float in [0, 1) with 24 random bits, from counterHash.
PYCOMM_HD float counterUniform(uint32_t seed, uint32_t index) {
  return (float)(counterHash(seed, index) >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

/// splitmix64 step: mixes a 64-bit value (used host-side to derive per-step seeds).
PYCOMM_HD uint64_t splitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// QSGD stochastic rounding of x to a signed level in [-levels, levels], given
/// inv = levels / scale (0 when the block is all zeros) and u uniform in [0, 1):
/// E[level] * scale / levels == x (unbiased) for |x| <= scale.
/// Branch-free (so the CPU loops vectorise): trunc == floor for a >= 0, then clamp
/// and give the level x's sign.
PYCOMM_HD int qsgdQuantize(float x, float inv, int levels, float u) {
  const float a = fabsf(x) * inv + u;
  const float q = fminf(truncf(a), (float)levels);
  return (int)copysignf(q, x);
}

/// Value of a QSGD level: level * scale / levels.
PYCOMM_HD float qsgdDequantize(int level, float scale, int levels) {
  return (float)level * (scale / (float)levels);
}

/// Packs a 4-bit level (in [-7, 7]) into a nibble.
PYCOMM_HD uint32_t qsgdNibble(int level) { return (uint32_t)level & 0xFu; }

/// Sign-extends the low nibble of `b` back to a level.
PYCOMM_HD int qsgdLowLevel(uint32_t b) { return (int)((int8_t)(uint8_t)(b << 4)) >> 4; }

/// Sign-extends the high nibble of the byte `b` back to a level.
PYCOMM_HD int qsgdHighLevel(uint32_t b) { return (int)((int8_t)(uint8_t)b) >> 4; }

/// Half-precision storage of a float (round to nearest even), bf16 or fp16.
PYCOMM_HD uint16_t toHalfBits(float x, bool bf16) { return bf16 ? floatToBf16(x) : floatToHalf(x); }

/// Float value of a half-precision pattern, bf16 or fp16.
PYCOMM_HD float fromHalfBits(uint16_t h, bool bf16) { return bf16 ? bf16ToFloat(h) : halfToFloat(h); }

/// Float bits of |x| ordered like |x| (for radix selection of the largest magnitudes).
PYCOMM_HD uint32_t magnitudeKey(float x) { return floatBits(x) & 0x7fffffffu; }

}  // namespace pycomm
