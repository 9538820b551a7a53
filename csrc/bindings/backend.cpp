// The pycomm c10d backend: the only layer that knows about torch. It validates and
// stages tensors, then hands raw buffers to the torch-free Group (engine/group.h),
// whose communication thread runs the collective while Python gets a Work back.
#include <pybind11/chrono.h>
#include <pybind11/stl.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <optional>

#if defined(PYCOMM_WITH_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "transport/cuda_ipc.h"
#endif

#include "algorithms/compressed.h"
#include "algorithms/ipc_collectives.h"
#include "core/env.h"
#include "core/error.h"
#include "engine/group.h"
#include "kernels/compress_math.h"
#include "bindings/torch_types.h"

namespace pycomm {

namespace {

// ---- store adapter ---------------------------------------------------------------------------

class C10dStore : public Store {
 public:
  explicit C10dStore(c10::intrusive_ptr<c10d::Store> store) : store_(std::move(store)) {}
  void set(const std::string& key, const std::vector<uint8_t>& value) override { store_->set(key, value); }
  std::vector<uint8_t> get(const std::string& key, std::chrono::milliseconds timeout) override {
    try {
      store_->wait({key}, timeout);
    } catch (const std::exception& e) {
      throw TimeoutError(strCat("pycomm: timed out after ", timeout.count(),
                                " ms waiting for the store key '", key, "' (", e.what(), ")"));
    }
    return store_->get(key);
  }
  int64_t add(const std::string& key, int64_t delta) override { return store_->add(key, delta); }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
};

// ---- tensors -> core types -------------------------------------------------------------------

ReduceOp toReduceOp(const c10d::ReduceOp& op, DType dtype, int rank) {
  ReduceOp r;
  switch (op.op_) {
    case c10d::ReduceOp::SUM: r = ReduceOp::kSum; break;
    case c10d::ReduceOp::AVG: r = ReduceOp::kAvg; break;
    case c10d::ReduceOp::PRODUCT: r = ReduceOp::kProduct; break;
    case c10d::ReduceOp::MIN: r = ReduceOp::kMin; break;
    case c10d::ReduceOp::MAX: r = ReduceOp::kMax; break;
    case c10d::ReduceOp::BAND: r = ReduceOp::kBand; break;
    case c10d::ReduceOp::BOR: r = ReduceOp::kBor; break;
    case c10d::ReduceOp::BXOR: r = ReduceOp::kBxor; break;
    default:
      TORCH_CHECK_VALUE(false, "pycomm rank ", rank, ": unsupported reduce op (", static_cast<int>(op.op_),
                        "); supported: SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR, BXOR");
  }
  TORCH_CHECK_VALUE(reduceOpSupported(dtype, r), "pycomm rank ", rank, ": reduce op ", reduceOpName(r),
                    " is not supported for dtype ", dtypeName(dtype));
  return r;
}

#if defined(PYCOMM_WITH_CUDA)
// Host staging of a CUDA tensor for a collective: the caller's current stream is
// captured by an event when the collective is issued; on the communication thread the
// group's comm stream waits for that event and copies the tensor into a pinned buffer
// (prepare), the collective runs on the host buffer, and the result is copied back on
// the comm stream (finish), which the communication thread synchronises before the
// Work completes. The caller's thread never waits for the device.
struct CudaStage {
  at::cuda::CUDAEvent ready;
  c10::cuda::CUDAStream stream;
  explicit CudaStage(c10::cuda::CUDAStream s) : stream(s) {}
};
#endif

// A tensor as the core sees it: a contiguous CPU buffer. Non-contiguous CPU tensors are
// copied and written back afterwards; CUDA tensors are staged through pinned host memory
// on the group's comm stream (CudaStage), by the thread that runs the operation.
struct Staged {
  at::Tensor orig;
  at::Tensor buf;
  bool copyBack = false;
#if defined(PYCOMM_WITH_CUDA)
  std::shared_ptr<CudaStage> cuda;  // set when the device copies are deferred
#endif
  void* data() const { return buf.data_ptr(); }
  size_t bytes() const { return buf.numel() * buf.element_size(); }
  /// On the communication thread, before the collective: brings a deferred CUDA
  /// tensor's values into the host buffer.
  void prepare() const {
#if defined(PYCOMM_WITH_CUDA)
    if (cuda) {
      c10::cuda::CUDAStreamGuard g(cuda->stream);
      cuda->ready.block(cuda->stream);  // after everything the caller queued before the call
      buf.copy_(orig, /*non_blocking=*/true);
      cuda->stream.synchronize();
    }
#endif
  }
  /// After the collective: writes the result back into an output that was staged.
  void finish() const {
    if (!copyBack) return;
#if defined(PYCOMM_WITH_CUDA)
    if (cuda) {
      c10::cuda::CUDAStreamGuard g(cuda->stream);
      cuda->ready.block(cuda->stream);  // not before the caller's earlier work on the tensor (recv)
      orig.copy_(buf, /*non_blocking=*/true);
      cuda->stream.synchronize();  // the pinned buffer is released with the Work
      return;
    }
#endif
    orig.copy_(buf);
  }
};

void checkTensor(const at::Tensor& t, int rank, const char* what) {
  TORCH_CHECK_VALUE(t.defined(), "pycomm rank ", rank, ": ", what, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "pycomm rank ", rank, ": ", what,
                    " is a sparse tensor; pycomm supports dense (strided) tensors only");
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), "pycomm rank ", rank, ": ", what,
                    " is on device ", t.device(), "; pycomm serves cpu and cuda tensors");
  toDType(t.scalar_type(), rank);
}

/// The communication streams of one group, one per device (created on first use).
class CommStreams {
 public:
#if defined(PYCOMM_WITH_CUDA)
  /// The group's stream on `device`: a pool stream, which never waits on the legacy
  /// default stream.
  c10::cuda::CUDAStream get(c10::DeviceIndex device) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = streams_.find(device);
    if (it == streams_.end()) {
      it = streams_.emplace(device, c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device)).first;
    }
    return it->second;
  }

 private:
  std::mutex mu_;
  std::map<c10::DeviceIndex, c10::cuda::CUDAStream> streams_;
#endif
};

