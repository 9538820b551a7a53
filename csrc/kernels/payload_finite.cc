#include "kernels/payload_finite.h"

#include <cmath>
#include <cstring>

#include "kernels/compress_math.h"

namespace pycomm {
namespace {

float scaleAt(const uint8_t* p) {
  float s;
  std::memcpy(&s, p, sizeof(s));
  return s;
}

// True if no element has all exponent bits set: OR of the per-element tests, so the loop
// has no early exit and vectorises.
template <typename T>
bool noAllOnesExponent(const T* in, size_t n, T mask) {
  T bad = 0;
  for (size_t i = 0; i < n; ++i) bad |= static_cast<T>((in[i] & mask) == mask);
  return bad == 0;
}

}  // namespace

bool oneBitPayloadFinite(const uint8_t* in, size_t count) {
  for (size_t first = 0; first < count; first += kOneBitBlock) {
    if (!std::isfinite(scaleAt(in + oneBitPayloadOffset(first)))) return false;
  }
  return true;
}

bool qsgdPayloadFinite(const uint8_t* in, size_t count, int bits) {
  for (size_t first = 0; first < count; first += kQsgdBlock) {
    if (!std::isfinite(scaleAt(in + qsgdPayloadOffset(first, bits)))) return false;
  }
  return true;
}

bool halfPayloadFinite(const uint16_t* in, size_t n, bool bf16) {
  return noAllOnesExponent<uint16_t>(in, n, bf16 ? uint16_t{0x7f80} : uint16_t{0x7c00});
}

bool floatPayloadFinite(const float* in, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, in + i, sizeof(u));  // the bits, without breaking aliasing rules
    bad |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

}  // namespace pycomm
