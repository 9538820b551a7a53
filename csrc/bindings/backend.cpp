// The pycomm c10d backend: the translation from torch.distributed's calls to the
// torch-free Group (engine/group.h). Each collective is checked, described once (a
// Call for the Work and the header, a CollOp for the algorithms) and queued; the
// group's communication thread runs it while Python gets a Work back. Staging of
// tensors lives in staging.h, the CUDA paths in cuda_collectives.h, the Work in work.h,
// argument checks in arguments.h. What remains (~650 lines) is one c10d override per
// collective plus the shared submit path: one job, the c10d translation.
#include <pybind11/chrono.h>
#include <pybind11/stl.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <optional>

#if defined(PYCOMM_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "algorithms/compressed.h"
#include "bindings/arguments.h"
#include "bindings/c10d_store.h"
#include "bindings/cuda_collectives.h"
#include "bindings/process_stats.h"
#include "bindings/sparse_allreduce.h"
#include "bindings/staging.h"
#include "bindings/torch_types.h"
#include "bindings/work.h"
#include "core/env.h"
#include "core/error.h"
#include "engine/coll_op.h"
#include "engine/group.h"
#include "engine/monitored_barrier.h"
#include "kernels/compress_math.h"

namespace pycomm {

/// torch.distributed backend "pycomm": every collective runs on the group's
/// communication thread; send/recv on their own threads.
class PycommBackend : public c10d::Backend {
 public:
  PycommBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                std::chrono::milliseconds timeout)
      : c10d::Backend(rank, size),
        options_(c10::make_intrusive<c10d::Backend::Options>("pycomm", timeout)) {
    // The store adapter lives as long as the group: the TCP transport leaves abort
    // reasons in it for peers, and the CUDA IPC setup rendezvous through it later.
    store_ = std::make_unique<C10dStore>(store);
    group_ = std::make_unique<Group>(*store_, rank, size, timeout);
    cuda_ = std::make_unique<CudaCollectives>(*group_, streams_);
    stageChunkBytes_ = static_cast<size_t>(std::max<int64_t>(4096, envInt("PYCOMM_CUDA_STAGE_CHUNK_BYTES", 4 << 20)));
    processStatsAdd(group_.get());
  }

  ~PycommBackend() override {
    processStatsRetire(group_.get());
    // Joining the worker threads must not happen under the GIL: a worker that drops
    // the last reference to a tensor of a finished (or failed) operation takes the
    // GIL to release its Python object, and destroy_process_group() gets here with
    // the GIL held.
    if (Py_IsInitialized() && PyGILState_Check()) {
      pybind11::gil_scoped_release noGil;
      group_.reset();
    } else {
      group_.reset();
    }
  }

  const std::string getBackendName() const override { return "pycomm"; }

  c10::intrusive_ptr<c10d::Backend::Options> getBackendOptions() override { return options_; }

  /// Like Gloo: a new group over a subset of the ranks is built with a new backend.
  bool supportsSplitting() const override { return true; }

  /// The backend of the group `ranks` (this group's ranks, in the new group's order)
  /// under `store`; null on a rank that is not in it.
  c10::intrusive_ptr<c10d::Backend> split(const c10::intrusive_ptr<c10d::Store>& store, const std::vector<int>& ranks,
                                          const c10::intrusive_ptr<c10d::Backend::Options>& opts) override {
    auto it = std::find(ranks.begin(), ranks.end(), rank_);
    if (it == ranks.end()) return nullptr;
    const auto timeout = opts ? opts->timeout : group_->timeout();
    c10::intrusive_ptr<PycommBackend> be;
    {
      NoGil noGil;  // the rendezvous waits for the other ranks
      be = c10::make_intrusive<PycommBackend>(store, static_cast<int>(it - ranks.begin()),
                                              static_cast<int>(ranks.size()), timeout);
    }
    if (opts) {
      be->options_->group_name = opts->group_name;
      be->options_->group_desc = opts->group_desc;
      be->options_->global_ranks_in_group = opts->global_ranks_in_group;
    }
    return be;
  }

  /// Collectives issued so far (the same on every rank while they agree), as Gloo counts.
  uint64_t getSequenceNumberForGroup() override { return group_->lastSeq(); }

  /// Gloo's no-op: sequence numbers start at 0 on every rank.
  void setSequenceNumberForGroup() override {}

  /// Nothing to switch on: every Work records its own timing through torch's profiler hooks.
  void enableCollectivesTiming() override {}

