// The single-host IPC collectives (algorithms/ipc_collectives.h) over a host stand-in for
// CUDA IPC: each rank's "stream" is a worker thread that runs queued operations in
// order, events follow CUDA's rule (a wait covers the peer's record as of the wait
// call), and every operation starts after a random delay, so device work runs late and
// out of step with the host. Buffers are plain memory shared by the rank threads. What
// runs on the GPU is the same algorithm with the same reduceMany element math.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "algorithms/collectives.h"
#include "algorithms/ipc_collectives.h"
#include "kernels/half_math.h"
#include "kernels/reduce.h"
#include "test_util.h"
#include "transport/shm.h"
#include "transport/tcp.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::runRanks;

constexpr milliseconds kTimeout{20000};

/// One rank's stream: operations run in queue order on a worker thread.
class HostStream {
 public:
  explicit HostStream(unsigned seed, int maxDelayUs) : rng_(seed), maxDelayUs_(maxDelayUs) {
    worker_ = std::thread([this] { loop(); });
  }
  ~HostStream() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  /// Queues `fn`; returns its position (1-based).
  uint64_t push(std::function<void()> fn) {
    std::lock_guard<std::mutex> g(mu_);
    q_.push_back(std::move(fn));
    cv_.notify_all();
    return ++queued_;
  }
  uint64_t queued() {
    std::lock_guard<std::mutex> g(mu_);
    return queued_;
  }
  /// Blocks until `n` operations have run (or `until` passes; returns false then).
  bool waitDone(uint64_t n, std::chrono::steady_clock::time_point until) {
    std::unique_lock<std::mutex> g(mu_);
    return done_cv_.wait_until(g, until, [&] { return done_ >= n; });
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> fn;
      int delay = 0;
      {
        std::unique_lock<std::mutex> g(mu_);
        cv_.wait(g, [&] { return stop_ || !q_.empty(); });
        if (q_.empty()) return;
        fn = std::move(q_.front());
        q_.pop_front();
        if (maxDelayUs_ > 0) delay = static_cast<int>(rng_() % static_cast<unsigned>(maxDelayUs_));
      }
      if (delay > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay));
      fn();
      {
        std::lock_guard<std::mutex> g(mu_);
        ++done_;
      }
      done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<std::function<void()>> q_;
  uint64_t queued_ = 0;
  uint64_t done_ = 0;
  bool stop_ = false;
  std::mt19937 rng_;
  int maxDelayUs_;
  std::thread worker_;
};

/// What the rank threads share: allocations by handle, and each rank's stream and event.
struct HostWorld {
  std::mutex mu;
  std::vector<std::unique_ptr<std::vector<char>>> blocks;
  std::vector<HostStream*> streams;
  std::vector<std::atomic<uint64_t>> recorded;  // each rank's event: the position it marks
  explicit HostWorld(int n) : streams(n, nullptr), recorded(n) {
    for (auto& r : recorded) r.store(0);
  }
};

class HostIpcDevice : public IpcDevice {
 public:
  /// `skipWaits` breaks the ordering on purpose (the test that the harness can fail).
  HostIpcDevice(HostWorld& w, int rank, int maxDelayUs, bool skipWaits = false)
      : w_(w), rank_(rank), stream_(std::make_unique<HostStream>(1234u + rank, maxDelayUs)), skipWaits_(skipWaits) {
    std::lock_guard<std::mutex> g(w_.mu);
    w_.streams[rank] = stream_.get();
  }
  ~HostIpcDevice() override {
    stream_->waitDone(stream_->queued(), std::chrono::steady_clock::now() + kTimeout);
  }

