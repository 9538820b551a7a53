#include "algorithms/compressed.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "core/work_queue.h"
#include "kernels/compress.h"
#include "kernels/payload_finite.h"

namespace pycomm {

static_assert(kPieceAlign % kOneBitBlock == 0 && kPieceAlign % kQsgdBlock == 0,
              "pieces must be whole OneBit and QSGD blocks, or piecewise encoding would differ");

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
  bool finite(const uint8_t* in, size_t, size_t valid) const override {
    return halfPayloadFinite(reinterpret_cast<const uint16_t*>(in), valid, bf16_);
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
  bool finite(const uint8_t* in, size_t, size_t valid) const override { return oneBitPayloadFinite(in, valid); }
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
  bool finite(const uint8_t* in, size_t, size_t valid) const override {
    return qsgdPayloadFinite(in, valid, bits_);
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
  bool finite(const uint8_t* in, size_t, size_t valid) const override {
    return floatPayloadFinite(reinterpret_cast<const float*>(in), valid);
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

std::unique_ptr<PieceCodec> makeCodec(const std::string& name, int bits, bool* errorFeedback, uint32_t workerSeed,
                                      uint32_t serverSeed) {
  if (name == "fp16" || name == "bf16") return makeHalfCodec(name == "bf16", *errorFeedback);
  if (name == "onebit") {
    *errorFeedback = true;
    return makeOneBitCodec();
  }
  if (name == "qsgd") {
    PYCOMM_CHECK_ARG(bits == 8 || bits == 4, "QSGD bits must be 8 or 4, got ", bits);
    return makeQsgdCodec(bits, *errorFeedback, workerSeed, serverSeed);
  }
  if (name == "none") {
    *errorFeedback = false;
    return makeFloatCodec();
  }
  throw InvalidArgument(strCat("unknown compression codec '", name, "' (fp16, bf16, onebit, qsgd, none)"));
}

// ---------------------------------------------------------------------------------------------
// the pipeline

namespace {

// Thrown on one thread when the other one failed (its own error is the one reported).
struct PipelineStopped {};

// Progress counters of the five stages (each stage completes pieces in order).
class Progress {
 public:
  enum Stage {
    kCompressed,  // codec: piece's payloads encoded (send slot)
    kSentX,       // sender: payloads sent to every peer
    kRecvX,       // receiver: every rank's payload for this rank's chunk in (recv slot)
    kReduced,     // codec: owner payload encoded (own slot)
    kSentG,       // sender: owner payload sent to every peer
    kRecvG,       // receiver: every owner's payload in (gather slot)
    kDecoded,     // codec: piece written into the tensor
    kStages
  };

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
  size_t count_[kStages] = {};
  bool stopped_ = false;
};

// Buffer slots in flight per stage: piece j uses slot j % kSlots.
constexpr long kSlots = 3;

}  // namespace

void pipelinedCompressedAllReduce(Transport& transport, WorkQueue& codecThread, WorkQueue& recvThread,
                                  std::vector<uint8_t>& scratch,
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
  if (w == 1 || a.n == 0) {  // the tensor is the result
    if (a.nonfinite) *a.nonfinite = floatPayloadFinite(a.data, a.n) ? 0 : 1;
    return;
  }

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
  bool nonfinite = false;  // written by the codec thread, read here after it is done

  // Codec thread: compress piece t, reduce piece t-1, decode piece t-2, in that order.
  auto codecLoop = [&] {
    try {
      for (long t = 0; t < pieces + 2; ++t) {
        if (t < pieces) {
          prog.await(S::kSentX, t - kSlots + 1);  // send slot free (sent, and copied by the receiver)
          prog.await(S::kRecvX, t - kSlots + 1);
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
          prog.await(S::kRecvX, j + 1);
          prog.await(S::kSentG, j - kSlots + 1);  // own slot free
          prog.await(S::kRecvG, j - kSlots + 1);
          const size_t local = static_cast<size_t>(j) * P;
          codec.serverReduce(recvBuf(j), w, elemsOf(j), validOf(rank, j), a.divisor,
                             a.serverResidual ? a.serverResidual + local : nullptr, local, ownBuf(j));
          prog.done(S::kReduced);
        }
        if (t >= 2) {
          const long j = t - 2;
          prog.await(S::kRecvG, j + 1);
          const size_t e = elemsOf(j), pb = codec.payloadBytes(e);
          const uint8_t* in = gatherBuf(j);
          for (int r = 0; r < w; ++r) {
            const size_t v = validOf(r, j);
            if (!v) continue;
            const uint8_t* payload = in + static_cast<size_t>(r) * pb;
            codec.decompress(payload, e, v, a.data + at(r, j));
            if (a.nonfinite && !nonfinite && !codec.finite(payload, e, v)) nonfinite = true;
          }
          prog.done(S::kDecoded);
        }
      }
    } catch (const PipelineStopped&) {
      // Another thread failed and reports its own error.
    } catch (...) {
      prog.stop();
      throw;
    }
  };

  // Sends and receives run on two threads with no step-by-step pairing: a slow peer
  // delays only what it owes, and a rank keeps sending while it waits for another.
  // Both follow the same global order (pieces, exchange before gather, peers by
  // distance), which keeps every pair's messages in step and cannot deadlock: the
  // earliest receive still pending anywhere has a sender that is not blocked behind it.
  auto recvLoop = [&] {
    try {
      for (long t = 0; t <= pieces; ++t) {
        if (t < pieces) {
          const size_t pb = codec.payloadBytes(elemsOf(t));
          prog.await(S::kReduced, t - kSlots + 1);  // recv slot free
          prog.await(S::kCompressed, t + 1);        // this rank's own payload
          uint8_t* in = recvBuf(t);
          std::memcpy(in + static_cast<size_t>(rank) * pb, sendBuf(t) + static_cast<size_t>(rank) * pb, pb);
          for (int s = 1; s < w; ++s) {
            const int from = (rank - s + w) % w;
            transport.recv(from, in + static_cast<size_t>(from) * pb, pb, desc, deadline);
          }
          prog.done(S::kRecvX);
        }
        if (t >= 1) {
          const long j = t - 1;
          const size_t pb = codec.payloadBytes(elemsOf(j));
          prog.await(S::kDecoded, j - kSlots + 1);  // gather slot free
          prog.await(S::kReduced, j + 1);
          uint8_t* in = gatherBuf(j);
          std::memcpy(in + static_cast<size_t>(rank) * pb, ownBuf(j), pb);
          for (int s = 1; s < w; ++s) {
            const int from = (rank - s + w) % w;
            transport.recv(from, in + static_cast<size_t>(from) * pb, pb, desc, deadline);
          }
          prog.done(S::kRecvG);
        }
      }
    } catch (const PipelineStopped&) {
    } catch (...) {
      prog.stop();
      throw;
    }
  };

  std::shared_ptr<Completion> codecDone = codecThread.push(codecLoop);
  std::shared_ptr<Completion> recvDone;
  try {
    recvDone = recvThread.push(recvLoop);
  } catch (...) {
    prog.stop();  // the codec task references this frame: let it end before unwinding
    codecDone->waitFor(-1);
    throw;
  }

  // This thread sends: the exchange of piece t, then the gather of piece t-1.
  std::exception_ptr mine;
  try {
    for (long t = 0; t <= pieces; ++t) {
      if (t < pieces) {
        const size_t pb = codec.payloadBytes(elemsOf(t));
        prog.await(S::kCompressed, t + 1);
        const uint8_t* out = sendBuf(t);
        for (int s = 1; s < w; ++s) {
          const int to = (rank + s) % w;
          transport.send(to, out + static_cast<size_t>(to) * pb, pb, desc, deadline);
        }
        prog.done(S::kSentX);
      }
      if (t >= 1) {
        const long j = t - 1;
        const size_t pb = codec.payloadBytes(elemsOf(j));
        prog.await(S::kReduced, j + 1);
        for (int s = 1; s < w; ++s) transport.send((rank + s) % w, ownBuf(j), pb, desc, deadline);
        prog.done(S::kSentG);
      }
    }
  } catch (const PipelineStopped&) {
  } catch (...) {
    mine = std::current_exception();
    prog.stop();
  }
  codecDone->waitFor(-1);
  recvDone->waitFor(-1);
  // Report the first real failure: this thread's, else the receiver's, else the codec's.
  if (mine) std::rethrow_exception(mine);
  if (auto err = recvDone->error()) std::rethrow_exception(err);
  if (auto err = codecDone->error()) std::rethrow_exception(err);
  if (a.nonfinite) *a.nonfinite = nonfinite ? 1 : 0;
}

}  // namespace pycomm
