// Hierarchical all-reduce for groups whose ranks span several hosts with several ranks
// on some (NCCL's and Horovod's scheme): reduce-scatter inside each host, an all-reduce
// of each shard across hosts run by the local rank that owns it (every host link
// carries 2(H-1)/H of the buffer, shared by that host's ranks), all-gather inside the
// host. The steps are ordinary collectives over two sub-transports given by the
// topology: this host's ranks, and the ranks with this rank's local index on every host.
#include <algorithm>
#include <cstring>

#include "algorithms/collectives.h"
#include "core/error.h"
#include "core/work_queue.h"
#include "kernels/reduce.h"
#include "transport/subset.h"

namespace pycomm {

namespace {
inline size_t shardBegin(size_t count, int n, int c) {
  return static_cast<size_t>((static_cast<unsigned __int128>(count) * c) / n);
}
}  // namespace

void Collectives::hierAbort(const std::string& why) {
  transport_.abort(why);
  if (local_) local_->transport().abort(why);
}

void Collectives::initHierarchy(Transport* local) {
  const int host = topology_.hostOf[rank_];
  const std::vector<int> mine = topology_.ranksOn(host);
  localIndex_ = topology_.localIndex(rank_);
  localSize_ = static_cast<int>(mine.size());
  // As many shards as the smallest host has ranks: every shard then has an owner on
  // every host, and the cross-host step of shard k runs among the k-th ranks of the hosts.
  shards_ = topology_.minPerHost();
  AlgoConfig sub = config_;
  sub.algo = "auto";
  if (localSize_ > 1) {
    Transport* lt = local;
    localSeparate_ = local != nullptr;
    if (!lt) {
      localView_ = std::make_unique<SubsetTransport>(transport_, mine);
      lt = localView_.get();
    }
    PYCOMM_ASSERT(lt->size() == localSize_ && lt->rank() == localIndex_, "in-host transport of ", lt->size(),
                  " ranks (this one ", lt->rank(), ") for ", localSize_, " local ranks (this one ", localIndex_, ")");
    local_ = std::make_unique<Collectives>(*lt, sub);
  }
  uniform_ = topology_.maxPerHost() == shards_;
  if (uniform_) {
    for (int l = 0; l < shards_; ++l) {
      for (int h = 0; h < topology_.numHosts(); ++h) permBlocks_.push_back(topology_.ranksOn(h)[l]);
    }
  }
  if (localIndex_ < shards_) {
    std::vector<int> peers;
    for (int h = 0; h < topology_.numHosts(); ++h) peers.push_back(topology_.ranksOn(h)[localIndex_]);
    crossView_ = std::make_unique<SubsetTransport>(transport_, peers);
    cross_ = std::make_unique<Collectives>(*crossView_, sub);
  }
}

// In-host step 1 on n elements at b: afterwards this rank's shard holds the host's
// partial. Hosts with as many ranks as shards and an n the shards divide run a
// reduce-scatter; others (a host with more ranks than shards, or a ragged n) an
// all-reduce inside the host. Every rank of a host decides alike; the shard bounds are
// the same on every host.
void Collectives::hierLocalReduce(char* b, size_t n, DType dtype, ReduceOp op, const OpDesc& desc,
                                  const Deadline& deadline) {
  if (!local_) return;
  const size_t es = dtypeSize(dtype);
  const size_t k = static_cast<size_t>(shards_);
  if (localSize_ == shards_ && n % k == 0) {
    const size_t per = n / k;
    if (hierScratch_.size() < per * es) hierScratch_.resize(per * es);
    local_->reduceScatter(b, hierScratch_.data(), per, dtype, op, desc, deadline);
    if (per) memcpy(b + localIndex_ * per * es, hierScratch_.data(), per * es);
  } else {
    local_->allReduce(b, n, dtype, op, desc, deadline);
  }
}

// Cross-host step: this rank's shard, all-reduced among the ranks owning it on every
// host (with `op` = kAvg: summed, then divided by the group size here).
void Collectives::hierCross(char* b, size_t n, DType dtype, ReduceOp op, const OpDesc& desc,
                            const Deadline& deadline) {
  if (!cross_) return;
  const size_t es = dtypeSize(dtype);
  const size_t lo = shardBegin(n, shards_, localIndex_);
  const size_t len = shardBegin(n, shards_, localIndex_ + 1) - lo;
  cross_->allReduce(b + lo * es, len, dtype, op == ReduceOp::kAvg ? ReduceOp::kSum : op, desc, deadline);
  if (op == ReduceOp::kAvg) finalizeAvg(b + lo * es, len, dtype, size_);
}

// In-host step 3: every shard from its owner to the host's other ranks.
void Collectives::hierLocalGather(char* b, size_t n, DType dtype, const OpDesc& desc, const Deadline& deadline) {
  if (!local_) return;
  const size_t es = dtypeSize(dtype);
  const size_t k = static_cast<size_t>(shards_);
  if (localSize_ == shards_ && n % k == 0) {
    const size_t per = n / k;
    local_->allGather(b + localIndex_ * per * es, b, per * es, desc, deadline);
  } else {
    for (int s = 0; s < shards_; ++s) {
      const size_t lo = shardBegin(n, shards_, s);
      local_->broadcast(b + lo * es, (shardBegin(n, shards_, s + 1) - lo) * es, s, desc, deadline);
    }
  }
}

void Collectives::hierAllReduce(void* buf, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                                const Deadline& deadline) {
  const size_t es = dtypeSize(dtype);
  char* b = static_cast<char*>(buf);
  // Partial steps sum; the shard owner divides once at the end (hosts may hold unequal
  // numbers of ranks, so an average of averages would be wrong).
  const ReduceOp inner = op == ReduceOp::kAvg ? ReduceOp::kSum : op;
  // Chunks: the same on every rank (they depend on the count only).
  const size_t chunks = std::max<size_t>(1, (count * es + config_.hierChunkBytes - 1) / config_.hierChunkBytes);
  auto chunk = [&](size_t c, size_t* n) {
    const size_t lo = shardBegin(count, static_cast<int>(chunks), static_cast<int>(c));
    *n = shardBegin(count, static_cast<int>(chunks), static_cast<int>(c) + 1) - lo;
    return b + lo * es;
  };
  if (chunks == 1 || !local_ || !localSeparate_) {
    // One step after the other (nothing to overlap, or the two kinds of step share a
    // transport). The choice is the same for every rank of a host, so the in-host steps
    // come in the same order on all of them.
    for (size_t c = 0; c < chunks; ++c) {
      size_t n;
      char* p = chunk(c, &n);
      hierLocalReduce(p, n, dtype, inner, desc, deadline);
      hierCross(p, n, dtype, op, desc, deadline);
      hierLocalGather(p, n, dtype, desc, deadline);
    }
    return;
  }
  // Pipelined: this thread runs the in-host steps in a fixed order (reduce chunk c+1,
  // then gather chunk c once its cross-host step is done), the cross-host steps run in
  // chunk order on crossThread_, each queued as soon as its chunk is reduced.
  if (!crossThread_) crossThread_ = std::make_unique<WorkQueue>("pycomm-hier");
  std::vector<std::shared_ptr<Completion>> crossDone(chunks);
  auto queueCross = [&](size_t c) {
    size_t n;
    char* p = chunk(c, &n);
    crossDone[c] = crossThread_->push([this, p, n, dtype, op, &desc, &deadline] {
      hierCross(p, n, dtype, op, desc, deadline);
    });
  };
  auto waitAll = [&] {
    for (auto& d : crossDone) {
      if (d) d->waitFor(-1);  // each bounded by the deadline inside its transport calls
    }
  };
  try {
    size_t n0;
    char* p0 = chunk(0, &n0);
    hierLocalReduce(p0, n0, dtype, inner, desc, deadline);
    queueCross(0);
    for (size_t c = 0; c < chunks; ++c) {
      if (c + 1 < chunks) {
        size_t n;
        char* p = chunk(c + 1, &n);
        hierLocalReduce(p, n, dtype, inner, desc, deadline);
        queueCross(c + 1);
      }
      crossDone[c]->waitFor(-1);
      if (auto err = crossDone[c]->error()) std::rethrow_exception(err);
      size_t n;
      char* p = chunk(c, &n);
      hierLocalGather(p, n, dtype, desc, deadline);
    }
  } catch (...) {
    // Steps still queued or running use `buf`: fail them now, wait, then report.
    hierAbort(exceptionMessage(std::current_exception(), "pycomm: hierarchical all-reduce failed"));
    waitAll();
    throw;
  }
}

// ---------------------------------------------------------------------------------------------
// reduce_scatter / all_gather on hosts that hold equally many ranks. Block j of the
// permuted order is group rank permBlocks_[j] = rank l of host h for j = l * hosts + h,
// so in-host rank l's share of the in-host step is the blocks of every host's rank l,
// which the cross-host step (among the ranks l, ordered by host) then splits by host.
// Each host's link carries (H-1)/H of the whole buffer, as the all-reduce's halves do.

bool Collectives::hierBlocks(size_t bytes) const {
  if (shards_ == 0 || !uniform_ || !local_ || !cross_) return false;
  return config_.algo == "hier" || (config_.algo == "auto" && bytes > config_.smallBytes);
}

void Collectives::hierReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                                    const OpDesc& desc, const Deadline& deadline) {
  const size_t es = dtypeSize(dtype);
  const size_t block = countPerRank * es;
  const int hosts = topology_.numHosts();
  const ReduceOp inner = op == ReduceOp::kAvg ? ReduceOp::kSum : op;
  char* perm = scratch(block * (size_ + hosts));
  char* mine = perm + block * size_;
  const char* src = static_cast<const char*>(in);
  if (block) {
    for (int j = 0; j < size_; ++j) memcpy(perm + j * block, src + permBlocks_[j] * block, block);
  }
  local_->reduceScatter(perm, mine, countPerRank * hosts, dtype, inner, desc, deadline);
  cross_->reduceScatter(mine, out, countPerRank, dtype, inner, desc, deadline);
  if (op == ReduceOp::kAvg) finalizeAvg(out, countPerRank, dtype, size_);
}

void Collectives::hierAllGather(const void* in, void* out, size_t bytesPerRank, const OpDesc& desc,
                                const Deadline& deadline) {
  const size_t block = bytesPerRank;
  const int hosts = topology_.numHosts();
  char* mine = scratch(block * (hosts + size_));
  char* perm = mine + block * hosts;
  cross_->allGather(in, mine, block, desc, deadline);  // reads `in` before `out` is written
  local_->allGather(mine, perm, block * hosts, desc, deadline);
  char* o = static_cast<char*>(out);
  if (block) {
    for (int j = 0; j < size_; ++j) memcpy(o + permBlocks_[j] * block, perm + j * block, block);
  }
}

}  // namespace pycomm
