// Process-wide view over every pycomm group of this process, for
// pycomm.stats(group="all"): the live groups plus what finished groups counted. The
// one piece of process-global state, which is why it lives in the bindings (the core
// keeps its state in the objects the backend owns).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "engine/group.h"

namespace pycomm {

/// Adds `group` to the live groups (it must stay alive until processStatsRetire).
void processStatsAdd(const Group* group);

/// Removes `group` from the live groups and keeps its final counters.
void processStatsRetire(const Group* group);

/// Counters summed over every group added so far (live and retired), plus
/// "groups_live".
std::map<std::string, uint64_t> processStats();

}  // namespace pycomm
