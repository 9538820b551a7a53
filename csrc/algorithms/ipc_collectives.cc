#include "algorithms/ipc_collectives.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/error.h"

namespace pycomm {

namespace {

// Handles travel through the store as length-prefixed strings.
std::vector<uint8_t> packHandles(const std::vector<std::string>& hs) {
  std::vector<uint8_t> out;
  for (const auto& h : hs) {
    const uint32_t n = static_cast<uint32_t>(h.size());
    const auto* p = reinterpret_cast<const uint8_t*>(&n);
    out.insert(out.end(), p, p + sizeof(n));
    out.insert(out.end(), h.begin(), h.end());
  }
  return out;
}

std::vector<std::string> unpackHandles(const std::vector<uint8_t>& blob, size_t want, int peer) {
  std::vector<std::string> hs;
  size_t at = 0;
  while (hs.size() < want) {
    uint32_t n = 0;
    if (blob.size() - at < sizeof(n)) break;
    std::memcpy(&n, blob.data() + at, sizeof(n));
    at += sizeof(n);
    if (blob.size() - at < n) break;
    hs.emplace_back(reinterpret_cast<const char*>(blob.data() + at), n);
    at += n;
  }
  if (hs.size() != want || at != blob.size()) {
    throw Error(strCat("rank ", peer, " published malformed IPC handles (", blob.size(), " bytes)"));
  }
  return hs;
}

std::chrono::milliseconds left(const Deadline& d) {
  return std::max(std::chrono::milliseconds(1),
                  std::chrono::duration_cast<std::chrono::milliseconds>(d.remaining()));
}

}  // namespace

std::unique_ptr<IpcCollectives> IpcCollectives::create(const std::function<std::unique_ptr<IpcDevice>()>& makeDevice,
                                                   Store& store,
                                                   const std::string& keyPrefix, Collectives& coll,
                                                   size_t bufferBytes, size_t oneShotBytes, const OpDesc& desc,
                                                   const Deadline& deadline, std::string* whyNot) {
  const int rank = coll.transport().rank();
  const int size = coll.transport().size();
  // At least 16 bytes a rank for reduce_scatter's chunk layout; whole 16-byte units.
  bufferBytes = std::max<size_t>(256, bufferBytes & ~static_cast<size_t>(15));
  std::unique_ptr<IpcCollectives> ar(new IpcCollectives(rank, size, bufferBytes));
  int64_t ok = 1;
  std::string why;
  std::vector<uint8_t> mineBlob;
  auto where = [&] { return ar->device_ ? ar->device_->name() : std::string("its device"); };
  try {
    ar->device_ = makeDevice();
    IpcDevice& dev = *ar->device_;
    PYCOMM_CHECK_ARG(size <= dev.maxSources(), "the IPC collectives take at most ", dev.maxSources(),
                     " ranks, the group has ", size);
    std::string h0, h1;
    ar->mine_[0] = static_cast<char*>(dev.allocate(bufferBytes, &h0));
    ar->mine_[1] = static_cast<char*>(dev.allocate(bufferBytes, &h1));
    mineBlob = packHandles({h0, h1, dev.eventHandle()});
  } catch (const std::exception& e) {
    ok = 0;
    why = strCat("rank ", rank, " on ", where(), ": ", e.what());
    mineBlob.clear();  // an empty entry tells the peers this rank is out
  }
  // Every rank publishes something, so nobody waits for a rank that failed.
  store.set(strCat(keyPrefix, rank), mineBlob);
  for (int b = 0; b < 2; ++b) ar->peers_[b].assign(size, nullptr);
  ar->peers_[0][rank] = ar->mine_[0];
  ar->peers_[1][rank] = ar->mine_[1];
  for (int p = 0; p < size; ++p) {
    if (p == rank) continue;
    const std::vector<uint8_t> blob = store.get(strCat(keyPrefix, p), left(deadline));
    if (!ok) continue;
    if (blob.empty()) {
      ok = 0;
      why = strCat("rank ", p, " could not set up its IPC buffers");
      continue;
    }
    try {
      const auto hs = unpackHandles(blob, 3, p);
      ar->peers_[0][p] = static_cast<const char*>(ar->device_->openPeer(hs[0]));
      ar->peers_[1][p] = static_cast<const char*>(ar->device_->openPeer(hs[1]));
      ar->device_->openPeerEvent(p, hs[2]);
    } catch (const std::exception& e) {
      ok = 0;
      why = strCat("rank ", rank, " on ", where(), " cannot map rank ", p, "'s memory: ", e.what());
    }
  }
  // All ranks take the IPC path or none does, and all cut calls the same way: the
  // smallest buffer size and one-shot limit any rank asked for (a smaller limit than a
  // rank allocated only leaves part of its buffers unused).
  int64_t agreed[3] = {ok, static_cast<int64_t>(bufferBytes), static_cast<int64_t>(oneShotBytes)};
  OpDesc agree = desc;
  agree.count = 3;
  agree.dtype = DType::kInt64;
  agree.op = ReduceOp::kMin;
  coll.allReduce(agreed, 3, DType::kInt64, ReduceOp::kMin, agree, deadline);
  if (!agreed[0]) {
    if (whyNot) *whyNot = why.empty() ? std::string("another rank could not set up CUDA IPC") : why;
    // Free what was allocated, but only after every rank unmapped what it had opened.
    try {
      if (ar->device_) ar->device_->closePeers();
    } catch (const std::exception&) {  // still meet the others at the barrier
    }
    coll.barrier(agree, deadline);
    if (ar->device_) ar->device_->freeOnDestroy();
    return nullptr;
  }
  ar->bufferBytes_ = static_cast<size_t>(agreed[1]);
  ar->oneShotBytes_ = std::min(static_cast<size_t>(agreed[2]), ar->bufferBytes_);
  return ar;
}

size_t IpcCollectives::slotBytes() const {
  const size_t slot = std::max<size_t>(1, bufferBytes_ / size_);
  return slot >= 16 ? slot & ~static_cast<size_t>(15) : slot;  // 16-byte aligned where that fits
}

int IpcCollectives::beginChunk() {
  device_->waitPeers();
  return static_cast<int>(chunks_++ & 1);
}

void IpcCollectives::endCall(Collectives& coll, const OpDesc& desc, const Deadline& deadline) {
  device_->synchronize(deadline);
  coll.barrier(desc, deadline);  // every rank's device work that reads our buffers is done
}

void IpcCollectives::allReduce(void* data, size_t count, DType dtype, ReduceOp op, Collectives& coll,
                               const OpDesc& desc, const Deadline& deadline) {
  checkReduceOp(dtype, op);
  if (count == 0 || size_ == 1) return;  // one rank: the input is the result (AVG over 1)
  const size_t esz = dtypeSize(dtype);
  const size_t cap = std::max<size_t>(1, bufferBytes_ / esz);
  std::vector<const void*> srcs(size_);
  if (count * esz <= oneShotBytes_) {
    // One-shot: every rank reduces the whole call from all buffers, in rank order (the
    // same result everywhere). Reads n times the data instead of 2(n-1)/n of it, with one
    // barrier instead of two: the faster choice while latency dominates.
    const int b = beginChunk();
    device_->copy(mine_[b], data, count * esz);
    device_->record();
    coll.barrier(desc, deadline);  // every rank's input is queued into its buffer, recorded
    device_->waitPeers();
    for (int p = 0; p < size_; ++p) srcs[p] = peers_[b][p];
    device_->reduceMany(data, srcs.data(), size_, count, dtype, op);
    device_->record();
    endCall(coll, desc, deadline);
    oneShotRuns_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  const size_t align = std::max<size_t>(1, 16 / esz);  // slices start on 16-byte boundaries
  char* base = static_cast<char*>(data);
  for (size_t off = 0; off < count; off += cap) {
    const size_t c = std::min(cap, count - off);
    const size_t slice = (c + size_ - 1) / size_ + align - 1;
    const size_t s = slice - slice % align;
    auto lo = [&](int p) { return std::min(c, static_cast<size_t>(p) * s); };
    auto hi = [&](int p) { return std::min(c, lo(p) + s); };
    char* chunk = base + off * esz;

    const int b = beginChunk();
    device_->copy(mine_[b], chunk, c * esz);
    device_->record();
    coll.barrier(desc, deadline);  // every rank's chunk is queued into its buffer, recorded

    // Reduce-scatter: slice `rank_` of every rank's buffer, in rank order, into ours.
    device_->waitPeers();
    if (hi(rank_) > lo(rank_)) {
      for (int p = 0; p < size_; ++p) srcs[p] = peers_[b][p] + lo(rank_) * esz;
      device_->reduceMany(mine_[b] + lo(rank_) * esz, srcs.data(), size_, hi(rank_) - lo(rank_), dtype, op);
    }
    device_->record();
    coll.barrier(desc, deadline);  // every slice is reduced by its owner, recorded

    // All-gather: every slice from its owner's buffer.
    device_->waitPeers();
    for (int p = 0; p < size_; ++p) {
      if (hi(p) > lo(p)) device_->copy(chunk + lo(p) * esz, peers_[b][p] + lo(p) * esz, (hi(p) - lo(p)) * esz);
    }
    device_->record();
  }
  endCall(coll, desc, deadline);
  twoStepRuns_.fetch_add(1, std::memory_order_relaxed);
}

std::map<std::string, uint64_t> IpcCollectives::stats() const {
  return {{"algo_all_reduce_ipc_oneshot", oneShotRuns_.load(std::memory_order_relaxed)},
          {"algo_all_reduce_ipc", twoStepRuns_.load(std::memory_order_relaxed)}};
}

void IpcCollectives::reduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                                   Collectives& coll, const OpDesc& desc, const Deadline& deadline) {
  checkReduceOp(dtype, op);
  if (countPerRank == 0) return;
  const size_t esz = dtypeSize(dtype);
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  if (size_ == 1) {
    device_->copy(dst, src, countPerRank * esz);
    device_->synchronize(deadline);
    return;
  }
  // A chunk is `per` elements of every rank's block, laid out block after block.
  const size_t align = std::max<size_t>(1, 16 / esz);
  size_t per = std::max<size_t>(1, bufferBytes_ / esz / size_);
  if (per > align) per -= per % align;
  std::vector<const void*> srcs(size_);
  for (size_t off = 0; off < countPerRank; off += per) {
    const size_t c = std::min(per, countPerRank - off);
    const int b = beginChunk();
    for (int p = 0; p < size_; ++p) {
      device_->copy(mine_[b] + p * per * esz, src + (p * countPerRank + off) * esz, c * esz);
    }
    device_->record();
    coll.barrier(desc, deadline);  // every rank's blocks are queued into its buffer, recorded
    device_->waitPeers();
    for (int p = 0; p < size_; ++p) srcs[p] = peers_[b][p] + rank_ * per * esz;
    device_->reduceMany(dst + off * esz, srcs.data(), size_, c, dtype, op);
    device_->record();
  }
  endCall(coll, desc, deadline);
}

void IpcCollectives::allGather(const void* in, void* out, size_t bytesPerRank, Collectives& coll,
                               const OpDesc& desc, const Deadline& deadline) {
  if (bytesPerRank == 0) return;
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  char* own = dst + rank_ * bytesPerRank;
  if (src != own) device_->copy(own, src, bytesPerRank);
  if (size_ == 1) {
    device_->synchronize(deadline);
    return;
  }
  for (size_t off = 0; off < bytesPerRank; off += bufferBytes_) {
    const size_t c = std::min(bufferBytes_, bytesPerRank - off);
    const int b = beginChunk();
    device_->copy(mine_[b], src + off, c);
    device_->record();
    coll.barrier(desc, deadline);  // every rank's chunk is queued into its buffer, recorded
    device_->waitPeers();
    for (int p = 0; p < size_; ++p) {
      if (p != rank_) device_->copy(dst + p * bytesPerRank + off, peers_[b][p], c);
    }
    device_->record();
  }
  endCall(coll, desc, deadline);
}

void IpcCollectives::reduce(void* data, size_t count, DType dtype, ReduceOp op, int root, Collectives& coll,
                            const OpDesc& desc, const Deadline& deadline) {
  checkReduceOp(dtype, op);
  if (count == 0 || size_ == 1) return;
  const size_t esz = dtypeSize(dtype);
  const size_t cap = std::max<size_t>(1, bufferBytes_ / esz);
  char* base = static_cast<char*>(data);
  std::vector<const void*> srcs(size_);
  for (size_t off = 0; off < count; off += cap) {
    const size_t c = std::min(cap, count - off);
    const int b = beginChunk();
    device_->copy(mine_[b], base + off * esz, c * esz);
    device_->record();
    coll.barrier(desc, deadline);  // every rank's chunk is queued into its buffer, recorded
    if (rank_ == root) {
      device_->waitPeers();
      for (int p = 0; p < size_; ++p) srcs[p] = peers_[b][p];
      device_->reduceMany(base + off * esz, srcs.data(), size_, c, dtype, op);
      device_->record();  // the peers wait for this before they reuse buffer b
    }
  }
  endCall(coll, desc, deadline);
}

void IpcCollectives::broadcast(void* buf, size_t bytes, int root, Collectives& coll, const OpDesc& desc,
                               const Deadline& deadline) {
  if (bytes == 0 || size_ == 1) return;
  char* p = static_cast<char*>(buf);
  for (size_t off = 0; off < bytes; off += bufferBytes_) {
    const size_t c = std::min(bufferBytes_, bytes - off);
    const int b = beginChunk();
    if (rank_ == root) {
      device_->copy(mine_[b], p + off, c);
      device_->record();
      coll.barrier(desc, deadline);  // the root's chunk is queued into its buffer, recorded
    } else {
      coll.barrier(desc, deadline);
      device_->waitPeers();
      device_->copy(p + off, peers_[b][root], c);
      device_->record();  // the root waits for this before it reuses buffer b
    }
  }
  endCall(coll, desc, deadline);
}

void IpcCollectives::gather(const void* in, void* out, size_t bytesPerRank, int root, Collectives& coll,
                            const OpDesc& desc, const Deadline& deadline) {
  if (bytesPerRank == 0) return;
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  if (rank_ == root) device_->copy(dst + root * bytesPerRank, src, bytesPerRank);
  if (size_ > 1) {
    for (size_t off = 0; off < bytesPerRank; off += bufferBytes_) {
      const size_t c = std::min(bufferBytes_, bytesPerRank - off);
      const int b = beginChunk();
      if (rank_ != root) device_->copy(mine_[b], src + off, c);
      device_->record();
      coll.barrier(desc, deadline);  // every rank's chunk is queued into its buffer, recorded
      if (rank_ == root) {
        device_->waitPeers();
        for (int p = 0; p < size_; ++p) {
          if (p != root) device_->copy(dst + p * bytesPerRank + off, peers_[b][p], c);
        }
        device_->record();  // the peers wait for this before they reuse buffer b
      }
    }
  }
  endCall(coll, desc, deadline);
}

void IpcCollectives::scatter(const void* in, void* out, size_t bytesPerRank, int root, Collectives& coll,
                             const OpDesc& desc, const Deadline& deadline) {
  if (bytesPerRank == 0) return;
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  if (rank_ == root) device_->copy(dst, src + root * bytesPerRank, bytesPerRank);
  const size_t slot = slotBytes();
  for (size_t off = 0; size_ > 1 && off < bytesPerRank; off += slot) {
    const size_t c = std::min(slot, bytesPerRank - off);
    const int b = beginChunk();
    if (rank_ == root) {
      for (int p = 0; p < size_; ++p) {
        if (p != root) device_->copy(mine_[b] + p * slot, src + p * bytesPerRank + off, c);
      }
      device_->record();
      coll.barrier(desc, deadline);  // the root's pieces are queued into its buffer, recorded
    } else {
      coll.barrier(desc, deadline);
      device_->waitPeers();
      device_->copy(dst + off, peers_[b][root] + rank_ * slot, c);
      device_->record();  // the root waits for this before it reuses buffer b
    }
  }
  endCall(coll, desc, deadline);
}

void IpcCollectives::allToAll(const void* in, const std::vector<size_t>& sendOffsets,
                              const std::vector<size_t>& sendBytes, void* out,
                              const std::vector<size_t>& recvOffsets, const std::vector<size_t>& recvBytes,
                              Collectives& coll, const OpDesc& desc, const Deadline& deadline) {
  const int n = size_;
  PYCOMM_CHECK_ARG(static_cast<int>(sendOffsets.size()) == n && static_cast<int>(sendBytes.size()) == n &&
                       static_cast<int>(recvOffsets.size()) == n && static_cast<int>(recvBytes.size()) == n,
                   "all_to_all needs one split per rank (", n, ")");
  // Row q of `all`: rank q's send sizes, then its receive sizes.
  const size_t row = 2 * static_cast<size_t>(n);
  std::vector<int64_t> mine(row), all(row * n);
  for (int p = 0; p < n; ++p) {
    mine[p] = static_cast<int64_t>(sendBytes[p]);
    mine[n + p] = static_cast<int64_t>(recvBytes[p]);
  }
  OpDesc sizes = desc;
  sizes.coll = CollType::kAllGather;
  sizes.count = row;
  sizes.dtype = DType::kInt64;
  coll.allGather(mine.data(), all.data(), row * sizeof(int64_t), sizes, deadline);
  size_t most = 0;  // the largest piece between two different ranks: sets the rounds
  for (int q = 0; q < n; ++q) {
    for (int p = 0; p < n; ++p) {
      const int64_t sent = all[q * row + p];
      const int64_t expected = all[p * row + n + q];
      if (sent != expected) {
        throw MismatchError(strCat("pycomm: all_to_all split sizes disagree: rank ", q, " sends ", sent,
                                   " bytes to rank ", p, ", which expects ", expected, " [seen by rank ", rank_,
                                   "]"));
      }
      if (p != q) most = std::max(most, static_cast<size_t>(sent));
    }
  }
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  if (sendBytes[rank_]) device_->copy(dst + recvOffsets[rank_], src + sendOffsets[rank_], sendBytes[rank_]);
  const size_t slot = slotBytes();
  for (size_t off = 0; off < most; off += slot) {
    const int b = beginChunk();
    for (int p = 0; p < n; ++p) {
      if (p != rank_ && sendBytes[p] > off) {
        device_->copy(mine_[b] + p * slot, src + sendOffsets[p] + off, std::min(slot, sendBytes[p] - off));
      }
    }
    device_->record();
    coll.barrier(desc, deadline);  // every rank's pieces are queued into its buffer, recorded
    device_->waitPeers();
    for (int q = 0; q < n; ++q) {
      if (q != rank_ && recvBytes[q] > off) {
        device_->copy(dst + recvOffsets[q] + off, peers_[b][q] + rank_ * slot, std::min(slot, recvBytes[q] - off));
      }
    }
    device_->record();
  }
  endCall(coll, desc, deadline);
}

}  // namespace pycomm
