// Hierarchical broadcast, reduce and small all-reduce for groups whose ranks span
// several hosts with several ranks on some. Across hosts, one rank per host carries the
// data (the root on its own host, the host's first rank elsewhere), so each host link
// carries the buffer about once, not once per rank:
//  - broadcast: a pipelined chain across those ranks, then a broadcast inside each host;
//  - reduce: a reduce inside each host to that rank, then a pipelined chain reduce
//    across hosts ending at the root;
//  - small all-reduce: reduce inside each host (one-shot through shared memory), recursive
//    doubling among the hosts' first ranks (log2 of the hosts rounds; non-power-of-two
//    counts fold the extra hosts in), then a broadcast inside each host.
// Large calls are cut into chunks of hierChunkBytes; when the in-host steps have their
// own transport (shared memory), the cross-host steps run on the hierarchy's helper
// thread and overlap the in-host steps of other chunks.
#include <algorithm>
#include <cstring>
#include <exception>
#include <string>

#include "algorithms/collectives.h"
#include "core/error.h"
#include "core/work_queue.h"
#include "kernels/reduce.h"
#include "transport/subset.h"

namespace pycomm {

namespace {
inline size_t pieceBegin(size_t count, size_t n, size_t c) {
  return static_cast<size_t>((static_cast<unsigned __int128>(count) * c) / n);
}

std::string describe(const std::exception_ptr& e) {
  return exceptionMessage(e, "pycomm: hierarchical collective failed");
}
}  // namespace

bool Collectives::hierRooted() const {
  const std::string& a = config_.algo;
  return shards_ > 0 && (a == "auto" || a == "hier" || a == "hier_rd");
}

int Collectives::rootedPathRank(int host, int root) const {
  return host == topology_.hostOf[root] ? root : topology_.ranksOn(host).front();
}

Collectives& Collectives::rootedCross(int root) {
  auto it = rootedCross_.find(root);
  if (it != rootedCross_.end()) return *it->second.second;
  std::vector<int> path;
  for (int h = 0; h < topology_.numHosts(); ++h) path.push_back(rootedPathRank(h, root));
  auto view = std::make_unique<SubsetTransport>(transport_, path);
  AlgoConfig sub = config_;
  sub.algo = "auto";
  auto coll = std::make_unique<Collectives>(*view, sub);
  Collectives& c = *coll;
  rootedCross_.emplace(root, std::make_pair(std::move(view), std::move(coll)));
  return c;
}

void Collectives::smallLocalBroadcast(void* buf, size_t bytes, int root, const OpDesc& desc,
                                      const Deadline& deadline) {
  if (!direct_ || bytes > direct_->inlineCapacity()) {
    broadcast(buf, bytes, root, desc, deadline);
    return;
  }
  // The root's bytes travel inline in its post record. Every rank waits for every
  // peer's record (not just the root's), as the one-shot all-reduce does: that keeps
  // the transport's rule for reusing a record slot.
  const uint64_t d = direct_->post(desc, buf, bytes, rank_ == root ? bytes : 0);
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    const auto rec = direct_->peerRecord(p, d, desc, bytes, deadline);
    if (p == root && bytes) memcpy(buf, rec.inlineData, bytes);
  }
}

void Collectives::hierPipeline(size_t chunks, bool crossFirst, bool waitCross,
                               const std::function<void(size_t)>& local,
                               const std::function<void(size_t)>& cross) {
  if (!cross) {
    for (size_t c = 0; c < chunks; ++c) local(c);
    return;
  }
  if (chunks == 1 || !local_ || !localSeparate_) {
    // One step after the other (nothing to overlap, or both kinds of step share a transport).
    for (size_t c = 0; c < chunks; ++c) {
      if (crossFirst) cross(c);
      local(c);
      if (!crossFirst) cross(c);
    }
    return;
  }
  if (!crossThread_) crossThread_ = std::make_unique<WorkQueue>("pycomm-hier");
  std::vector<std::shared_ptr<Completion>> done(chunks);
  Transport& localTransport = local_->transport();
  auto queue = [&](size_t c) {
    done[c] = crossThread_->push([&cross, &localTransport, c] {
      try {
        cross(c);
      } catch (...) {
        // This host's other ranks may be waiting on us in an in-host step: fail them too.
        localTransport.abort(describe(std::current_exception()));
        throw;
      }
    });
  };
  auto check = [&](size_t c) {
    done[c]->waitFor(-1);  // bounded by the deadline inside the step's transport calls
    if (auto err = done[c]->error()) std::rethrow_exception(err);
  };
  try {
    if (crossFirst) {
      for (size_t c = 0; c < chunks; ++c) queue(c);
      for (size_t c = 0; c < chunks; ++c) {
        if (waitCross) check(c);
        local(c);
      }
    } else {
      for (size_t c = 0; c < chunks; ++c) {
        local(c);
        queue(c);
      }
    }
    for (size_t c = 0; c < chunks; ++c) check(c);
  } catch (...) {
    // Steps still queued or running use the caller's buffer: fail them, wait, report.
    hierAbort(describe(std::current_exception()));
    for (auto& d : done) {
      if (d) d->waitFor(-1);
    }
    throw;
  }
}

