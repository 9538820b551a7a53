#include "bindings/process_stats.h"

#include <algorithm>
#include <mutex>
#include <vector>

namespace pycomm {

namespace {
struct ProcessTotals {
  std::mutex mu;
  std::vector<const Group*> live;
  std::map<std::string, uint64_t> finished;
};
ProcessTotals& processTotals() {
  static ProcessTotals* t = new ProcessTotals();  // never destroyed: backends may outlive statics
  return *t;
}
}  // namespace

void processStatsAdd(const Group* group) {
  auto& t = processTotals();
  std::lock_guard<std::mutex> g(t.mu);
  t.live.push_back(group);
}

void processStatsRetire(const Group* group) {
  auto& t = processTotals();
  std::lock_guard<std::mutex> g(t.mu);
  t.live.erase(std::remove(t.live.begin(), t.live.end(), group), t.live.end());
  for (const auto& [k, v] : group->stats()) t.finished[k] += v;
}

std::map<std::string, uint64_t> processStats() {
  auto& t = processTotals();
  std::lock_guard<std::mutex> g(t.mu);
  auto s = t.finished;
  for (const Group* group : t.live) {
    for (const auto& [k, v] : group->stats()) s[k] += v;
  }
  s["groups_live"] = t.live.size();
  return s;
}

}  // namespace pycomm
