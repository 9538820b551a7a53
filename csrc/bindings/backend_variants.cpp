// The all-reduces beyond the dense one: sparse COO (SUM, as Gloo) and the pipelined
// compressed all-reduce (the native path of pycomm.compression), flat or with the codec
// on the cross-host hop only.
#include <tuple>
#include <utility>

#include "algorithms/compressed.h"
#include "bindings/backend.h"
#include "bindings/sparse_allreduce.h"
#include "bindings/work.h"
#include "kernels/compress_math.h"

namespace pycomm {

namespace {
// What the compressed paths take: a contiguous CPU float32 tensor.
bool isFlatF32(const at::Tensor& x) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous();
}

// The error-feedback residuals of a compressed call: checked (CPU float32 of `nWorker`
// and `nServer` elements), kept alive with the call in `keep`, their data returned.
std::pair<float*, float*> residuals(const std::optional<at::Tensor>& worker, const std::optional<at::Tensor>& server,
                                    size_t nWorker, size_t nServer, int rank, const std::string& codecName,
                                    const char* where, std::vector<at::Tensor>& keep) {
  TORCH_CHECK_VALUE(worker && server && isFlatF32(*worker) && isFlatF32(*server) &&
                        static_cast<size_t>(worker->numel()) == nWorker &&
                        static_cast<size_t>(server->numel()) == nServer,
                    "pycomm rank ", rank, ": ", codecName, " with error feedback", where,
                    " needs CPU float32 residuals of ", nWorker, " (worker) and ", nServer, " (server) elements");
  keep.push_back(*worker);
  keep.push_back(*server);
  return {worker->data_ptr<float>(), server->data_ptr<float>()};
}
}  // namespace

