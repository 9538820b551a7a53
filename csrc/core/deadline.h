// Deadlines: every blocking wait in the core takes one.
#pragma once

#include <chrono>

namespace pycomm {

/// A point in (steady) time after which a wait gives up.
class Deadline {
 public:
  using Clock = std::chrono::steady_clock;

  /// A deadline `timeout` from now (a non-positive timeout means "never").
  static Deadline after(std::chrono::milliseconds timeout) {
    Deadline d;
    if (timeout.count() > 0) {
      d.at_ = Clock::now() + timeout;
      d.finite_ = true;
    }
    return d;
  }

  /// A deadline that never expires.
  static Deadline never() { return Deadline(); }

  /// True once the deadline has passed.
  bool expired() const { return finite_ && Clock::now() >= at_; }

  /// Time left (zero if expired, a large value if infinite).
  std::chrono::nanoseconds remaining() const {
    if (!finite_) return std::chrono::hours(24 * 365);
    auto left = at_ - Clock::now();
    return left.count() > 0 ? std::chrono::duration_cast<std::chrono::nanoseconds>(left)
                            : std::chrono::nanoseconds(0);
  }

  /// True unless this is never().
  bool finite() const { return finite_; }

 private:
  Clock::time_point at_{};
  bool finite_ = false;
};

}  // namespace pycomm
