#include "algorithms/compressed.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "engine/work_queue.h"
#include "kernels/compress.h"

namespace pycomm {

// ---------------------------------------------------------------------------------------------
// codecs: thin adapters from a piece to the fused kernels of kernels/compress.h

namespace {

class HalfCodec : public PieceCodec {
 public:
  HalfCodec(bool bf16, bool ef) : bf16_(bf16), ef_(ef) {}
  size_t payloadBytes(size_t elems) const override { return 2 * elems; }
  void compress(const float* x, float* residual, size_t valid, size_t elems, size_t,
                uint8_t* out) override {
    halfCompress(x, ef_ ? residual : nullptr, valid, elems, bf16_, reinterpret_cast<uint16_t*>(out));
  }
  void serverReduce(const uint8_t* in, int numPayloads, size_t elems, size_t valid, int divisor,
                    float* residual, size_t, uint8_t* out) override {
    halfServerReduce(reinterpret_cast<const uint16_t*>(in), numPayloads, elems, valid, divisor,
                     ef_ ? residual : nullptr, bf16_, reinterpret_cast<uint16_t*>(out));
  }
  void decompress(const uint8_t* in, size_t, size_t valid, float* out) override {
    halfDecompress(reinterpret_cast<const uint16_t*>(in), valid, bf16_, out);
  }
  uint32_t id() const override { return (bf16_ ? 2u : 1u) | (ef_ ? 0x100u : 0u); }

 private:
  bool bf16_;
  bool ef_;
};

class OneBitCodec : public PieceCodec {
 public:
  size_t payloadBytes(size_t elems) const override { return oneBitPayloadBytes(elems); }
  void compress(const float* x, float* residual, size_t valid, size_t elems, size_t,
                uint8_t* out) override {
    oneBitCompress(x, residual, valid, elems, 1, out);
  }
  void serverReduce(const uint8_t* in, int numPayloads, size_t elems, size_t valid, int divisor,
                    float* residual, size_t, uint8_t* out) override {
    oneBitServerReduce(in, numPayloads, elems, valid, divisor, residual, out);
  }
  void decompress(const uint8_t* in, size_t elems, size_t valid, float* out) override {
    oneBitDecompress(in, 1, elems, valid, out, false);
  }
  uint32_t id() const override { return 3u; }
};

class QsgdCodec : public PieceCodec {
 public:
  QsgdCodec(int bits, bool ef, uint32_t workerSeed, uint32_t serverSeed)
      : bits_(bits), ef_(ef), workerSeed_(workerSeed), serverSeed_(serverSeed) {}
  size_t payloadBytes(size_t elems) const override { return qsgdPayloadBytes(elems, bits_); }
  void compress(const float* x, float* residual, size_t valid, size_t elems, size_t index,
                uint8_t* out) override {
    qsgdCompress(x, ef_ ? residual : nullptr, valid, elems, 1, bits_, workerSeed_, out,
                 static_cast<uint32_t>(index));
  }
  void serverReduce(const uint8_t* in, int numPayloads, size_t elems, size_t valid, int divisor,
                    float* residual, size_t index, uint8_t* out) override {
    qsgdServerReduce(in, numPayloads, elems, valid, divisor, ef_ ? residual : nullptr, bits_, serverSeed_, out,
                     static_cast<uint32_t>(index));
  }
  void decompress(const uint8_t* in, size_t elems, size_t valid, float* out) override {
    qsgdDecompress(in, 1, elems, valid, bits_, out, false);
  }
  uint32_t id() const override { return (bits_ == 8 ? 4u : 5u) | (ef_ ? 0x100u : 0u); }

