// Hierarchical reduce_scatter / all_gather on hosts that hold unequal numbers of ranks
// (3+2, 4+2+2), when every host holds at least two. Every rank's block is cut into
// k = (ranks on the smallest host) pieces; "lane" l is piece l of every block, laid out
// host by host. The host's local rank l carries lane l across hosts, in a ring whose
// blocks are the hosts' shares of the lane (L_h pieces for a host of L_h ranks), so a
// host's link carries what no algorithm can avoid: (n - L_h)/n of the buffer out (its
// contribution to blocks owned elsewhere) for reduce_scatter, as much in for
// all_gather, where the flat ring carries (n - 1)/n over every host link. The in-host
// steps are ordinary collectives over the host's transport (shared memory).
// With a host of one rank the flat ring is already at that bound (docs/USER_GUIDE.md).
#include <algorithm>
#include <cstring>

#include "algorithms/collectives.h"
#include "core/error.h"
#include "kernels/reduce.h"

namespace pycomm {

namespace {
inline int mod(int a, int n) { return ((a % n) + n) % n; }
inline size_t pieceBegin(size_t count, int k, int l) {
  return static_cast<size_t>((static_cast<unsigned __int128>(count) * l) / k);
}
}  // namespace

bool Collectives::hierUneven(size_t bytes) const {
  if (shards_ < 2 || uniform_ || !local_) return false;
  return config_.algo == "hier" || (config_.algo == "auto" && bytes > config_.smallBytes);
}

// Group rank j's place in the host-by-host order (hosts in order, ranks in order).
std::vector<size_t> Collectives::hostMajorPositions(std::vector<size_t>* perHost) const {
  const int hosts = topology_.numHosts();
  std::vector<size_t> first(hosts + 1, 0);
  perHost->assign(hosts, 0);
  for (int h = 0; h < hosts; ++h) {
    (*perHost)[h] = topology_.ranksOn(h).size();
    first[h + 1] = first[h] + (*perHost)[h];
  }
  std::vector<size_t> pos(size_);
  for (int j = 0; j < size_; ++j) pos[j] = first[topology_.hostOf[j]] + topology_.localIndex(j);
  return pos;
}

void Collectives::ringReduceScatterV(const char* blocks, char* out, const std::vector<size_t>& counts,
                                     DType dtype, ReduceOp op, const OpDesc& desc, const Deadline& deadline) {
  const int n = size_;
  const size_t es = dtypeSize(dtype);
  PYCOMM_ASSERT(static_cast<int>(counts.size()) == n, "reduce_scatter_v: ", counts.size(), " blocks for ", n, " ranks");
  std::vector<size_t> off(n + 1, 0);
  for (int i = 0; i < n; ++i) off[i + 1] = off[i] + counts[i];
  const size_t most = std::max<size_t>(1, *std::max_element(counts.begin(), counts.end()) * es);
  char* acc = scratch(2 * most);
  char* tmp = acc + most;
  // The partial of block c starts at rank c+1 and ends, complete, at rank c.
  int c = n == 1 ? rank_ : mod(rank_ - 1, n);
  if (counts[c]) memcpy(acc, blocks + off[c] * es, counts[c] * es);
  for (int s = 0; s < n - 1; ++s) {
    const int sent = c;
    c = mod(c - 1, n);
    transport_.sendRecv(mod(rank_ + 1, n), acc, counts[sent] * es, mod(rank_ - 1, n), tmp, counts[c] * es, desc,
                        deadline);
    reduce3(acc, tmp, blocks + off[c] * es, counts[c], dtype, op);
  }
  if (counts[rank_]) memcpy(out, acc, counts[rank_] * es);
}

void Collectives::ringAllGatherV(char* blocks, const std::vector<size_t>& bytes, const OpDesc& desc,
                                 const Deadline& deadline) {
  const int n = size_;
  PYCOMM_ASSERT(static_cast<int>(bytes.size()) == n, "all_gather_v: ", bytes.size(), " blocks for ", n, " ranks");
  std::vector<size_t> off(n + 1, 0);
  for (int i = 0; i < n; ++i) off[i + 1] = off[i] + bytes[i];
  // Block i travels once around the ring from its owner.
  for (int s = 0; s < n - 1; ++s) {
    const int sb = mod(rank_ - s, n);
    const int rb = mod(rank_ - s - 1, n);
    transport_.sendRecv(mod(rank_ + 1, n), blocks + off[sb], bytes[sb], mod(rank_ - 1, n), blocks + off[rb], bytes[rb],
                        desc, deadline);
  }
}

void Collectives::hierUnevenReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                                          const OpDesc& desc, const Deadline& deadline) {
  const int n = size_, k = shards_, me = localIndex_;
  const int host = topology_.hostOf[rank_];
  const size_t es = dtypeSize(dtype), c = countPerRank;
  const ReduceOp inner = op == ReduceOp::kAvg ? ReduceOp::kSum : op;
  std::vector<size_t> perHost;
  const std::vector<size_t> pos = hostMajorPositions(&perHost);
  auto lo = [&](int l) { return pieceBegin(c, k, l); };
  auto len = [&](int l) { return lo(l + 1) - lo(l); };
  // Lane l (elements [n*lo(l), n*lo(l+1)) of perm): piece l of every block, host by host.
  char* perm = scratch(n * c * es);
  const char* src = static_cast<const char*>(in);
  for (int j = 0; j < n; ++j) {
    for (int l = 0; l < k; ++l) {
      if (len(l)) memcpy(perm + (n * lo(l) + pos[j] * len(l)) * es, src + (j * c + lo(l)) * es, len(l) * es);
    }
  }
  // In the host: lane l's host partial at local rank l.
  for (int l = 0; l < k; ++l) local_->reduce(perm + n * lo(l) * es, n * len(l), dtype, inner, l, desc, deadline);
  // Across hosts: lane `me` among the hosts' local ranks `me`; this host's share (its
  // ranks' pieces) ends here fully reduced.
  const size_t share = perHost[host] * (me < k ? len(me) : 0);
  if (hierScratch_.size() < std::max<size_t>(1, share * es)) hierScratch_.resize(std::max<size_t>(1, share * es));
  if (me < k) {
    std::vector<size_t> counts(topology_.numHosts());
    for (int h = 0; h < topology_.numHosts(); ++h) counts[h] = perHost[h] * len(me);
    cross_->ringReduceScatterV(perm + n * lo(me) * es, hierScratch_.data(), counts, dtype, inner, desc, deadline);
  }
  // In the host: piece l of local rank m's block from local rank l to m.
  const int L = localSize_;
  std::vector<size_t> so(L, 0), sb(L, 0), ro(L, 0), rb(L, 0);
  for (int m = 0; m < L && me < k; ++m) so[m] = m * len(me) * es, sb[m] = len(me) * es;
  for (int l = 0; l < std::min(k, L); ++l) ro[l] = lo(l) * es, rb[l] = len(l) * es;
  local_->allToAll(hierScratch_.data(), so, sb, out, ro, rb, desc, deadline);
  if (op == ReduceOp::kAvg) finalizeAvg(out, c, dtype, n);
}

