#include "algorithms/collectives.h"

#include <algorithm>
#include <cstring>

#include "core/env.h"
#include "core/error.h"
#include "core/work_queue.h"
#include "kernels/reduce.h"

namespace pycomm {

namespace {

// Start of block c when `count` elements are split as evenly as possible over n blocks.
inline size_t blockBegin(size_t count, int n, int c) {
  return static_cast<size_t>((static_cast<unsigned __int128>(count) * c) / n);
}

inline int mod(int a, int n) { return ((a % n) + n) % n; }

// Cross-memory reads are done in pieces small enough to stay in cache while they
// are reduced into the destination.
constexpr size_t kPieceBytes = 128 * 1024;

}  // namespace

const char* algoKey(Algo a) {
  switch (a) {
    case Algo::kAllReduceLocal: return "algo_all_reduce_local";
    case Algo::kAllReduceRing: return "algo_all_reduce_ring";
    case Algo::kAllReduceRd: return "algo_all_reduce_rd";
    case Algo::kAllReduceOneShot: return "algo_all_reduce_oneshot";
    case Algo::kAllReduceDirect: return "algo_all_reduce_direct";
    case Algo::kReduceScatterDirect: return "algo_reduce_scatter_direct";
    case Algo::kReduceScatterRing: return "algo_reduce_scatter_ring";
    case Algo::kAllGatherDirect: return "algo_all_gather_direct";
    case Algo::kAllGatherRing: return "algo_all_gather_ring";
    case Algo::kAllGatherBruck: return "algo_all_gather_bruck";
    case Algo::kBroadcastDirect: return "algo_broadcast_direct";
    case Algo::kBroadcastChain: return "algo_broadcast_chain";
    case Algo::kBroadcastTree: return "algo_broadcast_tree";
    case Algo::kReduceDirect: return "algo_reduce_direct";
    case Algo::kReduceAllReduce: return "algo_reduce_all_reduce";
    case Algo::kReduceChain: return "algo_reduce_chain";
    case Algo::kAllReduceHier: return "algo_all_reduce_hier";
    case Algo::kReduceScatterHier: return "algo_reduce_scatter_hier";
    case Algo::kAllGatherHier: return "algo_all_gather_hier";
    // ---- hierarchical rooted collectives and small all-reduces (hierarchical_rooted.cc) ----
    case Algo::kAllReduceHierRd: return "algo_all_reduce_hier_rd";
    case Algo::kBroadcastHier: return "algo_broadcast_hier";
    case Algo::kReduceHier: return "algo_reduce_hier";
    // ---- end of hierarchical rooted block ----
    case Algo::kCount: break;
  }
  return "algo_unknown";
}

std::map<std::string, uint64_t> Collectives::stats() const {
  std::map<std::string, uint64_t> s;
  for (size_t i = 0; i < ran_.size(); ++i) s[algoKey(static_cast<Algo>(i))] = ran_[i].load(std::memory_order_relaxed);
  return s;
}

AlgoConfig AlgoConfig::fromEnv() {
  AlgoConfig c;
  c.smallBytes = static_cast<size_t>(envInt("PYCOMM_ALLREDUCE_SMALL_BYTES", static_cast<int64_t>(c.smallBytes)));
  c.segmentBytes = static_cast<size_t>(
      std::max<int64_t>(4096, envInt("PYCOMM_RING_SEGMENT_BYTES", static_cast<int64_t>(c.segmentBytes))));
  c.algo = envStr("PYCOMM_ALGO", "auto");
  c.hierChunkBytes = static_cast<size_t>(
      std::max<int64_t>(4096, envInt("PYCOMM_HIER_CHUNK_BYTES", static_cast<int64_t>(c.hierChunkBytes))));
  c.registeredCopyMax = static_cast<size_t>(std::max<int64_t>(
      0, envInt("PYCOMM_REGISTERED_COPY_MAX", static_cast<int64_t>(c.registeredCopyMax))));
  c.compressPieceBytes = static_cast<size_t>(std::max<int64_t>(
      4, envInt("PYCOMM_COMPRESS_PIECE_BYTES", static_cast<int64_t>(c.compressPieceBytes))));
  PYCOMM_CHECK_ARG(c.algo == "auto" || c.algo == "ring" || c.algo == "direct" || c.algo == "oneshot" ||
                       c.algo == "rd" || c.algo == "hier" || c.algo == "hier_rd",
                   "PYCOMM_ALGO must be one of auto, ring, direct, oneshot, rd, hier, hier_rd (got '", c.algo, "')");
  return c;
}

Collectives::Collectives(Transport& transport, AlgoConfig config, const Topology& topology, Transport* local)
    : transport_(transport),
      direct_(transport.directAccess()),
      config_(std::move(config)),
      rank_(transport.rank()),
      size_(transport.size()),
      topology_(topology) {
  if (direct_ && config_.smallBytes > direct_->inlineCapacity()) config_.smallBytes = direct_->inlineCapacity();
  PYCOMM_ASSERT(topology_.hostOf.empty() || static_cast<int>(topology_.hostOf.size()) == size_,
                "topology of ", topology_.hostOf.size(), " ranks for a group of ", size_);
  if (topology_.hierarchical()) initHierarchy(local);
}

Collectives::~Collectives() {
  if (codecThread_) codecThread_->shutdown("pycomm: collectives destroyed");
  if (recvThread_) recvThread_->shutdown("pycomm: collectives destroyed");
  if (crossThread_) crossThread_->shutdown("pycomm: collectives destroyed");
  // A destroyed group leaves no registered segment (nor its descriptor) behind.
  registeredScratch_.reset();
  SharedArena::instance().trim();
}

void Collectives::compressedAllReduce(PieceCodec& codec, const CompressedArgs& args, const OpDesc& desc,
                                      const Deadline& deadline) {
  if (!codecThread_) {
    codecThread_ = std::make_unique<WorkQueue>("pycomm-codec");
    recvThread_ = std::make_unique<WorkQueue>("pycomm-crecv");
  }
  CompressedArgs a = args;
  if (a.pieceElems == 0) {
    const size_t elems = std::max<size_t>(1, config_.compressPieceBytes / sizeof(float));
    a.pieceElems = (elems + kPieceAlign - 1) / kPieceAlign * kPieceAlign;
  }
  pipelinedCompressedAllReduce(transport_, *codecThread_, *recvThread_, compressScratch_, codec, a, desc, deadline);
}

char* Collectives::scratch(size_t bytes) {
  if (scratch_.size() < bytes) scratch_.resize(std::max(bytes, scratch_.size() * 2));
  return scratch_.data();
}

// ---------------------------------------------------------------------------------------------
// all_reduce

void Collectives::allReduce(void* buf, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                            const Deadline& deadline) {
  ran(runAllReduce(buf, buf, count, dtype, op, desc, deadline));
}

void Collectives::allReduce(const void* in, void* out, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                            const Deadline& deadline) {
  ran(runAllReduce(in, out, count, dtype, op, desc, deadline));
}

Algo Collectives::runAllReduce(const void* in, void* out, size_t count, DType dtype, ReduceOp op,
                               const OpDesc& desc, const Deadline& deadline) {
  checkReduceOp(dtype, op);
  const size_t bytes = count * dtypeSize(dtype);
  // The algorithms without an out-of-place form run in place on `out`.
  auto inPlace = [&]() -> void* {
    if (in != out && bytes) memcpy(out, in, bytes);
    return out;
  };
  if (size_ == 1) {
    void* buf = inPlace();
    if (op == ReduceOp::kAvg) finalizeAvg(buf, count, dtype, 1);
    return Algo::kAllReduceLocal;
  }
  const std::string& a = config_.algo;
  // Hierarchical when the group spans hosts with several ranks on some: small calls are
  // latency-bound and go to recursive doubling among the host leaders (log2 of the
  // hosts rounds over the network instead of log2 of the ranks), large ones to the
  // bandwidth scheme.
  if (shards_ > 0 && (a == "hier_rd" || (a == "auto" && bytes <= config_.smallBytes))) {
    hierSmallAllReduce(inPlace(), count, dtype, op, desc, deadline);
    return Algo::kAllReduceHierRd;
  }
  if (shards_ > 0 && (a == "hier" || (a == "auto" && bytes > config_.smallBytes && count >= static_cast<size_t>(size_)))) {
    hierAllReduce(inPlace(), count, dtype, op, desc, deadline);
    return Algo::kAllReduceHier;
  }
  if (direct_) {
    if (a == "oneshot" || (a == "auto" && bytes <= config_.smallBytes)) {
      PYCOMM_CHECK_ARG(bytes <= direct_->inlineCapacity(), "PYCOMM_ALGO=oneshot supports at most ",
                       direct_->inlineCapacity(), " bytes, got ", bytes);
      shmOneShotAllReduce(in, out, count, dtype, op, desc, deadline);
      return Algo::kAllReduceOneShot;
    }
    if (a == "auto" || a == "direct") {
      shmDirectAllReduce(in, out, count, dtype, op, desc, deadline);
      return Algo::kAllReduceDirect;
    }
  }
  // Blocks smaller than one element per rank go to recursive doubling: the ring would
  // leave some ranks with nothing to send.
  if (a == "rd" || (a != "ring" && bytes <= config_.smallBytes) || count < static_cast<size_t>(size_)) {
    recursiveDoublingAllReduce(inPlace(), count, dtype, op, desc, deadline);
    return Algo::kAllReduceRd;
  }
  ringAllReduce(inPlace(), count, dtype, op, desc, deadline);
  return Algo::kAllReduceRing;
}

void Collectives::ringAllReduce(void* buf, size_t count, DType dtype, ReduceOp op,
                                const OpDesc& desc, const Deadline& deadline) {
  const int n = size_;
  const size_t es = dtypeSize(dtype);
  char* b = static_cast<char*>(buf);
  const int next = mod(rank_ + 1, n);
  const int prev = mod(rank_ - 1, n);
  auto lo = [&](int c) { return blockBegin(count, n, c); };
  auto len = [&](int c) { return lo(c + 1) - lo(c); };
  const size_t maxChunk = (count + n - 1) / n;
  const size_t segElems = std::max<size_t>(1, config_.segmentBytes / es);
  // Every rank derives the same number of segments per step from the largest block,
  // so messages pair up even when blocks differ by one element.
  const size_t nseg = std::max<size_t>(1, (maxChunk + segElems - 1) / segElems);
  char* tmp = scratch(std::min(maxChunk, segElems) * es);
  auto segment = [&](int c, size_t j, size_t* off, size_t* n_) {
    size_t l = len(c);
    size_t o = std::min(j * segElems, l);
    *off = lo(c) + o;
    *n_ = std::min(segElems, l - o);
  };
  // Reduce-scatter: after n-1 steps rank r holds the full reduction of block r+1.
  for (int s = 0; s < n - 1; ++s) {
    const int sc = mod(rank_ - s, n);
    const int rc = mod(rank_ - s - 1, n);
    for (size_t j = 0; j < nseg; ++j) {
      size_t so, sl, ro, rl;
      segment(sc, j, &so, &sl);
      segment(rc, j, &ro, &rl);
      transport_.sendRecv(next, b + so * es, sl * es, prev, tmp, rl * es, desc, deadline);
      reduceInto(b + ro * es, tmp, rl, dtype, op);
    }
  }
  const int own = mod(rank_ + 1, n);
  if (op == ReduceOp::kAvg) finalizeAvg(b + lo(own) * es, len(own), dtype, n);
  // All-gather: each block travels once around the ring from its owner, so every
  // rank ends with the owner's bits.
  for (int s = 0; s < n - 1; ++s) {
    const int sc = mod(rank_ + 1 - s, n);
    const int rc = mod(rank_ - s, n);
    for (size_t j = 0; j < nseg; ++j) {
      size_t so, sl, ro, rl;
      segment(sc, j, &so, &sl);
      segment(rc, j, &ro, &rl);
      transport_.sendRecv(next, b + so * es, sl * es, prev, b + ro * es, rl * es, desc, deadline);
    }
  }
}

void Collectives::recursiveDoublingAllReduce(void* buf, size_t count, DType dtype, ReduceOp op,
                                             const OpDesc& desc, const Deadline& deadline) {
  const int n = size_;
  const size_t bytes = count * dtypeSize(dtype);
  char* b = static_cast<char*>(buf);
  int p2 = 1;
  while (p2 * 2 <= n) p2 *= 2;
  const int rem = n - p2;
  char* tmp = scratch(bytes);
  if (rank_ >= p2) {
    // Extra ranks hand their data to a partner and get the final result back.
    transport_.send(rank_ - p2, b, bytes, desc, deadline);
    transport_.recv(rank_ - p2, b, bytes, desc, deadline);
    return;
  }
  if (rank_ < rem) {
    transport_.recv(rank_ + p2, tmp, bytes, desc, deadline);
    reduce3(b, b, tmp, count, dtype, op);
  }
  for (int mask = 1; mask < p2; mask <<= 1) {
    const int partner = rank_ ^ mask;
    transport_.sendRecv(partner, b, bytes, partner, tmp, bytes, desc, deadline);
    // Combine lower rank's partial first on both sides: the pair computes identical bits.
    if (rank_ < partner) {
      reduce3(b, b, tmp, count, dtype, op);
    } else {
      reduce3(b, tmp, b, count, dtype, op);
    }
  }
  if (op == ReduceOp::kAvg) finalizeAvg(b, count, dtype, n);
  if (rank_ < rem) transport_.send(rank_ + p2, b, bytes, desc, deadline);
}

void Collectives::shmOneShotAllReduce(const void* in, void* out, size_t count, DType dtype, ReduceOp op,
                                      const OpDesc& desc, const Deadline& deadline) {
  const size_t bytes = count * dtypeSize(dtype);
  const uint64_t d = direct_->post(desc, in, bytes, bytes);
  std::vector<const void*> src(size_);
  for (int p = 0; p < size_; ++p) {
    src[p] = p == rank_ ? in : direct_->peerRecord(p, d, desc, bytes, deadline).inlineData;
  }
  // Every rank reduces the same inputs in the same (rank) order: identical bits. In
  // place the sum goes to scratch first (`in` is one of the inputs); out of place
  // straight into `out`.
  char* acc = in == out ? scratch(bytes) : static_cast<char*>(out);
  reduce3(acc, src[0], src[1], count, dtype, op);
  for (int p = 2; p < size_; ++p) reduceInto(acc, src[p], count, dtype, op);
  if (op == ReduceOp::kAvg) finalizeAvg(acc, count, dtype, size_);
  if (acc != out && bytes) memcpy(out, acc, bytes);
}

void Collectives::shmDirectAllReduce(const void* in, void* out, size_t count, DType dtype, ReduceOp op,
                                     const OpDesc& desc, const Deadline& deadline) {
  const int n = size_;
  const size_t es = dtypeSize(dtype);
  const size_t bytes = count * es;
  const char* src = static_cast<const char*>(in);
  char* user = static_cast<char*>(out);
  // Peers read this rank's input. Outside the registered arena every read is a
  // process_vm_readv that pins its pages; a copy into registered scratch (one pass here)
  // lets them read with plain loads instead, where that is cheaper (registeredCopyMax).
  // `red` is where this rank reduces its block: the scratch copy, else the output.
  char* red = user;
  SharedArena::Location loc;
  if (bytes > config_.smallBytes && bytes <= config_.registeredCopyMax &&
      !SharedArena::instance().locate(src, bytes, &loc)) {
    if (char* r = registeredScratch_.get(bytes)) {
      memcpy(r, src, bytes);
      src = red = r;
    }
  }
  const uint64_t d = direct_->post(desc, src, bytes, 0);
  std::vector<uint64_t> addr(n, 0);
  std::vector<const char*> mapped(n, nullptr);  // peers' registered buffers, mapped here
  for (int p = 0; p < n; ++p) {
    if (p == rank_) continue;
    const DirectAccess::Peer rec = direct_->peerRecord(p, d, desc, bytes, deadline);
    addr[p] = rec.addr;
    mapped[p] = static_cast<const char*>(rec.mapped);
  }
  // Reduce-scatter: this rank alone reduces block `rank_` into `red`: its own input
  // first, then each peer's block read straight from the peer's input (one copy, in
  // cache-sized pieces; none for a registered peer, whose block is reduced straight out
  // of its mapping). In place and out of place combine in the same order.
  const size_t lo = blockBegin(count, n, rank_);
  const size_t hi = blockBegin(count, n, rank_ + 1);
  const size_t piece = std::max<size_t>(1, kPieceBytes / es);
  char* tmp = scratch(piece * es);
  for (size_t off = lo; off < hi; off += piece) {
    const size_t len = std::min(piece, hi - off);
    const char* acc = src + off * es;  // what the next peer's block is combined with
    for (int p = 0; p < n; ++p) {
      if (p == rank_) continue;
      const char* theirs = mapped[p] ? mapped[p] + off * es : tmp;
      if (!mapped[p]) direct_->readPeer(p, addr[p] + off * es, tmp, len * es);
      reduce3(red + off * es, acc, theirs, len, dtype, op);
      acc = red + off * es;
    }
  }
  for (int p = 0; p < n; ++p) {
    if (mapped[p] && hi > lo) direct_->countMappedRead(p, (hi - lo) * es);
  }
  if (op == ReduceOp::kAvg) finalizeAvg(red + lo * es, hi - lo, dtype, n);
  // The reduced blocks, published: a peer's record of them also says its block is
  // final (and that it has finished reading this rank's input).
  const uint64_t d2 = direct_->post(desc, red, bytes, 0);
  for (int p = 0; p < n; ++p) {
    if (p == rank_) continue;
    const DirectAccess::Peer rec = direct_->peerRecord(p, d2, desc, bytes, deadline);
    addr[p] = rec.addr;
    mapped[p] = static_cast<const char*>(rec.mapped);
  }
  // All-gather: copy each peer's finished block out of the peer's buffer, into the
  // caller's output (with this rank's own block when it was reduced in the scratch).
  for (int p = 0; p < n; ++p) {
    const size_t plo = blockBegin(count, n, p);
    const size_t phi = blockBegin(count, n, p + 1);
    if (phi <= plo) continue;
    if (p == rank_) {
      if (red != user) memcpy(user + plo * es, red + plo * es, (phi - plo) * es);
    } else if (mapped[p]) {
      memcpy(user + plo * es, mapped[p] + plo * es, (phi - plo) * es);
      direct_->countMappedRead(p, (phi - plo) * es);
    } else {
      direct_->readPeer(p, addr[p] + plo * es, user + plo * es, (phi - plo) * es);
    }
  }
  // Nobody may touch its buffers again until every peer has finished reading them.
  direct_->barrier(desc, deadline);
}

// ---------------------------------------------------------------------------------------------
// reduce_scatter / all_gather

void Collectives::reduceScatter(const void* in, void* out, size_t countPerRank, DType dtype,
                                ReduceOp op, const OpDesc& desc, const Deadline& deadline) {
  checkReduceOp(dtype, op);
  const int n = size_;
  const size_t es = dtypeSize(dtype);
  const size_t blockBytes = countPerRank * es;
  const char* src = static_cast<const char*>(in);
  char* o = static_cast<char*>(out);
  if (hierBlocks(blockBytes * n)) {
    hierReduceScatter(in, out, countPerRank, dtype, op, desc, deadline);
    ran(Algo::kReduceScatterHier);
    return;
  }
  if (hierUneven(blockBytes * n)) {
    hierUnevenReduceScatter(in, out, countPerRank, dtype, op, desc, deadline);
    ran(Algo::kReduceScatterHier);
    return;
  }
  if (blockBytes) memmove(o, src + rank_ * blockBytes, blockBytes);
  if (n == 1) {
    if (op == ReduceOp::kAvg) finalizeAvg(o, countPerRank, dtype, 1);
    return;
  }
  if (direct_ && config_.algo != "ring") {
    const uint64_t d = direct_->post(desc, in, blockBytes * n, 0);
    std::vector<uint64_t> addr(n, 0);
    std::vector<const char*> mapped(n, nullptr);  // registered peers' inputs, mapped here
    for (int p = 0; p < n; ++p) {
      if (p == rank_) continue;
      const DirectAccess::Peer rec = direct_->peerRecord(p, d, desc, blockBytes * n, deadline);
      addr[p] = rec.addr;
      mapped[p] = static_cast<const char*>(rec.mapped);
    }
    const size_t piece = std::max<size_t>(1, kPieceBytes / es);
    char* tmp = scratch(piece * es);
    for (size_t off = 0; off < countPerRank; off += piece) {
      const size_t len = std::min(piece, countPerRank - off);
      for (int p = 0; p < n; ++p) {
        if (p == rank_) continue;
        if (mapped[p]) {
          reduceInto(o + off * es, mapped[p] + rank_ * blockBytes + off * es, len, dtype, op);
        } else {
          direct_->readPeer(p, addr[p] + rank_ * blockBytes + off * es, tmp, len * es);
          reduceInto(o + off * es, tmp, len, dtype, op);
        }
      }
    }
    for (int p = 0; p < n; ++p) {
      if (mapped[p] && blockBytes) direct_->countMappedRead(p, blockBytes);
    }
    if (op == ReduceOp::kAvg) finalizeAvg(o, countPerRank, dtype, n);
    direct_->barrier(desc, deadline);  // peers are done reading our input
    ran(Algo::kReduceScatterDirect);
    return;
  }
  // Ring: the partial for block c starts at rank c+1 and ends, complete, at rank c.
  const int next = mod(rank_ + 1, n);
  const int prev = mod(rank_ - 1, n);
  const size_t segElems = std::max<size_t>(1, config_.segmentBytes / es);
  const size_t nseg = std::max<size_t>(1, (countPerRank + segElems - 1) / segElems);
  // acc holds the running partial we forward; tmp receives the previous rank's.
  char* acc = scratch(2 * std::max<size_t>(blockBytes, 1));
  char* tmp = acc + std::max<size_t>(blockBytes, 1);
  int c = mod(rank_ - 1, n);  // block whose partial this rank starts
  if (blockBytes) memcpy(acc, src + c * blockBytes, blockBytes);
  for (int s = 0; s < n - 1; ++s) {
    c = mod(c - 1, n);  // block received this step
    for (size_t j = 0; j < nseg; ++j) {
      const size_t off = std::min(j * segElems, countPerRank);
      const size_t len = std::min(segElems, countPerRank - off);
      transport_.sendRecv(next, acc + off * es, len * es, prev, tmp + off * es, len * es, desc, deadline);
    }
    // tmp = partial of block c from prev; add our own contribution to it.
    reduce3(acc, tmp, src + c * blockBytes, countPerRank, dtype, op);
  }
  // After n-1 steps c == rank_: acc is the full reduction of our block.
  if (blockBytes) memcpy(o, acc, blockBytes);
  if (op == ReduceOp::kAvg) finalizeAvg(o, countPerRank, dtype, n);
  ran(Algo::kReduceScatterRing);
}

void Collectives::allGather(const void* in, void* out, size_t bytesPerRank, const OpDesc& desc,
                            const Deadline& deadline) {
  const int n = size_;
  char* o = static_cast<char*>(out);
  if (hierBlocks(bytesPerRank * n)) {
    hierAllGather(in, out, bytesPerRank, desc, deadline);
    ran(Algo::kAllGatherHier);
    return;
  }
  if (hierUneven(bytesPerRank * n)) {
    hierUnevenAllGather(in, out, bytesPerRank, desc, deadline);
    ran(Algo::kAllGatherHier);
    return;
  }
  if (bytesPerRank && o + rank_ * bytesPerRank != in) memmove(o + rank_ * bytesPerRank, in, bytesPerRank);
  if (n == 1) return;
  if (direct_ && config_.algo != "ring") {
    const uint64_t d = direct_->post(desc, in, bytesPerRank, 0);
    std::vector<DirectAccess::Peer> rec(n);
    for (int p = 0; p < n; ++p) {
      if (p != rank_) rec[p] = direct_->peerRecord(p, d, desc, bytesPerRank, deadline);
    }
    for (int p = 0; p < n; ++p) {
      if (p == rank_ || !bytesPerRank) continue;
      if (rec[p].mapped) {
        memcpy(o + p * bytesPerRank, rec[p].mapped, bytesPerRank);  // a registered peer
        direct_->countMappedRead(p, bytesPerRank);
      } else {
        direct_->readPeer(p, rec[p].addr, o + p * bytesPerRank, bytesPerRank);
      }
    }
    direct_->barrier(desc, deadline);  // peers are done reading our input
    ran(Algo::kAllGatherDirect);
    return;
  }
  // Latency-bound: log2(n) rounds instead of the ring's n-1.
  if (logRounds(bytesPerRank * n)) {
    bruckAllGather(o, bytesPerRank, desc, deadline);
    ran(Algo::kAllGatherBruck);
    return;
  }
  const int next = mod(rank_ + 1, n);
  const int prev = mod(rank_ - 1, n);
  const size_t seg = std::max<size_t>(1, config_.segmentBytes);
  const size_t nseg = std::max<size_t>(1, (bytesPerRank + seg - 1) / seg);
  for (int s = 0; s < n - 1; ++s) {
    const int sc = mod(rank_ - s, n);
    const int rc = mod(rank_ - s - 1, n);
    for (size_t j = 0; j < nseg; ++j) {
      const size_t off = std::min(j * seg, bytesPerRank);
      const size_t len = std::min(seg, bytesPerRank - off);
      transport_.sendRecv(next, o + sc * bytesPerRank + off, len, prev, o + rc * bytesPerRank + off, len,
                          desc, deadline);
    }
  }
  ran(Algo::kAllGatherRing);
}

// ---------------------------------------------------------------------------------------------
// rooted collectives

void Collectives::broadcast(void* buf, size_t bytes, int root, const OpDesc& desc,
                            const Deadline& deadline) {
  const int n = size_;
  PYCOMM_CHECK_ARG(root >= 0 && root < n, "broadcast root ", root, " is out of range for group size ", n);
  if (n == 1) return;
  char* b = static_cast<char*>(buf);
  if (hierRooted()) {
    hierBroadcast(buf, bytes, root, desc, deadline);
    ran(Algo::kBroadcastHier);
    return;
  }
  if (direct_ && config_.algo != "ring") {
    const uint64_t d = direct_->post(desc, buf, bytes, 0);
    if (rank_ != root) {
      auto rec = direct_->peerRecord(root, d, desc, bytes, deadline);
      if (bytes) direct_->readPeer(root, rec.addr, b, bytes);
    }
    direct_->barrier(desc, deadline);  // root's buffer is read by everyone before it returns
    ran(Algo::kBroadcastDirect);
    return;
  }
  // Latency-bound: a binomial tree, so the last rank hears from the root after
  // ceil(log2(n)) hops instead of n-1 along the chain. Bandwidth-bound: the chain, where
  // every link carries the buffer once and segments overlap (a tree's root would send it
  // log2(n) times).
  if (logRounds(bytes)) {
    treeBroadcast(b, bytes, root, desc, deadline);
    ran(Algo::kBroadcastTree);
    return;
  }
  // Pipelined chain root -> root+1 -> ... : segment j+1 arrives while segment j moves on.
  const int vr = mod(rank_ - root, n);
  const int prev = mod(rank_ - 1, n);
  const int next = mod(rank_ + 1, n);
  const size_t seg = std::max<size_t>(1, config_.segmentBytes);
  const size_t nseg = std::max<size_t>(1, (bytes + seg - 1) / seg);
  auto segPtr = [&](size_t j) { return b + std::min(j * seg, bytes); };
  auto segLen = [&](size_t j) { return std::min(seg, bytes - std::min(j * seg, bytes)); };
  if (vr == 0) {
    for (size_t j = 0; j < nseg; ++j) transport_.send(next, segPtr(j), segLen(j), desc, deadline);
  } else if (vr == n - 1) {
    for (size_t j = 0; j < nseg; ++j) transport_.recv(prev, segPtr(j), segLen(j), desc, deadline);
  } else {
    transport_.recv(prev, segPtr(0), segLen(0), desc, deadline);
    for (size_t j = 1; j < nseg; ++j) {
      transport_.sendRecv(next, segPtr(j - 1), segLen(j - 1), prev, segPtr(j), segLen(j), desc, deadline);
    }
    transport_.send(next, segPtr(nseg - 1), segLen(nseg - 1), desc, deadline);
  }
  ran(Algo::kBroadcastChain);
}

bool Collectives::logRounds(size_t bytes) const {
  return size_ > 2 && (config_.algo == "rd" || (config_.algo != "ring" && bytes <= config_.smallBytes));
}

void Collectives::bruckAllGather(char* o, size_t b, const OpDesc& desc, const Deadline& deadline) {
  const int n = size_;
  // tmp block i holds rank (rank_ + i) mod n's block: own first, then doubling.
  char* tmp = scratch(static_cast<size_t>(n) * b);
  if (b) memcpy(tmp, o + rank_ * b, b);
  for (int dist = 1; dist < n; dist <<= 1) {
    const size_t cnt = static_cast<size_t>(std::min(dist, n - dist));
    transport_.sendRecv(mod(rank_ - dist, n), tmp, cnt * b, mod(rank_ + dist, n), tmp + dist * b, cnt * b, desc,
                        deadline);
  }
  for (int i = 1; b && i < n; ++i) memcpy(o + mod(rank_ + i, n) * b, tmp + i * b, b);
}

void Collectives::treeBroadcast(char* b, size_t bytes, int root, const OpDesc& desc,
                                const Deadline& deadline) {
  const int n = size_;
  const int vr = mod(rank_ - root, n);  // position in the tree: the root is 0
  // The parent of vr is vr with its lowest set bit cleared.
  int mask = 1;
  for (; mask < n; mask <<= 1) {
    if (vr & mask) {
      transport_.recv(mod(vr - mask + root, n), b, bytes, desc, deadline);
      break;
    }
  }
  // Children: vr + 2^k for every 2^k below that bit (all powers below n for the root),
  // largest first, since that subtree is the deepest.
  for (mask >>= 1; mask > 0; mask >>= 1) {
    if (vr + mask < n) transport_.send(mod(vr + mask + root, n), b, bytes, desc, deadline);
  }
}

void Collectives::reduce(void* buf, size_t count, DType dtype, ReduceOp op, int root,
                         const OpDesc& desc, const Deadline& deadline) {
  checkReduceOp(dtype, op);
  const int n = size_;
  PYCOMM_CHECK_ARG(root >= 0 && root < n, "reduce root ", root, " is out of range for group size ", n);
  const size_t es = dtypeSize(dtype);
  const size_t bytes = count * es;
  char* b = static_cast<char*>(buf);
  if (n == 1) {
    if (op == ReduceOp::kAvg) finalizeAvg(b, count, dtype, 1);
    return;
  }
  if (hierRooted()) {
    hierReduce(buf, count, dtype, op, root, desc, deadline);
    ran(Algo::kReduceHier);
    return;
  }
  if (direct_ && config_.algo != "ring") {
    // Root reads every peer's buffer piecewise and reduces into its own.
    const uint64_t d = direct_->post(desc, buf, bytes, 0);
    if (rank_ == root) {
      std::vector<uint64_t> addr(n, 0);
      for (int p = 0; p < n; ++p) {
        if (p != rank_) addr[p] = direct_->peerRecord(p, d, desc, bytes, deadline).addr;
      }
      const size_t piece = std::max<size_t>(1, kPieceBytes / es);
      char* tmp = scratch(piece * es);
      for (size_t off = 0; off < count; off += piece) {
        const size_t len = std::min(piece, count - off);
        for (int p = 0; p < n; ++p) {
          if (p == rank_) continue;
          direct_->readPeer(p, addr[p] + off * es, tmp, len * es);
          reduceInto(b + off * es, tmp, len, dtype, op);
        }
      }
      if (op == ReduceOp::kAvg) finalizeAvg(b, count, dtype, n);
    }
    direct_->barrier(desc, deadline);
    ran(Algo::kReduceDirect);
    return;
  }
  if (config_.algo == "rd" || bytes <= config_.smallBytes) {
    // Latency-bound: all-reduce a copy (log2(n) rounds), keep the result on the root.
    // The root's result lands in its buffer; the others' in a copy they drop.
    std::vector<char> sink(rank_ == root ? 0 : bytes);
    runAllReduce(b, rank_ == root ? b : sink.data(), count, dtype, op, desc, deadline);
    ran(Algo::kReduceAllReduce);
    return;
  }
  chainReduce(b, count, dtype, op, root, desc, deadline);
  ran(Algo::kReduceChain);
}

void Collectives::chainReduce(char* b, size_t count, DType dtype, ReduceOp op, int root, const OpDesc& desc,
                              const Deadline& deadline) {
  // A pipelined chain that ends at the root: root+1 sends its segments to root+2, which
  // reduces its own values in and passes them on, ..., and the root reduces the last
  // partial sums into its buffer. Every link carries the buffer once (an all-reduce
  // would carry it 2(n-1)/n times), and segments overlap along the chain. Non-root
  // buffers are left unchanged.
  if (count == 0) return;
  const int n = size_;
  const size_t es = dtypeSize(dtype);
  const int pos = mod(rank_ - root - 1, n);  // root+1 -> 0, ..., root -> n-1
  const int next = mod(rank_ + 1, n);
  const int prev = mod(rank_ - 1, n);
  const size_t segElems = std::max<size_t>(1, config_.segmentBytes / es);
  const size_t nseg = (count + segElems - 1) / segElems;
  auto off = [&](size_t j) { return j * segElems; };
  auto len = [&](size_t j) { return std::min(segElems, count - j * segElems); };
  if (pos == 0) {
    for (size_t j = 0; j < nseg; ++j) transport_.send(next, b + off(j) * es, len(j) * es, desc, deadline);
    return;
  }
  const size_t seg = std::min(segElems, count);
  char* tmp = scratch(2 * seg * es);
  char* slot[2] = {tmp, tmp + seg * es};
  if (pos == n - 1) {  // the root: receive segment j while reducing segment j-1
    for (size_t j = 0; j <= nseg; ++j) {
      if (j < nseg) transport_.recv(prev, slot[j % 2], len(j) * es, desc, deadline);
      if (j >= 1) reduceInto(b + off(j - 1) * es, slot[(j - 1) % 2], len(j - 1), dtype, op);
    }
    if (op == ReduceOp::kAvg) finalizeAvg(b, count, dtype, n);
    return;
  }
  // In the middle: receive segment j while sending the reduced segment j-1.
  for (size_t j = 0; j <= nseg; ++j) {
    if (j == 0) {
      transport_.recv(prev, slot[0], len(0) * es, desc, deadline);
    } else if (j < nseg) {
      transport_.sendRecv(next, slot[(j - 1) % 2], len(j - 1) * es, prev, slot[j % 2], len(j) * es, desc,
                          deadline);
    } else {
      transport_.send(next, slot[(j - 1) % 2], len(j - 1) * es, desc, deadline);
    }
    if (j < nseg) reduceInto(slot[j % 2], b + off(j) * es, len(j), dtype, op);  // partial op own
  }
}

void Collectives::gather(const void* in, void* out, size_t bytes, int root, const OpDesc& desc,
                         const Deadline& deadline) {
  const int n = size_;
  PYCOMM_CHECK_ARG(root >= 0 && root < n, "gather root ", root, " is out of range for group size ", n);
  if (rank_ != root) {
    transport_.send(root, in, bytes, desc, deadline);
    return;
  }
  char* o = static_cast<char*>(out);
  if (bytes && o + rank_ * bytes != in) memmove(o + rank_ * bytes, in, bytes);
  for (int p = 0; p < n; ++p) {
    if (p != root) transport_.recv(p, o + p * bytes, bytes, desc, deadline);
  }
}

void Collectives::scatter(const void* in, void* out, size_t bytes, int root, const OpDesc& desc,
                          const Deadline& deadline) {
  const int n = size_;
  PYCOMM_CHECK_ARG(root >= 0 && root < n, "scatter root ", root, " is out of range for group size ", n);
  if (rank_ != root) {
    transport_.recv(root, out, bytes, desc, deadline);
    return;
  }
  const char* src = static_cast<const char*>(in);
  for (int p = 0; p < n; ++p) {
    if (p != root) transport_.send(p, src + p * bytes, bytes, desc, deadline);
  }
  if (bytes && src + rank_ * bytes != out) memmove(out, src + rank_ * bytes, bytes);
}

void Collectives::allToAll(const void* in, const std::vector<size_t>& sendOffsets,
                           const std::vector<size_t>& sendBytes, void* out,
                           const std::vector<size_t>& recvOffsets,
                           const std::vector<size_t>& recvBytes, const OpDesc& desc,
                           const Deadline& deadline) {
  const int n = size_;
  PYCOMM_CHECK_ARG(static_cast<int>(sendOffsets.size()) == n && static_cast<int>(sendBytes.size()) == n &&
                       static_cast<int>(recvOffsets.size()) == n && static_cast<int>(recvBytes.size()) == n,
                   "all_to_all needs one split per rank (", n, ")");
  PYCOMM_CHECK_ARG(sendBytes[rank_] == recvBytes[rank_], "all_to_all: rank ", rank_, " sends ",
                   sendBytes[rank_], " bytes to itself but expects ", recvBytes[rank_]);
  const char* src = static_cast<const char*>(in);
  char* o = static_cast<char*>(out);
  if (recvBytes[rank_]) memmove(o + recvOffsets[rank_], src + sendOffsets[rank_], recvBytes[rank_]);
  // Pairwise exchange: in step k every rank sends to r+k and receives from r-k.
  for (int k = 1; k < n; ++k) {
    const int to = mod(rank_ + k, n);
    const int from = mod(rank_ - k, n);
    transport_.sendRecv(to, src + sendOffsets[to], sendBytes[to], from, o + recvOffsets[from],
                        recvBytes[from], desc, deadline);
  }
}

void Collectives::barrier(const OpDesc& desc, const Deadline& deadline) {
  if (size_ == 1) return;
  if (direct_) {
    // Every rank's post of this operation is the barrier (and shows mismatches).
    const uint64_t d = direct_->post(desc, nullptr, 0, 0);
    for (int p = 0; p < size_; ++p) {
      if (p != rank_) direct_->peerRecord(p, d, desc, 0, deadline);
    }
    return;
  }
  // Dissemination barrier: log2(n) rounds of empty messages.
  for (int k = 1; k < size_; k <<= 1) {
    transport_.sendRecv(mod(rank_ + k, size_), nullptr, 0, mod(rank_ - k, size_), nullptr, 0, desc,
                        deadline);
  }
}

}  // namespace pycomm