// ---------------------------------------------------------------------------------------------
// small all-reduce

void Collectives::hierSmallAllReduce(void* buf, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                                     const Deadline& deadline) {
  const ReduceOp inner = op == ReduceOp::kAvg ? ReduceOp::kSum : op;
  if (local_) local_->allReduce(buf, count, dtype, inner, desc, deadline);
  if (localIndex_ == 0) {
    // cross_ of local index 0: the first rank of every host (shards_ >= 1).
    cross_->allReduce(buf, count, dtype, inner, desc, deadline);
    if (op == ReduceOp::kAvg) finalizeAvg(buf, count, dtype, size_);
  }
  if (local_) local_->smallLocalBroadcast(buf, count * dtypeSize(dtype), 0, desc, deadline);
}

// ---------------------------------------------------------------------------------------------
// broadcast / reduce

void Collectives::hierBroadcast(void* buf, size_t bytes, int root, const OpDesc& desc, const Deadline& deadline) {
  const int rootHost = topology_.hostOf[root];
  const int pathRank = rootedPathRank(topology_.hostOf[rank_], root);
  const int localRoot = topology_.localIndex(pathRank);
  Collectives* cross = rank_ == pathRank ? &rootedCross(root) : nullptr;
  char* b = static_cast<char*>(buf);
  const size_t chunks = std::max<size_t>(1, (bytes + config_.hierChunkBytes - 1) / config_.hierChunkBytes);
  auto piece = [&](size_t c, size_t* n) {
    const size_t lo = pieceBegin(bytes, chunks, c);
    *n = pieceBegin(bytes, chunks, c + 1) - lo;
    return b + lo;
  };
  std::function<void(size_t)> crossStep;
  if (cross) {
    crossStep = [&](size_t c) {
      size_t n;
      char* p = piece(c, &n);
      cross->broadcast(p, n, rootHost, desc, deadline);
    };
  }
  auto localStep = [&](size_t c) {
    if (!local_) return;
    size_t n;
    char* p = piece(c, &n);
    local_->smallLocalBroadcast(p, n, localRoot, desc, deadline);
  };
  // The root has its data already: its in-host steps need not wait for its sends.
  hierPipeline(chunks, /*crossFirst=*/true, /*waitCross=*/rank_ != root, localStep, crossStep);
}

void Collectives::hierReduce(void* buf, size_t count, DType dtype, ReduceOp op, int root, const OpDesc& desc,
                             const Deadline& deadline) {
  const ReduceOp inner = op == ReduceOp::kAvg ? ReduceOp::kSum : op;
  const size_t es = dtypeSize(dtype);
  const int rootHost = topology_.hostOf[root];
  const int pathRank = rootedPathRank(topology_.hostOf[rank_], root);
  const int localRoot = topology_.localIndex(pathRank);
  Collectives* cross = rank_ == pathRank ? &rootedCross(root) : nullptr;
  char* b = static_cast<char*>(buf);
  // A path rank other than the root collects its host's partial sums in a copy: a
  // reduce leaves every buffer but the root's unchanged.
  char* work = b;
  if (cross && rank_ != root) {
    if (rootedScratch_.size() < count * es) rootedScratch_.resize(count * es);
    work = rootedScratch_.data();
  }
  const size_t chunks = std::max<size_t>(1, (count * es + config_.hierChunkBytes - 1) / config_.hierChunkBytes);
  auto range = [&](size_t c, size_t* lo, size_t* n) {
    *lo = pieceBegin(count, chunks, c);
    *n = pieceBegin(count, chunks, c + 1) - *lo;
  };
  auto localStep = [&](size_t c) {
    size_t lo, n;
    range(c, &lo, &n);
    if (work != b && n) memcpy(work + lo * es, b + lo * es, n * es);
    if (local_) local_->reduce(work + lo * es, n, dtype, inner, localRoot, desc, deadline);
  };
  std::function<void(size_t)> crossStep;
  if (cross) {
    crossStep = [&](size_t c) {
      size_t lo, n;
      range(c, &lo, &n);
      cross->reduce(work + lo * es, n, dtype, inner, rootHost, desc, deadline);
    };
  }
  hierPipeline(chunks, /*crossFirst=*/false, /*waitCross=*/true, localStep, crossStep);
  if (rank_ == root && op == ReduceOp::kAvg) finalizeAvg(b, count, dtype, size_);
}

}  // namespace pycomm