  void* allocate(size_t bytes, std::string* handle) override {
    std::lock_guard<std::mutex> g(w_.mu);
    // Poisoned, as fresh device memory would hold anything.
    w_.blocks.push_back(std::make_unique<std::vector<char>>(bytes, static_cast<char>(0x7f)));
    *handle = std::to_string(w_.blocks.size() - 1);
    return w_.blocks.back()->data();
  }
  void* openPeer(const std::string& handle) override {
    std::lock_guard<std::mutex> g(w_.mu);
    return w_.blocks.at(std::stoul(handle))->data();
  }
  void closePeers() override { peers_.clear(); }
  void freeOnDestroy() override {}  // the shared blocks live as long as the HostWorld
  std::string eventHandle() override { return std::to_string(rank_); }
  void openPeerEvent(int peer, const std::string& handle) override {
    ASSERT_EQ(std::stoi(handle), peer);
    peers_.push_back(peer);
  }
  void record() override { w_.recorded[rank_].store(stream_->queued()); }
  void waitPeers() override {
    if (skipWaits_) return;
    for (int p : peers_) {
      const uint64_t target = w_.recorded[p].load();  // the peer's record as of this call
      HostStream* s = w_.streams[p];
      stream_->push([s, target] {
        if (!s->waitDone(target, std::chrono::steady_clock::now() + kTimeout)) std::abort();
      });
    }
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    stream_->push([=] { std::memcpy(dst, src, bytes); });
  }
  void reduceMany(void* dst, const void* const* srcs, int n, size_t count, DType dtype, ReduceOp op) override {
    std::vector<const void*> s(srcs, srcs + n);
    stream_->push([=] { pycomm::reduceMany(dst, s.data(), n, count, dtype, op); });
  }
  void synchronize(const Deadline& deadline) override {
    auto until = std::chrono::steady_clock::now() +
                 std::chrono::duration_cast<std::chrono::steady_clock::duration>(deadline.remaining());
    if (!stream_->waitDone(stream_->queued(), until)) throw TimeoutError("host stream did not drain");
  }
  int maxSources() const override { return 16; }
  std::string name() const override { return strCat("host:", rank_); }

 private:
  HostWorld& w_;
  int rank_;
  std::unique_ptr<HostStream> stream_;
  bool skipWaits_;
  std::vector<int> peers_;
};

// ---- values and the float64 reference --------------------------------------------------------

bool isFloat(DType dt) {
  return dt == DType::kFloat32 || dt == DType::kFloat64 || dt == DType::kFloat16 || dt == DType::kBFloat16;
}

double inputValue(int rank, size_t i, DType dt, ReduceOp op) {
  const long k = static_cast<long>((i * 7 + static_cast<size_t>(rank) * 13 + i / 97) % 41);
  if (dt == DType::kBool) return (k % 3) == 0 ? 1 : 0;
  if (op == ReduceOp::kProduct) return static_cast<double>(k % 3) - 1.0 + (isFloat(dt) ? 0.5 : 0.0);
  if (op == ReduceOp::kBxor || op == ReduceOp::kBand || op == ReduceOp::kBor) return static_cast<double>(k * 3 % 64);
  if (dt == DType::kUInt8) return static_cast<double>(k % 50);
  return static_cast<double>(k - 20) + (isFloat(dt) ? 0.25 * rank : 0.0);
}

void putValue(void* buf, size_t i, DType dt, double v) {
  switch (dt) {
    case DType::kFloat32: static_cast<float*>(buf)[i] = static_cast<float>(v); break;
    case DType::kFloat64: static_cast<double*>(buf)[i] = v; break;
    case DType::kFloat16: static_cast<Half*>(buf)[i] = Half{floatToHalf(static_cast<float>(v))}; break;
    case DType::kBFloat16: static_cast<BFloat16*>(buf)[i] = BFloat16{floatToBf16(static_cast<float>(v))}; break;
    case DType::kInt8: static_cast<int8_t*>(buf)[i] = static_cast<int8_t>(v); break;
    case DType::kUInt8: static_cast<uint8_t*>(buf)[i] = static_cast<uint8_t>(v); break;
    case DType::kInt32: static_cast<int32_t*>(buf)[i] = static_cast<int32_t>(v); break;
    case DType::kInt64: static_cast<int64_t*>(buf)[i] = static_cast<int64_t>(v); break;
    case DType::kBool: static_cast<bool*>(buf)[i] = v != 0; break;
  }
}

double getValue(const void* buf, size_t i, DType dt) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(buf)[i];
    case DType::kFloat64: return static_cast<const double*>(buf)[i];
    case DType::kFloat16: return halfToFloat(static_cast<const Half*>(buf)[i].bits);
    case DType::kBFloat16: return bf16ToFloat(static_cast<const BFloat16*>(buf)[i].bits);
    case DType::kInt8: return static_cast<const int8_t*>(buf)[i];
    case DType::kUInt8: return static_cast<const uint8_t*>(buf)[i];
    case DType::kInt32: return static_cast<const int32_t*>(buf)[i];
    case DType::kInt64: return static_cast<double>(static_cast<const int64_t*>(buf)[i]);
    case DType::kBool: return static_cast<const bool*>(buf)[i] ? 1 : 0;
  }
  return 0;
}

