// The core's Store interface (core/store.h) over torch's c10d::Store: the rendezvous a
// pycomm group makes goes through the store torch.distributed already set up.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/store.h"

namespace pycomm {

/// A c10d::Store seen as a pycomm Store.
class C10dStore : public Store {
 public:
  explicit C10dStore(c10::intrusive_ptr<c10d::Store> store) : store_(std::move(store)) {}
  void set(const std::string& key, const std::vector<uint8_t>& value) override { store_->set(key, value); }
  /// Waits up to `timeout` for `key` (TimeoutError naming it), then reads it.
  std::vector<uint8_t> get(const std::string& key, std::chrono::milliseconds timeout) override {
    try {
      store_->wait({key}, timeout);
    } catch (const std::exception& e) {
      throw TimeoutError(strCat("pycomm: timed out after ", timeout.count(), " ms waiting for the store key '", key,
                                "' (", e.what(), ")"));
    }
    return store_->get(key);
  }
  int64_t add(const std::string& key, int64_t delta) override { return store_->add(key, delta); }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
};

}  // namespace pycomm
