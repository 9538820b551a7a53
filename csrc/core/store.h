// The rendezvous store the core needs: a small subset of c10d::Store.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace pycomm {

/// Key-value store shared by all ranks of a group (the c10d store, or an
/// in-memory one in the C++ tests). Keys are already private to the group.
class Store {
 public:
  virtual ~Store() = default;

  /// Sets `key` to `value`.
  virtual void set(const std::string& key, const std::vector<uint8_t>& value) = 0;

  /// Returns the value of `key`, waiting up to `timeout` for it to be set.
  virtual std::vector<uint8_t> get(const std::string& key, std::chrono::milliseconds timeout) = 0;

  /// Atomically adds `delta` to the counter at `key`, returns the new value.
  virtual int64_t add(const std::string& key, int64_t delta) = 0;

  /// Convenience: set a string value.
  void setString(const std::string& key, const std::string& value) {
    set(key, std::vector<uint8_t>(value.begin(), value.end()));
  }

  /// Convenience: get a string value.
  std::string getString(const std::string& key, std::chrono::milliseconds timeout) {
    auto v = get(key, timeout);
    return std::string(v.begin(), v.end());
  }
};

}  // namespace pycomm
