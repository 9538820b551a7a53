// The coalesced collectives: several tensors laid end to end in one host buffer, one
// collective, one Work, each tensor written back from its view of the flat result.
#include "bindings/arguments.h"
#include "bindings/backend.h"
#include "bindings/torch_types.h"

namespace pycomm {

c10::intrusive_ptr<c10d::Work> PycommBackend::allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                                  const c10d::AllreduceCoalescedOptions& opts) {
  const char* what = "all_reduce_coalesced";
  checkCoalesced(tensors, tensors, what);
  at::Tensor flat = flatOnHost(tensors);
  const CollOp op = allReduceOp(flat, opts.reduceOp);
  std::vector<Piece> back;
  int64_t off = 0;
  for (auto& t : tensors) {
    back.push_back({t, flat.narrow(0, off, t.numel())});
    off += t.numel();
  }
  return submitCoalesced(c10d::OpType::ALLREDUCE_COALESCED, "pycomm:all_reduce_coalesced", op, flat, flat, tensors,
                         std::move(back), opts.asyncOp);
}

c10::intrusive_ptr<c10d::Work> PycommBackend::allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputLists,
                                                                  std::vector<at::Tensor>& inputs,
                                                                  const c10d::AllgatherOptions& opts) {
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

c10::intrusive_ptr<c10d::Work> PycommBackend::allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                              std::vector<at::Tensor>& inputs,
                                                                              const c10d::AllgatherOptions& opts) {
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

void PycommBackend::checkCoalesced(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& outputs,
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

at::Tensor PycommBackend::flatOnHost(const std::vector<at::Tensor>& ts) {
  at::NoGradGuard noGrad;
  if (ts.empty()) return at::empty({0}, at::kFloat);
  std::vector<at::Tensor> flat;
  for (const auto& t : ts) flat.push_back(t.reshape({-1}).to(at::kCPU));
  return at::cat(flat).contiguous();
}

c10::intrusive_ptr<c10d::Work> PycommBackend::submitCoalesced(c10d::OpType type, const char* name, const CollOp& op, at::Tensor in,
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

}  // namespace pycomm
