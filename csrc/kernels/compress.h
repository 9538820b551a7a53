// Fused gradient-compression kernels (torch-free). Each function is one fused pass (or a
// short fixed number of passes over the same buffer) that reads the gradient once,
// keeps intermediate values in registers or a cache-resident block, and writes the
// packed payload and the new error-feedback residual without temporaries.
//
// Vocabulary shared by all compressors (see compress_math.h for the payload layouts):
//   n          elements of the gradient (float32);
//   chunk      elements per chunk, a multiple of kCompressAlign; the gradient, padded with
//              zeros to numChunks * chunk, is split into numChunks = world_size chunks;
//   residual   error-feedback buffer (nullptr = no error feedback): on entry it holds the
//              error carried over from the previous step, on return the new error;
//   divisor    1 for SUM, world_size for AVG (the sum is divided once, in float32).
// Server-side ("reduce") functions take the numPayloads chunk payloads that the ranks
// sent to this rank (in rank order, summed in that order, so every run is bitwise
// reproducible) and the `count` valid elements of this rank's chunk.
//
// The *Cuda variants (compress_cuda.cu) take device pointers and run on `stream`; they are
// only compiled when PYCOMM_WITH_CUDA is defined.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/compress_math.h"

#if defined(PYCOMM_WITH_CUDA)
struct CUstream_st;
#endif