/// Rank `rank`'s element i as it holds it (rounded to dt).
double asStored(int rank, size_t i, DType dt, ReduceOp op) {
  alignas(8) char one[8];
  putValue(one, 0, dt, inputValue(rank, i, dt, op));
  return getValue(one, 0, dt);
}

double reference(int n, size_t i, DType dt, ReduceOp op) {
  // Each rank's input as stored, combined in float64.
  double acc = 0;
  for (int r = 0; r < n; ++r) {
    const double v = asStored(r, i, dt, op);
    if (r == 0) {
      acc = v;
      continue;
    }
    switch (op) {
      case ReduceOp::kSum: case ReduceOp::kAvg: acc = dt == DType::kBool ? (acc || v) : acc + v; break;
      case ReduceOp::kProduct: acc *= v; break;
      case ReduceOp::kMin: acc = std::min(acc, v); break;
      case ReduceOp::kMax: acc = std::max(acc, v); break;
      case ReduceOp::kBand: acc = static_cast<double>(static_cast<long>(acc) & static_cast<long>(v)); break;
      case ReduceOp::kBor: acc = static_cast<double>(static_cast<long>(acc) | static_cast<long>(v)); break;
      case ReduceOp::kBxor: acc = static_cast<double>(static_cast<long>(acc) ^ static_cast<long>(v)); break;
    }
  }
  if (op == ReduceOp::kAvg) acc = isFloat(dt) ? acc / n : std::trunc(acc / n);
  return acc;
}

double tolerance(DType dt) {
  switch (dt) {
    case DType::kFloat16: return 1e-3;
    case DType::kBFloat16: return 8e-3;
    case DType::kFloat32: return 1e-6;
    case DType::kFloat64: return 1e-12;
    default: return 0;
  }
}

struct Case {
  int n;
  DType dt;
  ReduceOp op;
  std::vector<size_t> counts;  // one call each, in order, on the same buffers
  size_t bufferBytes;
  bool tcp = false;
  size_t oneShotBytes = 0;  // all-reduces up to this size run one-shot
  bool ranksDisagree = false;  // ranks ask for different sizes (create() agrees on the smallest)
};

/// Runs c.counts all-reduces on every rank; returns each rank's outputs.
std::vector<std::vector<std::vector<char>>> runCase(const Case& c, int maxDelayUs, bool skipWaits = false) {
  MemStore store;
  auto t = testing::makeTransports(store, c.tcp, c.tcp ? "t/" : "s/", c.n, kTimeout);
  HostWorld world(c.n);
  std::vector<std::vector<std::vector<char>>> outs(c.n);
  const size_t esz = dtypeSize(c.dt);
  runRanks(c.n, [&](int r) {
    Collectives coll(*t[r], AlgoConfig{});
    uint64_t seq = 0;
    OpDesc d0 = testing::makeDesc(CollType::kAllReduce, ++seq, 0, c.dt);
    std::string why;
    // Rank 0's device is the slow one: its work lags the others' by up to maxDelayUs an operation.
    const int delay = r == 0 ? maxDelayUs : maxDelayUs / 10;
    const size_t extra = c.ranksDisagree ? 1024 * static_cast<size_t>(r) : 0;
    auto ar = IpcCollectives::create([&] { return std::make_unique<HostIpcDevice>(world, r, delay, skipWaits); },
                                     store, "ipc/", coll, c.bufferBytes + extra, c.oneShotBytes + extra, d0,
                                     Deadline::after(kTimeout), &why);
    ASSERT_TRUE(ar) << why;
    for (size_t count : c.counts) {
      std::vector<char> buf(count * esz + 16);
      char* data = buf.data() + (count % 2 ? esz : 0);  // odd counts start off 16-byte alignment
      for (size_t i = 0; i < count; ++i) putValue(data, i, c.dt, inputValue(r, i, c.dt, c.op));
      OpDesc d = testing::makeDesc(CollType::kAllReduce, ++seq, count, c.dt);
      d.op = c.op;
      ar->allReduce(data, count, c.dt, c.op, coll, d, Deadline::after(kTimeout));
      outs[r].emplace_back(data, data + count * esz);
    }
  });
  return outs;
}