#if defined(PYCOMM_WITH_CUDA)
/// Runs `coll` over a contiguous CUDA tensor in chunks staged through one pinned host
/// buffer, on `stream` (current on the calling thread): the device-to-host copy of chunk
/// i+1 is queued before `coll` runs on chunk i, and the host-to-device copy of chunk i
/// right after it, so both copy directions overlap the network work of the neighbouring
/// chunks; the host waits only for the chunk it is about to send. `copyIn`: the
/// collective reads the tensor; `copyOut`: it writes it. Complete on return.
void stagedChunks(const at::Tensor& t, c10::cuda::CUDAStream stream, size_t chunkBytes, bool copyIn, bool copyOut,
                  const std::function<void(void* host, size_t firstElem, size_t count)>& coll) {
  const size_t esz = t.element_size();
  const size_t n = static_cast<size_t>(t.numel());
  if (n == 0) {
    coll(nullptr, 0, 0);  // every rank still takes part
    return;
  }
  const size_t per = std::max<size_t>(1, chunkBytes / esz);
  const size_t chunks = (n + per - 1) / per;
  at::Tensor pinned = at::empty({static_cast<int64_t>(n * esz)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  char* host = static_cast<char*>(pinned.data_ptr());
  char* dev = static_cast<char*>(t.data_ptr());
  // Chunk i's copy-in is marked by landed[i % 2]: that event is recorded again for
  // chunk i + 2 only after the host has waited for chunk i.
  at::cuda::CUDAEvent landed[2];
  auto first = [&](size_t i) { return i * per; };
  auto len = [&](size_t i) { return std::min(per, n - i * per); };
  auto fetch = [&](size_t i) {
    C10_CUDA_CHECK(cudaMemcpyAsync(host + first(i) * esz, dev + first(i) * esz, len(i) * esz,
                                   cudaMemcpyDeviceToHost, stream.stream()));
    landed[i % 2].record(stream);
  };
  try {
    if (copyIn) fetch(0);
    for (size_t i = 0; i < chunks; ++i) {
      if (copyIn && i + 1 < chunks) fetch(i + 1);  // overlaps coll(i)
      if (copyIn) landed[i % 2].synchronize();
      coll(host + first(i) * esz, first(i), len(i));
      if (copyOut) {  // overlaps coll(i + 1)
        C10_CUDA_CHECK(cudaMemcpyAsync(dev + first(i) * esz, host + first(i) * esz, len(i) * esz,
                                       cudaMemcpyHostToDevice, stream.stream()));
      }
    }
    stream.synchronize();  // the pinned buffer is released on return
  } catch (...) {
    cudaStreamSynchronize(stream.stream());  // copies still queued must not outlive the buffer
    throw;
  }
}
#endif

/// Stages `t` for an operation. A CUDA tensor is copied by the thread that runs the
/// operation (prepare/finish), on its device's stream from `streams`; without pycomm's
/// CUDA code, synchronously here.
Staged stage(const at::Tensor& t, bool isOutput, int rank, const char* what, CommStreams& streams) {
  checkTensor(t, rank, what);
  Staged s;
  s.orig = t;
#if defined(PYCOMM_WITH_CUDA)
  if (t.device().is_cuda()) {
    s.buf = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
    s.copyBack = isOutput;
    s.cuda = std::make_shared<CudaStage>(streams.get(t.device().index()));
    s.cuda->ready.record(c10::cuda::getCurrentCUDAStream(t.device().index()));
    return s;
  }
#else
  (void)streams;
#endif
  if (t.device().is_cpu() && t.is_contiguous()) {
    s.buf = t;
  } else {
    s.buf = t.to(at::kCPU).contiguous();
    if (s.buf.data_ptr() == t.data_ptr()) s.buf = s.buf.clone();
    s.copyBack = isOutput;
  }
  return s;
}

std::vector<c10::Device> cudaDevices(const std::vector<at::Tensor>& ts) {
  std::vector<c10::Device> d;
  for (const auto& t : ts) {
    if (t.device().is_cuda() && std::find(d.begin(), d.end(), t.device()) == d.end()) d.push_back(t.device());
  }
  return d;
}

// ---- Work ------------------------------------------------------------------------------------

class PycommWork : public c10d::Work {
 public:
  PycommWork(int rank, c10d::OpType type, const char* name, std::vector<at::Tensor> outputs,
             std::shared_ptr<Completion> completion, uint64_t seq)
      : c10d::Work(rank, type, name),
        outputs_(std::move(outputs)),
        completion_(std::move(completion)),
        seq_(seq) {
    future_ = c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()),
                                                       cudaDevices(outputs_));
    auto fut = future_;
    auto outs = outputs_;
    completion_->onFinish([fut, outs](std::exception_ptr err) {
      if (err) {
        fut->setError(err);
      } else {
        fut->markCompleted(c10::IValue(outs));
      }
    });
  }

  bool isCompleted() override { return completion_->finished(); }
  bool isSuccess() const override { return completion_->finished() && !completion_->error(); }
  std::exception_ptr exception() const override { return completion_->error(); }
  std::vector<at::Tensor> result() override { return outputs_; }
  uint64_t getSequencenumber() const override { return seq_; }

  bool wait(std::chrono::milliseconds timeout) override {
    const long ms = timeout == kNoTimeout ? -1 : static_cast<long>(timeout.count());
    if (!completion_->waitFor(ms)) {
      TORCH_CHECK(false, "pycomm: Work.wait timed out after ", timeout.count(), " ms");
    }
    if (auto err = completion_->error()) std::rethrow_exception(err);
    return true;
  }

  void synchronize() override {}

  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }

 private:
  std::vector<at::Tensor> outputs_;
  std::shared_ptr<Completion> completion_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
  uint64_t seq_;
};

}  // namespace

// ---- Backend ---------------------------------------------------------------------------------

class PycommBackend;

namespace {
// Process-wide view over every pycomm group of this process, for
// pycomm.stats(group="all"): the live groups plus what finished groups sent.
struct ProcessTotals {
  std::mutex mu;
  std::vector<const PycommBackend*> live;
  std::map<std::string, uint64_t> finished;
};
ProcessTotals& processTotals() {
  static ProcessTotals* t = new ProcessTotals();  // never destroyed: backends may outlive statics
  return *t;
}
}  // namespace

