// Helpers for the C++ tests: an in-memory store and ranks run as threads.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/store.h"

namespace pycomm {
namespace testing {

/// Store shared by threads of one process (stands in for the c10d store).
class MemStore : public Store {
 public:
  void set(const std::string& key, const std::vector<uint8_t>& value) override {
    std::lock_guard<std::mutex> g(mu_);
    data_[key] = value;
    cv_.notify_all();
  }
  std::vector<uint8_t> get(const std::string& key, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> g(mu_);
    if (!cv_.wait_for(g, timeout, [&] { return data_.count(key) > 0; })) {
      throw TimeoutError("MemStore: timed out waiting for key " + key);
    }
    return data_[key];
  }
  int64_t add(const std::string& key, int64_t delta) override {
    std::lock_guard<std::mutex> g(mu_);
    auto& v = data_[key];
    int64_t cur = 0;
    if (!v.empty()) cur = std::stoll(std::string(v.begin(), v.end()));
    cur += delta;
    std::string s = std::to_string(cur);
    v.assign(s.begin(), s.end());
    cv_.notify_all();
    return cur;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::vector<uint8_t>> data_;
};

/// Runs fn(rank) on `n` threads and rethrows the first exception any rank raised.
inline void runRanks(int n, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(n);
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace testing
}  // namespace pycomm