void Collectives::hierUnevenAllGather(const void* in, void* out, size_t bytesPerRank, const OpDesc& desc,
                                      const Deadline& deadline) {
  const int n = size_, k = shards_, me = localIndex_;
  const size_t b = bytesPerRank;
  std::vector<size_t> perHost;
  const std::vector<size_t> pos = hostMajorPositions(&perHost);
  auto lo = [&](int l) { return pieceBegin(b, k, l); };
  auto len = [&](int l) { return lo(l + 1) - lo(l); };
  char* perm = scratch(n * b);
  const size_t hostFirst = pos[rank_] - static_cast<size_t>(me);
  // In the host: piece l of every local rank's block to local rank l, into lane l.
  const int L = localSize_;
  std::vector<size_t> so(L, 0), sb(L, 0), ro(L, 0), rb(L, 0);
  for (int l = 0; l < std::min(k, L); ++l) so[l] = lo(l), sb[l] = len(l);
  for (int m = 0; m < L && me < k; ++m) ro[m] = n * lo(me) + (hostFirst + m) * len(me), rb[m] = len(me);
  local_->allToAll(in, so, sb, perm, ro, rb, desc, deadline);
  // Across hosts: lane `me` among the hosts' local ranks `me`, each host's share once
  // around the ring.
  if (me < k) {
    std::vector<size_t> shares(topology_.numHosts());
    for (int h = 0; h < topology_.numHosts(); ++h) shares[h] = perHost[h] * len(me);
    cross_->ringAllGatherV(perm + n * lo(me), shares, desc, deadline);
  }
  // In the host: every lane from its local rank to all, then back to rank order.
  for (int l = 0; l < k; ++l) local_->broadcast(perm + n * lo(l), n * len(l), l, desc, deadline);
  char* o = static_cast<char*>(out);
  for (int j = 0; j < n; ++j) {
    for (int l = 0; l < k; ++l) {
      if (len(l)) memcpy(o + j * b + lo(l), perm + n * lo(l) + pos[j] * len(l), len(l));
    }
  }
}

}  // namespace pycomm
