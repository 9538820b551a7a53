// The pycomm c10d backend's construction, its c10d collectives (one override each)
// and its Python bindings; see backend.h for how the class is split across files.
#include <pybind11/chrono.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "bindings/arguments.h"
#include "bindings/backend.h"
#include "bindings/process_stats.h"
#include "bindings/torch_types.h"
#include "bindings/work.h"
#include "core/env.h"
#include "core/error.h"
#include "engine/monitored_barrier.h"

namespace pycomm {

PycommBackend::PycommBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                             std::chrono::milliseconds timeout)
    : c10d::Backend(rank, size), options_(c10::make_intrusive<c10d::Backend::Options>("pycomm", timeout)) {
  // The store adapter lives as long as the group: the TCP transport leaves abort
  // reasons in it for peers, and the CUDA IPC setup rendezvous through it later.
  store_ = std::make_unique<C10dStore>(store);
  group_ = std::make_unique<Group>(*store_, rank, size, timeout);
  cuda_ = std::make_unique<CudaCollectives>(*group_, streams_);
  stageChunkBytes_ = static_cast<size_t>(std::max<int64_t>(4096, envInt("PYCOMM_CUDA_STAGE_CHUNK_BYTES", 4 << 20)));
  processStatsAdd(group_.get());
}

PycommBackend::~PycommBackend() {
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

c10::intrusive_ptr<c10d::Backend> PycommBackend::split(const c10::intrusive_ptr<c10d::Store>& store, const std::vector<int>& ranks,
                                                       const c10::intrusive_ptr<c10d::Backend::Options>& opts) {
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

void PycommBackend::monitoredBarrier(const c10d::BarrierOptions& opts, bool waitAllRanks) {
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

std::map<std::string, uint64_t> PycommBackend::stats() const {
  auto s = group_->stats();
  s["rank"] = static_cast<uint64_t>(rank_);
  s["world_size"] = static_cast<uint64_t>(size_);
  for (const auto& [k, v] : cuda_->stats()) s[k] = v;
  return s;
}

c10::intrusive_ptr<c10d::Work> PycommBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                        const c10d::AllreduceOptions& opts) {
  if (tensors.size() == 1 && tensors[0].defined() && tensors[0].is_sparse()) {
    return sparseAllReduce(tensors[0], opts);
  }
  return inPlace(tensors, c10d::OpType::ALLREDUCE, "pycomm:all_reduce", CollType::kAllReduce, opts.reduceOp, -1,
                 opts.asyncOp);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::allreduceOut(at::Tensor output, at::Tensor input, int64_t op,
                                                           bool asyncOp) {
  checkTensor(input, rank_, "all_reduce input");
  checkTensor(output, rank_, "all_reduce output");
  checkSameShape(output, input, "all_reduce output");
  TORCH_CHECK_VALUE(output.device() == input.device(), "pycomm rank ", rank_, ": all_reduce output is on ",
                    output.device(), ", its input on ", input.device());
  TORCH_CHECK_VALUE(op >= 0 && op < static_cast<int64_t>(c10d::ReduceOp::RedOpType::UNUSED), "pycomm rank ", rank_,
                    ": all_reduce got reduce op ", op);
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp(static_cast<c10d::ReduceOp::RedOpType>(op));
  opts.asyncOp = asyncOp;
  // The bytes each view spans in its storage (numel 0: none).
  const auto span = [](const at::Tensor& t) {
    const char* p = static_cast<const char*>(t.data_ptr());
    int64_t extent = t.numel() > 0 ? 1 : 0;
    for (int64_t d = 0; d < t.dim() && t.numel() > 0; ++d) extent += (t.size(d) - 1) * std::abs(t.stride(d));
    return std::make_pair(p, p + extent * static_cast<int64_t>(t.element_size()));
  };
  const bool same = output.data_ptr() == input.data_ptr() && output.strides() == input.strides();
  if (!same && output.is_alias_of(input)) {
    const auto a = span(output), b = span(input);
    TORCH_CHECK_VALUE(a.second <= b.first || b.second <= a.first, "pycomm rank ", rank_,
                      ": all_reduce output overlaps its input; pass the same tensor for an in-place call, or "
                      "non-overlapping tensors");
  }
  if (same || input.is_cuda()) {
    if (!same) output.copy_(input);  // queued on the current stream, which the staging waits for
    std::vector<at::Tensor> t{output};
    return allreduce(t, opts);
  }
  FlatCall call{c10d::OpType::ALLREDUCE, "pycomm:all_reduce", "all_reduce", input.numel(),
                allReduceOp(input, opts.reduceOp)};
  return outOfPlace(call, output, input, asyncOp);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                        const c10d::BroadcastOptions& opts) {
  checkRoot(opts.rootRank, "broadcast");
  return inPlace(tensors, c10d::OpType::BROADCAST, "pycomm:broadcast", CollType::kBroadcast, c10d::ReduceOp(),
                 static_cast<int>(opts.rootRank), opts.asyncOp);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::reduce(std::vector<at::Tensor>& tensors,
                                                     const c10d::ReduceOptions& opts) {
  checkRoot(opts.rootRank, "reduce");
  return inPlace(tensors, c10d::OpType::REDUCE, "pycomm:reduce", CollType::kReduce, opts.reduceOp,
                 static_cast<int>(opts.rootRank), opts.asyncOp);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                        std::vector<at::Tensor>& inputs,
                                                        const c10d::AllgatherOptions& opts) {
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

c10::intrusive_ptr<c10d::Work> PycommBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                              const c10d::AllgatherOptions& opts) {
  TORCH_CHECK_VALUE(output.numel() == input.numel() * size_, "pycomm rank ", rank_,
                    ": all_gather_into_tensor output has ", output.numel(), " elements, expected ",
                    input.numel() * size_, " (input ", input.numel(), " x ", size_, " ranks)");
  checkSameDType(output, input, "all_gather_into_tensor");
  FlatCall call{c10d::OpType::_ALLGATHER_BASE, "pycomm:all_gather_into_tensor", "all_gather", input.numel(),
                allGatherOp(input)};
  return outOfPlace(call, output, input, opts.asyncOp);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::gather(std::vector<std::vector<at::Tensor>>& outputs,
                                                     std::vector<at::Tensor>& inputs,
                                                     const c10d::GatherOptions& opts) {
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

c10::intrusive_ptr<c10d::Work> PycommBackend::scatter(std::vector<at::Tensor>& outputs,
                                                      std::vector<std::vector<at::Tensor>>& inputs,
                                                      const c10d::ScatterOptions& opts) {
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

c10::intrusive_ptr<c10d::Work> PycommBackend::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                             std::vector<std::vector<at::Tensor>>& inputs,
                                                             const c10d::ReduceScatterOptions& opts) {
  TORCH_CHECK_VALUE(outputs.size() == 1 && inputs.size() == 1, "pycomm rank ", rank_,
                    ": reduce_scatter takes one output tensor and one input list");
  TORCH_CHECK_VALUE(static_cast<int>(inputs[0].size()) == size_, "pycomm rank ", rank_,
                    ": reduce_scatter input list has ", inputs[0].size(), " tensors, the group has ",
                    size_, " ranks");
  for (auto& i : inputs[0]) checkSameShape(i, outputs[0], "reduce_scatter input");
  at::Tensor flat = concatOnDevice(inputs[0], "reduce_scatter input");
  return _reduce_scatter_base(outputs[0], flat, opts);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                   const c10d::ReduceScatterOptions& opts) {
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

c10::intrusive_ptr<c10d::Work> PycommBackend::reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                              std::vector<at::Tensor>& inputs,
                                                                              const c10d::ReduceScatterOptions& opts) {
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

c10::intrusive_ptr<c10d::Work> PycommBackend::alltoall_base(at::Tensor& output, at::Tensor& input,
                                                            std::vector<int64_t>& outputSplits,
                                                            std::vector<int64_t>& inputSplits,
                                                            const c10d::AllToAllOptions& opts) {
  checkSameDType(output, input, "all_to_all_single");
  const bool equal = outputSplits.empty() && inputSplits.empty();
  auto [sendOff, sendBytes] = splitRows(input, inputSplits, rank_, size_, "input");
  auto [recvOff, recvBytes] = splitRows(output, outputSplits, rank_, size_, "output");
  FlatCall call{c10d::OpType::ALLTOALL_BASE, "pycomm:all_to_all_single", "all_to_all", equal ? input.numel() : 0,
                allToAllOp(sendOff, sendBytes, recvOff, recvBytes)};
  return outOfPlace(call, output, input, opts.asyncOp);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                                       const c10d::AllToAllOptions& opts) {
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

c10::intrusive_ptr<c10d::Work> PycommBackend::barrier(const c10d::BarrierOptions& opts) {
  return submit(Call{c10d::OpType::BARRIER, "pycomm:barrier", CollType::kBarrier, {}, {}}, opts.asyncOp,
                [](Collectives& c, const OpDesc& d, const Deadline& dl) { c.barrier(d, dl); });
}

void initBackendBindings(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<PycommBackend, c10d::Backend, c10::intrusive_ptr<PycommBackend>>(m, "PycommBackend")
      .def("stats", &PycommBackend::stats, "Counters: collectives run, bytes sent/received")
      .def("transport", &PycommBackend::transportName, "Transport in use: 'shm' or 'tcp'")
      .def("abort_group", &PycommBackend::abortGroup, py::arg("why"),
           "Fails every pending and future operation of the group on every rank")
      .def("all_reduce_out", &PycommBackend::allreduceOut, py::arg("output"), py::arg("input"), py::arg("op"),
           py::arg("async_op"), py::call_guard<py::gil_scoped_release>(),
           "Out-of-place all_reduce: output = reduction of every rank's input (op: a RedOpType value); returns a Work")
      .def("compressed_all_reduce", &PycommBackend::compressedAllReduce, py::arg("tensor"), py::arg("codec"),
           py::arg("bits"), py::arg("error_feedback"), py::arg("chunk"), py::arg("divisor"), py::arg("worker"),
           py::arg("server"), py::arg("worker_seed"), py::arg("server_seed"), py::arg("async_op"),
           py::arg("nonfinite") = py::none(), py::call_guard<py::gil_scoped_release>(),
           "Pipelined compressed all-reduce in place (native path of pycomm.compression); returns a Work. "
           "nonfinite: a one-element uint8 CPU tensor that receives 1 if the result holds an inf or NaN "
           "(the same on every rank), else 0, read off the payloads")
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