  /// Barrier that names the ranks that did not reach it within the timeout (rank 0
  /// reports them; see engine/monitored_barrier.h). Through the store, like Gloo's
  /// through send/recv: it does not wait for the group's queued collectives.
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool waitAllRanks) override {
    const auto timeout = opts.timeout == c10d::kUnsetTimeout ? group_->timeout() : opts.timeout;
    const uint64_t id = ++monitoredBarriers_;
    try {
      NoGil noGil;
      pycomm::monitoredBarrier(*store_, group_->keyPrefix(), rank_, size_, id, timeout, waitAllRanks,
                               group_->timeout());
    } catch (const Error& e) {
      TORCH_CHECK(false, e.what());
    }
  }

  /// Counters for pycomm.stats().
  std::map<std::string, uint64_t> stats() const {
    auto s = group_->stats();
    s["rank"] = static_cast<uint64_t>(rank_);
    s["world_size"] = static_cast<uint64_t>(size_);
    for (const auto& [k, v] : cuda_->stats()) s[k] = v;
    return s;
  }

  /// "shm" or "tcp".
  std::string transportName() const { return group_->transportName(); }

  /// Fails all pending and future operations of the group, on every rank.
  void abortGroup(const std::string& why) { group_->abort(why); }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override {
    if (tensors.size() == 1 && tensors[0].defined() && tensors[0].is_sparse()) {
      return sparseAllReduce(tensors[0], opts);
    }
    return inPlace(tensors, c10d::OpType::ALLREDUCE, "pycomm:all_reduce", CollType::kAllReduce, opts.reduceOp, -1,
                   opts.asyncOp);
  }

  /// SUM all-reduce of a sparse COO CPU tensor (bindings/sparse_allreduce.h), written
  /// back into it; one collective, one Work.
  c10::intrusive_ptr<c10d::Work> sparseAllReduce(at::Tensor t, const c10d::AllreduceOptions& opts) {
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

  /// Pipelined compressed all-reduce of a contiguous CPU float32 tensor, in place (the
  /// native path of pycomm.compression on pycomm groups). `codec`: "fp16", "bf16",
  /// "onebit", "qsgd" (with `bits`) or "none"; residual tensors hold the error-feedback
  /// state (n and chunk float32 elements) or are None for codecs that keep none.
  c10::intrusive_ptr<c10d::Work> compressedAllReduce(at::Tensor t, const std::string& codecName, int64_t bits,
                                                     bool errorFeedback, int64_t chunk, int64_t divisor,
                                                     std::optional<at::Tensor> worker,
                                                     std::optional<at::Tensor> server, int64_t workerSeed,
                                                     int64_t serverSeed, bool asyncOp) {
    auto isFlatF32 = [](const at::Tensor& x) {
      return x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous();
    };
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
      TORCH_CHECK_VALUE(worker && server && isFlatF32(*worker) && isFlatF32(*server) &&
                            static_cast<size_t>(worker->numel()) == n && server->numel() == chunk,
                        "pycomm rank ", rank_, ": ", codecName, " with error feedback needs CPU float32 residuals of ",
                        n, " (worker) and ", chunk, " (server) elements");
      args.workerResidual = worker->data_ptr<float>();
      args.serverResidual = server->data_ptr<float>();
      keep.push_back(*worker);
      keep.push_back(*server);
    }
    std::shared_ptr<PieceCodec> shared(std::move(codec));
    Call call{c10d::OpType::ALLREDUCE, "pycomm:compressed_all_reduce", CollType::kCompressed, {t}, {Staged{t, t, false}}};
    call.op = divisor == 1 ? ReduceOp::kSum : ReduceOp::kAvg;
    call.tag = shared->id();
    return submit(std::move(call), asyncOp, [shared, args, keep](Collectives& c, const OpDesc& d, const Deadline& dl) {
      c.compressedAllReduce(*shared, args, d, dl);
    });
  }

  /// Compression on the cross-host hop only (algorithms/hier_compressed.cc): what a call
  /// of `n` float32 elements with `codecName` needs on this rank. Keys: hierarchical,
  /// hosts, worker / server (residual floats), cross_bytes (codec payload bytes this rank
  /// sends across hosts).
  std::map<std::string, int64_t> hierCompressedPlan(int64_t n, const std::string& codecName, int64_t bits) {
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

  /// The hierarchical compressed all-reduce of a contiguous CPU float32 tensor, in place:
  /// exact in-host steps, `codecName` across hosts on this rank's shard (residuals sized
  /// by hierCompressedPlan, or None for codecs that keep none).
  c10::intrusive_ptr<c10d::Work> hierCompressedAllReduce(at::Tensor t, const std::string& codecName, int64_t bits,
                                                         bool errorFeedback, int64_t divisor,
                                                         std::optional<at::Tensor> worker,
                                                         std::optional<at::Tensor> server, int64_t workerSeed,
                                                         int64_t serverSeed, bool asyncOp) {
    auto isFlatF32 = [](const at::Tensor& x) {
      return x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous();
    };
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
      TORCH_CHECK_VALUE(worker && server && isFlatF32(*worker) && isFlatF32(*server) &&
                            static_cast<size_t>(worker->numel()) == plan.workerElems &&
                            static_cast<size_t>(server->numel()) == plan.serverElems,
                        "pycomm rank ", rank_, ": ", codecName, " with error feedback across hosts needs CPU float32 "
                        "residuals of ", plan.workerElems, " (worker) and ", plan.serverElems, " (server) elements");
      args.workerResidual = worker->data_ptr<float>();
      args.serverResidual = server->data_ptr<float>();
      keep.push_back(*worker);
      keep.push_back(*server);
    }
    std::shared_ptr<PieceCodec> shared(std::move(codec));
    Call call{c10d::OpType::ALLREDUCE, "pycomm:compressed_all_reduce", CollType::kCompressed, {t}, {Staged{t, t, false}}};
    call.op = divisor == 1 ? ReduceOp::kSum : ReduceOp::kAvg;
    call.tag = shared->id() | 0x10000u;  // a rank on the flat path fails with a mismatch, not garbage
    return submit(std::move(call), asyncOp, [shared, args, keep](Collectives& c, const OpDesc& d, const Deadline& dl) {
      c.hierCompressedAllReduce(*shared, args, d, dl);
    });
  }

  /// One all-reduce over the tensors laid end to end (all of one dtype), written back
  /// into each: one collective, one Work.
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                     const c10d::AllreduceCoalescedOptions& opts) override {
    const char* what = "all_reduce_coalesced";
    checkCoalesced(tensors, tensors, what);
    at::Tensor flat = flatOnHost(tensors);
    CollOp op;
    op.coll = CollType::kAllReduce;
    op.count = static_cast<size_t>(flat.numel());
    op.bytes = flat.nbytes();
    op.dtype = toDType(flat.scalar_type(), rank_);
    op.op = toReduceOp(opts.reduceOp, op.dtype, rank_);
    std::vector<Piece> back;
    int64_t off = 0;
    for (auto& t : tensors) {
      back.push_back({t, flat.narrow(0, off, t.numel())});
      off += t.numel();
    }
    return submitCoalesced(c10d::OpType::ALLREDUCE_COALESCED, "pycomm:all_reduce_coalesced", op, flat, flat, tensors,
                           std::move(back), opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override {
    checkRoot(opts.rootRank, "broadcast");
    return inPlace(tensors, c10d::OpType::BROADCAST, "pycomm:broadcast", CollType::kBroadcast, c10d::ReduceOp(),
                   static_cast<int>(opts.rootRank), opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts) override {
    checkRoot(opts.rootRank, "reduce");
    return inPlace(tensors, c10d::OpType::REDUCE, "pycomm:reduce", CollType::kReduce, opts.reduceOp,
                   static_cast<int>(opts.rootRank), opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override {
    TORCH_CHECK_VALUE(inputs.size() == 1 && outputs.size() == 1, "pycomm rank ", rank_,
                      ": all_gather takes one input tensor and one output list");
    auto& outs = outputs[0];
    TORCH_CHECK_VALUE(static_cast<int>(outs.size()) == size_, "pycomm rank ", rank_,
                      ": all_gather output list has ", outs.size(), " tensors, the group has ", size_,
                      " ranks");
    for (auto& o : outs) checkSameShape(o, inputs[0], "all_gather output");
    FlatCall call{c10d::OpType::ALLGATHER, "pycomm:all_gather", "all_gather", inputs[0].numel(), allGatherOp(inputs[0])};
    call.splitInto = outs;
    return outOfPlaceList(call, inputs[0], static_cast<int64_t>(size_) * inputs[0].numel(), outs, opts.asyncOp);
  }

  /// all_gather of several tensors as one operation: `outputLists[r][i]` receives rank
  /// r's `inputs[i]` (torch's layout, as Gloo takes it).
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputLists,
                                                     std::vector<at::Tensor>& inputs,
                                                     const c10d::AllgatherOptions& opts) override {
    TORCH_CHECK_VALUE(static_cast<int>(outputLists.size()) == size_, "pycomm rank ", rank_,
                      ": all_gather_coalesced needs one output list per rank (", size_, "), got ",
                      outputLists.size());
    std::vector<at::Tensor> outs;
    for (int r = 0; r < size_; ++r) {
      TORCH_CHECK_VALUE(outputLists[r].size() == inputs.size(), "pycomm rank ", rank_,
                        ": all_gather_coalesced output list ", r, " has ", outputLists[r].size(),
                        " tensors for ", inputs.size(), " inputs");
      for (size_t i = 0; i < inputs.size(); ++i) {
        checkSameShape(outputLists[r][i], inputs[i], "all_gather_coalesced output");
        outs.push_back(outputLists[r][i]);
      }
    }
    checkCoalesced(inputs, outs, "all_gather_coalesced");
    // One all-gather of the inputs laid end to end: rank r's block holds its inputs in order.
    at::Tensor in = flatOnHost(inputs);
    const int64_t k = in.numel();
    at::Tensor out = at::empty({size_ * k}, in.options());
    std::vector<Piece> back;
    for (int r = 0; r < size_; ++r) {
      int64_t off = 0;
      for (size_t i = 0; i < inputs.size(); ++i) {
        back.push_back({outputLists[r][i], out.narrow(0, r * k + off, inputs[i].numel())});
        off += inputs[i].numel();
      }
    }
    return submitCoalesced(c10d::OpType::ALLGATHER_COALESCED, "pycomm:all_gather_coalesced", allGatherOp(in), in, out,
                           outs, std::move(back), opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override {
    TORCH_CHECK_VALUE(output.numel() == input.numel() * size_, "pycomm rank ", rank_,
                      ": all_gather_into_tensor output has ", output.numel(), " elements, expected ",
                      input.numel() * size_, " (input ", input.numel(), " x ", size_, " ranks)");
    checkSameDType(output, input, "all_gather_into_tensor");
    FlatCall call{c10d::OpType::_ALLGATHER_BASE, "pycomm:all_gather_into_tensor", "all_gather", input.numel(),
                  allGatherOp(input)};
    return outOfPlace(call, output, input, opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::AllgatherOptions& opts) override {
    TORCH_CHECK_VALUE(outputs.size() == inputs.size(), "pycomm rank ", rank_,
                      ": coalesced all_gather_into_tensor needs as many outputs as inputs, got ", outputs.size(),
                      " and ", inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
      TORCH_CHECK_VALUE(outputs[i].numel() == inputs[i].numel() * size_, "pycomm rank ", rank_,
                        ": coalesced all_gather_into_tensor output ", i, " has ", outputs[i].numel(),
                        " elements, expected ", inputs[i].numel() * size_);
    }
    checkCoalesced(inputs, outputs, "all_gather_into_tensor_coalesced");
    at::Tensor in = flatOnHost(inputs);
    const int64_t k = in.numel();
    at::Tensor out = at::empty({size_ * k}, in.options());
    std::vector<Piece> back;
    int64_t off = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const int64_t n = inputs[i].numel();
      // Output i, seen as [ranks, n], is column block [off, off + n) of the result seen as [ranks, k].
      back.push_back({outputs[i], out.view({size_, k}).narrow(1, off, n)});
      off += n;
    }
    return submitCoalesced(c10d::OpType::ALLGATHER_INTO_TENSOR_COALESCED, "pycomm:all_gather_into_tensor_coalesced", allGatherOp(in), in, out,
                           outputs, std::move(back), opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts) override {
    checkRoot(opts.rootRank, "gather");
    TORCH_CHECK_VALUE(inputs.size() == 1, "pycomm rank ", rank_, ": gather takes one input tensor");
    const int root = static_cast<int>(opts.rootRank);
    std::vector<at::Tensor> outs;
    if (rank_ == root) {
      TORCH_CHECK_VALUE(outputs.size() == 1 && static_cast<int>(outputs[0].size()) == size_, "pycomm rank ",
                        rank_, ": gather on the root needs a list of ", size_, " output tensors");
      outs = outputs[0];
      for (auto& o : outs) checkSameShape(o, inputs[0], "gather output");
    } else {
      TORCH_CHECK_VALUE(outputs.empty() || outputs[0].empty(), "pycomm rank ", rank_,
                        ": gather output list must be empty on non-root ranks");
    }
    checkTensor(inputs[0], rank_, "gather input");
    CollOp op;
    op.coll = CollType::kGather;
    op.bytes = inputs[0].nbytes();
    op.root = root;
    FlatCall call{c10d::OpType::GATHER, "pycomm:gather", "gather", inputs[0].numel(), op};
    call.splitInto = outs;
    // The root gathers into one flat tensor; the others have no output.
    return outOfPlaceList(call, inputs[0], rank_ == root ? static_cast<int64_t>(size_) * inputs[0].numel() : -1, outs,
                          opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override {
    checkRoot(opts.rootRank, "scatter");
    TORCH_CHECK_VALUE(outputs.size() == 1, "pycomm rank ", rank_, ": scatter takes one output tensor");
    const int root = static_cast<int>(opts.rootRank);
    at::Tensor flat;
    if (rank_ == root) {
      TORCH_CHECK_VALUE(inputs.size() == 1 && static_cast<int>(inputs[0].size()) == size_, "pycomm rank ",
                        rank_, ": scatter on the root needs a list of ", size_, " input tensors");
      for (auto& i : inputs[0]) checkSameShape(i, outputs[0], "scatter input");
      flat = concatOnDevice(inputs[0], "scatter input");
    } else {
      TORCH_CHECK_VALUE(inputs.empty() || inputs[0].empty(), "pycomm rank ", rank_,
                        ": scatter input list must be empty on non-root ranks");
    }
    checkTensor(outputs[0], rank_, "scatter output");
    CollOp op;
    op.coll = CollType::kScatter;
    op.bytes = outputs[0].nbytes();
    op.root = root;
    FlatCall call{c10d::OpType::SCATTER, "pycomm:scatter", "scatter", outputs[0].numel(), op};
#if defined(PYCOMM_WITH_CUDA)
    if (outputs[0].is_cuda() && (!flat.defined() || flat.device() == outputs[0].device()) &&
        cuda_->ipcEligible(outputs[0].device().index())) {
      // Only the root has an input.
      at::Tensor in = flat.defined() ? flat : at::empty({0}, outputs[0].options());
      return submitCudaFlat(call, outputs[0], in, opts.asyncOp);
    }
#endif
    return hostFlat(call, outputs[0], flat, opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override {
    TORCH_CHECK_VALUE(outputs.size() == 1 && inputs.size() == 1, "pycomm rank ", rank_,
                      ": reduce_scatter takes one output tensor and one input list");
    TORCH_CHECK_VALUE(static_cast<int>(inputs[0].size()) == size_, "pycomm rank ", rank_,
                      ": reduce_scatter input list has ", inputs[0].size(), " tensors, the group has ",
                      size_, " ranks");
    for (auto& i : inputs[0]) checkSameShape(i, outputs[0], "reduce_scatter input");
    at::Tensor flat = concatOnDevice(inputs[0], "reduce_scatter input");
    return _reduce_scatter_base(outputs[0], flat, opts);
  }

  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                      const c10d::ReduceScatterOptions& opts) override {
    TORCH_CHECK_VALUE(input.numel() == output.numel() * size_, "pycomm rank ", rank_,
                      ": reduce_scatter input has ", input.numel(), " elements, expected ",
                      output.numel() * size_, " (output ", output.numel(), " x ", size_, " ranks)");
    checkSameDType(output, input, "reduce_scatter");
    checkTensor(input, rank_, "reduce_scatter input");
    CollOp op;
    op.coll = CollType::kReduceScatter;
    op.count = static_cast<size_t>(output.numel());
    op.dtype = toDType(input.scalar_type(), rank_);
    op.op = toReduceOp(opts.reduceOp, op.dtype, rank_);
    FlatCall call{c10d::OpType::_REDUCE_SCATTER_BASE, "pycomm:reduce_scatter", "reduce_scatter", output.numel(), op};
    return outOfPlace(call, output, input, opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::ReduceScatterOptions& opts) override {
    TORCH_CHECK_VALUE(outputs.size() == inputs.size(), "pycomm rank ", rank_,
                      ": coalesced reduce_scatter_tensor needs as many outputs as inputs, got ", outputs.size(),
                      " and ", inputs.size());
    int64_t k = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      TORCH_CHECK_VALUE(inputs[i].numel() == outputs[i].numel() * size_, "pycomm rank ", rank_,
                        ": coalesced reduce_scatter_tensor input ", i, " has ", inputs[i].numel(),
                        " elements, expected ", outputs[i].numel() * size_);
      k += outputs[i].numel();
    }
    checkCoalesced(inputs, outputs, "reduce_scatter_tensor_coalesced");
    // The input rank r reduces is every input's r-th block, laid end to end.
    at::Tensor in = at::empty({size_ * k}, inputs.empty() ? at::TensorOptions(at::kFloat)
                                                            : inputs[0].options().device(at::kCPU));
    at::Tensor out = at::empty({k}, in.options());
    std::vector<Piece> back;
    int64_t off = 0;
    {
      at::NoGradGuard noGrad;
      for (size_t i = 0; i < inputs.size(); ++i) {
        const int64_t n = outputs[i].numel();
        in.view({size_, k}).narrow(1, off, n).copy_(inputs[i].reshape({size_, n}));
        back.push_back({outputs[i], out.narrow(0, off, n)});
        off += n;
      }
    }
    CollOp op;
    op.coll = CollType::kReduceScatter;
    op.count = static_cast<size_t>(k);
    op.dtype = toDType(in.scalar_type(), rank_);
    op.op = toReduceOp(opts.reduceOp, op.dtype, rank_);
    return submitCoalesced(c10d::OpType::REDUCE_SCATTER_TENSOR_COALESCED, "pycomm:reduce_scatter_tensor_coalesced", op, in, out, outputs,
                           std::move(back), opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& outputSplits,
                                               std::vector<int64_t>& inputSplits,
                                               const c10d::AllToAllOptions& opts) override {
    checkSameDType(output, input, "all_to_all_single");
    const bool equal = outputSplits.empty() && inputSplits.empty();
    auto [sendOff, sendBytes] = splitRows(input, inputSplits, rank_, size_, "input");
    auto [recvOff, recvBytes] = splitRows(output, outputSplits, rank_, size_, "output");
    FlatCall call{c10d::OpType::ALLTOALL_BASE, "pycomm:all_to_all_single", "all_to_all", equal ? input.numel() : 0,
                  allToAllOp(sendOff, sendBytes, recvOff, recvBytes)};
    return outOfPlace(call, output, input, opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override {
    TORCH_CHECK_VALUE(static_cast<int>(outputs.size()) == size_ && static_cast<int>(inputs.size()) == size_,
                      "pycomm rank ", rank_, ": all_to_all needs ", size_, " input and output tensors");
    at::Tensor inFlat = concatOnDevice(inputs, "all_to_all input");
    std::vector<size_t> sendOff(size_), sendBytes(size_), recvOff(size_), recvBytes(size_);
    size_t so = 0, ro = 0;
    for (int p = 0; p < size_; ++p) {
      checkTensor(outputs[p], rank_, "all_to_all output");
      checkSameDType(outputs[p], inputs[0], "all_to_all");
      sendOff[p] = so;
      sendBytes[p] = inputs[p].numel() * inputs[p].element_size();
      so += sendBytes[p];
      recvOff[p] = ro;
      recvBytes[p] = outputs[p].numel() * outputs[p].element_size();
      ro += recvBytes[p];
    }
    const int64_t outCount = static_cast<int64_t>(ro / std::max<size_t>(1, outputs[0].element_size()));
    FlatCall call{c10d::OpType::ALLTOALL, "pycomm:all_to_all", "all_to_all", 0,
                  allToAllOp(sendOff, sendBytes, recvOff, recvBytes)};
    call.splitInto = outputs;
    return outOfPlaceList(call, inFlat, outCount, outputs, opts.asyncOp);
  }

  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override {
    return submit(Call{c10d::OpType::BARRIER, "pycomm:barrier", CollType::kBarrier, {}, {}}, opts.asyncOp,
                  [](Collectives& c, const OpDesc& d, const Deadline& dl) { c.barrier(d, dl); });
  }

  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dstRank, int tag) override {
    TORCH_CHECK_VALUE(tensors.size() == 1, "pycomm rank ", rank_, ": send takes one tensor");
    TORCH_CHECK_VALUE(dstRank >= 0 && dstRank < size_ && dstRank != rank_, "pycomm rank ", rank_,
                      ": send to invalid rank ", dstRank, " (group size ", size_, ")");
    // A CUDA tensor is copied to pinned memory on the send thread, after the caller's
    // current stream (Staged::prepare): the caller's thread does not wait for the device.
    Staged s = stage(tensors[0], false, "send tensor");
    auto c = group_->submitSend(dstRank, s.data(), s.bytes(), static_cast<uint32_t>(tag), [s] {
      at::NoGradGuard noGrad;
      s.prepare();
    });
    return c10::make_intrusive<PycommWork>(rank_, c10d::OpType::SEND, "pycomm:send", tensors, c, 0);
  }

  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int srcRank, int tag) override {
    TORCH_CHECK_VALUE(tensors.size() == 1, "pycomm rank ", rank_, ": recv takes one tensor");
    TORCH_CHECK_VALUE(srcRank >= 0 && srcRank < size_ && srcRank != rank_, "pycomm rank ", rank_,
                      ": recv from invalid rank ", srcRank, " (group size ", size_, ")");
    // What arrived is written into the tensor (a staged CUDA or non-contiguous one) on the
    // receive thread before the Work completes, so wait() returning means it is there.
    Staged s = stage(tensors[0], true, "recv tensor");
    auto c = group_->submitRecv(srcRank, s.data(), s.bytes(), static_cast<uint32_t>(tag), [s] {
      at::NoGradGuard noGrad;
      s.finish();
    });
    auto work = c10::make_intrusive<PycommWork>(rank_, c10d::OpType::RECV, "pycomm:recv", tensors, c, 0);
    work->setSource(std::make_shared<std::atomic<int>>(srcRank));
    return work;
  }

  /// Receives the first message with `tag` that any other rank sends; the Work's
  /// sourceRank() names the sender once it completed.
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors, int tag) override {
    TORCH_CHECK_VALUE(tensors.size() == 1, "pycomm rank ", rank_, ": recv takes one tensor");
    TORCH_CHECK_VALUE(size_ > 1, "pycomm rank ", rank_, ": recv from any source in a group of one rank");
    Staged s = stage(tensors[0], true, "recv tensor");
    auto source = std::make_shared<std::atomic<int>>(-1);
    auto c = group_->submitRecvAny(s.data(), s.bytes(), static_cast<uint32_t>(tag), source, [s] {
      at::NoGradGuard noGrad;
      s.finish();
    });
    auto work = c10::make_intrusive<PycommWork>(rank_, c10d::OpType::RECVANYSOURCE, "pycomm:recv_anysource", tensors,
                                                c, 0);
    work->setSource(std::move(source));
    return work;
  }

 private:
  /// One collective as submitted: what its Work reports and returns, what its header
  /// says (sequence number, dtype and count from staged[0] unless `count` is given, root,
  /// op, tag) and which staged tensors are prepared before it and written back after it.
  struct Call {
    c10d::OpType type;
    const char* name;                                  // "pycomm:..." (the Work's)
    CollType coll;
    std::vector<at::Tensor> outputs;                   // the Work's result
    std::vector<Staged> staged;                        // prepared before the collective
    std::optional<std::vector<Staged>> copyBack = {};  // finished after it (default: staged)
    int root = -1;
    int64_t count = -1;
    ReduceOp op = ReduceOp::kSum;
    uint32_t tag = 0;
  };

  /// One out-of-place collective (all_gather, gather, scatter, reduce_scatter,
  /// all_to_all): the Work's name, the collective in messages, the header count, what
  /// runs, and for the list forms the tensors the flat result is split into (the Work's
  /// outputs instead of the flat tensor).
  struct FlatCall {
    c10d::OpType type;
    const char* name;
    const char* what;
    int64_t count;
    CollOp op;
    std::optional<std::vector<at::Tensor>> splitInto = std::nullopt;
  };

  /// Releases the GIL for a blocking wait if this thread holds it (torch's bindings may
  /// have released it already).
  struct NoGil {
    std::optional<pybind11::gil_scoped_release> released;
    NoGil() {
      if (Py_IsInitialized() && PyGILState_Check()) released.emplace();
    }
  };

  /// Where a coalesced collective's result goes: `dst` gets `src` (a view of the flat result).
  struct Piece {
    at::Tensor dst;
    at::Tensor src;
  };

  /// The tensors of a coalesced call: defined, all of the first input's dtype (one flat
  /// buffer carries them all), outputs on one device class with the inputs.
  void checkCoalesced(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs,
                      const char* what) {
    TORCH_CHECK_VALUE(!inputs.empty() || outputs.empty(), "pycomm rank ", rank_, ": ", what,
                      " has outputs but no inputs");
    for (const auto* list : {&inputs, &outputs}) {
      for (const auto& t : *list) {
        checkTensor(t, rank_, what);
        TORCH_CHECK_VALUE(t.scalar_type() == inputs[0].scalar_type(), "pycomm rank ", rank_, ": ", what,
                          " needs tensors of one dtype, got ", inputs[0].scalar_type(), " and ", t.scalar_type());
        TORCH_CHECK_VALUE(t.layout() == at::kStrided, "pycomm rank ", rank_, ": ", what, " needs dense tensors");
      }
    }
  }

  /// The tensors flattened and laid end to end in one new host tensor.
  static at::Tensor flatOnHost(const std::vector<at::Tensor>& ts) {
    at::NoGradGuard noGrad;
    if (ts.empty()) return at::empty({0}, at::kFloat);
    std::vector<at::Tensor> flat;
    for (const auto& t : ts) flat.push_back(t.reshape({-1}).to(at::kCPU));
    return at::cat(flat).contiguous();
  }

  /// One collective over flat host tensors `in` and `out` (the same for in-place ones),
  /// after which each piece's dst gets its src: the coalesced calls' single operation.
  c10::intrusive_ptr<c10d::Work> submitCoalesced(c10d::OpType type, const char* name, const CollOp& op, at::Tensor in,
                                                 at::Tensor out, std::vector<at::Tensor> outputs,
                                                 std::vector<Piece> pieces, bool asyncOp) {
    Call c{type, name, op.coll, std::move(outputs), {stage(in, false, name + 7), stage(out, true, name + 7)}};
    c.copyBack = std::vector<Staged>{};
    c.count = in.numel();
    c.op = op.op;
    c.root = op.root;
    return submit(std::move(c), asyncOp,
                  [in, out, op, pieces = std::move(pieces)](Collectives& cs, const OpDesc& d, const Deadline& dl) {
                    op.run(cs, nullptr, in.data_ptr(), out.data_ptr(), d, dl);
                    for (const Piece& p : pieces) p.dst.copy_(p.src.reshape(p.dst.sizes()));
                  });
  }

  static CollOp allGatherOp(const at::Tensor& input) {
    CollOp op;
    op.coll = CollType::kAllGather;
    op.bytes = input.nbytes();
    return op;
  }

  static CollOp allToAllOp(std::vector<size_t> sendOff, std::vector<size_t> sendBytes, std::vector<size_t> recvOff,
                           std::vector<size_t> recvBytes) {
    CollOp op;
    op.coll = CollType::kAllToAll;
    op.sendOffsets = std::move(sendOff);
    op.sendBytes = std::move(sendBytes);
    op.recvOffsets = std::move(recvOff);
    op.recvBytes = std::move(recvBytes);
    return op;
  }

  /// all_reduce, broadcast and reduce: in place on every tensor of the list. CUDA
  /// tensors go over CudaCollectives::inPlace (IPC or chunked staging), others are
  /// staged (see stage()).
  c10::intrusive_ptr<c10d::Work> inPlace(std::vector<at::Tensor>& tensors, c10d::OpType type, const char* name,
                                         CollType coll, const c10d::ReduceOp& rop, int root, bool asyncOp) {
    const std::string what = std::string(name + 7 /* past "pycomm:" */) + " tensor";
    std::vector<CollOp> ops;
    for (auto& t : tensors) {
      checkTensor(t, rank_, what.c_str());
      CollOp op;
      op.coll = coll;
      op.count = static_cast<size_t>(t.numel());
      op.bytes = t.nbytes();
      op.dtype = toDType(t.scalar_type(), rank_);
      op.op = coll == CollType::kBroadcast ? ReduceOp::kSum : toReduceOp(rop, op.dtype, rank_);
      op.root = root;
      ops.push_back(op);
    }
    Call call{type, name, coll, tensors, {}};
    call.root = root;
    call.op = ops.empty() ? ReduceOp::kSum : ops[0].op;
#if defined(PYCOMM_WITH_CUDA)
    if (anyCuda(tensors)) {
      for (auto& t : tensors) {
        TORCH_CHECK_VALUE(t.device() == tensors[0].device(), "pycomm rank ", rank_, ": the tensors of one ",
                          name + 7, " must be on one device, got ", tensors[0].device(), " and ", t.device());
        call.staged.push_back(Staged{t, t, false});
      }
      const bool ipc = cuda_->ipcEligible(tensors[0].device().index());
      call.tag = ipc ? kCudaIpcTag : 0;
      return submit(std::move(call), asyncOp, cuda_->inPlace(tensors, ops, ipc, stageChunkBytes_));
    }
#endif
    for (auto& t : tensors) call.staged.push_back(stage(t, true, what.c_str()));
    return submit(call, asyncOp, [st = call.staged, ops](Collectives& c, const OpDesc& d, const Deadline& dl) {
      for (size_t i = 0; i < st.size(); ++i) ops[i].run(c, nullptr, st[i].data(), st[i].data(), d, dl);
    });
  }

  /// An out-of-place collective from `input` into `output` (both defined): over CUDA IPC
  /// when both are on the group's IPC device, else staged through host memory.
  c10::intrusive_ptr<c10d::Work> outOfPlace(const FlatCall& call, at::Tensor output, at::Tensor input, bool asyncOp) {
    checkTensor(input, rank_, (std::string(call.what) + " input").c_str());
    checkTensor(output, rank_, (std::string(call.what) + " output").c_str());
#if defined(PYCOMM_WITH_CUDA)
    if (input.is_cuda() && input.device() == output.device() && cuda_->ipcEligible(input.device().index())) {
      return submitCudaFlat(call, output, input, asyncOp);
    }
#endif
    return hostFlat(call, output, input, asyncOp);
  }

  /// A list form (its result split into `outs`, all on `input`'s device for the IPC
  /// path): the collective runs into one flat tensor of `flatNumel` elements (-1: none,
  /// a non-root gather), on the device for CUDA IPC, else on the host.
  c10::intrusive_ptr<c10d::Work> outOfPlaceList(const FlatCall& call, const at::Tensor& input, int64_t flatNumel,
                                                const std::vector<at::Tensor>& outs, bool asyncOp) {
    checkTensor(input, rank_, (std::string(call.what) + " input").c_str());
#if defined(PYCOMM_WITH_CUDA)
    const auto onInputDevice = [&](const at::Tensor& o) { return o.device() == input.device(); };
    if (input.is_cuda() && std::all_of(outs.begin(), outs.end(), onInputDevice) &&
        cuda_->ipcEligible(input.device().index())) {
      at::Tensor flat = at::empty({std::max<int64_t>(0, flatNumel)}, input.options());
      return submitCudaFlat(call, flat, input, asyncOp);
    }
#endif
    at::Tensor flat;
    if (flatNumel >= 0) flat = at::empty({flatNumel}, input.options().device(at::kCPU));
    return hostFlat(call, flat, input, asyncOp);
  }

#if defined(PYCOMM_WITH_CUDA)
  c10::intrusive_ptr<c10d::Work> submitCudaFlat(const FlatCall& call, at::Tensor output, at::Tensor input,
                                                bool asyncOp) {
    Call c{call.type, call.name, call.op.coll, call.splitInto.value_or(std::vector<at::Tensor>{output}),
           {Staged{input, input, false}, Staged{output, output, false}}};
    c.root = call.op.root;
    c.count = call.count;
    c.op = call.op.op;
    c.tag = kCudaIpcTag;
    return submit(std::move(c), asyncOp,
                  cuda_->outOfPlace(output, input, call.op, call.splitInto.value_or(std::vector<at::Tensor>{})));
  }
#endif

  /// The host path of an out-of-place collective: `input` and `output` staged (either
  /// may be undefined where the collective has none on this rank: the root-only side of
  /// gather and scatter); the list forms' flat host `output` is then split into the
  /// call's tensors.
  c10::intrusive_ptr<c10d::Work> hostFlat(const FlatCall& call, at::Tensor output, at::Tensor input, bool asyncOp) {
    const std::string what(call.what);
    std::optional<Staged> in, out;
    if (input.defined()) in = stage(input, false, (what + " input").c_str());
    if (output.defined()) out = stage(output, true, (what + " output").c_str());
    // reduce_scatter reads its input while writing its output: never the same buffer.
    if (call.op.coll == CollType::kReduceScatter && in && out && out->buf.data_ptr() == in->buf.data_ptr() &&
        out->bytes() > 0) {
      out->buf = out->buf.clone(), out->copyBack = true;
    }
    Call c{call.type, call.name, call.op.coll, call.splitInto.value_or(std::vector<at::Tensor>{output}), {}};
    if (in) c.staged.push_back(*in);
    if (out) c.staged.push_back(*out);
    c.copyBack = out && !call.splitInto ? std::vector<Staged>{*out} : std::vector<Staged>{};
    c.root = call.op.root;
    c.count = call.count;
    c.op = call.op.op;
    const std::vector<at::Tensor> split = call.splitInto.value_or(std::vector<at::Tensor>{});
    return submit(std::move(c), asyncOp,
                  [in, out, op = call.op, split](Collectives& c, const OpDesc& d, const Deadline& dl) {
                    op.run(c, nullptr, in ? in->data() : nullptr, out ? out->data() : nullptr, d, dl);
                    if (!out) return;
                    int64_t off = 0;
                    for (const at::Tensor& o : split) {
                      o.copy_(out->buf.narrow(0, off, o.numel()).view(o.sizes()));
                      off += o.numel();
                    }
                  });
  }

  at::Tensor concatOnDevice(const std::vector<at::Tensor>& ts, const char* what) {
    return pycomm::concatOnDevice(ts, rank_, what);
  }

  /// Stages `t` with this group's comm streams (see staging.h).
  Staged stage(const at::Tensor& t, bool isOutput, const char* what) {
    return pycomm::stage(t, isOutput, rank_, what, streams_);
  }

  void checkRoot(int64_t root, const char* what) { pycomm::checkRoot(root, rank_, size_, what); }
  void checkSameShape(const at::Tensor& a, const at::Tensor& b, const char* what) {
    pycomm::checkSameShape(a, b, rank_, what);
  }
  void checkSameDType(const at::Tensor& a, const at::Tensor& b, const char* what) {
    pycomm::checkSameDType(a, b, rank_, what);
  }

  /// Queues `fn` as the collective `call` describes; its staged tensors are prepared
  /// before fn and its copy-back ones finished after it, on the thread that runs it.
  c10::intrusive_ptr<c10d::Work> submit(Call call, bool asyncOp, CollFn fn) {
    OpDesc desc;
    desc.seq = group_->nextSeq();
    desc.coll = call.coll;
    desc.root = call.root;
    desc.tag = call.tag;
    if (!call.staged.empty()) {
      desc.dtype = toDType(call.staged[0].buf.scalar_type(), rank_);
      desc.count = call.count >= 0 ? static_cast<uint64_t>(call.count)
                                   : static_cast<uint64_t>(call.staged[0].buf.numel());
    }
    desc.op = call.op;  // part of the header: ranks reducing with different ops are a mismatch
    std::vector<Staged> copyBack = call.copyBack.value_or(call.staged);
    // A synchronous call (async_op=False) runs on the caller's thread when the comm
    // thread is idle: no hand-off to the worker and back for small, latency-bound calls.
    auto c = group_->submitCollective(!asyncOp,
        [fn = std::move(fn), desc, copyBack = std::move(copyBack), staged = call.staged](Collectives& cs,
                                                                                        const Deadline& dl) {
          // Staging copies are data movement, not differentiable ops (a caller may pass
          // a tensor that requires grad, e.g. a parameter to broadcast).
          at::NoGradGuard noGrad;
#if defined(PYCOMM_WITH_CUDA)
          // Device copies made inside fn (outputs written from host results) go on the
          // comm stream too, and are complete before the Work is.
          std::optional<c10::cuda::CUDAStreamGuard> guard;
          for (auto& s : staged) {
            if (s.cuda) {
              guard.emplace(s.cuda->stream);
              break;
            }
          }
#endif
          for (auto& s : staged) s.prepare();
          fn(cs, desc, dl);
          for (auto& s : copyBack) s.finish();
#if defined(PYCOMM_WITH_CUDA)
          if (guard) guard->current_stream().synchronize();
#endif
        },
        desc);
    return c10::make_intrusive<PycommWork>(rank_, call.type, call.name, std::move(call.outputs), c, desc.seq);
  }

  std::unique_ptr<C10dStore> store_;         // declared first: destroyed after group_
  CommStreams streams_;                      // CUDA comm streams of this group
  size_t stageChunkBytes_ = 0;               // PYCOMM_CUDA_STAGE_CHUNK_BYTES
  std::unique_ptr<Group> group_;
  std::unique_ptr<CudaCollectives> cuda_;    // refers to group_ and streams_
  c10::intrusive_ptr<c10d::Backend::Options> options_;  // what getBackendOptions() returns
  uint64_t monitoredBarriers_ = 0;           // monitored barriers issued (caller thread)
};

void initBackendBindings(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<PycommBackend, c10d::Backend, c10::intrusive_ptr<PycommBackend>>(m, "PycommBackend")
      .def("stats", &PycommBackend::stats, "Counters: collectives run, bytes sent/received")
      .def("transport", &PycommBackend::transportName, "Transport in use: 'shm' or 'tcp'")
      .def("abort_group", &PycommBackend::abortGroup, py::arg("why"),
           "Fails every pending and future operation of the group on every rank")
      .def("compressed_all_reduce", &PycommBackend::compressedAllReduce, py::arg("tensor"), py::arg("codec"),
           py::arg("bits"), py::arg("error_feedback"), py::arg("chunk"), py::arg("divisor"), py::arg("worker"),
           py::arg("server"), py::arg("worker_seed"), py::arg("server_seed"), py::arg("async_op"),
           py::call_guard<py::gil_scoped_release>(),
           "Pipelined compressed all-reduce in place (native path of pycomm.compression); returns a Work")
      .def("hier_compressed_plan", &PycommBackend::hierCompressedPlan, py::arg("n"), py::arg("codec"), py::arg("bits"),
           "What a compressed all-reduce on the cross-host hop only needs and sends on this rank")
      .def("hier_compressed_all_reduce", &PycommBackend::hierCompressedAllReduce, py::arg("tensor"), py::arg("codec"),
           py::arg("bits"), py::arg("error_feedback"), py::arg("divisor"), py::arg("worker"), py::arg("server"),
           py::arg("worker_seed"), py::arg("server_seed"), py::arg("async_op"),
           py::call_guard<py::gil_scoped_release>(),
           "Compressed all-reduce with exact in-host steps and the codec on the cross-host hop; returns a Work");
  m.def("process_stats", &processStats,
        "Counters summed over every pycomm group of this process (live and destroyed)");
  m.def(
      "create_backend",
      [](const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
         const std::chrono::duration<float>& timeout) {
        auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(timeout);
        py::gil_scoped_release release;
        return c10::make_intrusive<PycommBackend>(store, rank, size, ms);
      },
      py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("timeout"),
      "Creates the pycomm c10d backend (torch.distributed calls this through the registered creator)");
}

}  // namespace pycomm
