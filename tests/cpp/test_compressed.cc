// Pipelined compressed all-reduce (algorithms/compressed.h): ranks as threads over TCP
// and shared memory. Every rank's result and residuals must equal, bit for bit, a
// reference computed here with the whole-chunk kernels (compress every chunk at once,
// reduce each owner's chunk at once, decode everything) - the exchange the Python
// compressors run on other backends.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "algorithms/collectives.h"
#include "algorithms/compressed.h"
#include "core/error.h"
#include "kernels/compress.h"
#include "test_util.h"
#include "transport/shm.h"
#include "transport/tcp.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::runRanks;

constexpr milliseconds kTimeout{30000};

enum class Kind { kFp16Ef, kBf16, kOneBit, kQsgd8Ef, kQsgd4, kFloat };

struct RankState {
  std::vector<float> x, worker, server;
};

size_t chunkFor(size_t n, int w) {
  size_t per = (n + w - 1) / w;
  return std::max<size_t>(kCompressAlign, (per + kCompressAlign - 1) / kCompressAlign * kCompressAlign);
}

uint32_t workerSeed(int r) { return 1000u + 17u * static_cast<uint32_t>(r); }
uint32_t serverSeed(int r) { return 5000u + 31u * static_cast<uint32_t>(r); }

bool usesResiduals(Kind k) { return k == Kind::kFp16Ef || k == Kind::kOneBit || k == Kind::kQsgd8Ef; }

std::unique_ptr<PieceCodec> codecFor(Kind k, int rank) {
  switch (k) {
    case Kind::kFp16Ef: return makeHalfCodec(false, true);
    case Kind::kBf16: return makeHalfCodec(true, false);
    case Kind::kOneBit: return makeOneBitCodec();
    case Kind::kQsgd8Ef: return makeQsgdCodec(8, true, workerSeed(rank), serverSeed(rank));
    case Kind::kQsgd4: return makeQsgdCodec(4, false, workerSeed(rank), serverSeed(rank));
    case Kind::kFloat: return makeFloatCodec();
  }
  return nullptr;
}

std::vector<RankState> makeStates(int w, size_t n, size_t chunk, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<RankState> s(w);
  for (int r = 0; r < w; ++r) {
    s[r].x.resize(n);
    s[r].worker.resize(n);
    s[r].server.resize(chunk);
    for (auto& v : s[r].x) v = d(gen);
    for (auto& v : s[r].worker) v = 0.1f * d(gen);  // leftover error from an earlier step
    for (auto& v : s[r].server) v = 0.05f * d(gen);
  }
  return s;
}

// Whole-chunk reference of one compressed all-reduce over every rank's state.
void reference(Kind k, std::vector<RankState>& s, size_t n, size_t chunk, int divisor) {
  const int w = static_cast<int>(s.size());
  const bool bf16 = k == Kind::kBf16;
  const int bits = k == Kind::kQsgd4 ? 4 : 8;
  size_t pb = 0;
  switch (k) {
    case Kind::kFp16Ef: case Kind::kBf16: pb = 2 * chunk; break;
    case Kind::kOneBit: pb = oneBitPayloadBytes(chunk); break;
    case Kind::kQsgd8Ef: case Kind::kQsgd4: pb = qsgdPayloadBytes(chunk, bits); break;
    case Kind::kFloat: pb = 4 * chunk; break;
  }
  std::vector<std::vector<uint8_t>> payload(w, std::vector<uint8_t>(pb * w));
  for (int r = 0; r < w; ++r) {
    float* res = usesResiduals(k) ? s[r].worker.data() : nullptr;
    uint8_t* out = payload[r].data();
    switch (k) {
      case Kind::kFp16Ef: case Kind::kBf16:
        halfCompress(s[r].x.data(), res, n, chunk * w, bf16, reinterpret_cast<uint16_t*>(out));
        break;
      case Kind::kOneBit: oneBitCompress(s[r].x.data(), res, n, chunk, w, out); break;
      case Kind::kQsgd8Ef: case Kind::kQsgd4:
        qsgdCompress(s[r].x.data(), res, n, chunk, w, bits, workerSeed(r), out);
        break;
      case Kind::kFloat:
        std::memset(out, 0, pb * w);
        std::memcpy(out, s[r].x.data(), n * 4);
        break;
    }
  }
  std::vector<uint8_t> gathered(pb * w);
  for (int o = 0; o < w; ++o) {
    std::vector<uint8_t> recv(pb * w);
    for (int r = 0; r < w; ++r) std::memcpy(recv.data() + r * pb, payload[r].data() + o * pb, pb);
    const size_t start = static_cast<size_t>(o) * chunk;
    const size_t count = start >= n ? 0 : std::min(chunk, n - start);
    float* res = usesResiduals(k) ? s[o].server.data() : nullptr;
    uint8_t* out = gathered.data() + o * pb;
    switch (k) {
      case Kind::kFp16Ef: case Kind::kBf16:
        halfServerReduce(reinterpret_cast<uint16_t*>(recv.data()), w, chunk, count, divisor, res, bf16,
                         reinterpret_cast<uint16_t*>(out));
        break;
      case Kind::kOneBit: oneBitServerReduce(recv.data(), w, chunk, count, divisor, res, out); break;
      case Kind::kQsgd8Ef: case Kind::kQsgd4:
        qsgdServerReduce(recv.data(), w, chunk, count, divisor, res, bits, serverSeed(o), out);
        break;
      case Kind::kFloat:
        floatServerReduce(reinterpret_cast<float*>(recv.data()), w, chunk, count, divisor,
                          reinterpret_cast<float*>(out));
        break;
    }
  }
  std::vector<float> result(n);
  switch (k) {
    case Kind::kFp16Ef: case Kind::kBf16: {
      // Chunk payloads are `chunk` halves each: gathered is the padded tensor.
      halfDecompress(reinterpret_cast<uint16_t*>(gathered.data()), n, bf16, result.data());
      break;
    }
    case Kind::kOneBit: oneBitDecompress(gathered.data(), w, chunk, n, result.data(), false); break;
    case Kind::kQsgd8Ef: case Kind::kQsgd4:
      qsgdDecompress(gathered.data(), w, chunk, n, bits, result.data(), false);
      break;
    case Kind::kFloat: std::memcpy(result.data(), gathered.data(), n * 4); break;
  }
  for (auto& st : s) st.x = result;
}

