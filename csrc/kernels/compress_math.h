// Element math of the gradient compressors, shared by the CPU loops (compress.cc) and
// the CUDA kernels (compress_cuda.cu): the same formulas, so the CPU tests check the
// bits the GPU produces. Everything here is header-only, torch-free and branch-light.
//
// Payload layouts (all little-endian). Every chunk is a multiple of kCompressAlign (32)
// elements. OneBit and QSGD chunk payloads are sequences of self-contained blocks, each
// block's header followed by its data, so the payload of any run of whole blocks is one
// contiguous byte range (oneBitPayloadOffset / qsgdPayloadOffset), and compressing a
// chunk piece by piece (pieces made of whole blocks) writes the same bytes as one call:
//   OneBit: per kOneBitBlock (2048) elements (last block partial, a multiple of 32):
//             [float scale][blockLen/8 bytes of sign bits]
//           bit j of byte b = element 8b+j, 1 = >= 0 (padding elements are zeros: bit 1);
//           scale = mean |v| over the block's valid elements (oneBitLaneSum +
//           oneBitScale), 0 if it has none.
//   QSGD:   per kQsgdBlock (512) elements (last block partial, a multiple of 32):
//             [float scale = max |v|][blockLen int8 levels]                   (bits = 8)
//             [float scale = max |v|][blockLen/2 bytes, 2 nibbles per byte]   (bits = 4,
//           low nibble = even element, two's-complement level in [-7, 7]); padding = 0.
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

/// Elements sharing one OneBit scale (a self-contained block of the payload).
constexpr size_t kOneBitBlock = 2048;

/// Float lanes of the OneBit |v| sum (see oneBitLaneSum).
constexpr unsigned kOneBitLanes = 16;

/// Bytes of a OneBit payload before element `elem` of its chunk (elem a multiple of 32
/// that is a multiple of kOneBitBlock or the chunk end): 4 bytes of scale per block
/// started, one bit per element.
PYCOMM_HD size_t oneBitPayloadOffset(size_t elem) {
  return 4 * ((elem + kOneBitBlock - 1) / kOneBitBlock) + elem / 8;
}

/// Bytes of one OneBit chunk payload for `chunk` elements (a multiple of 32).
PYCOMM_HD size_t oneBitPayloadBytes(size_t chunk) { return oneBitPayloadOffset(chunk); }

/// Number of QSGD scale blocks in a chunk.
PYCOMM_HD size_t qsgdNumBlocks(size_t chunk) { return (chunk + kQsgdBlock - 1) / kQsgdBlock; }

/// Bytes of QSGD levels for `elems` elements (even) at `bits` (8 or 4) per element.
PYCOMM_HD size_t qsgdLevelBytes(size_t elems, int bits) { return bits == 8 ? elems : elems / 2; }

/// Bytes of a QSGD payload before element `elem` of its chunk (elem a multiple of
/// kQsgdBlock or the chunk end).
PYCOMM_HD size_t qsgdPayloadOffset(size_t elem, int bits) {
  return 4 * qsgdNumBlocks(elem) + qsgdLevelBytes(elem, bits);
}

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

/// Lane `lane` (< kOneBitLanes) of the OneBit |v| sum over v[0:count): the float sum,
/// in index order, of |v[i]| for the i < count with i % 16 == lane. The CPU loops keep
/// the 16 lanes in vector registers and the CUDA kernel runs one thread per lane: same
/// additions in the same order, so the scales are bitwise identical.
PYCOMM_HD float oneBitLaneSum(const float* v, size_t count, unsigned lane) {
  float acc = 0.0f;
  for (size_t i = lane; i < count; i += kOneBitLanes) acc += fabsf(v[i]);
  return acc;
}

/// OneBit block scale = mean |v|: the 16 lane sums added in lane order in double, divided
/// by the number of valid elements; 0 when there are none.
PYCOMM_HD float oneBitScale(const float* laneSums, size_t count) {
  if (count == 0) return 0.0f;
  double total = 0.0;
  for (unsigned l = 0; l < kOneBitLanes; ++l) total += (double)laneSums[l];
  return (float)(total / (double)count);
}

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

/// a * b rounded once, never fused with a following add (nvcc contracts a*b+c into an
/// FMA by default; host builds have no FMA in the generic or AVX2 paths), so the CPU,
/// its AVX2 path and the GPU round identically.
PYCOMM_HD float mulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

/// QSGD stochastic rounding of x to a signed level in [-levels, levels], given
/// inv = levels / scale (0 when the block is all zeros) and u uniform in [0, 1):
/// E[level] * scale / levels == x (unbiased) for |x| <= scale.
/// Branch-free (so the CPU loops vectorise): trunc == floor for a >= 0, then clamp
/// and give the level x's sign.
PYCOMM_HD int qsgdQuantize(float x, float inv, int levels, float u) {
  const float a = mulRn(fabsf(x), inv) + u;
  const float q = fminf(truncf(a), (float)levels);
  return (int)copysignf(q, x);
}

/// Value of a QSGD level: level * scale / levels.
PYCOMM_HD float qsgdDequantize(int level, float scale, int levels) {
  return mulRn((float)level, scale / (float)levels);
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
