// Placement of a host's ranks on its cores (the process's CPU affinity).
//
// When a host runs more ranks than the cores they may use, the scheduler moves the
// ranks between cores as they sleep and wake each other, and a small collective then
// waits for migrations as much as for peers (4 ranks on 2 cores, 8-byte all_reduce: p50
// ~120 us unbound vs ~45 us with each rank kept on one core; docs/ARCHITECTURE.md). So,
// as MPI launchers bind ranks to cores, pycomm binds the process of each local rank to
// its share of the CPUs it was allowed -- only when the host is oversubscribed, never
// outside the set the process was given, once per process (the first pycomm group).
//
// PYCOMM_BIND: "auto" (default: bind when local ranks outnumber the usable CPUs), "0"
// (never), "1" (always: each local rank gets a contiguous share of the CPUs).
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace pycomm {

struct BindResult {
  bool decided = false;    ///< a group has run the policy in this process
  bool bound = false;      ///< the process's threads were bound to `cpus`
  std::vector<int> cpus;   ///< the CPUs bound to (empty when not bound)
  std::vector<int> before; ///< the CPUs the process could use before
  int localIndex = -1;     ///< this process's position among its host's ranks
  int localSize = 0;       ///< ranks on this host (of the group that decided)
  std::string mode;        ///< PYCOMM_BIND as read: auto, 0 or 1
  std::string reason;      ///< why bound or not, in words
};

/// The CPUs `localIndex` of `localSize` ranks gets out of `allowed` (ascending ids): one
/// CPU, round robin, when ranks outnumber CPUs; otherwise a contiguous share (sizes
/// differ by at most one). Pure: tested directly.
std::vector<int> cpuShare(const std::vector<int>& allowed, int localIndex, int localSize);

/// Runs the binding policy for this process once (later calls return the first result):
/// binds every thread of the process when PYCOMM_BIND asks for it. `sharesProcess`, asked
/// only when it would bind, says whether another local rank is a thread of this same
/// process (a C++ embedding or test): their common mask is then left alone. Throws
/// InvalidArgument on a bad PYCOMM_BIND.
BindResult bindLocalRank(int localIndex, int localSize, const std::function<bool()>& sharesProcess = {});

/// PYCOMM_BIND as "auto", "0" or "1" ("off"/"on" accepted); throws InvalidArgument otherwise.
std::string bindMode();

/// What the policy decided (decided == false before any group ran it).
BindResult bindingResult();

/// CPUs the process may use, as it was given them: before pycomm bound it, if it did.
int processCpuCount();

/// While alive, the calling thread (and the threads and processes it starts) may use the
/// CPUs the process had before pycomm bound it: the machine-limit probes measure the
/// machine, not one rank's share. A no-op when nothing was bound.
class UnboundScope {
 public:
  UnboundScope();
  ~UnboundScope();
  UnboundScope(const UnboundScope&) = delete;
  UnboundScope& operator=(const UnboundScope&) = delete;

 private:
  bool active_ = false;
  std::vector<int> saved_;
};

}  // namespace pycomm