/// torch.distributed backend "pycomm": every collective runs on the group's
/// communication thread; send/recv on their own threads.
class PycommBackend : public c10d::Backend {
 public:
  PycommBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                std::chrono::milliseconds timeout)
      : c10d::Backend(rank, size) {
    // The store adapter lives as long as the group: the TCP transport leaves abort
    // reasons in it for peers.
    store_ = std::make_unique<C10dStore>(store);
    group_ = std::make_unique<Group>(*store_, rank, size, timeout);
#if defined(PYCOMM_WITH_CUDA)
    // CUDA IPC needs every rank on this host, which is when the group runs over shm.
    ipcWanted_ = size > 1 && group_->transportName() == "shm" && envInt("PYCOMM_CUDA_IPC", 1) != 0;
    ipcBufferBytes_ = static_cast<size_t>(std::max<int64_t>(4096, envInt("PYCOMM_CUDA_IPC_BUFFER_BYTES", 8 << 20)));
    stageChunkBytes_ = static_cast<size_t>(std::max<int64_t>(4096, envInt("PYCOMM_CUDA_STAGE_CHUNK_BYTES", 4 << 20)));
    ipcOneShotBytes_ = static_cast<size_t>(std::max<int64_t>(0, envInt("PYCOMM_CUDA_IPC_ONESHOT_BYTES", 256 << 10)));
#endif
    auto& t = processTotals();
    std::lock_guard<std::mutex> g(t.mu);
    t.live.push_back(this);
  }

  ~PycommBackend() override {
    {
      auto& t = processTotals();
      std::lock_guard<std::mutex> g(t.mu);
      t.live.erase(std::remove(t.live.begin(), t.live.end(), this), t.live.end());
      for (const auto& [k, v] : group_->stats()) t.finished[k] += v;
    }
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

  /// Counters summed over every pycomm group this process has created.
  static std::map<std::string, uint64_t> processStats() {
    auto& t = processTotals();
    std::lock_guard<std::mutex> g(t.mu);
    auto s = t.finished;
    for (const PycommBackend* b : t.live) {
      for (const auto& [k, v] : b->group_->stats()) s[k] += v;
    }
    s["groups_live"] = t.live.size();
    return s;
  }

  const std::string getBackendName() const override { return "pycomm"; }

  /// Counters for pycomm.stats().
  std::map<std::string, uint64_t> stats() const {
    auto s = group_->stats();
    s["rank"] = static_cast<uint64_t>(rank_);
    s["world_size"] = static_cast<uint64_t>(size_);
    s["cuda_ipc_collectives"] = cudaIpcCalls_.load();
    s["cuda_staged_chunks"] = cudaStagedChunks_.load();
    return s;
  }

  /// "shm" or "tcp".
  std::string transportName() const { return group_->transportName(); }

  /// Fails all pending and future operations of the group, on every rank.
  void abortGroup(const std::string& why) { group_->abort(why); }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override {
#if defined(PYCOMM_WITH_CUDA)
    if (anyCuda(tensors)) {
      return cudaInPlace(tensors, c10d::OpType::ALLREDUCE, "pycomm:all_reduce", CollType::kAllReduce, opts.reduceOp,
                         -1, opts.asyncOp);
    }
#endif
    std::vector<Staged> st;
    for (auto& t : tensors) st.push_back(stage(t, true, rank_, "all_reduce tensor"));
    auto ops = reduceArgs(st, opts.reduceOp);
    return submit(opts.asyncOp, c10d::OpType::ALLREDUCE, "pycomm:all_reduce", CollType::kAllReduce, tensors, st, -1,
                  [st, ops](Collectives& c, const OpDesc& d, const Deadline& dl) {
                    for (size_t i = 0; i < st.size(); ++i) {
                      c.allReduce(st[i].data(), st[i].buf.numel(), ops[i].first, ops[i].second, d, dl);
                    }
                  },
                  -1, {}, ops.empty() ? ReduceOp::kSum : ops[0].second);
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
    if (codecName == "fp16" || codecName == "bf16") {
      codec = makeHalfCodec(codecName == "bf16", errorFeedback);
    } else if (codecName == "onebit") {
      codec = makeOneBitCodec();
      errorFeedback = true;
    } else if (codecName == "qsgd") {
      TORCH_CHECK_VALUE(bits == 8 || bits == 4, "pycomm rank ", rank_, ": QSGD bits must be 8 or 4, got ", bits);
      codec = makeQsgdCodec(static_cast<int>(bits), errorFeedback, static_cast<uint32_t>(workerSeed),
                            static_cast<uint32_t>(serverSeed));
    } else if (codecName == "none") {
      codec = makeFloatCodec();
      errorFeedback = false;
    } else {
      TORCH_CHECK_VALUE(false, "pycomm rank ", rank_, ": unknown compression codec '", codecName,
                        "' (fp16, bf16, onebit, qsgd, none)");
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
    const uint32_t tag = shared->id();
    return submit(asyncOp, c10d::OpType::ALLREDUCE, "pycomm:compressed_all_reduce", CollType::kCompressed, {t},
                  {Staged{t, t, false}}, -1,
                  [shared, args, keep](Collectives& c, const OpDesc& d, const Deadline& dl) {
                    c.compressedAllReduce(*shared, args, d, dl);
                  },
                  -1, {}, divisor == 1 ? ReduceOp::kSum : ReduceOp::kAvg, tag);
  }

  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                     const c10d::AllreduceCoalescedOptions& opts) override {
    return allreduce(tensors, opts);
  }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override {
    checkRoot(opts.rootRank, "broadcast");
#if defined(PYCOMM_WITH_CUDA)
    if (anyCuda(tensors)) {
      return cudaInPlace(tensors, c10d::OpType::BROADCAST, "pycomm:broadcast", CollType::kBroadcast, c10d::ReduceOp(),
                         static_cast<int>(opts.rootRank), opts.asyncOp);
    }
#endif
    std::vector<Staged> st;
    for (auto& t : tensors) st.push_back(stage(t, true, rank_, "broadcast tensor"));
    return submit(opts.asyncOp, c10d::OpType::BROADCAST, "pycomm:broadcast", CollType::kBroadcast, tensors, st,
                  static_cast<int>(opts.rootRank),
                  [st, root = static_cast<int>(opts.rootRank)](Collectives& c, const OpDesc& d,
                                                               const Deadline& dl) {
                    for (auto& s : st) c.broadcast(s.data(), s.bytes(), root, d, dl);
                  });
  }

  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts) override {
    checkRoot(opts.rootRank, "reduce");
#if defined(PYCOMM_WITH_CUDA)
    if (anyCuda(tensors)) {
      return cudaInPlace(tensors, c10d::OpType::REDUCE, "pycomm:reduce", CollType::kReduce, opts.reduceOp,
                         static_cast<int>(opts.rootRank), opts.asyncOp);
    }
#endif
    std::vector<Staged> st;
    for (auto& t : tensors) st.push_back(stage(t, true, rank_, "reduce tensor"));
    auto ops = reduceArgs(st, opts.reduceOp);
    return submit(opts.asyncOp, c10d::OpType::REDUCE, "pycomm:reduce", CollType::kReduce, tensors, st,
                  static_cast<int>(opts.rootRank),
                  [st, ops, root = static_cast<int>(opts.rootRank)](Collectives& c, const OpDesc& d,
                                                                    const Deadline& dl) {
                    for (size_t i = 0; i < st.size(); ++i) {
                      c.reduce(st[i].data(), st[i].buf.numel(), ops[i].first, ops[i].second, root, d, dl);
                    }
                  },
                  -1, {}, ops.empty() ? ReduceOp::kSum : ops[0].second);
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
#if defined(PYCOMM_WITH_CUDA)
    const auto onInputDevice = [&](const at::Tensor& o) { return o.device() == inputs[0].device(); };
    if (inputs[0].is_cuda() && std::all_of(outs.begin(), outs.end(), onInputDevice) &&
        ipcEligible(inputs[0].device().index())) {
      at::Tensor flat = at::empty({static_cast<int64_t>(size_) * inputs[0].numel()}, inputs[0].options());
      FlatCall call{CollType::kAllGather, c10d::OpType::ALLGATHER, "pycomm:all_gather", "all_gather",
                    inputs[0].numel()};
      call.ops = allGatherOps(inputs[0].nbytes());
      call.splitInto = outs;
      if (auto w = cudaIpcFlat(flat, inputs[0], call, opts.asyncOp)) {
        return w;
      }
    }
#endif
    Staged in = stage(inputs[0], false, rank_, "all_gather input");
    at::Tensor flat = at::empty({static_cast<int64_t>(size_) * inputs[0].numel()},
                                inputs[0].options().device(at::kCPU));
    std::vector<at::Tensor> outsCopy = outs;
    return submit(opts.asyncOp, c10d::OpType::ALLGATHER, "pycomm:all_gather", CollType::kAllGather, outs, {in}, -1,
                  [in, flat, outsCopy](Collectives& c, const OpDesc& d, const Deadline& dl) {
                    c.allGather(in.data(), flat.data_ptr(), in.bytes(), d, dl);
                    auto parts = flat.chunk(static_cast<int64_t>(outsCopy.size()));
                    for (size_t i = 0; i < outsCopy.size(); ++i) {
                      outsCopy[i].copy_(parts[i].view(outsCopy[i].sizes()));
                    }
                  },
                  inputs[0].numel());
  }

  c10::intrusive_ptr<c10d::Work> allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputLists,
                                                     std::vector<at::Tensor>& inputs,
                                                     const c10d::AllgatherOptions& opts) override {
    TORCH_CHECK_VALUE(outputLists.size() == inputs.size(), "pycomm rank ", rank_,
                      ": allgather_coalesced needs one output list per input");
    c10::intrusive_ptr<c10d::Work> last;
    for (size_t i = 0; i < inputs.size(); ++i) {
      std::vector<std::vector<at::Tensor>> o{outputLists[i]};
      std::vector<at::Tensor> in{inputs[i]};
      last = allgather(o, in, opts);
    }
    return last ? last : barrier(c10d::BarrierOptions());
  }

  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override {
    TORCH_CHECK_VALUE(output.numel() == input.numel() * size_, "pycomm rank ", rank_,
                      ": all_gather_into_tensor output has ", output.numel(), " elements, expected ",
                      input.numel() * size_, " (input ", input.numel(), " x ", size_, " ranks)");
    checkSameDType(output, input, "all_gather_into_tensor");
#if defined(PYCOMM_WITH_CUDA)
    FlatCall call{CollType::kAllGather, c10d::OpType::_ALLGATHER_BASE, "pycomm:all_gather_into_tensor", "all_gather",
                  input.numel()};
    call.ops = allGatherOps(input.nbytes());
    if (auto w = cudaIpcFlat(output, input, call, opts.asyncOp)) {
      return w;
    }
#endif
    Staged in = stage(input, false, rank_, "all_gather input");
    Staged out = stage(output, true, rank_, "all_gather output");
    std::vector<at::Tensor> outs{output};
    return submit(opts.asyncOp, c10d::OpType::_ALLGATHER_BASE, "pycomm:all_gather_into_tensor", CollType::kAllGather,
                  outs, {in, out}, -1,
                  [in, out](Collectives& c, const OpDesc& d, const Deadline& dl) {
                    c.allGather(in.data(), out.data(), in.bytes(), d, dl);
                  },
                  input.numel(), {out});
  }

  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::AllgatherOptions& opts) override {
    TORCH_CHECK_VALUE(outputs.size() == inputs.size(), "pycomm rank ", rank_,
                      ": coalesced all_gather needs as many outputs as inputs");
    c10::intrusive_ptr<c10d::Work> last;
    for (size_t i = 0; i < inputs.size(); ++i) last = _allgather_base(outputs[i], inputs[i], opts);
    return last ? last : barrier(c10d::BarrierOptions());
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
#if defined(PYCOMM_WITH_CUDA)
    checkTensor(inputs[0], rank_, "gather input");
    const auto onInputDevice = [&](const at::Tensor& o) { return o.device() == inputs[0].device(); };
    if (inputs[0].is_cuda() && std::all_of(outs.begin(), outs.end(), onInputDevice) &&
        ipcEligible(inputs[0].device().index())) {
      // The root gathers into one flat device tensor; the others have no output.
      at::Tensor flat = at::empty({rank_ == root ? static_cast<int64_t>(size_) * inputs[0].numel() : 0},
                                  inputs[0].options());
      FlatCall call{CollType::kGather, c10d::OpType::GATHER, "pycomm:gather", "gather", inputs[0].numel()};
      call.root = root;
      const size_t bytes = inputs[0].nbytes();
      call.ops = {[bytes, root, this](IpcCollectives& ipc, const void* in, void* out, Collectives& c,
                                      const OpDesc& d, const Deadline& dl) {
                    ipc.gather(in, rank_ == root ? out : nullptr, bytes, root, c, d, dl);
                  },
                  [bytes, root, this](Collectives& c, const void* in, void* out, const OpDesc& d, const Deadline& dl) {
                    c.gather(in, rank_ == root ? out : nullptr, bytes, root, d, dl);
                  }};
      call.splitInto = outs;
      if (auto w = cudaIpcFlat(flat, inputs[0], call, opts.asyncOp)) return w;
    }
#endif
    Staged in = stage(inputs[0], false, rank_, "gather input");
    at::Tensor flat = rank_ == root ? at::empty({static_cast<int64_t>(size_) * inputs[0].numel()},
                                                inputs[0].options().device(at::kCPU))
                                    : at::Tensor();
    return submit(opts.asyncOp, c10d::OpType::GATHER, "pycomm:gather", CollType::kGather, outs, {in}, root,
                  [in, flat, outs, root](Collectives& c, const OpDesc& d, const Deadline& dl) {
                    c.gather(in.data(), flat.defined() ? flat.data_ptr() : nullptr, in.bytes(), root, d, dl);
                    if (flat.defined()) {
                      auto parts = flat.chunk(static_cast<int64_t>(outs.size()));
                      for (size_t i = 0; i < outs.size(); ++i) outs[i].copy_(parts[i].view(outs[i].sizes()));
                    }
                  },
                  inputs[0].numel());
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
#if defined(PYCOMM_WITH_CUDA)
    checkTensor(outputs[0], rank_, "scatter output");
    if (outputs[0].is_cuda() && (!flat.defined() || flat.device() == outputs[0].device()) &&
        ipcEligible(outputs[0].device().index())) {
      // Only the root has an input.
      at::Tensor in = flat.defined() ? flat : at::empty({0}, outputs[0].options());
      FlatCall call{CollType::kScatter, c10d::OpType::SCATTER, "pycomm:scatter", "scatter", outputs[0].numel()};
      call.root = root;
      const size_t bytes = outputs[0].nbytes();
      call.ops = {[bytes, root, this](IpcCollectives& ipc, const void* in, void* out, Collectives& c,
                                      const OpDesc& d, const Deadline& dl) {
                    ipc.scatter(rank_ == root ? in : nullptr, out, bytes, root, c, d, dl);
                  },
                  [bytes, root, this](Collectives& c, const void* in, void* out, const OpDesc& d, const Deadline& dl) {
                    c.scatter(rank_ == root ? in : nullptr, out, bytes, root, d, dl);
                  }};
      if (auto w = cudaIpcFlat(outputs[0], in, call, opts.asyncOp)) return w;
    }
#endif
    Staged out = stage(outputs[0], true, rank_, "scatter output");
    std::vector<Staged> staged{out};
    std::optional<Staged> in;
    if (flat.defined()) staged.push_back(*(in = stage(flat, false, rank_, "scatter input")));
    return submit(opts.asyncOp, c10d::OpType::SCATTER, "pycomm:scatter", CollType::kScatter, outputs, staged, root,
                  [out, in, root](Collectives& c, const OpDesc& d, const Deadline& dl) {
                    c.scatter(in ? in->data() : nullptr, out.data(), out.bytes(), root, d, dl);
                  },
                  outputs[0].numel(), {out});
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
#if defined(PYCOMM_WITH_CUDA)
    if (input.is_cuda()) {
      checkTensor(input, rank_, "reduce_scatter input");
      const DType dt = toDType(input.scalar_type(), rank_);
      const ReduceOp op = toReduceOp(opts.reduceOp, dt, rank_);
      const size_t count = static_cast<size_t>(output.numel());
      FlatCall call{CollType::kReduceScatter, c10d::OpType::_REDUCE_SCATTER_BASE, "pycomm:reduce_scatter",
                    "reduce_scatter", output.numel(), op};
      call.ops = {[count, dt, op](IpcCollectives& ipc, const void* in, void* out, Collectives& c, const OpDesc& d,
                                  const Deadline& dl) { ipc.reduceScatter(in, out, count, dt, op, c, d, dl); },
                  [count, dt, op](Collectives& c, const void* in, void* out, const OpDesc& d, const Deadline& dl) {
                    c.reduceScatter(in, out, count, dt, op, d, dl);
                  }};
      if (auto w = cudaIpcFlat(output, input, call, opts.asyncOp)) {
        return w;
      }
    }
#endif
    Staged in = stage(input, false, rank_, "reduce_scatter input");
    Staged out = stage(output, true, rank_, "reduce_scatter output");
    if (out.buf.data_ptr() == in.buf.data_ptr() && out.bytes() > 0) out.buf = out.buf.clone(), out.copyBack = true;
    auto ops = reduceArgs({out}, opts.reduceOp);
    std::vector<at::Tensor> outs{output};
    return submit(opts.asyncOp, c10d::OpType::_REDUCE_SCATTER_BASE, "pycomm:reduce_scatter", CollType::kReduceScatter,
                  outs, {in, out}, -1,
                  [in, out, ops](Collectives& c, const OpDesc& d, const Deadline& dl) {
                    c.reduceScatter(in.data(), out.data(), out.buf.numel(), ops[0].first, ops[0].second, d, dl);
                  },
                  output.numel(), {out}, ops[0].second);
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::ReduceScatterOptions& opts) override {
    TORCH_CHECK_VALUE(outputs.size() == inputs.size(), "pycomm rank ", rank_,
                      ": coalesced reduce_scatter needs as many outputs as inputs");
    c10::intrusive_ptr<c10d::Work> last;
    for (size_t i = 0; i < inputs.size(); ++i) last = _reduce_scatter_base(outputs[i], inputs[i], opts);
    return last ? last : barrier(c10d::BarrierOptions());
  }

  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& outputSplits,
                                               std::vector<int64_t>& inputSplits,
                                               const c10d::AllToAllOptions& opts) override {
    checkSameDType(output, input, "all_to_all_single");
    const bool equal = outputSplits.empty() && inputSplits.empty();
    auto splits = [&](const at::Tensor& t, const std::vector<int64_t>& sp, const char* which) {
      std::vector<size_t> sizes(size_), offsets(size_);
      const int64_t rows = t.dim() > 0 ? t.size(0) : 0;
      const size_t rowBytes = rows > 0 ? t.numel() / rows * t.element_size() : 0;
      if (sp.empty()) {
        TORCH_CHECK_VALUE(rows % size_ == 0, "pycomm rank ", rank_, ": all_to_all_single ", which,
                          " dim 0 (", rows, ") is not divisible by the group size ", size_);
        for (int p = 0; p < size_; ++p) sizes[p] = rows / size_ * rowBytes;
      } else {
        TORCH_CHECK_VALUE(static_cast<int>(sp.size()) == size_, "pycomm rank ", rank_, ": all_to_all_single ",
                          which, " split sizes have ", sp.size(), " entries, the group has ", size_, " ranks");
        int64_t total = 0;
        for (int p = 0; p < size_; ++p) {
          TORCH_CHECK_VALUE(sp[p] >= 0, "pycomm rank ", rank_, ": negative split size");
          sizes[p] = static_cast<size_t>(sp[p]) * rowBytes;
          total += sp[p];
        }
        TORCH_CHECK_VALUE(total == rows, "pycomm rank ", rank_, ": all_to_all_single ", which,
                          " split sizes sum to ", total, " but dim 0 is ", rows);
      }
      size_t off = 0;
      for (int p = 0; p < size_; ++p) {
        offsets[p] = off;
        off += sizes[p];
      }
      return std::make_pair(offsets, sizes);
    };
    auto [sendOff, sendBytes] = splits(input, inputSplits, "input");
    auto [recvOff, recvBytes] = splits(output, outputSplits, "output");
#if defined(PYCOMM_WITH_CUDA)
    FlatCall call{CollType::kAllToAll, c10d::OpType::ALLTOALL_BASE, "pycomm:all_to_all_single", "all_to_all",
                  equal ? input.numel() : 0};
    call.ops = allToAllOps(sendOff, sendBytes, recvOff, recvBytes);
    if (auto w = cudaIpcFlat(output, input, call, opts.asyncOp)) {
      return w;
    }
#endif
    Staged in = stage(input, false, rank_, "all_to_all input");
    Staged out = stage(output, true, rank_, "all_to_all output");
    std::vector<at::Tensor> outs{output};
    return submit(opts.asyncOp, c10d::OpType::ALLTOALL_BASE, "pycomm:all_to_all_single", CollType::kAllToAll, outs,
                  {in, out}, -1,
                  [in, out, sendOff, sendBytes, recvOff, recvBytes](Collectives& c, const OpDesc& d,
                                                                    const Deadline& dl) {
                    c.allToAll(in.data(), sendOff, sendBytes, out.data(), recvOff, recvBytes, d, dl);
                  },
                  equal ? input.numel() : 0, {out});
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
#if defined(PYCOMM_WITH_CUDA)
    const auto onInputDevice = [&](const at::Tensor& o) { return o.device() == inFlat.device(); };
    if (inFlat.is_cuda() && std::all_of(outputs.begin(), outputs.end(), onInputDevice) &&
        ipcEligible(inFlat.device().index())) {
      at::Tensor outFlat = at::empty({outCount}, inFlat.options());
      FlatCall call{CollType::kAllToAll, c10d::OpType::ALLTOALL, "pycomm:all_to_all", "all_to_all", 0};
      call.ops = allToAllOps(sendOff, sendBytes, recvOff, recvBytes);
      call.splitInto = outputs;
      if (auto w = cudaIpcFlat(outFlat, inFlat, call, opts.asyncOp)) {
        return w;
      }
    }
#endif
    Staged in = stage(inFlat, false, rank_, "all_to_all input");
    at::Tensor outFlat = at::empty({outCount}, outputs[0].options().device(at::kCPU));
    std::vector<at::Tensor> outs = outputs;
    return submit(opts.asyncOp, c10d::OpType::ALLTOALL, "pycomm:all_to_all", CollType::kAllToAll, outs, {in}, -1,
                  [in, outFlat, outs, sendOff, sendBytes, recvOff, recvBytes](
                      Collectives& c, const OpDesc& d, const Deadline& dl) {
                    c.allToAll(in.data(), sendOff, sendBytes, outFlat.data_ptr(), recvOff, recvBytes, d, dl);
                    int64_t off = 0;
                    for (auto& o : outs) {
                      o.copy_(outFlat.narrow(0, off, o.numel()).view(o.sizes()));
                      off += o.numel();
                    }
                  },
                  0);
  }

  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override {
    return submit(opts.asyncOp, c10d::OpType::BARRIER, "pycomm:barrier", CollType::kBarrier, {}, {}, -1,
                  [](Collectives& c, const OpDesc& d, const Deadline& dl) { c.barrier(d, dl); });
  }

  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dstRank, int tag) override {
    TORCH_CHECK_VALUE(tensors.size() == 1, "pycomm rank ", rank_, ": send takes one tensor");
    TORCH_CHECK_VALUE(dstRank >= 0 && dstRank < size_ && dstRank != rank_, "pycomm rank ", rank_,
                      ": send to invalid rank ", dstRank, " (group size ", size_, ")");
    // A CUDA tensor is copied to pinned memory on the send thread, after the caller's
    // current stream (Staged::prepare): the caller's thread does not wait for the device.
    Staged s = stage(tensors[0], false, rank_, "send tensor");
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
    Staged s = stage(tensors[0], true, rank_, "recv tensor");
    auto c = group_->submitRecv(srcRank, s.data(), s.bytes(), static_cast<uint32_t>(tag), [s] {
      at::NoGradGuard noGrad;
      s.finish();
    });
    return c10::make_intrusive<PycommWork>(rank_, c10d::OpType::RECV, "pycomm:recv", tensors, c, 0);
  }

  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>&, int) override {
    TORCH_CHECK(false, "pycomm rank ", rank_, ": recv from any source is not supported; name the source rank");
  }

 private:
  using CollFn = std::function<void(Collectives&, const OpDesc&, const Deadline&)>;

