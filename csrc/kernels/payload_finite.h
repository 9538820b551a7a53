// Whether a codec's payload decodes to finite values only, read off the payload itself
// (no decode, no pass over the result): a OneBit or QSGD value is a finite code times its
// block's scale, so the scales decide (one float per 2048 / 512 elements); FP16, BF16 and
// float32 payloads are scanned for an all-ones exponent (inf or NaN). The compressed
// all-reduce uses these to say whether its result holds a non-finite value, which every
// rank then knows at once (they all decode the same payloads).
#pragma once

#include <cstddef>
#include <cstdint>

namespace pycomm {

/// True if every block scale of the first `count` elements of a OneBit chunk payload
/// (oneBitPayloadBytes layout) is finite.
bool oneBitPayloadFinite(const uint8_t* in, size_t count);

/// True if every block scale of the first `count` elements of a QSGD chunk payload
/// (qsgdPayloadBytes layout, `bits` 8 or 4) is finite.
bool qsgdPayloadFinite(const uint8_t* in, size_t count, int bits);

/// True if none of in[0:n) (FP16, or BF16 when `bf16`) is inf or NaN.
bool halfPayloadFinite(const uint16_t* in, size_t n, bool bf16);

/// True if none of in[0:n) is inf or NaN.
bool floatPayloadFinite(const float* in, size_t n);

}  // namespace pycomm
