// Pipelined compressed all-reduce (the 1-bit Adam exchange, in C++ on the group's
// communication thread): the tensor is split into world_size chunks (rank r owns chunk
// r) and every chunk into pieces of `pieceElems` elements. Piece j goes through
//
//   compress  (each chunk's piece j + worker error -> one payload per owner)   codec thread
//   exchange  (all-to-all of the payloads)                        send + receive threads
//   reduce    (owner: decode in rank order, sum in float32, + server error,   codec thread
//              re-encode)
//   gather    (all-gather of the owners' payloads)                send + receive threads
//   decode    (every rank writes the same values into piece j of each chunk)  codec thread
//
// and the threads work on different pieces at once, so encoding and decoding hide
// behind the wire. Every codec works block-wise (FP16: per element; OneBit: per 2048;
// QSGD: per 512 with an index-keyed random stream), and pieces are whole blocks, so the
// result is bit for bit the one a whole-chunk exchange (pycomm.compression on another
// backend) produces with the same state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/deadline.h"
#include "transport/transport.h"

namespace pycomm {

class WorkQueue;

/// How one piece of a chunk is encoded, reduced and decoded. Pieces hold `elems`
/// elements (a multiple of 32) of which the first `valid` are real data (the rest is
/// padding that encodes as zeros and is never written back).
class PieceCodec {
 public:
  virtual ~PieceCodec() = default;

  /// Bytes of the payload of a piece of `elems` elements.
  virtual size_t payloadBytes(size_t elems) const = 0;

  /// Worker step: encodes x[0:valid) (+ residual, updated to the new worker error when
  /// the codec keeps one). `index` is the tensor-wide index of x[0].
  virtual void compress(const float* x, float* residual, size_t valid, size_t elems, size_t index,
                        uint8_t* out) = 0;

  /// Owner step: decodes `numPayloads` payloads (contiguous, payloadBytes(elems) each,
  /// in rank order), sums them in float32, divides by `divisor`, adds/updates the server
  /// residual (when kept) and re-encodes into `out`. `index` is the chunk-local index of
  /// the piece's first element.
  virtual void serverReduce(const uint8_t* in, int numPayloads, size_t elems, size_t valid, int divisor,
                            float* residual, size_t index, uint8_t* out) = 0;

  /// Decodes a payload into out[0:valid).
  virtual void decompress(const uint8_t* in, size_t elems, size_t valid, float* out) = 0;

  /// True if the payload decodes to finite values only in out[0:valid) (read off the
  /// payload: block scales, or exponents; kernels/payload_finite.h).
  virtual bool finite(const uint8_t* in, size_t elems, size_t valid) const = 0;

  /// Wire identifier (carried in the message header, so ranks using different codecs
  /// fail with a mismatch instead of decoding garbage).
  virtual uint32_t id() const = 0;
};

/// FP16 or BF16 wire format (optionally with worker/server rounding-error feedback).
std::unique_ptr<PieceCodec> makeHalfCodec(bool bf16, bool errorFeedback);
/// Sign + per-block scale with worker and server error feedback (residuals required).
std::unique_ptr<PieceCodec> makeOneBitCodec();
/// QSGD with `bits` (8 or 4) and the per-call seeds of the worker and server streams.
std::unique_ptr<PieceCodec> makeQsgdCodec(int bits, bool errorFeedback, uint32_t workerSeed,
                                          uint32_t serverSeed);
/// Uncompressed float32 (deterministic rank-order sums; the baseline).
std::unique_ptr<PieceCodec> makeFloatCodec();

/// The codec called `name`: "fp16", "bf16", "onebit", "qsgd" (with `bits` 8 or 4, and
/// the per-call seeds of its worker and server streams) or "none" (float32).
/// `errorFeedback` asks for worker/server residuals and is set to what the codec does:
/// OneBit always keeps them, "none" never. InvalidArgument for an unknown name or bits.
std::unique_ptr<PieceCodec> makeCodec(const std::string& name, int bits, bool* errorFeedback, uint32_t workerSeed,
                                      uint32_t serverSeed);

/// Parameters of one compressed all-reduce.
struct CompressedArgs {
  float* data = nullptr;        ///< the tensor (n float32), reduced in place
  size_t n = 0;                 ///< elements
  size_t chunk = 0;             ///< elements per rank's chunk (multiple of 32, size*chunk >= n)
  size_t pieceElems = 0;        ///< pipelining granularity (multiple of 2048)
  int divisor = 1;              ///< 1 for SUM, world size for AVG
  float* workerResidual = nullptr;  ///< n floats, or null when the codec keeps none
  float* serverResidual = nullptr;  ///< chunk floats, or null when the codec keeps none
  /// When set, receives 1 if the result holds an inf or NaN, else 0 (every rank the same:
  /// all decode the same payloads); read off the payloads as they are decoded.
  uint8_t* nonfinite = nullptr;
};

/// Pieces are a multiple of this many elements (whole OneBit and QSGD blocks).
constexpr size_t kPieceAlign = 2048;

/// Runs the pipelined exchange over `transport`: sends on the calling thread, receives
/// on `recvThread`'s, encodes and decodes on `codecThread`'s, with buffers in `scratch`
/// (grown as needed, kept by the caller between calls). Every message carries `desc`
/// (whose tag should be codec.id()).
void pipelinedCompressedAllReduce(Transport& transport, WorkQueue& codecThread, WorkQueue& recvThread,
                                  std::vector<uint8_t>& scratch,
                                  PieceCodec& codec, const CompressedArgs& args, const OpDesc& desc,
                                  const Deadline& deadline);

}  // namespace pycomm