#if defined(PYCOMM_WITH_CUDA)
  /// Header tag of collectives that take the CUDA IPC path: a rank that stages instead
  /// (its tensor on another device, PYCOMM_CUDA_IPC set differently) is a mismatch.
  static constexpr uint32_t kCudaIpcTag = 0x43495043;  // "CIPC"

  static bool anyCuda(const std::vector<at::Tensor>& ts) {
    return std::any_of(ts.begin(), ts.end(), [](const at::Tensor& t) { return t.defined() && t.is_cuda(); });
  }

  /// True if a collective on `dev` takes the CUDA IPC path: the group's ranks share one
  /// host and `dev` is the group's IPC device, which the first CUDA collective that could
  /// take the path picks (the same call on every rank, so every rank decides alike).
  bool ipcEligible(c10::DeviceIndex dev) {
    if (!ipcWanted_) return false;
    c10::DeviceIndex none = -1;
    ipcDevice_.compare_exchange_strong(none, dev);
    return ipcDevice_.load() == dev;
  }

  /// all_reduce, broadcast and reduce of CUDA tensors, in place, on the group's comm
  /// stream for their device (after the caller's current stream, captured now).
  /// They go over CUDA IPC when the group's ranks share one host (see ipcEligible,
  /// ipcFor), and are staged through pinned host memory in overlapped chunks otherwise
  /// (stagedChunks).
  c10::intrusive_ptr<c10d::Work> cudaInPlace(std::vector<at::Tensor>& tensors, c10d::OpType type, const char* name,
                                             CollType coll, const c10d::ReduceOp& rop, int root, bool asyncOp) {
    const char* what = coll == CollType::kAllReduce ? "all_reduce tensor"
                       : coll == CollType::kBroadcast ? "broadcast tensor"
                                                      : "reduce tensor";
    for (auto& t : tensors) {
      checkTensor(t, rank_, what);
      TORCH_CHECK_VALUE(t.device() == tensors[0].device(), "pycomm rank ", rank_, ": the tensors of one ", name + 7 /* past "pycomm:" */,
                        " must be on one device, got ", tensors[0].device(), " and ", t.device());
    }
    const c10::DeviceIndex dev = tensors[0].device().index();
    std::vector<Staged> st;
    for (auto& t : tensors) st.push_back(Staged{t, t, false});
    std::vector<std::pair<DType, ReduceOp>> ops;
    if (coll == CollType::kBroadcast) {
      for (auto& t : tensors) ops.emplace_back(toDType(t.scalar_type(), rank_), ReduceOp::kSum);
    } else {
      ops = reduceArgs(st, rop);
    }
    const bool ipc = ipcEligible(dev);
    auto cs = std::make_shared<CudaStage>(streams_.get(dev));
    cs->ready.record(c10::cuda::getCurrentCUDAStream(dev));
    return submit(
        asyncOp, type, name, coll, tensors, st, root,
        [this, st, ops, cs, ipc, coll, root, dev](Collectives& c, const OpDesc& d, const Deadline& dl) {
          c10::cuda::CUDAGuard device(dev);
          c10::cuda::CUDAStreamGuard guard(cs->stream);
          cs->ready.block(cs->stream);  // after everything the caller queued before the call
          IpcCollectives* ar = ipc ? ipcFor(c, d, dl, dev, cs->stream) : nullptr;
          for (size_t i = 0; i < st.size(); ++i) {
            const at::Tensor& t = st[i].orig;
            at::Tensor work = t.is_contiguous() ? t : t.contiguous();  // on the comm stream
            const DType dt = ops[i].first;
            const ReduceOp op = ops[i].second;
            if (ar) {
              if (coll == CollType::kAllReduce) {
                ar->allReduce(work.data_ptr(), static_cast<size_t>(work.numel()), dt, op, c, d, dl);
              } else if (coll == CollType::kBroadcast) {
                ar->broadcast(work.data_ptr(), work.nbytes(), root, c, d, dl);
              } else {
                ar->reduce(work.data_ptr(), static_cast<size_t>(work.numel()), dt, op, root, c, d, dl);
              }
              cudaIpcCalls_.fetch_add(1);
            } else {
              const bool in = coll != CollType::kBroadcast || rank_ == root;
              const bool out = coll == CollType::kAllReduce || (coll == CollType::kBroadcast) != (rank_ == root);
              const size_t esz = work.element_size();
              stagedChunks(work, cs->stream, stageChunkBytes_, in, out, [&](void* h, size_t, size_t cnt) {
                if (coll == CollType::kAllReduce) {
                  c.allReduce(h, cnt, dt, op, d, dl);
                } else if (coll == CollType::kBroadcast) {
                  c.broadcast(h, cnt * esz, root, d, dl);
                } else {
                  c.reduce(h, cnt, dt, op, root, d, dl);
                }
                cudaStagedChunks_.fetch_add(1);
              });
            }
            if (!work.is_same(t)) t.copy_(work);
          }
          cs->stream.synchronize();
        },
        -1, {}, ops.empty() ? ReduceOp::kSum : ops[0].second, ipc ? kCudaIpcTag : 0);
  }

  /// What an out-of-place collective runs on contiguous buffers: over the group's CUDA
  /// IPC collectives (device pointers), or, if IPC could not be set up on this group, over
  /// the host transport (whole tensors copied through pinned host memory).
  struct FlatOps {
    std::function<void(IpcCollectives&, const void* in, void* out, Collectives&, const OpDesc&, const Deadline&)>
        onIpc;
    std::function<void(Collectives&, const void* in, void* out, const OpDesc&, const Deadline&)> onHost;
  };

  /// One out-of-place collective for cudaIpcFlat: what the header says (as the host
  /// path's would), the operation, and for the list forms where its result goes.
  struct FlatCall {
    CollType coll;
    c10d::OpType type;
    const char* name;  // "pycomm:..." (the Work's)
    const char* what;  // the collective in messages
    int64_t count;
    ReduceOp op = ReduceOp::kSum;
    int root = -1;
    FlatOps ops;
    /// List forms: after the collective, output's consecutive parts are copied into these
    /// tensors on the comm stream, and they (not output) are the Work's outputs.
    std::optional<std::vector<at::Tensor>> splitInto = std::nullopt;
  };

  /// An out-of-place collective (all_gather, reduce_scatter, all_to_all, gather, scatter
  /// and their list forms) over CUDA IPC, when both tensors are on the group's IPC device
  /// (ipcEligible); null otherwise, and the caller stages them through host memory.
  c10::intrusive_ptr<c10d::Work> cudaIpcFlat(at::Tensor& output, at::Tensor& input, FlatCall call, bool asyncOp) {
    checkTensor(input, rank_, (std::string(call.what) + " input").c_str());
    checkTensor(output, rank_, (std::string(call.what) + " output").c_str());
    if (!input.is_cuda() || input.device() != output.device() || !ipcEligible(input.device().index())) return {};
    const c10::DeviceIndex dev = input.device().index();
    auto cs = std::make_shared<CudaStage>(streams_.get(dev));
    cs->ready.record(c10::cuda::getCurrentCUDAStream(dev));
    const std::vector<at::Tensor> splitInto = call.splitInto.value_or(std::vector<at::Tensor>{});
    const std::vector<at::Tensor> workOutputs = call.splitInto ? splitInto : std::vector<at::Tensor>{output};
    const CollType coll = call.coll;
    const FlatOps ops = call.ops;
    return submit(
        asyncOp, call.type, call.name, coll, workOutputs, {Staged{input, input, false}, Staged{output, output, false}},
        call.root,
        [this, input, output, splitInto, cs, dev, coll, ops](Collectives& c, const OpDesc& d, const Deadline& dl) {
          c10::cuda::CUDAGuard device(dev);
          c10::cuda::CUDAStreamGuard guard(cs->stream);
          cs->ready.block(cs->stream);  // after everything the caller queued before the call
          at::Tensor in = input.contiguous();
          at::Tensor out = output.is_contiguous() ? output : at::empty_like(output, at::MemoryFormat::Contiguous);
          const char* a = static_cast<const char*>(in.data_ptr());
          const char* b = static_cast<const char*>(out.data_ptr());
          const bool overlap = a < b + out.nbytes() && b < a + in.nbytes();
          // all_gather's input may be this rank's block of its output; nothing else may overlap.
          if (coll != CollType::kAllGather && overlap && out.nbytes() > 0) in = in.clone();
          if (IpcCollectives* ipc = ipcFor(c, d, dl, dev, cs->stream)) {
            ops.onIpc(*ipc, in.data_ptr(), out.data_ptr(), c, d, dl);
            cudaIpcCalls_.fetch_add(1);
          } else {  // IPC could not be set up on this group: whole tensors through pinned memory
            auto pinned = [](const at::Tensor& t) {
              return at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
            };
            at::Tensor hin = pinned(in), hout = pinned(out);
            hin.copy_(in, /*non_blocking=*/true);
            cs->stream.synchronize();
            ops.onHost(c, hin.data_ptr(), hout.data_ptr(), d, dl);
            out.copy_(hout, /*non_blocking=*/true);
          }
          if (!out.is_same(output)) output.copy_(out);
          if (!splitInto.empty()) {
            const at::Tensor whole = output.reshape({-1});
            int64_t off = 0;
            for (const at::Tensor& o : splitInto) {
              o.copy_(whole.narrow(0, off, o.numel()).view(o.sizes()));
              off += o.numel();
            }
          }
          cs->stream.synchronize();
        },
        call.count, {}, call.op, kCudaIpcTag);
  }

  static FlatOps allGatherOps(size_t bytesPerRank) {
    return {[bytesPerRank](IpcCollectives& ipc, const void* in, void* out, Collectives& c, const OpDesc& d,
                           const Deadline& dl) { ipc.allGather(in, out, bytesPerRank, c, d, dl); },
            [bytesPerRank](Collectives& c, const void* in, void* out, const OpDesc& d, const Deadline& dl) {
              c.allGather(in, out, bytesPerRank, d, dl);
            }};
  }

  static FlatOps allToAllOps(std::vector<size_t> sendOff, std::vector<size_t> sendBytes, std::vector<size_t> recvOff,
                             std::vector<size_t> recvBytes) {
    return {[=](IpcCollectives& ipc, const void* in, void* out, Collectives& c, const OpDesc& d, const Deadline& dl) {
              ipc.allToAll(in, sendOff, sendBytes, out, recvOff, recvBytes, c, d, dl);
            },
            [=](Collectives& c, const void* in, void* out, const OpDesc& d, const Deadline& dl) {
              c.allToAll(in, sendOff, sendBytes, out, recvOff, recvBytes, d, dl);
            }};
  }

  /// The group's IPC collectives, set up on first use (collectively: every rank's first
  /// IPC collective is the same operation). Null, on every rank, if any rank cannot map
  /// its peers' memory; the group then stages through host memory for good.
  IpcCollectives* ipcFor(Collectives& c, const OpDesc& d, const Deadline& dl, c10::DeviceIndex dev,
                       c10::cuda::CUDAStream stream) {
    if (!ipcTried_) {
      ipcTried_ = true;
      std::string why;
      ipc_ = IpcCollectives::create([&] { return makeCudaIpcDevice(dev, stream.stream()); }, *store_,
                                  group_->keyPrefix() + "ipc/", c, ipcBufferBytes_, ipcOneShotBytes_, d, dl, &why);
      if (!ipc_) {
        std::fprintf(stderr,
                     "pycomm rank %d: CUDA IPC unavailable (%s); CUDA collectives are staged through host "
                     "memory\n",
                     rank_, why.c_str());
      }
    }
    return ipc_.get();
  }
