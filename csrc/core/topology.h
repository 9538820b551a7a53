// Which ranks of a group share a host: the description the hierarchical algorithms
// are given (they never learn which transport connects which pair). Built by the
// engine from every rank's host key (hostname, boot id, namespaces; confirmed by the
// shared-memory probe) and identical on every rank of the group.
#pragma once

#include <string>
#include <vector>

namespace pycomm {

/// Host layout of a group: host index of every rank, hosts numbered in order of their
/// lowest rank (host 0 holds rank 0).
struct Topology {
  std::vector<int> hostOf;  ///< host index of each rank; empty = not known (one host)

  /// Every rank on one host.
  static Topology singleHost(int size) { return Topology{std::vector<int>(size, 0)}; }

  /// Ranks with equal keys share a host; hosts numbered by first appearance.
  static Topology fromKeys(const std::vector<std::string>& keys);

  /// Number of hosts (1 when unknown).
  int numHosts() const;
  /// Ranks on `host`, ascending.
  std::vector<int> ranksOn(int host) const;
  /// Position of `rank` among the ranks of its host.
  int localIndex(int rank) const;
  /// Fewest / most ranks any host holds.
  int minPerHost() const;
  int maxPerHost() const;
  /// True if a hierarchical algorithm can help: more than one host, and some host
  /// holds more than one rank.
  bool hierarchical() const { return numHosts() > 1 && maxPerHost() > 1; }
  /// "3 hosts: [0 1] [2] [3]".
  std::string str() const;
};

}  // namespace pycomm