void checkCase(const Case& c) {
  SCOPED_TRACE(strCat(c.n, " ranks, ", dtypeName(c.dt), " ", reduceOpName(c.op), ", buffer ", c.bufferBytes,
                      c.tcp ? ", tcp" : ", shm", ", one-shot up to ", c.oneShotBytes,
                      c.ranksDisagree ? ", ranks ask for different sizes" : ""));
  auto outs = runCase(c, /*maxDelayUs=*/150);
  for (size_t k = 0; k < c.counts.size(); ++k) {
    const size_t count = c.counts[k];
    for (int r = 1; r < c.n; ++r) ASSERT_EQ(outs[r][k], outs[0][k]) << "rank " << r << " differs, count " << count;
    const double tol = tolerance(c.dt);
    for (size_t i = 0; i < count; ++i) {
      const double want = reference(c.n, i, c.dt, c.op);
      const double got = getValue(outs[0][k].data(), i, c.dt);
      ASSERT_LE(std::fabs(got - want), tol * std::max(1.0, std::fabs(want)))
          << "count " << count << " element " << i << ": got " << got << ", want " << want;
    }
  }
}

TEST(IpcCollectives, EveryDTypeAndOpOnOddWorldSizesAndAwkwardLengths) {
  const std::vector<size_t> counts{0, 1, 7, 13, 257, 1021};
  for (int n : {2, 3, 5}) {
    checkCase({n, DType::kFloat32, ReduceOp::kSum, counts, 64});
    checkCase({n, DType::kFloat16, ReduceOp::kAvg, counts, 1024});
    checkCase({n, DType::kBFloat16, ReduceOp::kSum, counts, 96});
    checkCase({n, DType::kInt32, ReduceOp::kMax, counts, 4096});
  }
  checkCase({3, DType::kFloat64, ReduceOp::kMin, counts, 256});
  checkCase({3, DType::kFloat32, ReduceOp::kProduct, counts, 128});
  checkCase({3, DType::kFloat32, ReduceOp::kAvg, counts, 4096});
  checkCase({5, DType::kInt64, ReduceOp::kBxor, counts, 256});
  checkCase({3, DType::kInt8, ReduceOp::kSum, counts, 64});
  checkCase({2, DType::kUInt8, ReduceOp::kBand, counts, 64});
  checkCase({3, DType::kInt32, ReduceOp::kAvg, counts, 256});
  checkCase({3, DType::kBool, ReduceOp::kSum, counts, 64});
  checkCase({2, DType::kBool, ReduceOp::kProduct, counts, 64});
}

TEST(IpcCollectives, ManyChunksReuseBothBuffersAcrossCalls) {
  // 40961 floats through 4 KiB buffers: 41 chunks per call, buffers alternating, three
  // calls back to back on the same buffers.
  checkCase({3, DType::kFloat32, ReduceOp::kSum, {40961, 1, 40961}, 4096});
  checkCase({4, DType::kBFloat16, ReduceOp::kAvg, {12347, 12347}, 2048});
}

TEST(IpcCollectives, OneShotForSmallCallsTwoStepAboveIt) {
  // 4 KiB one-shot limit: counts up to 1021 floats run one-shot, 40961 in two steps;
  // both on the same buffers, back to back.
  for (int n : {2, 3, 5}) {
    checkCase({n, DType::kFloat32, ReduceOp::kSum, {0, 1, 7, 1021, 40961, 13}, 8192, false, 4096});
    checkCase({n, DType::kBFloat16, ReduceOp::kAvg, {1, 1021, 2049, 5}, 8192, false, 4096});
  }
  checkCase({3, DType::kInt32, ReduceOp::kMin, {257, 9000}, 8192, false, 8192});
}

TEST(IpcCollectives, RanksAskingForDifferentSizesAgreeOnTheSmallest) {
  // Rank r asks for buffers and a one-shot limit 1 KiB * r larger: had each rank cut
  // calls its own way, their barriers would not line up.
  checkCase({3, DType::kFloat32, ReduceOp::kSum, {100, 300, 5000}, 1024, false, 1024, true});
}

