// Hand-vectorised (AVX2) inner loops of the CPU compression kernels, compiled with a
// target attribute and called only when the CPU has AVX2 (the build needs no -mavx2).
// Each is bitwise equal to the portable loop it replaces (tested in test_compress.cc).
#pragma once

#include <cstddef>
#include <cstdint>

namespace pycomm {
namespace detail {

#if defined(__x86_64__) || defined(__i386__)
/// OneBit server step, full 32-element groups of a block: for i < valid rounded down to
/// 32, r[i] += (sum over k < numPayloads, in order, of +-scale_k by sign bit i of in[k])
/// / div, and lanes[i % 16] += |r[i]| in index order. `in[k]` points at block k's
/// [scale][sign bits]. The caller handles the last partial group.
void oneBitServerAccumulateAvx2(const uint8_t* const* in, int numPayloads, size_t valid, float div, float* r,
                                float* lanes);

/// QSGD 4-bit decode of the first count rounded down to 32 elements of a block's levels
/// `q` (low nibble = even element): out[j] = level_j * step, or out[j] += that.
void qsgd4DequantizeAvx2(const uint8_t* q, size_t count, float step, float* out, bool accumulate);
#endif

}  // namespace detail
}  // namespace pycomm
