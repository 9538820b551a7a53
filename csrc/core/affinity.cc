#include "core/affinity.h"

#include <dirent.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "core/env.h"
#include "core/error.h"

namespace pycomm {
namespace {

std::mutex gMu;
BindResult gResult;

std::vector<int> threadCpus(pid_t tid) {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> out;
  if (sched_getaffinity(tid, sizeof(set), &set) != 0) return out;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) out.push_back(c);
  }
  return out;
}

cpu_set_t toSet(const std::vector<int>& cpus) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus) CPU_SET(c, &set);
  return set;
}

// Every thread of the process (a thread started meanwhile inherits its creator's mask,
// which is already set or is set by a later entry of the listing). Returns 0 or the
// calling thread's errno.
int setProcessCpus(const std::vector<int>& cpus) {
  const cpu_set_t set = toSet(cpus);
  if (sched_setaffinity(0, sizeof(set), &set) != 0) return errno;
  if (DIR* d = opendir("/proc/self/task")) {
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] == '.') continue;
      const pid_t tid = static_cast<pid_t>(std::atoi(e->d_name));
      if (tid > 0) sched_setaffinity(tid, sizeof(set), &set);  // an exited thread: ESRCH, fine
    }
    closedir(d);
  }
  return 0;
}

std::string list(const std::vector<int>& cpus) {
  std::string s;
  for (size_t i = 0; i < cpus.size(); ++i) s += (i ? "," : "") + std::to_string(cpus[i]);
  return s;
}

}  // namespace

std::vector<int> cpuShare(const std::vector<int>& allowed, int localIndex, int localSize) {
  const int k = static_cast<int>(allowed.size());
  if (k == 0 || localSize <= 0 || localIndex < 0 || localIndex >= localSize) return {};
  if (localSize >= k) return {allowed[localIndex % k]};
  const int per = k / localSize, extra = k % localSize;
  const int start = localIndex * per + std::min(localIndex, extra);
  const int count = per + (localIndex < extra ? 1 : 0);
  return std::vector<int>(allowed.begin() + start, allowed.begin() + start + count);
}

std::string bindMode() {
  std::string mode = envStr("PYCOMM_BIND", "auto");
  if (mode == "off") mode = "0";
  if (mode == "on") mode = "1";
  PYCOMM_CHECK_ARG(mode == "auto" || mode == "0" || mode == "1",
                   "PYCOMM_BIND must be auto, 0 or 1 (got '", mode, "')");
  return mode;
}

BindResult bindLocalRank(int localIndex, int localSize, const std::function<bool()>& sharesProcess) {
  std::lock_guard<std::mutex> lock(gMu);
  if (gResult.decided) return gResult;
  const std::string mode = bindMode();
  BindResult r;
  r.decided = true;
  r.mode = mode;
  r.localIndex = localIndex;
  r.localSize = localSize;
  r.before = threadCpus(0);
  const int k = static_cast<int>(r.before.size());
  if (localSize <= 1) {
    r.reason = "one rank on this host";
  } else if (mode == "0") {
    r.reason = "PYCOMM_BIND=0";
  } else if (k == 0) {
    r.reason = strCat("sched_getaffinity failed: ", strerror(errno));
  } else if (mode == "auto" && localSize <= k) {
    r.reason = strCat("not oversubscribed: ", localSize, " ranks on this host, ", k, " usable CPUs");
  } else if (sharesProcess && sharesProcess()) {
    r.reason = "the host's ranks are threads of one process";
  } else {
    const std::vector<int> share = cpuShare(r.before, localIndex, localSize);
    const int err = setProcessCpus(share);
    if (err != 0) {
      r.reason = strCat("sched_setaffinity(", list(share), ") failed: ", strerror(err));
    } else {
      r.bound = true;
      r.cpus = share;
      r.reason = mode == "1" ? strCat("PYCOMM_BIND=1: local rank ", localIndex, " of ", localSize, " on CPUs ", list(share))
                             : strCat("oversubscribed: ", localSize, " ranks on this host, ", k,
                                      " usable CPUs; local rank ", localIndex, " on CPU ", list(share));
    }
  }
  gResult = r;
  return r;
}

BindResult bindingResult() {
  std::lock_guard<std::mutex> lock(gMu);
  return gResult;
}

int processCpuCount() {
  {
    std::lock_guard<std::mutex> lock(gMu);
    if (gResult.bound) return static_cast<int>(gResult.before.size());
  }
  const std::vector<int> now = threadCpus(0);
  if (!now.empty()) return static_cast<int>(now.size());
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

UnboundScope::UnboundScope() {
  const BindResult r = bindingResult();
  if (!r.bound) return;
  saved_ = threadCpus(0);
  const cpu_set_t set = toSet(r.before);
  active_ = !saved_.empty() && sched_setaffinity(0, sizeof(set), &set) == 0;
}

UnboundScope::~UnboundScope() {
  if (!active_) return;
  const cpu_set_t set = toSet(saved_);
  sched_setaffinity(0, sizeof(set), &set);
}

}  // namespace pycomm