bool sameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

using Param = std::tuple<Kind, int, size_t, bool>;  // codec, world size, n, tcp?

class Compressed : public ::testing::TestWithParam<Param> {};

TEST_P(Compressed, PipelineEqualsWholeChunkExchange) {
  const auto [kind, w, n, tcp] = GetParam();
  const size_t chunk = chunkFor(n, w);
  const int divisor = w;  // AVG
  auto got = makeStates(w, n, chunk, 7u + static_cast<uint32_t>(n));
  auto want = got;
  reference(kind, want, n, chunk, divisor);
  std::vector<int> flags(static_cast<size_t>(w), -1);

  MemStore store;
  auto t = testing::makeTransports(store, tcp, tcp ? "c/t/" : "c/s/", w, kTimeout);
  runRanks(w, [&](int r) {
    Collectives coll(*t[r], AlgoConfig{});
    auto codec = codecFor(kind, r);
    CompressedArgs a;
    a.data = got[r].x.data();
    a.n = n;
    a.chunk = chunk;
    a.pieceElems = kPieceAlign;  // many pieces: exercises slot reuse
    a.divisor = divisor;
    if (usesResiduals(kind)) {
      a.workerResidual = got[r].worker.data();
      a.serverResidual = got[r].server.data();
    }
    uint8_t nonfinite = 2;
    a.nonfinite = &nonfinite;
    OpDesc d = testing::makeDesc(CollType::kCompressed, 1, n, DType::kFloat32);
    d.tag = codec->id();
    // Twice: the second call reuses the helper thread and buffers, and the residuals
    // written by the first.
    coll.compressedAllReduce(*codec, a, d, Deadline::after(kTimeout));
    d.seq = 2;
    coll.compressedAllReduce(*codec, a, d, Deadline::after(kTimeout));
    flags[r] = nonfinite;
  });
  reference(kind, want, n, chunk, divisor);
  for (int r = 0; r < w; ++r) {
    EXPECT_TRUE(sameBits(got[r].x, want[r].x)) << "rank " << r << " result";
    EXPECT_EQ(flags[r], 0) << "rank " << r << ": finite result flagged (or flag not written)";
    if (usesResiduals(kind)) {
      EXPECT_TRUE(sameBits(got[r].worker, want[r].worker)) << "rank " << r << " worker residual";
      EXPECT_TRUE(sameBits(got[r].server, want[r].server)) << "rank " << r << " server residual";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Codecs, Compressed,
    ::testing::Combine(::testing::Values(Kind::kFp16Ef, Kind::kBf16, Kind::kOneBit, Kind::kQsgd8Ef, Kind::kQsgd4,
                                         Kind::kFloat),
                       ::testing::Values(2, 3, 5),
                       ::testing::Values(size_t{1}, size_t{37}, size_t{13331}, size_t{40961}),
                       ::testing::Values(true, false)));

TEST(CompressedAllReduce, DifferentCodecsAreAMismatchOnEveryRank) {
  MemStore store;
  const int w = 2;
  const size_t n = 5000;
  std::vector<std::unique_ptr<Transport>> t(w);
  runRanks(w, [&](int r) { t[r] = std::make_unique<TcpTransport>(store, "m/", r, w, milliseconds(5000)); });
  std::vector<std::string> errors(w);
  runRanks(w, [&](int r) {
    Collectives coll(*t[r], AlgoConfig{});
    auto codec = r == 0 ? makeHalfCodec(false, false) : makeHalfCodec(true, false);
    std::vector<float> x(n, 1.0f);
    CompressedArgs a;
    a.data = x.data();
    a.n = n;
    a.chunk = chunkFor(n, w);
    a.pieceElems = kPieceAlign;
    a.divisor = 1;
    OpDesc d = testing::makeDesc(CollType::kCompressed, 1, n, DType::kFloat32);
    d.tag = codec->id();
    try {
      coll.compressedAllReduce(*codec, a, d, Deadline::after(milliseconds(5000)));
    } catch (const std::exception& e) {
      errors[r] = e.what();
    }
  });
  for (int r = 0; r < w; ++r) EXPECT_NE(errors[r].find("mismatch"), std::string::npos) << errors[r];
}

TEST(CompressedAllReduce, RejectsPiecesThatSplitBlocks) {
  MemStore store;
  TcpTransport t(store, "x/", 0, 1, kTimeout);
  Collectives coll(t, AlgoConfig{});
  auto codec = makeOneBitCodec();
  std::vector<float> x(64), res(64), srv(64);
  CompressedArgs a;
  a.data = x.data();
  a.n = 64;
  a.chunk = 64;
  a.pieceElems = 1000;
  a.divisor = 1;
  a.workerResidual = res.data();
  a.serverResidual = srv.data();
  EXPECT_THROW(coll.compressedAllReduce(*codec, a, OpDesc{}, Deadline::after(kTimeout)), InvalidArgument);
}

}  // namespace
}  // namespace pycomm
