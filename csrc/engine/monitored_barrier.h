// A barrier that names the ranks that did not reach it: torch.distributed's
// monitored_barrier, done through the group's store (no transport involved, so it
// works and reports even when the transport is busy or a peer is stuck elsewhere).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "core/store.h"

namespace pycomm {

/// Monitored barrier number `id` (every rank calls them in the same order) of the
/// group whose store keys start with `keyPrefix`. Ranks other than 0 check in and wait
/// for rank 0's answer; rank 0 waits up to `timeout` for all of them. If some did not
/// arrive, rank 0 throws TimeoutError naming the first one in rank order (`waitAll`:
/// every one), and the others, whether early or late, fail with rank 0's message: the
/// barrier passes on every rank or on none. A rank that gets no answer from rank 0
/// within `timeout` plus `answerGrace` throws TimeoutError too.
void monitoredBarrier(Store& store, const std::string& keyPrefix, int rank, int size, uint64_t id,
                      std::chrono::milliseconds timeout, bool waitAll, std::chrono::milliseconds answerGrace);

}  // namespace pycomm
