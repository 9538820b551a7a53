#include "core/net_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>

#include "core/error.h"

namespace pycomm {
namespace net {

std::optional<std::string> getEnv(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

namespace {

struct IfaddrsDeleter {
  void operator()(ifaddrs* p) const { freeifaddrs(p); }
};
using IfaddrsPtr = std::unique_ptr<ifaddrs, IfaddrsDeleter>;

IfaddrsPtr localInterfaces() {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) {
    throw Error(strCat("pycomm: getifaddrs failed: ", std::strerror(errno)));
  }
  return IfaddrsPtr(list);
}

std::string ipString(const in_addr& a) {
  char buf[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &a, buf, sizeof(buf));
  return buf;
}

}  // namespace

std::string interfaceAddress(const std::string& ifname) {
  IfaddrsPtr list = localInterfaces();
  bool exists = false;
  std::set<std::string> names;
  for (ifaddrs* i = list.get(); i != nullptr; i = i->ifa_next) {
    if (i->ifa_name == nullptr) continue;
    names.insert(i->ifa_name);
    if (ifname != i->ifa_name) continue;
    exists = true;
    if (i->ifa_addr != nullptr && i->ifa_addr->sa_family == AF_INET) {
      return ipString(reinterpret_cast<const sockaddr_in*>(i->ifa_addr)->sin_addr);
    }
  }
  if (exists) {
    throw InvalidArgument(strCat("pycomm: PYCOMM_SOCKET_IFNAME=", ifname,
                                 ": interface has no IPv4 address"));
  }
  std::string avail;
  for (const auto& n : names) avail += (avail.empty() ? "" : ", ") + n;
  throw InvalidArgument(strCat("pycomm: PYCOMM_SOCKET_IFNAME=", ifname,
                               ": no such network interface (available: ", avail, ")"));
}

std::string resolveIPv4(const std::string& host) {
  in_addr a{};
  if (inet_pton(AF_INET, host.c_str(), &a) == 1) return ipString(a);
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr) {
    throw InvalidArgument(strCat("pycomm: cannot resolve host '", host,
                                 "' to an IPv4 address: ", gai_strerror(rc)));
  }
  std::string out = ipString(reinterpret_cast<const sockaddr_in*>(res->ai_addr)->sin_addr);
  freeaddrinfo(res);
  return out;
}

bool isLocalAddress(const std::string& addr) {
  in_addr want{};
  if (inet_pton(AF_INET, addr.c_str(), &want) != 1) return false;
  IfaddrsPtr list = localInterfaces();
  for (ifaddrs* i = list.get(); i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    if (reinterpret_cast<const sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr == want.s_addr) {
      return true;
    }
  }
  return false;
}

namespace {

// The host name's address when it is one of ours, else loopback.
ListenAddress defaultAddress() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) == 0 && name[0] != '\0') {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (getaddrinfo(name, nullptr, &hints, &res) == 0) {
      std::string found;
      for (addrinfo* r = res; r != nullptr && found.empty(); r = r->ai_next) {
        std::string ip = ipString(reinterpret_cast<const sockaddr_in*>(r->ai_addr)->sin_addr);
        if (isLocalAddress(ip)) found = ip;
      }
      freeaddrinfo(res);
      if (!found.empty()) return {found, found, strCat("host name ", name)};
    }
  }
  return {"127.0.0.1", "127.0.0.1", "loopback default"};
}

}  // namespace

ListenAddress chooseListenAddress() {
  if (auto ifname = getEnv("PYCOMM_SOCKET_IFNAME")) {
    std::string ip = interfaceAddress(*ifname);
    return {ip, ip, "PYCOMM_SOCKET_IFNAME=" + *ifname};
  }
  if (auto addr = getEnv("PYCOMM_SOCKET_ADDR")) {
    std::string ip = resolveIPv4(*addr);
    if (ip == "0.0.0.0") {
      // Bind everything, but peers need a concrete address to dial.
      ListenAddress d = defaultAddress();
      return {"0.0.0.0", d.advertiseHost, "PYCOMM_SOCKET_ADDR=0.0.0.0"};
    }
    return {ip, ip, "PYCOMM_SOCKET_ADDR=" + *addr};
  }
  return defaultAddress();
}

std::string formatAddr(const sockaddr_in& a) {
  return strCat(ipString(a.sin_addr), ":", ntohs(a.sin_port));
}

sockaddr_in parseHostPort(const std::string& hostPort) {
  size_t colon = hostPort.rfind(':');
  PYCOMM_CHECK_ARG(colon != std::string::npos && colon > 0 && colon + 1 < hostPort.size(),
                   "pycomm: malformed address '", hostPort, "' (want host:port)");
  std::string host = hostPort.substr(0, colon);
  std::string portStr = hostPort.substr(colon + 1);
  char* end = nullptr;
  errno = 0;
  long port = std::strtol(portStr.c_str(), &end, 10);
  PYCOMM_CHECK_ARG(errno == 0 && end != nullptr && *end == '\0' && port > 0 && port < 65536,
                   "pycomm: malformed port in address '", hostPort, "'");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  std::string ip = resolveIPv4(host);
  inet_pton(AF_INET, ip.c_str(), &a.sin_addr);
  return a;
}

void setNonBlocking(int fd) {
  int flags = fcntl(fd, F_GETFL, 0);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    throw Error(strCat("pycomm: fcntl(O_NONBLOCK) failed: ", std::strerror(errno)));
  }
}

void randomBytes(void* buf, size_t n) {
  uint8_t* p = static_cast<uint8_t*>(buf);
  while (n > 0) {
    ssize_t got = getrandom(p, n, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      throw Error(strCat("pycomm: getrandom failed: ", std::strerror(errno)));
    }
    p += got;
    n -= static_cast<size_t>(got);
  }
}

void logLine(const std::string& line) {
  std::string s = line + "\n";
  const char* p = s.data();
  size_t left = s.size();
  while (left > 0) {
    ssize_t w = ::write(STDERR_FILENO, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;  // best effort: logging never throws
    }
    p += w;
    left -= static_cast<size_t>(w);
  }
}

}  // namespace net
}  // namespace pycomm
