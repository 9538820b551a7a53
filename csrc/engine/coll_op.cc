#include "engine/coll_op.h"

#include "core/error.h"

namespace pycomm {

CollOp CollOp::chunk(size_t elems, size_t elemBytes) const {
  CollOp c = *this;
  c.count = elems;
  c.bytes = elems * elemBytes;
  return c;
}

void CollOp::run(Collectives& host, IpcCollectives* ipc, const void* in, void* out, const OpDesc& desc,
                 const Deadline& deadline) const {
  const bool isRoot = host.transport().rank() == root;
  switch (coll) {
    case CollType::kAllReduce:
      if (ipc) {
        PYCOMM_CHECK_ARG(!in || in == out, "pycomm: all_reduce over CUDA IPC runs in place (the backend "
                         "copies an out-of-place call's input into its output first)");
        return ipc->allReduce(out, count, dtype, op, host, desc, deadline);
      }
      return host.allReduce(in ? in : out, out, count, dtype, op, desc, deadline);
    case CollType::kBroadcast:
      if (ipc) return ipc->broadcast(out, bytes, root, host, desc, deadline);
      return host.broadcast(out, bytes, root, desc, deadline);
    case CollType::kReduce:
      if (ipc) return ipc->reduce(out, count, dtype, op, root, host, desc, deadline);
      return host.reduce(out, count, dtype, op, root, desc, deadline);
    case CollType::kReduceScatter:
      if (ipc) return ipc->reduceScatter(in, out, count, dtype, op, host, desc, deadline);
      return host.reduceScatter(in, out, count, dtype, op, desc, deadline);
    case CollType::kAllGather:
      if (ipc) return ipc->allGather(in, out, bytes, host, desc, deadline);
      return host.allGather(in, out, bytes, desc, deadline);
    case CollType::kGather:
      if (ipc) return ipc->gather(in, isRoot ? out : nullptr, bytes, root, host, desc, deadline);
      return host.gather(in, isRoot ? out : nullptr, bytes, root, desc, deadline);
    case CollType::kScatter:
      if (ipc) return ipc->scatter(isRoot ? in : nullptr, out, bytes, root, host, desc, deadline);
      return host.scatter(isRoot ? in : nullptr, out, bytes, root, desc, deadline);
    case CollType::kAllToAll:
      if (ipc) {
        return ipc->allToAll(in, sendOffsets, sendBytes, out, recvOffsets, recvBytes, host, desc, deadline);
      }
      return host.allToAll(in, sendOffsets, sendBytes, out, recvOffsets, recvBytes, desc, deadline);
    case CollType::kBarrier:
      return host.barrier(desc, deadline);
    default:
      break;
  }
  throw InvalidArgument(strCat("pycomm: ", collName(coll), " has no buffer-level description"));
}

}  // namespace pycomm
