// Environment-variable helpers (the core's only configuration source besides arguments).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/error.h"

namespace pycomm {

/// Value of `name`, or `fallback` if unset or empty.
inline std::string envStr(const char* name, const std::string& fallback = "") {
  const char* v = std::getenv(name);
  return (v && *v) ? std::string(v) : fallback;
}

/// Integer value of `name` (accepts K/M/G suffixes, powers of 1024), or `fallback`.
/// Throws InvalidArgument if the variable is set to something that is not a number.
inline int64_t envInt(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v, &end, 10);
  if (end == v) throw InvalidArgument(strCat("environment variable ", name, "='", v, "' is not a number"));
  switch (*end) {
    case 'k': case 'K': x <<= 10; ++end; break;
    case 'm': case 'M': x <<= 20; ++end; break;
    case 'g': case 'G': x <<= 30; ++end; break;
    default: break;
  }
  if (*end != 0 && !(end[0] == 'B' && end[1] == 0)) {
    throw InvalidArgument(strCat("environment variable ", name, "='", v, "' is not a number"));
  }
  return x;
}

}  // namespace pycomm
