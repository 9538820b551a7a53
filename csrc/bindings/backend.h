// The pycomm c10d backend: the translation from torch.distributed's calls to the
// torch-free Group (engine/group.h). Each collective is checked, described once (a
// Call for the Work and the header, a CollOp for the algorithms) and queued; the
// group's communication thread runs it while Python gets a Work back.
//
// The class is defined across files, one job each:
//   backend.cpp            construction, the c10d collectives one override each, bindings
//   backend_submit.cpp     the shared submit path: in place / out of place, host or CUDA
//   backend_coalesced.cpp  the coalesced collectives (several tensors, one operation)
//   backend_p2p.cpp        send, recv, recv from any source
//   backend_variants.cpp   sparse and compressed all-reduce
// Staging of tensors lives in staging.h, the CUDA paths in cuda_collectives.h, the Work
// in work.h, argument checks in arguments.h.
#pragma once

#include <pybind11/pybind11.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/extension.h>

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bindings/arguments.h"
#include "bindings/c10d_store.h"
#include "bindings/cuda_collectives.h"
#include "bindings/staging.h"
#include "bindings/torch_types.h"
#include "engine/coll_op.h"
#include "engine/group.h"

namespace pycomm {

/// torch.distributed backend "pycomm": every collective runs on the group's
/// communication thread; send/recv on their own threads.
class PycommBackend : public c10d::Backend {
 public:
  PycommBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                std::chrono::milliseconds timeout);

  ~PycommBackend() override;

  const std::string getBackendName() const override { return "pycomm"; }

  c10::intrusive_ptr<c10d::Backend::Options> getBackendOptions() override { return options_; }

  /// Like Gloo: a new group over a subset of the ranks is built with a new backend.
  bool supportsSplitting() const override { return true; }

  /// The backend of the group `ranks` (this group's ranks, in the new group's order)
  /// under `store`; null on a rank that is not in it.
  c10::intrusive_ptr<c10d::Backend> split(const c10::intrusive_ptr<c10d::Store>& store, const std::vector<int>& ranks,
                                          const c10::intrusive_ptr<c10d::Backend::Options>& opts) override;

  /// Collectives issued so far (the same on every rank while they agree), as Gloo counts.
  uint64_t getSequenceNumberForGroup() override { return group_->lastSeq(); }

  /// Gloo's no-op: sequence numbers start at 0 on every rank.
  void setSequenceNumberForGroup() override {}

  /// Nothing to switch on: every Work records its own timing through torch's profiler hooks.
  void enableCollectivesTiming() override {}

