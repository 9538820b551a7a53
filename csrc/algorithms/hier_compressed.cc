// Hierarchical compressed all-reduce: compression on the cross-host hop only. Inside a
// host the ranks talk over shared memory, where float32 is cheap and exact; only the
// host links are slow. So each chunk of the call goes
//
//   in-host reduce-scatter (float32, exact sums)     -> this rank's shard holds the host's partial
//   compressed all-reduce of the shard across hosts  -> among the ranks owning it on every host
//   in-host all-gather (float32)                     -> every rank holds every shard
//
// The in-host steps are the uncompressed hierarchical all-reduce's (hierarchical.cc);
// the cross-host step is the pipelined compressed all-reduce (compressed.h) over the
// cross sub-transport, with its error feedback on the host partial of the shard. The
// owners of a shard on different hosts end with the same bytes (the compressed exchange
// guarantees it) and the all-gather copies them, so every rank ends bitwise identical.
// Like the uncompressed path, calls are cut into chunks of PYCOMM_HIER_CHUNK_BYTES and
// the in-host steps of one chunk overlap the cross-host step of another.
#include <algorithm>
#include <cstring>
#include <exception>
#include <string>

#include "algorithms/collectives.h"
#include "core/error.h"
#include "core/work_queue.h"
#include "kernels/compress.h"

namespace pycomm {

namespace {
// Element where part c of n parts of `count` begins (the cuts hierarchical.cc makes).
inline size_t cut(size_t count, size_t n, size_t c) {
  return static_cast<size_t>((static_cast<unsigned __int128>(count) * c) / n);
}
}  // namespace

std::vector<Collectives::HierPart> Collectives::hierCompressedParts(size_t count) const {
  std::vector<HierPart> parts;
  if (shards_ == 0 || count == 0) return parts;
  const size_t hosts = static_cast<size_t>(topology_.numHosts());
  const size_t chunks = std::max<size_t>(1, (count * sizeof(float) + config_.hierChunkBytes - 1) /
                                                config_.hierChunkBytes);
  size_t w = 0, s = 0;
  for (size_t c = 0; c < chunks; ++c) {
    HierPart p{};
    p.lo = cut(count, chunks, c);
    p.n = cut(count, chunks, c + 1) - p.lo;
    p.shardLo = cut(p.n, static_cast<size_t>(shards_), static_cast<size_t>(localIndex_));
    p.shardLen = cut(p.n, static_cast<size_t>(shards_), static_cast<size_t>(localIndex_) + 1) - p.shardLo;
    p.workerOff = w;
    p.serverOff = s;
    if (cross_ && p.shardLen > 0) {
      // As pycomm.compression cuts a tensor over its ranks: ceil(n / ranks), whole
      // alignment units, at least one unit.
      const size_t per = (p.shardLen + hosts - 1) / hosts;
      p.crossChunk = std::max(kCompressAlign, (per + kCompressAlign - 1) / kCompressAlign * kCompressAlign);
      w += p.shardLen;
      s += p.crossChunk;
    }
    parts.push_back(p);
  }
  return parts;
}

Collectives::HierCompressedPlan Collectives::hierCompressedPlan(size_t count, const PieceCodec* codec) const {
  HierCompressedPlan plan;
  plan.hosts = topology_.numHosts();
  plan.hierarchical = shards_ > 0;
  const size_t hosts = static_cast<size_t>(plan.hosts);
  // The pieces Collectives::compressedAllReduce cuts (cross_ runs with this config).
  const size_t pieceFloats = std::max<size_t>(1, config_.compressPieceBytes / sizeof(float));
  const size_t pieceElems = (pieceFloats + kPieceAlign - 1) / kPieceAlign * kPieceAlign;
  for (const HierPart& p : hierCompressedParts(count)) {
    if (p.crossChunk == 0) continue;
    plan.workerElems += p.shardLen;
    plan.serverElems += p.crossChunk;
    if (codec) {
      // The compressed exchange sends every piece's payload to the other hosts' owners
      // twice: the all-to-all, then the all-gather of the reduced piece.
      for (size_t at = 0; at < p.crossChunk; at += pieceElems) {
        const size_t e = std::min(pieceElems, p.crossChunk - at);
        plan.crossBytes += 2 * (hosts - 1) * codec->payloadBytes(e);
      }
    }
  }
  return plan;
}

void Collectives::hierCompressedAllReduce(PieceCodec& codec, const HierCompressedArgs& a, const OpDesc& desc,
                                          const Deadline& deadline) {
  PYCOMM_CHECK_ARG(shards_ > 0, "hierarchical compressed all_reduce needs a group on several hosts with several "
                                "ranks on some; this one is ", topology_.str());
  PYCOMM_CHECK_ARG(a.divisor >= 1, "hierarchical compressed all_reduce: divisor must be >= 1");
  const std::vector<HierPart> parts = hierCompressedParts(a.n);
  if (parts.empty()) return;
  char* b = reinterpret_cast<char*>(a.data);
  constexpr DType f32 = DType::kFloat32;

  auto crossStep = [&](const HierPart& p) {
    if (p.crossChunk == 0) return;  // no shard here, or this rank owns none (a host with extra ranks)
    CompressedArgs ca;
    ca.data = a.data + p.lo + p.shardLo;
    ca.n = p.shardLen;
    ca.chunk = p.crossChunk;
    ca.divisor = a.divisor;  // the host partials are sums: the owner divides once
    ca.workerResidual = a.workerResidual ? a.workerResidual + p.workerOff : nullptr;
    ca.serverResidual = a.serverResidual ? a.serverResidual + p.serverOff : nullptr;
    cross_->compressedAllReduce(codec, ca, desc, deadline);
  };
  auto at = [&](const HierPart& p) { return b + p.lo * sizeof(float); };

  if (parts.size() == 1 || !local_ || !localSeparate_) {
    for (const HierPart& p : parts) {
      hierLocalReduce(at(p), p.n, f32, ReduceOp::kSum, desc, deadline);
      crossStep(p);
      hierLocalGather(at(p), p.n, f32, desc, deadline);
    }
    return;
  }
  // Pipelined as hierAllReduce: in-host steps here in a fixed order, cross-host steps in
  // chunk order on crossThread_ (each runs its own compressed pipeline on cross_'s threads).
  if (!crossThread_) crossThread_ = std::make_unique<WorkQueue>("pycomm-hier");
  std::vector<std::shared_ptr<Completion>> crossDone(parts.size());
  auto queueCross = [&](size_t c) {
    const HierPart* p = &parts[c];
    crossDone[c] = crossThread_->push([p, &crossStep] { crossStep(*p); });
  };
  try {
    hierLocalReduce(at(parts[0]), parts[0].n, f32, ReduceOp::kSum, desc, deadline);
    queueCross(0);
    for (size_t c = 0; c < parts.size(); ++c) {
      if (c + 1 < parts.size()) {
        hierLocalReduce(at(parts[c + 1]), parts[c + 1].n, f32, ReduceOp::kSum, desc, deadline);
        queueCross(c + 1);
      }
      crossDone[c]->waitFor(-1);
      if (auto err = crossDone[c]->error()) std::rethrow_exception(err);
      hierLocalGather(at(parts[c]), parts[c].n, f32, desc, deadline);
    }
  } catch (...) {
    // Steps still queued or running use the tensor and this frame: fail them, wait, report.
    hierAbort(exceptionMessage(std::current_exception(), "pycomm: hierarchical compressed all-reduce failed"));
    for (auto& d : crossDone) {
      if (d) d->waitFor(-1);  // each bounded by the deadline inside its transport calls
    }
    throw;
  }
}

}  // namespace pycomm
