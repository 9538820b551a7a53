// SUM all-reduce of a sparse COO tensor, as Gloo offers it: the ranks all-gather their
// shapes and non-zero counts, then their indices and values (padded to the largest
// count), and every rank sums the same concatenation in rank order with torch's
// coalesce, so all ranks end with bitwise identical results.
#pragma once

#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/extension.h>

#include "algorithms/collectives.h"
#include "core/deadline.h"

namespace pycomm {

/// Checks on the caller's thread that `t` is a sparse COO CPU tensor this all-reduce
/// takes with `op` (SUM only); a ValueError names `rank` otherwise.
void checkSparseAllReduce(const at::Tensor& t, const c10d::ReduceOp& op, int rank);

/// Runs inside a collective (comm thread): returns the sum over the group's ranks of
/// each rank's `input` (coalesced, same sizes and dtype on every rank; MismatchError
/// naming both ranks otherwise). `desc` is the collective's header; its steps go out
/// as all_gathers under the same sequence number.
at::Tensor sparseAllReduceSum(Collectives& c, const at::Tensor& input, const OpDesc& desc, const Deadline& deadline,
                              int rank, int size);

}  // namespace pycomm
