// Small POSIX socket helpers shared by the network transports: an owning fd, address
// formatting and parsing, the listen-address policy (PYCOMM_SOCKET_IFNAME /
// PYCOMM_SOCKET_ADDR), environment lookup and kernel randomness. IPv4 only.
#pragma once

#include <netinet/in.h>

#include <cstddef>
#include <optional>
#include <string>

namespace pycomm {
namespace net {

/// The value of environment variable `name`, or nullopt if it is unset or empty.
std::optional<std::string> getEnv(const char* name);

/// Owns a file descriptor and closes it on destruction. Move-only.
class Fd {
 public:
  /// An empty holder (get() == -1).
  Fd() = default;
  /// Takes ownership of `fd` (may be -1).
  explicit Fd(int fd) : fd_(fd) {}
  /// Closes the descriptor, if any.
  ~Fd() { reset(); }
  /// Moves ownership out of `o`.
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  /// Closes the current descriptor and takes ownership of `o`'s.
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;

  /// The raw descriptor (-1 if none).
  int get() const { return fd_; }
  /// True if a descriptor is held.
  bool valid() const { return fd_ >= 0; }
  /// Gives up ownership and returns the descriptor.
  int release() {
    int f = fd_;
    fd_ = -1;
    return f;
  }
  /// Closes the held descriptor (if any) and holds `fd` instead.
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

/// Where a transport listens and what it tells its peers to connect to.
struct ListenAddress {
  std::string bindHost;       ///< numeric IPv4 the socket binds to
  std::string advertiseHost;  ///< numeric IPv4 published to the peers
  std::string source;         ///< which rule chose it (for error messages)
};

/// Chooses the listen address: env PYCOMM_SOCKET_IFNAME (the IPv4 address of that
/// interface; InvalidArgument if it does not exist or has none), else env
/// PYCOMM_SOCKET_ADDR (numeric or a resolvable host name; "0.0.0.0" binds every
/// interface and advertises the address the next rules pick), else the address the
/// host name resolves to when that address belongs to a local interface, else
/// 127.0.0.1. Never binds 0.0.0.0 unless PYCOMM_SOCKET_ADDR asks for it.
ListenAddress chooseListenAddress();

/// The IPv4 address of interface `ifname`; InvalidArgument naming the available
/// interfaces if it does not exist or has no IPv4 address.
std::string interfaceAddress(const std::string& ifname);

/// Resolves `host` (numeric or a name) to a numeric IPv4 string; InvalidArgument on failure.
std::string resolveIPv4(const std::string& host);

/// True if numeric IPv4 `addr` is assigned to one of this host's interfaces.
bool isLocalAddress(const std::string& addr);

/// Formats `a` as "A.B.C.D:P".
std::string formatAddr(const sockaddr_in& a);

/// Parses "host:port" (host resolved with resolveIPv4) into `out`; InvalidArgument on
/// malformed input.
sockaddr_in parseHostPort(const std::string& hostPort);

/// Puts `fd` in non-blocking mode (throws Error on failure).
void setNonBlocking(int fd);

/// Fills `n` bytes at `buf` from the kernel's CSPRNG (getrandom); throws Error on failure.
void randomBytes(void* buf, size_t n);

/// Writes `line` plus a newline to stderr in a single write (lines from several
/// threads do not interleave).
void logLine(const std::string& line);

}  // namespace net
}  // namespace pycomm
