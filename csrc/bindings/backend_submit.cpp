// The backend's shared submit path: in-place and out-of-place collectives routed over
// CUDA IPC or staged through host memory, queued on the group's communication thread
// as one described operation with its Work.
#include <algorithm>

#if defined(PYCOMM_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "bindings/arguments.h"
#include "bindings/backend.h"
#include "bindings/torch_types.h"
#include "bindings/work.h"

namespace pycomm {

c10::intrusive_ptr<c10d::Work> PycommBackend::inPlace(std::vector<at::Tensor>& tensors, c10d::OpType type, const char* name,
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

c10::intrusive_ptr<c10d::Work> PycommBackend::outOfPlace(const FlatCall& call, at::Tensor output, at::Tensor input, bool asyncOp) {
  checkTensor(input, rank_, (std::string(call.what) + " input").c_str());
  checkTensor(output, rank_, (std::string(call.what) + " output").c_str());
#if defined(PYCOMM_WITH_CUDA)
  if (input.is_cuda() && input.device() == output.device() && cuda_->ipcEligible(input.device().index())) {
    return submitCudaFlat(call, output, input, asyncOp);
  }
#endif
  return hostFlat(call, output, input, asyncOp);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::outOfPlaceList(const FlatCall& call, const at::Tensor& input, int64_t flatNumel,
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
c10::intrusive_ptr<c10d::Work> PycommBackend::submitCudaFlat(const FlatCall& call, at::Tensor output, at::Tensor input,
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
c10::intrusive_ptr<c10d::Work> PycommBackend::hostFlat(const FlatCall& call, at::Tensor output, at::Tensor input, bool asyncOp) {
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

c10::intrusive_ptr<c10d::Work> PycommBackend::submit(Call call, bool asyncOp, CollFn fn) {
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

}  // namespace pycomm
