#include "transport/probe.h"

#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <thread>

#include "core/affinity.h"
#include "core/huge_pages.h"

namespace pycomm {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

/// An anonymous private mapping aligned to 2 MiB, advised (or not) before first touch,
/// then touched so that every page is resident.
struct Buffer {
  char* base = nullptr;
  size_t mapped = 0;
  char* data = nullptr;
  size_t bytes = 0;

  Buffer(size_t n, bool huge, bool shared = false) : bytes(n) {
    mapped = n + kHugePageBytes;
    void* m = mmap(nullptr, mapped, PROT_READ | PROT_WRITE,
                   (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      mapped = 0;
      return;
    }
    base = static_cast<char*>(m);
    const uintptr_t a = (reinterpret_cast<uintptr_t>(base) + kHugePageBytes - 1) & ~(uintptr_t{kHugePageBytes} - 1);
    data = reinterpret_cast<char*>(a);
    madvise(data, n, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    for (size_t i = 0; i < n; i += 4096) data[i] = static_cast<char>(i >> 12);
  }
  ~Buffer() {
    if (base) munmap(base, mapped);
  }
  bool ok() const { return data != nullptr; }
};

/// Whether any of [p, p+n) is backed by a huge page, from /proc/self/smaps.
bool hugeBacked(const void* p, size_t n) {
  std::ifstream f("/proc/self/smaps");
  std::string line;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p), hi = lo + n;
  bool inside = false;
  while (std::getline(f, line)) {
    unsigned long a = 0, b = 0;
    if (sscanf(line.c_str(), "%lx-%lx ", &a, &b) == 2 && line.find(':') > line.find('-')) {
      inside = a < hi && lo < b;
      continue;
    }
    if (inside && line.rfind("AnonHugePages:", 0) == 0) {
      unsigned long kb = 0;
      sscanf(line.c_str(), "AnonHugePages: %lu", &kb);
      if (kb > 0) return true;
    }
  }
  return false;
}

void summarise(std::vector<double>& gbps, BandwidthProbe& r) {
  std::sort(gbps.begin(), gbps.end());
  r.bestGBps = gbps.back();
  r.medianGBps = gbps[gbps.size() / 2];
}

/// Runs `work(t)` on `threads` threads at once; the wall time of the slowest.
template <typename F>
double timeThreads(int threads, F work) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> ts;
  for (int t = 1; t < threads; ++t) {
    ts.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      work(t);
    });
  }
  while (ready.load() < threads - 1) std::this_thread::yield();
  const auto t0 = Clock::now();
  go.store(true, std::memory_order_release);
  work(0);
  for (auto& th : ts) th.join();
  return seconds(t0, Clock::now());
}

size_t partBegin(size_t bytes, int parts, int i) {
  return bytes / 4096 * static_cast<size_t>(i) / static_cast<size_t>(parts) * 4096;
}

int futex(std::atomic<uint32_t>* w, int op, uint32_t v, const struct timespec* ts) {
  return static_cast<int>(syscall(SYS_futex, reinterpret_cast<uint32_t*>(w), op, v, ts, nullptr, 0));
}

/// A forked child that stays alive (blocked on a pipe) until the parent is done with
/// it; it only makes async-signal-safe calls, as a child of a threaded process must.
struct Child {
  pid_t pid = -1;
  int wfd = -1;
  explicit Child(void (*body)(void*) = nullptr, void* arg = nullptr) {
    int fds[2];
    if (pipe(fds) != 0) return;
    const pid_t parent = getpid();
    pid = fork();
    if (pid == 0) {
      close(fds[1]);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(0);
      if (body) body(arg);
      char c;
      while (read(fds[0], &c, 1) < 0 && errno == EINTR) {
      }
      _exit(0);
    }
    close(fds[0]);
    if (pid < 0) {
      close(fds[1]);
      return;
    }
    wfd = fds[1];
  }
  ~Child() {
    if (wfd >= 0) close(wfd);  // EOF: the child exits
    if (pid > 0) {
      int st;
      while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
      }
    }
  }
  bool ok() const { return pid > 0; }
};

}  // namespace

int availableCpus() { return processCpuCount(); }

// Records a bandwidth probe's settings in `r`; false (with r.error) if its buffers
// could not be mapped.
bool setUp(BandwidthProbe& r, size_t bytes, int threads, int reps, bool hugePages, const Buffer& src,
           const Buffer& dst) {
  r.threads = std::max(1, threads);
  r.reps = std::max(1, reps);
  r.hugePages = hugePages;
  r.bytes = bytes;
  if (!src.ok() || !dst.ok()) {
    r.error = "mmap failed";
    return false;
  }
  r.hugeBacked = hugeBacked(src.data, bytes);
  return true;
}

BandwidthProbe probeMemcpy(size_t bytes, int threads, int reps, bool hugePages) {
  const UnboundScope machine;  // the machine, not this rank's share of it (core/affinity.h)
  BandwidthProbe r;
  Buffer src(bytes, hugePages), dst(bytes, hugePages);
  if (!setUp(r, bytes, threads, reps, hugePages, src, dst)) return r;
  std::vector<double> gbps;
  for (int i = 0; i <= r.reps; ++i) {  // the first repetition warms up
    const double s = timeThreads(r.threads, [&](int t) {
      const size_t a = partBegin(bytes, r.threads, t), b = partBegin(bytes, r.threads, t + 1);
      memcpy(dst.data + a, src.data + a, b - a);
    });
    if (i > 0) gbps.push_back(static_cast<double>(bytes) / s / 1e9);
  }
  summarise(gbps, r);
  return r;
}

