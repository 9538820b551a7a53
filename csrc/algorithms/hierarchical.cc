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
#include "kernels/reduce.h"
#include "transport/subset.h"

namespace pycomm {

namespace {
inline size_t shardBegin(size_t count, int n, int c) {
  return static_cast<size_t>((static_cast<unsigned __int128>(count) * c) / n);
}
}  // namespace

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
    if (!lt) {
      localView_ = std::make_unique<SubsetTransport>(transport_, mine);
      lt = localView_.get();
    }
    PYCOMM_ASSERT(lt->size() == localSize_ && lt->rank() == localIndex_, "in-host transport of ", lt->size(),
                  " ranks (this one ", lt->rank(), ") for ", localSize_, " local ranks (this one ", localIndex_, ")");
    local_ = std::make_unique<Collectives>(*lt, sub);
  }
  if (localIndex_ < shards_) {
    std::vector<int> peers;
    for (int h = 0; h < topology_.numHosts(); ++h) peers.push_back(topology_.ranksOn(h)[localIndex_]);
    crossView_ = std::make_unique<SubsetTransport>(transport_, peers);
    cross_ = std::make_unique<Collectives>(*crossView_, sub);
  }
}

void Collectives::hierAllReduce(void* buf, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                                const Deadline& deadline) {
  const size_t es = dtypeSize(dtype);
  char* b = static_cast<char*>(buf);
  const int k = shards_;
  // Partial steps sum; the shard owner divides once at the end (hosts may hold unequal
  // numbers of ranks, so an average of averages would be wrong).
  const ReduceOp inner = op == ReduceOp::kAvg ? ReduceOp::kSum : op;
  // Hosts with as many ranks as shards and a count they divide run reduce-scatter and
  // all-gather; others (a host with more ranks than shards, or a ragged count)
  // all-reduce inside the host and broadcast each shard from its owner. Every rank of
  // a host decides the same way; the shard bounds are the same on every host.
  const bool scatter = localSize_ == k && count % static_cast<size_t>(k) == 0;
  const size_t per = count / static_cast<size_t>(k);
  if (local_) {
    if (scatter) {
      if (hierScratch_.size() < per * es) hierScratch_.resize(per * es);
      local_->reduceScatter(b, hierScratch_.data(), per, dtype, inner, desc, deadline);
      if (per) memcpy(b + localIndex_ * per * es, hierScratch_.data(), per * es);
    } else {
      local_->allReduce(b, count, dtype, inner, desc, deadline);
    }
  }
  if (cross_) {
    const size_t lo = shardBegin(count, k, localIndex_);
    const size_t n = shardBegin(count, k, localIndex_ + 1) - lo;
    cross_->allReduce(b + lo * es, n, dtype, inner, desc, deadline);
    if (op == ReduceOp::kAvg) finalizeAvg(b + lo * es, n, dtype, size_);
  }
  if (local_) {
    if (scatter) {
      local_->allGather(b + localIndex_ * per * es, b, per * es, desc, deadline);
    } else {
      for (int s = 0; s < k; ++s) {
        const size_t lo = shardBegin(count, k, s);
        local_->broadcast(b + lo * es, (shardBegin(count, k, s + 1) - lo) * es, s, desc, deadline);
      }
    }
  }
}

}  // namespace pycomm
