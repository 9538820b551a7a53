#include "core/topology.h"

#include <algorithm>
#include <map>

namespace pycomm {

Topology Topology::fromKeys(const std::vector<std::string>& keys) {
  Topology t;
  std::map<std::string, int> index;
  for (const auto& k : keys) {
    auto it = index.emplace(k, static_cast<int>(index.size())).first;
    t.hostOf.push_back(it->second);
  }
  return t;
}

int Topology::numHosts() const {
  int h = 0;
  for (int x : hostOf) h = std::max(h, x + 1);
  return std::max(h, 1);
}

std::vector<int> Topology::ranksOn(int host) const {
  std::vector<int> r;
  for (int i = 0; i < static_cast<int>(hostOf.size()); ++i) {
    if (hostOf[i] == host) r.push_back(i);
  }
  return r;
}

int Topology::localIndex(int rank) const {
  int idx = 0;
  for (int i = 0; i < rank; ++i) idx += hostOf[i] == hostOf[rank];
  return idx;
}

int Topology::minPerHost() const {
  int m = static_cast<int>(hostOf.size());
  for (int h = 0; h < numHosts(); ++h) m = std::min(m, static_cast<int>(ranksOn(h).size()));
  return m;
}

int Topology::maxPerHost() const {
  int m = hostOf.empty() ? 1 : 0;
  for (int h = 0; h < numHosts(); ++h) m = std::max(m, static_cast<int>(ranksOn(h).size()));
  return m;
}

std::string Topology::str() const {
  std::string s = std::to_string(numHosts()) + (numHosts() == 1 ? " host:" : " hosts:");
  for (int h = 0; h < numHosts(); ++h) {
    s += " [";
    const auto r = ranksOn(h);
    for (size_t i = 0; i < r.size(); ++i) s += (i ? " " : "") + std::to_string(r[i]);
    s += "]";
  }
  return s;
}

}  // namespace pycomm