 private:
  int bits_;
  bool ef_;
  uint32_t workerSeed_;
  uint32_t serverSeed_;
};

class FloatCodec : public PieceCodec {
 public:
  size_t payloadBytes(size_t elems) const override { return 4 * elems; }
  void compress(const float* x, float*, size_t valid, size_t elems, size_t, uint8_t* out) override {
    if (valid) std::memcpy(out, x, valid * 4);
    std::memset(out + valid * 4, 0, (elems - valid) * 4);
  }
  void serverReduce(const uint8_t* in, int numPayloads, size_t elems, size_t valid, int divisor, float*,
                    size_t, uint8_t* out) override {
    floatServerReduce(reinterpret_cast<const float*>(in), numPayloads, elems, valid, divisor,
                      reinterpret_cast<float*>(out));
  }
  void decompress(const uint8_t* in, size_t, size_t valid, float* out) override {
    if (valid) std::memcpy(out, in, valid * 4);
  }
  uint32_t id() const override { return 6u; }
};

}  // namespace

std::unique_ptr<PieceCodec> makeHalfCodec(bool bf16, bool errorFeedback) {
  return std::make_unique<HalfCodec>(bf16, errorFeedback);
}
std::unique_ptr<PieceCodec> makeOneBitCodec() { return std::make_unique<OneBitCodec>(); }
std::unique_ptr<PieceCodec> makeQsgdCodec(int bits, bool errorFeedback, uint32_t workerSeed, uint32_t serverSeed) {
  PYCOMM_CHECK_ARG(bits == 8 || bits == 4, "QSGD bits must be 8 or 4, got ", bits);
  return std::make_unique<QsgdCodec>(bits, errorFeedback, workerSeed, serverSeed);
}
std::unique_ptr<PieceCodec> makeFloatCodec() { return std::make_unique<FloatCodec>(); }

// ---------------------------------------------------------------------------------------------
// the pipeline

namespace {

// Thrown on one thread when the other one failed (its own error is the one reported).
struct PipelineStopped {};

// Progress counters of the five stages (each stage completes pieces in order).
class Progress {
 public:
  enum Stage { kCompressed, kExchanged, kReduced, kGathered, kDecoded, kStages };

  void done(Stage s) {
    {
      std::lock_guard<std::mutex> g(mu_);
      ++count_[s];
    }
    cv_.notify_all();
  }

  // Waits until stage s has completed `need` pieces (need <= 0: no wait).
  void await(Stage s, long need) {
    if (need <= 0) return;
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return stopped_ || static_cast<long>(count_[s]) >= need; });
    if (static_cast<long>(count_[s]) < need) throw PipelineStopped{};
  }

  void stop() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stopped_ = true;
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  size_t count_[kStages] = {0, 0, 0, 0, 0};
  bool stopped_ = false;
};

// Buffer slots in flight per stage: piece j uses slot j % kSlots.
constexpr long kSlots = 3;

}  // namespace