TEST(IpcCollectives, BarriersOverTcpToo) { checkCase({3, DType::kFloat32, ReduceOp::kSum, {1021, 5}, 256, true}); }

TEST(IpcCollectives, OneRankIsTheIdentity) { checkCase({1, DType::kFloat32, ReduceOp::kAvg, {0, 7, 100}, 64}); }

/// reduce_scatter, all_gather, then reduce, gather, scatter and broadcast (every root) on n ranks, `per` elements a
/// rank, through buffers of `bufferBytes` (many chunks), checked element by element
/// against the float64 reference and bitwise across ranks where ranks share a result.
void checkOtherCollectives(int n, DType dt, ReduceOp op, size_t per, size_t bufferBytes) {
  SCOPED_TRACE(strCat(n, " ranks, ", dtypeName(dt), " ", reduceOpName(op), ", ", per, " a rank, buffer ",
                      bufferBytes));
  MemStore store;
  auto t = testing::makeTransports<ShmTransport>(store, "s/", n, kTimeout);
  HostWorld world(n);
  const size_t esz = dtypeSize(dt);
  std::vector<std::vector<char>> gathered(n);
  runRanks(n, [&](int r) {
    Collectives coll(*t[r], AlgoConfig{});
    uint64_t seq = 0;
    std::string why;
    auto ipc = IpcCollectives::create([&] { return std::make_unique<HostIpcDevice>(world, r, r == 0 ? 300 : 30); },
                                      store, "ipc/", coll, bufferBytes, 0,
                                      testing::makeDesc(CollType::kAllReduce, ++seq, 0), Deadline::after(kTimeout),
                                      &why);
    if (!ipc) {
      ADD_FAILURE() << why;
      return;  // every rank got null: nobody waits for this one
    }
    // reduce_scatter: rank r's input is element i of the full n*per vector as rank r holds it.
    std::vector<char> in(n * per * esz), out(per * esz + 1);
    for (size_t i = 0; i < n * per; ++i) putValue(in.data(), i, dt, inputValue(r, i, dt, op));
    OpDesc d = testing::makeDesc(CollType::kReduceScatter, ++seq, per, dt);
    d.op = op;
    ipc->reduceScatter(in.data(), out.data(), per, dt, op, coll, d, Deadline::after(kTimeout));
    // EXPECT, not ASSERT, in here: a rank that leaves early would hang the others.
    size_t bad = 0;
    for (size_t i = 0; i < per; ++i) {
      const double want = reference(n, r * per + i, dt, op);
      bad += std::fabs(getValue(out.data(), i, dt) - want) > tolerance(dt) * std::max(1.0, std::fabs(want));
    }
    EXPECT_EQ(bad, 0u) << "reduce_scatter: wrong elements on rank " << r;
    // all_gather, in place (rank r's input is its block of the output) and not.
    std::vector<char> all(n * per * esz), mine(per * esz);
    for (size_t i = 0; i < per; ++i) putValue(mine.data(), i, dt, inputValue(r, i, dt, op));
    std::copy(mine.begin(), mine.end(), all.begin() + r * per * esz);
    for (bool inPlace : {true, false}) {
      if (!inPlace) std::fill(all.begin(), all.end(), 0);
      ipc->allGather(inPlace ? all.data() + r * per * esz : mine.data(), all.data(), per * esz, coll,
                     testing::makeDesc(CollType::kAllGather, ++seq, per, dt), Deadline::after(kTimeout));
      bad = 0;
      for (int p = 0; p < n; ++p) {
        for (size_t i = 0; i < per; ++i) bad += getValue(all.data() + p * per * esz, i, dt) != asStored(p, i, dt, op);
      }
      EXPECT_EQ(bad, 0u) << "all_gather: wrong elements on rank " << r << (inPlace ? " (in place)" : "");
    }
    gathered[r] = all;
    // reduce to every root; the others keep their input
    for (int root = 0; root < n; ++root) {
      std::vector<char> buf(per * esz);
      for (size_t i = 0; i < per; ++i) putValue(buf.data(), i, dt, inputValue(r, i, dt, op));
      const std::vector<char> before = buf;
      OpDesc rd = testing::makeDesc(CollType::kReduce, ++seq, per, dt);
      rd.root = root;
      rd.op = op;
      ipc->reduce(buf.data(), per, dt, op, root, coll, rd, Deadline::after(kTimeout));
      if (r != root) {
        EXPECT_EQ(buf, before) << "reduce to root " << root << " changed rank " << r;
        continue;
      }
      bad = 0;
      for (size_t i = 0; i < per; ++i) {
        const double want = reference(n, i, dt, op);
        bad += std::fabs(getValue(buf.data(), i, dt) - want) > tolerance(dt) * std::max(1.0, std::fabs(want));
      }
      EXPECT_EQ(bad, 0u) << "reduce to root " << root << ": wrong elements";
    }
    // gather to and scatter from every root (the root's input is its copy of everything)
    for (int root = 0; root < n; ++root) {
      std::vector<char> got(r == root ? n * per * esz + 1 : 0, 0x3c);
      OpDesc gd = testing::makeDesc(CollType::kGather, ++seq, per * esz);
      gd.root = root;
      ipc->gather(mine.data(), r == root ? got.data() : nullptr, per * esz, root, coll, gd,
                  Deadline::after(kTimeout));
      if (r == root) {
        bad = 0;
        for (int p = 0; p < n; ++p) {
          for (size_t i = 0; i < per; ++i) bad += getValue(got.data() + p * per * esz, i, dt) != asStored(p, i, dt, op);
        }
        EXPECT_EQ(bad, 0u) << "gather to root " << root << ": wrong elements";
        EXPECT_EQ(got.back(), 0x3c) << "gather wrote past the root's output";
      }
      std::vector<char> piece(per * esz + 1, 0x3c);
      OpDesc sd = testing::makeDesc(CollType::kScatter, ++seq, per * esz);
      sd.root = root;
      // the root scatters the all_gather result: rank p gets rank p's input back
      ipc->scatter(r == root ? all.data() : nullptr, piece.data(), per * esz,
                   root, coll, sd, Deadline::after(kTimeout));
      bad = 0;
      for (size_t i = 0; i < per; ++i) bad += getValue(piece.data(), i, dt) != asStored(r, i, dt, op);
      EXPECT_EQ(bad, 0u) << "scatter from root " << root << ": wrong elements on rank " << r;
      EXPECT_EQ(piece.back(), 0x3c) << "scatter wrote past rank " << r << "'s output";
    }
    // broadcast from every root
    for (int root = 0; root < n; ++root) {
      std::vector<char> buf(per * esz);
      for (size_t i = 0; i < per; ++i) putValue(buf.data(), i, dt, inputValue(r, i, dt, op));
      OpDesc bd = testing::makeDesc(CollType::kBroadcast, ++seq, per * esz);
      bd.root = root;
      ipc->broadcast(buf.data(), per * esz, root, coll, bd, Deadline::after(kTimeout));
      bad = 0;
      for (size_t i = 0; i < per; ++i) bad += getValue(buf.data(), i, dt) != asStored(root, i, dt, op);
      EXPECT_EQ(bad, 0u) << "broadcast from root " << root << ": wrong elements on rank " << r;
    }
  });
  for (int r = 1; r < n; ++r) EXPECT_EQ(gathered[r], gathered[0]);
}

