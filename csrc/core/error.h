// Error types of the core. The core throws, it never exits or aborts the process.
#pragma once

#include <exception>
#include <sstream>
#include <stdexcept>
#include <string>

namespace pycomm {

/// Base of every error the core raises.
class Error : public std::runtime_error {
 public:
  /// Wraps `what` as the message.
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// Caller passed something the library cannot handle (dtype, op, sizes, ranks).
class InvalidArgument : public Error {
 public:
  /// Wraps `what` as the message.
  explicit InvalidArgument(const std::string& what) : Error(what) {}
};

/// A wait exceeded the group's timeout.
class TimeoutError : public Error {
 public:
  /// Wraps `what` as the message.
  explicit TimeoutError(const std::string& what) : Error(what) {}
};

/// A peer died, closed its connection, or sent something impossible.
class PeerError : public Error {
 public:
  /// Wraps `what` as the message.
  explicit PeerError(const std::string& what) : Error(what) {}
};

/// Ranks called different collectives (or the same one with different arguments).
class MismatchError : public Error {
 public:
  /// Wraps `what` as the message.
  explicit MismatchError(const std::string& what) : Error(what) {}
};

/// Builds a message from stream-able parts: `strCat("rank ", r, " failed")`.
template <typename... Args>
std::string strCat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

/// The message of exception `e` (what() of a std::exception), or `fallback` for others.
inline std::string exceptionMessage(const std::exception_ptr& e, const char* fallback) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
  }
  return fallback;
}

}  // namespace pycomm

/// Throws pycomm::InvalidArgument with the streamed message unless `cond` holds.
#define PYCOMM_CHECK_ARG(cond, ...)                                  \
  do {                                                               \
    if (!(cond)) throw ::pycomm::InvalidArgument(::pycomm::strCat(__VA_ARGS__)); \
  } while (0)

/// Throws pycomm::Error for a broken internal invariant.
#define PYCOMM_ASSERT(cond, ...)                                                \
  do {                                                                          \
    if (!(cond))                                                                \
      throw ::pycomm::Error(::pycomm::strCat("pycomm internal error at ", __FILE__, \
                                             ":", __LINE__, ": ", #cond, " ", ##__VA_ARGS__)); \
  } while (0)