BandwidthProbe probeCrossMemory(size_t bytes, int threads, int reps, bool hugePages) {
  const UnboundScope machine;  // the machine, not this rank's share of it (core/affinity.h)
  BandwidthProbe r;
  // The child inherits the source mapping (copy-on-write, never written again, so its
  // pages stay the parent's pages): the parent reads them out of the child's address
  // space, as a rank reads a peer's buffer.
  Buffer src(bytes, hugePages), dst(bytes, hugePages);
  if (!setUp(r, bytes, threads, reps, hugePages, src, dst)) return r;
  Child child;
  if (!child.ok()) {
    r.error = std::string("fork failed: ") + strerror(errno);
    return r;
  }
  std::vector<double> gbps;
  std::atomic<int> err{0};
  for (int i = 0; i <= r.reps && err.load() == 0; ++i) {
    const double s = timeThreads(r.threads, [&](int t) {
      size_t a = partBegin(bytes, r.threads, t);
      const size_t b = partBegin(bytes, r.threads, t + 1);
      while (a < b) {
        struct iovec l{dst.data + a, b - a};
        struct iovec rm{src.data + a, b - a};
        const ssize_t n = process_vm_readv(child.pid, &l, 1, &rm, 1, 0);
        if (n <= 0) {
          if (n < 0 && errno == EINTR) continue;
          err.store(n < 0 ? errno : EIO);
          return;
        }
        a += static_cast<size_t>(n);
      }
    });
    if (i > 0) gbps.push_back(static_cast<double>(bytes) / s / 1e9);
  }
  if (err.load() != 0) {
    r.error = std::string("process_vm_readv: ") + strerror(err.load());
    return r;
  }
  summarise(gbps, r);
  return r;
}

namespace {

struct PingPong {
  std::atomic<uint32_t> ping;  // parent -> child: round number; UINT32_MAX: stop
  std::atomic<uint32_t> pong;  // child -> parent: round number answered
};

void pongLoop(void* arg) {
  auto* pp = static_cast<PingPong*>(arg);
  uint32_t seen = 0;
  const struct timespec slice{1, 0};
  int idle = 0;
  while (idle < 30) {  // the parent went away without stopping us: give up after 30 s
    const uint32_t v = pp->ping.load(std::memory_order_acquire);
    if (v == UINT32_MAX) return;
    if (v == seen) {
      if (futex(&pp->ping, FUTEX_WAIT, v, &slice) != 0 && errno == ETIMEDOUT) ++idle;
      continue;
    }
    idle = 0;
    seen = v;
    pp->pong.store(v, std::memory_order_release);
    futex(&pp->pong, FUTEX_WAKE, INT_MAX, nullptr);
  }
}

}  // namespace

LatencyProbe probeFutexRoundTrip(int iters) {
  const UnboundScope machine;  // the machine, not this rank's share of it (core/affinity.h)
  LatencyProbe r;
  r.iters = std::max(1, iters);
  void* m = mmap(nullptr, sizeof(PingPong), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    r.error = "mmap failed";
    return r;
  }
  auto* pp = new (m) PingPong();
  pp->ping.store(0);
  pp->pong.store(0);
  std::vector<double> us;
  {
    Child child(pongLoop, pp);
    if (!child.ok()) {
      r.error = std::string("fork failed: ") + strerror(errno);
      munmap(m, sizeof(PingPong));
      return r;
    }
    const struct timespec slice{1, 0};
    const int warm = std::min(50, r.iters);
    for (int i = 1; i <= r.iters + warm && r.error.empty(); ++i) {
      const auto t0 = Clock::now();
      pp->ping.store(static_cast<uint32_t>(i), std::memory_order_release);
      futex(&pp->ping, FUTEX_WAKE, INT_MAX, nullptr);
      int waited = 0;
      while (pp->pong.load(std::memory_order_acquire) != static_cast<uint32_t>(i)) {
        if (futex(&pp->pong, FUTEX_WAIT, static_cast<uint32_t>(i - 1), &slice) != 0 && errno == ETIMEDOUT &&
            ++waited >= 5) {
          r.error = "the child did not answer within 5 s";
        }
        if (!r.error.empty()) break;
      }
      if (i > warm) us.push_back(seconds(t0, Clock::now()) * 1e6);
    }
    pp->ping.store(UINT32_MAX, std::memory_order_release);
    futex(&pp->ping, FUTEX_WAKE, INT_MAX, nullptr);
  }
  munmap(m, sizeof(PingPong));
  if (!r.error.empty() || us.empty()) return r;
  std::sort(us.begin(), us.end());
  r.minus = us.front();
  r.p50us = us[us.size() / 2];
  r.p99us = us[std::min(us.size() - 1, us.size() * 99 / 100)];
  return r;
}

}  // namespace pycomm
