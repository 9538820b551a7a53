#include "transport/transport.h"

#include "core/error.h"

namespace pycomm {

const char* collName(CollType c) {
  switch (c) {
    case CollType::kAllReduce: return "all_reduce";
    case CollType::kReduceScatter: return "reduce_scatter";
    case CollType::kAllGather: return "all_gather";
    case CollType::kBroadcast: return "broadcast";
    case CollType::kReduce: return "reduce";
    case CollType::kGather: return "gather";
    case CollType::kScatter: return "scatter";
    case CollType::kAllToAll: return "all_to_all";
    case CollType::kBarrier: return "barrier";
    case CollType::kSend: return "send/recv";
    case CollType::kCompressed: return "compressed";
  }
  return "unknown";
}

std::string OpDesc::str() const {
  std::string s = strCat(collName(coll), " #", seq, " (count=", count, ", ",
                         static_cast<int>(dtype) < kNumDTypes ? dtypeName(dtype) : "?");
  if (coll == CollType::kAllReduce || coll == CollType::kReduceScatter ||
      coll == CollType::kReduce) {
    s += strCat(", ", static_cast<int>(op) < kNumReduceOps ? reduceOpName(op) : "?");
  }
  if (root >= 0) s += strCat(", root=", root);
  if (coll == CollType::kSend) s += strCat(", tag=", tag);
  return s + ")";
}

void throwMismatch(int rank, int peer, const OpDesc& mine, size_t myBytes, const OpDesc& theirs,
                   size_t theirBytes) {
  throw MismatchError(strCat("pycomm: collective mismatch between rank ", rank, " and rank ", peer,
                             ": rank ", rank, " runs ", mine.str(), " expecting ", myBytes,
                             " bytes, rank ", peer, " runs ", theirs.str(), " sending ",
                             theirBytes, " bytes"));
}

}  // namespace pycomm