#endif

  /// The tensors of a list argument (one dtype, one device) flattened into one tensor on
  /// that device. On a CUDA device the copies are queued on the caller's current stream,
  /// which the collective's staging waits for: the caller's thread never waits for the GPU.
  at::Tensor concatOnDevice(const std::vector<at::Tensor>& ts, const char* what) {
    std::vector<at::Tensor> parts;
    for (auto& t : ts) {
      checkTensor(t, rank_, what);
      checkSameDType(t, ts[0], what);
      TORCH_CHECK_VALUE(t.device() == ts[0].device(), "pycomm rank ", rank_, ": the ", what,
                        " tensors must be on one device, got ", ts[0].device(), " and ", t.device());
      parts.push_back(t.reshape({-1}));
    }
    at::NoGradGuard noGrad;
    return at::cat(parts);
  }

  /// Stages with this group's comm streams (see the free function).
  Staged stage(const at::Tensor& t, bool isOutput, int rank, const char* what) {
    return pycomm::stage(t, isOutput, rank, what, streams_);
  }

  std::vector<std::pair<DType, ReduceOp>> reduceArgs(const std::vector<Staged>& st, const c10d::ReduceOp& op) {
    std::vector<std::pair<DType, ReduceOp>> r;
    for (auto& s : st) {
      DType dt = toDType(s.buf.scalar_type(), rank_);
      r.emplace_back(dt, toReduceOp(op, dt, rank_));
    }
    return r;
  }

  void checkRoot(int64_t root, const char* what) {
    TORCH_CHECK_VALUE(root >= 0 && root < size_, "pycomm rank ", rank_, ": ", what, " root ", root,
                      " is out of range for a group of ", size_, " ranks");
  }

  void checkSameShape(const at::Tensor& a, const at::Tensor& b, const char* what) {
    checkTensor(a, rank_, what);
    TORCH_CHECK_VALUE(a.numel() == b.numel(), "pycomm rank ", rank_, ": ", what, " has ", a.numel(),
                      " elements, expected ", b.numel());
    checkSameDType(a, b, what);
  }

  void checkSameDType(const at::Tensor& a, const at::Tensor& b, const char* what) {
    TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "pycomm rank ", rank_, ": ", what, " mixes dtypes ",
                     a.scalar_type(), " and ", b.scalar_type());
  }

  // Queues `fn`; staged outputs in `copyBack` (default: all of `staged`) are written
  // back to their original tensors on the communication thread after the collective.
  c10::intrusive_ptr<c10d::Work> submit(bool asyncOp, c10d::OpType type, const char* name, CollType coll,
                                        std::vector<at::Tensor> outputs, std::vector<Staged> staged, int root,
                                        CollFn fn, int64_t count = -1, std::vector<Staged> copyBack = {},
                                        ReduceOp op = ReduceOp::kSum, uint32_t tag = 0) {
    OpDesc desc;
    desc.seq = group_->nextSeq();
    desc.coll = coll;
    desc.root = root;
    desc.tag = tag;
    if (!staged.empty()) {
      desc.dtype = toDType(staged[0].buf.scalar_type(), rank_);
      desc.count = count >= 0 ? static_cast<uint64_t>(count) : static_cast<uint64_t>(staged[0].buf.numel());
    }
    desc.op = op;  // part of the header: ranks reducing with different ops are a mismatch
    if (copyBack.empty()) copyBack = staged;
    // A synchronous call (async_op=False) runs on the caller's thread when the comm
    // thread is idle: no hand-off to the worker and back for small, latency-bound calls.
    auto c = group_->submitCollective(!asyncOp,
        [fn = std::move(fn), desc, copyBack = std::move(copyBack), staged](Collectives& cs, const Deadline& dl) {
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
        });
    return c10::make_intrusive<PycommWork>(rank_, type, name, std::move(outputs), c, desc.seq);
  }

  std::unique_ptr<C10dStore> store_;  // declared first: destroyed after group_
  CommStreams streams_;                // CUDA comm streams of this group
  std::atomic<uint64_t> cudaIpcCalls_{0};      // collectives run over CUDA IPC
  std::atomic<uint64_t> cudaStagedChunks_{0};  // chunks of CUDA tensors staged through host memory
#if defined(PYCOMM_WITH_CUDA)
  bool ipcWanted_ = false;                     // one host, PYCOMM_CUDA_IPC not 0
  size_t ipcBufferBytes_ = 0;                  // PYCOMM_CUDA_IPC_BUFFER_BYTES
  size_t stageChunkBytes_ = 0;                 // PYCOMM_CUDA_STAGE_CHUNK_BYTES
  size_t ipcOneShotBytes_ = 0;                 // PYCOMM_CUDA_IPC_ONESHOT_BYTES
  std::atomic<c10::DeviceIndex> ipcDevice_{-1};  // picked by the first IPC-capable CUDA collective
  bool ipcTried_ = false;                      // collectives only (one at a time)
  std::unique_ptr<IpcCollectives> ipc_;          // destroyed after group_'s threads are gone
#endif
  std::unique_ptr<Group> group_;
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
           "Pipelined compressed all-reduce in place (native path of pycomm.compression); returns a Work");
  m.def("process_stats", &PycommBackend::processStats,
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