  /// Barrier that names the ranks that did not reach it within the timeout (rank 0
  /// reports them; see engine/monitored_barrier.h). Through the store, like Gloo's
  /// through send/recv: it does not wait for the group's queued collectives.
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool waitAllRanks) override;

  /// Counters for pycomm.stats().
  std::map<std::string, uint64_t> stats() const;

  /// "shm" or "tcp".
  std::string transportName() const { return group_->transportName(); }

  /// Fails all pending and future operations of the group, on every rank.
  void abortGroup(const std::string& why) { group_->abort(why); }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;

  /// Out-of-place all_reduce (pycomm.all_reduce(x, out=y)): `output` = the reduction of
  /// every rank's `input` (`op`: a c10d RedOpType value), `input` unchanged; one
  /// collective, one Work, matching in-place calls of the other ranks. On CPU the
  /// shared-memory algorithms read `input` and write `output` with no copy between them;
  /// CUDA tensors are copied into `output` on the current stream and reduced in place.
  c10::intrusive_ptr<c10d::Work> allreduceOut(at::Tensor output, at::Tensor input, int64_t op, bool asyncOp);

  /// SUM all-reduce of a sparse COO CPU tensor (bindings/sparse_allreduce.h), written
  /// back into it; one collective, one Work.
  c10::intrusive_ptr<c10d::Work> sparseAllReduce(at::Tensor t, const c10d::AllreduceOptions& opts);

  /// Pipelined compressed all-reduce of a contiguous CPU float32 tensor, in place (the
  /// native path of pycomm.compression on pycomm groups). `codec`: "fp16", "bf16",
  /// "onebit", "qsgd" (with `bits`) or "none"; residual tensors hold the error-feedback
  /// state (n and chunk float32 elements) or are None for codecs that keep none.
  c10::intrusive_ptr<c10d::Work> compressedAllReduce(at::Tensor t, const std::string& codecName, int64_t bits,
                                                     bool errorFeedback, int64_t chunk, int64_t divisor,
                                                     std::optional<at::Tensor> worker,
                                                     std::optional<at::Tensor> server, int64_t workerSeed,
                                                     int64_t serverSeed, bool asyncOp,
                                                     std::optional<at::Tensor> nonfinite = std::nullopt);

  /// Compression on the cross-host hop only (algorithms/hier_compressed.cc): what a call
  /// of `n` float32 elements with `codecName` needs on this rank. Keys: hierarchical,
  /// hosts, worker / server (residual floats), cross_bytes (codec payload bytes this rank
  /// sends across hosts).
  std::map<std::string, int64_t> hierCompressedPlan(int64_t n, const std::string& codecName, int64_t bits);

  /// The hierarchical compressed all-reduce of a contiguous CPU float32 tensor, in place:
  /// exact in-host steps, `codecName` across hosts on this rank's shard (residuals sized
  /// by hierCompressedPlan, or None for codecs that keep none).
  c10::intrusive_ptr<c10d::Work> hierCompressedAllReduce(at::Tensor t, const std::string& codecName, int64_t bits,
                                                         bool errorFeedback, int64_t divisor,
                                                         std::optional<at::Tensor> worker,
                                                         std::optional<at::Tensor> server, int64_t workerSeed,
                                                         int64_t serverSeed, bool asyncOp);

  /// One all-reduce over the tensors laid end to end (all of one dtype), written back
  /// into each: one collective, one Work.
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                     const c10d::AllreduceCoalescedOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;

  /// all_gather of several tensors as one operation: `outputLists[r][i]` receives rank
  /// r's `inputs[i]` (torch's layout, as Gloo takes it).
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputLists,
                                                     std::vector<at::Tensor>& inputs,
                                                     const c10d::AllgatherOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::AllgatherOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                      const c10d::ReduceScatterOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::ReduceScatterOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& outputSplits,
                                               std::vector<int64_t>& inputSplits,
                                               const c10d::AllToAllOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;

  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dstRank, int tag) override;

  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int srcRank, int tag) override;

  /// Receives the first message with `tag` that any other rank sends; the Work's
  /// sourceRank() names the sender once it completed.
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors, int tag) override;

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
                      const char* what);

  /// The tensors flattened and laid end to end in one new host tensor.
  static at::Tensor flatOnHost(const std::vector<at::Tensor>& ts);

  /// One collective over flat host tensors `in` and `out` (the same for in-place ones),
  /// after which each piece's dst gets its src: the coalesced calls' single operation.
  c10::intrusive_ptr<c10d::Work> submitCoalesced(c10d::OpType type, const char* name, const CollOp& op, at::Tensor in,
                                                 at::Tensor out, std::vector<at::Tensor> outputs,
                                                 std::vector<Piece> pieces, bool asyncOp);

  /// An all_reduce of all of `t`'s elements with `rop` (ValueError if `t`'s dtype lacks it).
  CollOp allReduceOp(const at::Tensor& t, const c10d::ReduceOp& rop) const {
    CollOp op;
    op.coll = CollType::kAllReduce;
    op.count = static_cast<size_t>(t.numel());
    op.bytes = t.nbytes();
    op.dtype = toDType(t.scalar_type(), rank_);
    op.op = toReduceOp(rop, op.dtype, rank_);
    return op;
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
                                         CollType coll, const c10d::ReduceOp& rop, int root, bool asyncOp);

  /// An out-of-place collective from `input` into `output` (both defined): over CUDA IPC
  /// when both are on the group's IPC device, else staged through host memory.
  c10::intrusive_ptr<c10d::Work> outOfPlace(const FlatCall& call, at::Tensor output, at::Tensor input, bool asyncOp);

  /// A list form (its result split into `outs`, all on `input`'s device for the IPC
  /// path): the collective runs into one flat tensor of `flatNumel` elements (-1: none,
  /// a non-root gather), on the device for CUDA IPC, else on the host.
  c10::intrusive_ptr<c10d::Work> outOfPlaceList(const FlatCall& call, const at::Tensor& input, int64_t flatNumel,
                                                const std::vector<at::Tensor>& outs, bool asyncOp);

#if defined(PYCOMM_WITH_CUDA)
  c10::intrusive_ptr<c10d::Work> submitCudaFlat(const FlatCall& call, at::Tensor output, at::Tensor input,
                                                bool asyncOp);
#endif

  /// The host path of an out-of-place collective: `input` and `output` staged (either
  /// may be undefined where the collective has none on this rank: the root-only side of
  /// gather and scatter); the list forms' flat host `output` is then split into the
  /// call's tensors.
  c10::intrusive_ptr<c10d::Work> hostFlat(const FlatCall& call, at::Tensor output, at::Tensor input, bool asyncOp);

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
  c10::intrusive_ptr<c10d::Work> submit(Call call, bool asyncOp, CollFn fn);

  std::unique_ptr<C10dStore> store_;         // declared first: destroyed after group_
  CommStreams streams_;                      // CUDA comm streams of this group
  size_t stageChunkBytes_ = 0;               // PYCOMM_CUDA_STAGE_CHUNK_BYTES
  std::unique_ptr<Group> group_;
  std::unique_ptr<CudaCollectives> cuda_;    // refers to group_ and streams_
  c10::intrusive_ptr<c10d::Backend::Options> options_;  // what getBackendOptions() returns
  uint64_t monitoredBarriers_ = 0;           // monitored barriers issued (caller thread)
};

/// Registers PycommBackend and create_backend on the module.
void initBackendBindings(pybind11::module_& m);

}  // namespace pycomm