TEST(IpcCollectives, ReduceScatterAllGatherReduceGatherScatterBroadcast) {
  for (int n : {1, 2, 3, 5}) {
    for (size_t per : {0, 1, 7, 1021}) {
      checkOtherCollectives(n, DType::kFloat32, ReduceOp::kSum, per, 256);
    }
  }
  checkOtherCollectives(3, DType::kBFloat16, ReduceOp::kAvg, 1021, 512);
  checkOtherCollectives(3, DType::kInt64, ReduceOp::kMax, 257, 256);
  checkOtherCollectives(4, DType::kFloat16, ReduceOp::kSum, 4099, 4096);
}

/// all_to_all on n ranks through buffers of `bufferBytes`: rank q sends bytes(q, p)
/// bytes to rank p (byte i is a function of q, p and i), laid out in rank order with a
/// gap of `gap` bytes between pieces on both sides; returns each rank's error message
/// ("" when the call succeeded, in which case every byte was checked, gaps included).
/// `expectFrom` overrides what rank p expects from q (for the mismatch test).
std::vector<std::string> runAllToAll(int n, size_t bufferBytes, const std::function<size_t(int, int)>& bytes,
                                     size_t gap, const std::function<size_t(int, int)>& expectFrom = nullptr) {
  SCOPED_TRACE(strCat(n, " ranks, buffer ", bufferBytes, ", gap ", gap));
  auto value = [](int q, int p, size_t i) { return static_cast<char>((q * 31 + p * 7 + i * 13 + i / 253) & 0xff); };
  MemStore store;
  auto t = testing::makeTransports<ShmTransport>(store, "s/", n, kTimeout);
  HostWorld world(n);
  std::vector<std::string> errors(n);
  runRanks(n, [&](int r) {
    Collectives coll(*t[r], AlgoConfig{});
    std::string why;
    auto ipc = IpcCollectives::create([&] { return std::make_unique<HostIpcDevice>(world, r, r == 0 ? 300 : 30); },
                                      store, "ipc/", coll, bufferBytes, 0,
                                      testing::makeDesc(CollType::kAllReduce, 1, 0), Deadline::after(kTimeout), &why);
    if (!ipc) {
      ADD_FAILURE() << why;
      return;
    }
    std::vector<size_t> sendOff(n), sendBytes(n), recvOff(n), recvBytes(n);
    size_t so = gap, ro = gap;
    for (int p = 0; p < n; ++p) {
      sendOff[p] = so;
      sendBytes[p] = bytes(r, p);
      so += sendBytes[p] + gap;
      recvOff[p] = ro;
      recvBytes[p] = expectFrom ? expectFrom(p, r) : bytes(p, r);
      ro += recvBytes[p] + gap;
    }
    std::vector<char> in(so, 0x55), out(ro, 0x66);
    for (int p = 0; p < n; ++p) {
      for (size_t i = 0; i < sendBytes[p]; ++i) in[sendOff[p] + i] = value(r, p, i);
    }
    try {
      ipc->allToAll(in.data(), sendOff, sendBytes, out.data(), recvOff, recvBytes, coll,
                    testing::makeDesc(CollType::kAllToAll, 2, 0), Deadline::after(kTimeout));
    } catch (const std::exception& e) {
      errors[r] = e.what();
      return;
    }
    size_t bad = 0;
    std::vector<char> want(ro, 0x66);
    for (int q = 0; q < n; ++q) {
      for (size_t i = 0; i < recvBytes[q]; ++i) want[recvOff[q] + i] = value(q, r, i);
    }
    for (size_t i = 0; i < ro; ++i) bad += out[i] != want[i];
    EXPECT_EQ(bad, 0u) << "all_to_all: wrong bytes on rank " << r;
  });
  return errors;
}