void pipelinedCompressedAllReduce(Transport& transport, WorkQueue& helper, std::vector<uint8_t>& scratch,
                                  PieceCodec& codec, const CompressedArgs& a, const OpDesc& desc,
                                  const Deadline& deadline) {
  const int w = transport.size();
  const int rank = transport.rank();
  PYCOMM_CHECK_ARG(a.chunk % kCompressAlign == 0 && a.chunk * static_cast<size_t>(w) >= a.n,
                   "compressed all_reduce: chunk ", a.chunk, " does not tile ", a.n, " elements over ", w,
                   " ranks in multiples of ", kCompressAlign);
  PYCOMM_CHECK_ARG(a.pieceElems > 0 && a.pieceElems % kPieceAlign == 0,
                   "compressed all_reduce: piece of ", a.pieceElems, " elements is not a multiple of ",
                   kPieceAlign);
  PYCOMM_CHECK_ARG(a.divisor >= 1, "compressed all_reduce: divisor must be >= 1");
  if (w == 1 || a.n == 0) return;

  const size_t P = a.pieceElems;
  const long pieces = static_cast<long>((a.chunk + P - 1) / P);
  const size_t slotBytes = codec.payloadBytes(std::min(P, a.chunk));
  auto elemsOf = [&](long j) { return std::min(P, a.chunk - static_cast<size_t>(j) * P); };
  // Valid elements of piece j of chunk r.
  auto validOf = [&](int r, long j) {
    const size_t start = static_cast<size_t>(r) * a.chunk + static_cast<size_t>(j) * P;
    return start >= a.n ? size_t{0} : std::min(elemsOf(j), a.n - start);
  };
  auto at = [&](int r, long j) { return static_cast<size_t>(r) * a.chunk + static_cast<size_t>(j) * P; };

  // Send, recv and gather hold w payloads per slot, own one (kept between calls).
  const size_t wide = static_cast<size_t>(w) * slotBytes;
  const size_t need = static_cast<size_t>(kSlots) * (3 * wide + slotBytes);
  if (scratch.size() < need) scratch.resize(need);
  uint8_t* const base = scratch.data();
  auto sendBuf = [&](long j) { return base + static_cast<size_t>(j % kSlots) * wide; };
  auto recvBuf = [&](long j) { return base + (kSlots + static_cast<size_t>(j % kSlots)) * wide; };
  auto gatherBuf = [&](long j) { return base + (2 * kSlots + static_cast<size_t>(j % kSlots)) * wide; };
  auto ownBuf = [&](long j) { return base + 3 * kSlots * wide + static_cast<size_t>(j % kSlots) * slotBytes; };

  Progress prog;
  using S = Progress;

  // Codec thread: compress piece t, reduce piece t-1, decode piece t-2, in that order.
  auto codecLoop = [&] {
    try {
      for (long t = 0; t < pieces + 2; ++t) {
        if (t < pieces) {
          prog.await(S::kExchanged, t - kSlots + 1);  // send slot free
          const size_t e = elemsOf(t), pb = codec.payloadBytes(e);
          uint8_t* out = sendBuf(t);
          for (int r = 0; r < w; ++r) {
            const size_t off = at(r, t);
            codec.compress(a.data + off, a.workerResidual ? a.workerResidual + off : nullptr, validOf(r, t), e, off,
                           out + static_cast<size_t>(r) * pb);
          }
          prog.done(S::kCompressed);
        }
        if (t >= 1 && t <= pieces) {
          const long j = t - 1;
          prog.await(S::kExchanged, j + 1);
          prog.await(S::kGathered, j - kSlots + 1);  // own slot free
          const size_t local = static_cast<size_t>(j) * P;
          codec.serverReduce(recvBuf(j), w, elemsOf(j), validOf(rank, j), a.divisor,
                             a.serverResidual ? a.serverResidual + local : nullptr, local, ownBuf(j));
          prog.done(S::kReduced);
        }
        if (t >= 2) {
          const long j = t - 2;
          prog.await(S::kGathered, j + 1);
          const size_t e = elemsOf(j), pb = codec.payloadBytes(e);
          const uint8_t* in = gatherBuf(j);
          for (int r = 0; r < w; ++r) {
            const size_t v = validOf(r, j);
            if (v) codec.decompress(in + static_cast<size_t>(r) * pb, e, v, a.data + at(r, j));
          }
          prog.done(S::kDecoded);
        }
      }
    } catch (const PipelineStopped&) {
      // The communication side failed; it reports its own error.
    } catch (...) {
      prog.stop();
      throw;
    }
  };
  std::shared_ptr<Completion> codecDone = helper.push(codecLoop);

  // Communication thread (this one): exchange piece t, gather piece t-1.
  auto exchange = [&](const uint8_t* out, uint8_t* in, size_t pb, size_t outStride) {
    for (int s = 1; s < w; ++s) {
      const int to = (rank + s) % w;
      const int from = (rank - s + w) % w;
      transport.sendRecv(to, out + static_cast<size_t>(to) * outStride, pb, from,
                         in + static_cast<size_t>(from) * pb, pb, desc, deadline);
    }
    std::memcpy(in + static_cast<size_t>(rank) * pb, out + static_cast<size_t>(rank) * outStride, pb);
  };
  try {
    for (long t = 0; t <= pieces; ++t) {
      if (t < pieces) {
        prog.await(S::kCompressed, t + 1);
        prog.await(S::kReduced, t - kSlots + 1);  // recv slot free
        const size_t pb = codec.payloadBytes(elemsOf(t));
        exchange(sendBuf(t), recvBuf(t), pb, pb);
        prog.done(S::kExchanged);
      }
      if (t >= 1) {
        const long j = t - 1;
        prog.await(S::kReduced, j + 1);
        prog.await(S::kDecoded, j - kSlots + 1);  // gather slot free
        // The owner's payload goes to every peer: stride 0 over the "per-destination" input.
        exchange(ownBuf(j), gatherBuf(j), codec.payloadBytes(elemsOf(j)), 0);
        prog.done(S::kGathered);
      }
    }
  } catch (const PipelineStopped&) {
    codecDone->waitFor(-1);
    if (auto err = codecDone->error()) std::rethrow_exception(err);
    throw;  // not reached: the codec stops the pipeline only when it fails
  } catch (...) {
    prog.stop();
    codecDone->waitFor(-1);
    throw;
  }
  codecDone->waitFor(-1);
  if (auto err = codecDone->error()) std::rethrow_exception(err);
}

}  // namespace pycomm
