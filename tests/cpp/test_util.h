// Helpers for the C++ tests: an in-memory store and ranks run as threads.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/store.h"
#include "transport/shm.h"
#include "transport/tcp.h"
#include "transport/transport.h"

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

/// Descriptor of a test message (what a collective would put in the header).
inline OpDesc makeDesc(CollType coll, uint64_t seq, uint64_t count, DType dt = DType::kUInt8) {
  OpDesc d;
  d.coll = coll;
  d.seq = seq;
  d.count = count;
  d.dtype = dt;
  return d;
}

/// Byte i of rank `rank`'s test payload (distinct per rank, not periodic in 256).
inline uint8_t pattern(int rank, size_t i) {
  return static_cast<uint8_t>((i * 131 + rank * 7 + i / 251) & 0xff);
}

/// A payload of n bytes filled with pattern(rank, i).
inline std::vector<uint8_t> filled(int rank, size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = pattern(rank, i);
  return v;
}

/// True if v holds rank's pattern.
inline bool matches(const std::vector<uint8_t>& v, int rank) {
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] != pattern(rank, i)) return false;
  }
  return true;
}

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

/// An n-rank group of transports T (ShmTransport, TcpTransport) under `prefix`; the
/// constructors run concurrently, as on real ranks.
template <typename T>
std::vector<std::unique_ptr<T>> makeTransports(MemStore& store, const std::string& prefix, int n,
                                               std::chrono::milliseconds timeout) {
  std::vector<std::unique_ptr<T>> t(n);
  runRanks(n, [&](int r) { t[r] = std::make_unique<T>(store, prefix, r, n, timeout); });
  return t;
}

/// The same over TCP (`tcp`) or shared memory, as the Transport interface.
inline std::vector<std::unique_ptr<Transport>> makeTransports(MemStore& store, bool tcp, const std::string& prefix,
                                                              int n, std::chrono::milliseconds timeout) {
  std::vector<std::unique_ptr<Transport>> out;
  if (tcp) {
    for (auto& t : makeTransports<TcpTransport>(store, prefix, n, timeout)) out.push_back(std::move(t));
  } else {
    for (auto& t : makeTransports<ShmTransport>(store, prefix, n, timeout)) out.push_back(std::move(t));
  }
  return out;
}

/// What fn() throws (its what()), or "" when it returns.
template <typename Fn>
std::string messageOf(Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace testing
}  // namespace pycomm