TEST(IpcCollectives, AllToAllUnequalSplitsManyRounds) {
  for (int n : {1, 2, 3, 5}) {
    // Equal pieces, pieces of 0..several slots (rank q to p: depends on both), and one
    // pair carrying far more than any other (the others sit out the extra rounds).
    const std::vector<std::function<size_t(int, int)>> shapes = {
        [](int, int) { return size_t{1021}; },
        [](int q, int p) { return static_cast<size_t>((q * 5 + p * 3) % 7) * 97; },
        [n](int q, int p) { return q == n - 1 && p == 0 ? size_t{20000} : static_cast<size_t>(q + p); },
        [](int, int) { return size_t{0}; },
    };
    for (const auto& shape : shapes) {
      for (size_t buffer : {256, 4096}) {
        for (const auto& e : runAllToAll(n, buffer, shape, 3)) EXPECT_EQ(e, "");
      }
    }
  }
}

TEST(IpcCollectives, AllToAllMismatchedSplitsFailOnEveryRank) {
  // Rank 2 expects 5 bytes from rank 0, which sends it 7: every rank raises, naming the pair.
  auto bytes = [](int, int) { return size_t{7}; };
  auto expect = [](int q, int p) { return q == 0 && p == 2 ? size_t{5} : size_t{7}; };
  const auto errors = runAllToAll(3, 256, bytes, 0, expect);
  for (int r = 0; r < 3; ++r) {
    EXPECT_NE(errors[r].find("rank 0 sends 7 bytes to rank 2, which expects 5"), std::string::npos)
        << "rank " << r << ": " << errors[r];
  }
}