namespace pycomm {

// ---------------------------------------------------------------- OneBit (sign + scale)

/// Worker step: v = x + residual; per kOneBitBlock block of each chunk, scale = mean |v|
/// over its valid elements; writes numChunks payloads of oneBitPayloadBytes(chunk) bytes and
/// residual = v - scale*sign(v). x == nullptr means the gradient already sits in residual;
/// residual == nullptr means no error feedback. Blocks are independent: compressing a
/// chunk as pieces of whole blocks (numChunks = 1 on each piece, output at
/// oneBitPayloadOffset(pieceStart)) gives the same bytes and residuals as one call.
void oneBitCompress(const float* x, float* residual, size_t n, size_t chunk, size_t numChunks,
                    uint8_t* out);

/// Server step: v = residual + (sum over payloads, in order, of scale*sign) / divisor on this
/// rank's `count` elements, re-compressed block by block into one payload; residual becomes
/// the server error. Piecewise calls on whole blocks give the same bytes as one call.
void oneBitServerReduce(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                        float* residual, uint8_t* out);

/// Unpacks numChunks payloads into the first n elements: out = scale*sign (or out += when
/// accumulate).
void oneBitDecompress(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, float* out,
                      bool accumulate);

// ---------------------------------------------------------------- QSGD (8 or 4 bits)

/// Worker step: v = x (+ residual); per kQsgdBlock block scale = max |v|; each element is
/// stochastically rounded to one of 2*levels+1 levels with the counter RNG keyed by
/// (seed, indexBase + element index), which is unbiased; residual (if given) = v -
/// dequantised(v). indexBase lets a caller compress a slice of a larger tensor and draw
/// the same random numbers as a whole-tensor call: compressing a chunk as pieces of whole
/// blocks (numChunks = 1, indexBase + c*chunk + pieceStart, output at
/// qsgdPayloadOffset(pieceStart, bits)) gives the same bytes and residuals as one call.
void qsgdCompress(const float* x, float* residual, size_t n, size_t chunk, size_t numChunks, int bits,
                  uint32_t seed, uint8_t* out, uint32_t indexBase = 0);

/// Server step: v = (sum of dequantised payloads) / divisor (+ residual), re-quantised
/// (RNG keyed by seed and indexBase + the chunk-local index); residual (optional) = the
/// server error.
void qsgdServerReduce(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                      float* residual, int bits, uint32_t seed, uint8_t* out, uint32_t indexBase = 0);

/// Dequantises numChunks payloads into the first n elements (out = or out +=).
void qsgdDecompress(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, int bits, float* out,
                    bool accumulate);

/// Testing hook: enables or disables the AVX2 CPU paths of the OneBit and QSGD kernels
/// (they are on by default where the CPU has AVX2; enabling has no effect elsewhere).
/// Both paths produce the same bits. Returns whether AVX2 was in use before the call.
bool setCompressSimd(bool enabled);

// ---------------------------------------------------------------- FP16 / BF16

/// out[i] = half(x[i] + residual[i]) for i < n, 0 for n <= i < outCount; residual (optional)
/// = v - float(out[i]).
void halfCompress(const float* x, float* residual, size_t n, size_t outCount, bool bf16, uint16_t* out);

/// Server step: sums the numPayloads half chunks in float32 (rank order), divides by divisor,
/// adds the residual (optional), rounds once to half; residual = the rounding error.
/// Writes `chunk` halves (zeros past count).
void halfServerReduce(const uint16_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                      float* residual, bool bf16, uint16_t* out);

/// out[i] = float(in[i]) for i < n.
void halfDecompress(const uint16_t* in, size_t n, bool bf16, float* out);

/// Uncompressed server step: out[i] = (sum of float payloads in rank order) / divisor,
/// `chunk` outputs (zeros past count). Used for tensors too small to compress.
void floatServerReduce(const float* in, int numPayloads, size_t chunk, size_t count, int divisor,
                       float* out);

// ---------------------------------------------------------------- TopK

/// v = x + residual (residual optional); selects the k largest |v| (ties broken by lower
/// index) by a two-level radix select on the magnitude bits, writes them in increasing
/// index order to values/indices and zeroes them in residual (the rest stays there).
void topkCompress(const float* x, float* residual, size_t n, size_t k, float* values, int32_t* indices);

/// out[0:n] = (sum over payloads, in rank order, of the scattered values) / divisor, where
/// payload r is `k` floats followed by `k` int32 indices (2k words at in + r*2k).
/// Throws InvalidArgument for an index outside [0, n).
void topkDecompress(const int32_t* in, int numPayloads, size_t k, size_t n, int divisor, float* out);

#if defined(PYCOMM_WITH_CUDA)
// ---------------------------------------------------------------- CUDA (compress_cuda.cu)
// Same contracts as the CPU functions above, device pointers, asynchronous on `stream`.

/// CUDA oneBitCompress.
void oneBitCompressCuda(const float* x, float* residual, size_t n, size_t chunk, size_t numChunks,
                        uint8_t* out, CUstream_st* stream);
/// CUDA oneBitServerReduce.
void oneBitServerReduceCuda(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                            float* residual, uint8_t* out, CUstream_st* stream);
/// CUDA oneBitDecompress.
void oneBitDecompressCuda(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, float* out,
                          bool accumulate, CUstream_st* stream);
/// CUDA qsgdCompress.
void qsgdCompressCuda(const float* x, float* residual, size_t n, size_t chunk, size_t numChunks, int bits,
                      uint32_t seed, uint8_t* out, CUstream_st* stream, uint32_t indexBase = 0);
/// CUDA qsgdServerReduce.
void qsgdServerReduceCuda(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                          float* residual, int bits, uint32_t seed, uint8_t* out, CUstream_st* stream,
                          uint32_t indexBase = 0);
/// CUDA qsgdDecompress.
void qsgdDecompressCuda(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, int bits, float* out,
                        bool accumulate, CUstream_st* stream);
/// CUDA halfCompress.
void halfCompressCuda(const float* x, float* residual, size_t n, size_t outCount, bool bf16, uint16_t* out,
                      CUstream_st* stream);
/// CUDA halfServerReduce.
void halfServerReduceCuda(const uint16_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                          float* residual, bool bf16, uint16_t* out, CUstream_st* stream);
/// CUDA halfDecompress.
void halfDecompressCuda(const uint16_t* in, size_t n, bool bf16, float* out, CUstream_st* stream);
/// CUDA floatServerReduce.
void floatServerReduceCuda(const float* in, int numPayloads, size_t chunk, size_t count, int divisor,
                           float* out, CUstream_st* stream);
/// CUDA top-k: v = x + residual; selects by the same radix select (histograms in device
/// memory), same output order and tie rule as topkCompress.
void topkCompressCuda(const float* x, float* residual, size_t n, size_t k, float* values, int32_t* indices,
                      CUstream_st* stream);
/// CUDA topkDecompress (index range is not checked on the device).
void topkDecompressCuda(const int32_t* in, int numPayloads, size_t k, size_t n, int divisor, float* out,
                        CUstream_st* stream);
#endif

}  // namespace pycomm