c10::intrusive_ptr<c10d::Work> PycommBackend::sparseAllReduce(at::Tensor t, const c10d::AllreduceOptions& opts) {
  checkSparseAllReduce(t, opts.reduceOp, rank_);
  OpDesc desc;
  desc.seq = group_->nextSeq();
  desc.coll = CollType::kAllReduce;
  auto c = group_->submitCollective(!opts.asyncOp, [t, desc, rank = rank_, size = size_](Collectives& cs,
                                                                                        const Deadline& dl) mutable {
    at::NoGradGuard noGrad;
    t.copy_(sparseAllReduceSum(cs, t, desc, dl, rank, size));
  }, desc);
  return c10::make_intrusive<PycommWork>(rank_, c10d::OpType::ALLREDUCE, "pycomm:all_reduce",
                                         std::vector<at::Tensor>{t}, c, desc.seq);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::compressedAllReduce(at::Tensor t, const std::string& codecName, int64_t bits,
                                                                  bool errorFeedback, int64_t chunk, int64_t divisor,
                                                                  std::optional<at::Tensor> worker,
                                                                  std::optional<at::Tensor> server, int64_t workerSeed,
                                                                  int64_t serverSeed, bool asyncOp,
                                                                  std::optional<at::Tensor> nonfinite) {
  TORCH_CHECK_VALUE(t.defined() && isFlatF32(t), "pycomm rank ", rank_,
                    ": compressed all_reduce needs a contiguous CPU float32 tensor, got ",
                    t.defined() ? c10::str(t.scalar_type(), " on ", t.device()) : std::string("undefined"));
  const size_t n = static_cast<size_t>(t.numel());
  TORCH_CHECK_VALUE(chunk > 0 && chunk % static_cast<int64_t>(kCompressAlign) == 0 &&
                        static_cast<size_t>(chunk) * static_cast<size_t>(size_) >= n,
                    "pycomm rank ", rank_, ": compressed all_reduce chunk ", chunk, " does not tile ", n,
                    " elements over ", size_, " ranks");
  TORCH_CHECK_VALUE(divisor >= 1, "pycomm rank ", rank_, ": compressed all_reduce divisor must be >= 1");
  std::unique_ptr<PieceCodec> codec;
  try {
    codec = makeCodec(codecName, static_cast<int>(bits), &errorFeedback, static_cast<uint32_t>(workerSeed),
                      static_cast<uint32_t>(serverSeed));
  } catch (const InvalidArgument& e) {
    TORCH_CHECK_VALUE(false, "pycomm rank ", rank_, ": ", e.what());
  }
  CompressedArgs args;
  args.data = t.data_ptr<float>();
  args.n = n;
  args.chunk = static_cast<size_t>(chunk);
  args.divisor = static_cast<int>(divisor);
  std::vector<at::Tensor> keep{t};
  if (errorFeedback) {
    std::tie(args.workerResidual, args.serverResidual) =
        residuals(worker, server, n, static_cast<size_t>(chunk), rank_, codecName, "", keep);
  }
  if (nonfinite) {
    const at::Tensor& f = *nonfinite;
    TORCH_CHECK_VALUE(f.defined() && f.device().is_cpu() && f.scalar_type() == at::kByte && f.numel() == 1,
                      "pycomm rank ", rank_, ": compressed all_reduce's nonfinite flag must be a one-element "
                      "uint8 CPU tensor");
    args.nonfinite = f.data_ptr<uint8_t>();
    keep.push_back(f);
  }
  std::shared_ptr<PieceCodec> shared(std::move(codec));
  Call call{c10d::OpType::ALLREDUCE, "pycomm:compressed_all_reduce", CollType::kCompressed, {t}, {Staged{t, t, false}}};
  call.op = divisor == 1 ? ReduceOp::kSum : ReduceOp::kAvg;
  call.tag = shared->id();
  return submit(std::move(call), asyncOp, [shared, args, keep](Collectives& c, const OpDesc& d, const Deadline& dl) {
    c.compressedAllReduce(*shared, args, d, dl);
  });
}

std::map<std::string, int64_t> PycommBackend::hierCompressedPlan(int64_t n, const std::string& codecName, int64_t bits) {
  TORCH_CHECK_VALUE(n >= 0, "pycomm rank ", rank_, ": negative element count ", n);
  bool ef = false;
  std::unique_ptr<PieceCodec> codec;
  try {
    codec = makeCodec(codecName, static_cast<int>(bits), &ef, 0, 0);
  } catch (const InvalidArgument& e) {
    TORCH_CHECK_VALUE(false, "pycomm rank ", rank_, ": ", e.what());
  }
  auto p = group_->algorithms().hierCompressedPlan(static_cast<size_t>(n), codec.get());
  return {{"hierarchical", p.hierarchical ? 1 : 0},
          {"hosts", p.hosts},
          {"worker", static_cast<int64_t>(p.workerElems)},
          {"server", static_cast<int64_t>(p.serverElems)},
          {"cross_bytes", static_cast<int64_t>(p.crossBytes)}};
}

c10::intrusive_ptr<c10d::Work> PycommBackend::hierCompressedAllReduce(at::Tensor t, const std::string& codecName, int64_t bits,
                                                                      bool errorFeedback, int64_t divisor,
                                                                      std::optional<at::Tensor> worker,
                                                                      std::optional<at::Tensor> server, int64_t workerSeed,
                                                                      int64_t serverSeed, bool asyncOp) {
  TORCH_CHECK_VALUE(t.defined() && isFlatF32(t), "pycomm rank ", rank_,
                    ": hierarchical compressed all_reduce needs a contiguous CPU float32 tensor, got ",
                    t.defined() ? c10::str(t.scalar_type(), " on ", t.device()) : std::string("undefined"));
  TORCH_CHECK_VALUE(divisor >= 1, "pycomm rank ", rank_, ": compressed all_reduce divisor must be >= 1");
  std::unique_ptr<PieceCodec> codec;
  try {
    codec = makeCodec(codecName, static_cast<int>(bits), &errorFeedback, static_cast<uint32_t>(workerSeed),
                      static_cast<uint32_t>(serverSeed));
  } catch (const InvalidArgument& e) {
    TORCH_CHECK_VALUE(false, "pycomm rank ", rank_, ": ", e.what());
  }
  const size_t n = static_cast<size_t>(t.numel());
  const auto plan = group_->algorithms().hierCompressedPlan(n, nullptr);
  TORCH_CHECK_VALUE(plan.hierarchical, "pycomm rank ", rank_,
                    ": compression on the cross-host hop only needs a group on several hosts with several ranks "
                    "on some; this group has ", plan.hosts, " host(s)");
  Collectives::HierCompressedArgs args;
  args.data = t.data_ptr<float>();
  args.n = n;
  args.divisor = static_cast<int>(divisor);
  std::vector<at::Tensor> keep{t};
  if (errorFeedback) {
    std::tie(args.workerResidual, args.serverResidual) =
        residuals(worker, server, plan.workerElems, plan.serverElems, rank_, codecName, " across hosts", keep);
  }
  std::shared_ptr<PieceCodec> shared(std::move(codec));
  Call call{c10d::OpType::ALLREDUCE, "pycomm:compressed_all_reduce", CollType::kCompressed, {t}, {Staged{t, t, false}}};
  call.op = divisor == 1 ? ReduceOp::kSum : ReduceOp::kAvg;
  call.tag = shared->id() | 0x10000u;  // a rank on the flat path fails with a mismatch, not garbage
  return submit(std::move(call), asyncOp, [shared, args, keep](Collectives& c, const OpDesc& d, const Deadline& dl) {
    c.hierCompressedAllReduce(*shared, args, d, dl);
  });
}

}  // namespace pycomm