TEST(IpcCollectives, HarnessCatchesMissingDeviceOrdering) {
#if defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "races on purpose: ThreadSanitizer would (rightly) report them";
#endif
  // Without the stream waits on peers' events, a peer's device reads our buffer before
  // our copies ran: the result must come out wrong, or this test suite proves nothing.
  Case c{3, DType::kFloat32, ReduceOp::kSum, {1021, 1021}, 4096};
  bool wrong = false;
  for (int attempt = 0; attempt < 10 && !wrong; ++attempt) {  // timing decides where it shows
    auto outs = runCase(c, /*maxDelayUs=*/3000, /*skipWaits=*/true);
    for (int r = 0; r < c.n; ++r) {
      for (size_t k = 0; k < c.counts.size(); ++k) {
        for (size_t i = 0; i < c.counts[k]; ++i) {
          wrong = wrong || getValue(outs[r][k].data(), i, c.dt) != reference(c.n, i, c.dt, c.op);
        }
      }
    }
  }
  EXPECT_TRUE(wrong) << "the host stand-in did not expose missing waits";
}

TEST(IpcCollectives, FailedSetupOnOneRankFallsBackOnEveryRank) {
  // Rank 1 cannot allocate, rank 2 cannot open its device: every rank gets null (and a
  // reason), nobody hangs.
  struct NoMemory : HostIpcDevice {
    using HostIpcDevice::HostIpcDevice;
    void* allocate(size_t, std::string*) override { throw Error("out of device memory"); }
  };
  const int n = 3;
  MemStore store;
  auto t = testing::makeTransports<ShmTransport>(store, "s/", n, kTimeout);
  HostWorld world(n);
  std::vector<std::string> why(n);
  runRanks(n, [&](int r) {
    Collectives coll(*t[r], AlgoConfig{});
    auto makeDevice = [&]() -> std::unique_ptr<IpcDevice> {
      if (r == 1) return std::make_unique<NoMemory>(world, r, 0);
      if (r == 2) throw Error("no such device");  // the device cannot even be opened
      return std::make_unique<HostIpcDevice>(world, r, 0);
    };
    auto ar = IpcCollectives::create(makeDevice, store, "ipc/", coll, 4096, 0,
                                   testing::makeDesc(CollType::kAllReduce, 1, 0), Deadline::after(kTimeout),
                                   &why[r]);
    EXPECT_EQ(ar, nullptr);
  });
  EXPECT_NE(why[1].find("rank 1 on host:1: out of device memory"), std::string::npos) << why[1];
  EXPECT_NE(why[2].find("rank 2 on its device: no such device"), std::string::npos) << why[2];
  EXPECT_NE(why[0].find("rank 1 could not set up"), std::string::npos) << why[0];
}

TEST(ReduceMany, MatchesPairwiseReductionForExactValues) {
  // Integer-valued floats: the one-rounding many-input sum equals the pairwise chain.
  const size_t n = 1000;
  std::vector<float> a(n), b(n), c(n), chain(n), many(n);
  for (size_t i = 0; i < n; ++i) {
    a[i] = static_cast<float>(i % 17);
    b[i] = -static_cast<float>(i % 5);
    c[i] = static_cast<float>(i % 3);
  }
  chain = a;
  reduceInto(chain.data(), b.data(), n, DType::kFloat32, ReduceOp::kSum);
  reduceInto(chain.data(), c.data(), n, DType::kFloat32, ReduceOp::kSum);
  const void* srcs[3] = {a.data(), b.data(), c.data()};
  reduceMany(many.data(), srcs, 3, n, DType::kFloat32, ReduceOp::kSum);
  EXPECT_EQ(chain, many);
  reduceMany(many.data(), srcs, 3, n, DType::kFloat32, ReduceOp::kAvg);
  for (size_t i = 0; i < n; ++i) EXPECT_FLOAT_EQ(many[i], chain[i] / 3.0f);
  // In place: dst aliases the first source.
  reduceMany(a.data(), srcs, 3, n, DType::kFloat32, ReduceOp::kSum);
  EXPECT_EQ(a, chain);
}

}  // namespace
}  // namespace pycomm
