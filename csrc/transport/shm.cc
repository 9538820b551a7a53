#include "transport/shm.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <fstream>
#include <thread>

#include "core/affinity.h"
#include "core/env.h"
#include "core/error.h"
#include "core/huge_pages.h"
#include "core/shared_arena.h"
#include "transport/probe.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYCOMM_CPU_RELAX() _mm_pause()
#else
#define PYCOMM_CPU_RELAX() std::this_thread::yield()
#endif

namespace pycomm {

namespace {

constexpr uint32_t kMagic = 0x70636d31;  // "pcm1"
constexpr size_t kAlign = 64;

size_t alignUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

int futexWait(std::atomic<uint32_t>* addr, uint32_t expected, std::chrono::nanoseconds timeout) {
  struct timespec ts;
  ts.tv_sec = static_cast<time_t>(timeout.count() / 1000000000LL);
  ts.tv_nsec = static_cast<long>(timeout.count() % 1000000000LL);
  return static_cast<int>(syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT,
                                  expected, &ts, nullptr, 0));
}

void futexWakeAll(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

std::string randomHex(size_t bytes) {
  std::vector<uint8_t> b(bytes);
  size_t got = 0;
  while (got < bytes) {
    ssize_t n = getrandom(b.data() + got, bytes - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(strCat("pycomm: getrandom failed: ", strerror(errno)));
    }
    got += static_cast<size_t>(n);
  }
  static const char* kHex = "0123456789abcdef";
  std::string s;
  for (uint8_t c : b) {
    s += kHex[c >> 4];
    s += kHex[c & 15];
  }
  return s;
}

bool pidAlive(pid_t pid) { return kill(pid, 0) == 0 || errno == EPERM; }

// Removes segments left by jobs whose creating process no longer exists (a job
// killed in the short window between creating and unlinking its segment).
void removeStaleSegments() {
  DIR* d = opendir("/dev/shm");
  if (!d) return;
  while (struct dirent* e = readdir(d)) {
    const char* n = e->d_name;
    if (strncmp(n, "pycomm-", 7) != 0) continue;
    long pid = strtol(n + 7, nullptr, 10);
    if (pid > 0 && !pidAlive(static_cast<pid_t>(pid))) shm_unlink((std::string("/") + n).c_str());
  }
  closedir(d);
}

}  // namespace

struct ShmHeader {
  uint32_t magic;
  uint32_t size;
  std::atomic<uint32_t> abortState;  // 0 running, 1 writing message, 2 aborted
  int32_t abortRank;
  char abortMsg[1024];
};

struct ShmPostRecord {
  std::atomic<uint64_t> seq;  // direct sequence number this record describes
  OpDesc desc;
  uint64_t addr;
  uint64_t bytes;
  uint64_t inlineBytes;
  // The buffer's registered segment (core/shared_arena.h), regSeg < 0 when it has none.
  int32_t regSeg;
  int32_t regFd;
  uint64_t regBase;
  uint64_t regBytes;
};

struct alignas(64) ShmRankSlot {
  std::atomic<uint32_t> doorbell;  // futex word: bumped by whoever changes state this rank waits on
  std::atomic<uint32_t> sleepers;  // threads of this rank blocked in futex_wait
  int32_t pid;
  uint32_t pad;
  uint64_t canaryAddr;              // address of canary_ in the owning process (CMA probe)
  std::atomic<uint64_t> barrier;    // last barrier this rank arrived at
  OpDesc barrierDesc[2];            // the call of each barrier, by barrier number parity
  // The collective this rank is blocked in (published when a wait turns slow), so that
  // stuck ranks compare calls even when the mismatched ones never meet in a
  // mailbox or post record. A seqlock: `callVer` is odd while the words change.
  std::atomic<uint64_t> callVer;
  std::atomic<uint64_t> callWords[sizeof(OpDesc) / 8];
  std::atomic<uint64_t> served;     // bytes peers have read out of this rank's buffers
  ShmPostRecord rec[2];             // double-buffered by direct sequence number parity
};

struct alignas(64) ShmMailbox {
  std::atomic<uint64_t> posted;    // sequence of the last message the sender posted
  std::atomic<uint64_t> consumed;  // sequence of the last message the receiver finished
  OpDesc desc;
  uint64_t addr;
  uint64_t bytes;
};

namespace {
const uint64_t kCanary = 0x7079636f6d6d2121ULL;  // read by peers to prove CMA works
size_t slotsOffset() { return alignUp(sizeof(ShmHeader), kAlign); }
size_t inlineOffset(int n) { return alignUp(slotsOffset() + n * sizeof(ShmRankSlot), 4096); }
size_t mailboxOffset(int n) { return inlineOffset(n) + static_cast<size_t>(n) * 2 * kShmInlineBytes; }
size_t totalBytes(int n) {
  return alignUp(mailboxOffset(n) + static_cast<size_t>(n) * n * sizeof(ShmMailbox), 4096);
}
}  // namespace

ShmTransport::ShmTransport(Store& store, const std::string& keyPrefix, int rank, int size,
                           std::chrono::milliseconds timeout)
    : rank_(rank), size_(size), pids_(size), pidfds_(size, -1), sendSeq_(size, 0),
      recvSeq_(size, 0) {
  peerSegs_.resize(size);
  curSeg_.assign(size, -1);
  registered_ = envInt("PYCOMM_REGISTERED", 1) != 0;
  // How long a wait spins before it sleeps on the futex. A spinning rank helps only
  // while the rank it waits for runs on another core: with more ranks on the host than
  // cores it can use, the spin steals the core that rank needs, so the wait yields the
  // core at every step and sleeps soon (PYCOMM_SPIN / PYCOMM_SPIN_YIELD override).
  const int cpus = processCpuCount();  // the host's CPUs, not the share pycomm bound this rank to
  oversubscribed_ = size > cpus;
  spinIters_ = static_cast<int>(envInt("PYCOMM_SPIN", oversubscribed_ ? kSpinOversubscribed : kSpinDefault));
  yieldEvery_ = static_cast<int>(std::max<int64_t>(
      1, envInt("PYCOMM_SPIN_YIELD", oversubscribed_ ? 1 : 128)));
  hugeAdviseBytes_ = static_cast<size_t>(envInt("PYCOMM_HUGE_PAGES_MIN", static_cast<int64_t>(kHugeAdviseDefault)));
  mapBytes_ = totalBytes(size);
  int fd = -1;
  if (rank == 0) {
    removeStaleSegments();
    segName_ = strCat("/pycomm-", getpid(), "-", randomHex(8));
    fd = shm_open(segName_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) throw Error(strCat("pycomm: shm_open(", segName_, ") failed: ", strerror(errno)));
    if (ftruncate(fd, static_cast<off_t>(mapBytes_)) != 0) {
      int e = errno;
      close(fd);
      shm_unlink(segName_.c_str());
      throw Error(strCat("pycomm: cannot size shared segment to ", mapBytes_, " bytes: ", strerror(e)));
    }
    store.setString(keyPrefix + "shm/name", segName_);
  } else {
    segName_ = store.getString(keyPrefix + "shm/name", timeout);
    fd = shm_open(segName_.c_str(), O_RDWR, 0600);
    if (fd < 0) throw Error(strCat("pycomm: rank ", rank, " cannot open shared segment ", segName_, ": ", strerror(errno)));
    struct stat st;
    if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != mapBytes_) {
      close(fd);
      throw Error(strCat("pycomm: shared segment ", segName_, " has the wrong size (group size mismatch?)"));
    }
  }
  base_ = mmap(nullptr, mapBytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base_ == MAP_FAILED) {
    base_ = nullptr;
    if (rank == 0) shm_unlink(segName_.c_str());
    throw Error(strCat("pycomm: mmap of shared segment failed: ", strerror(errno)));
  }
  header_ = static_cast<ShmHeader*>(base_);
  if (rank == 0) {
    header_->size = static_cast<uint32_t>(size);
    header_->magic = kMagic;
  }
  ShmRankSlot* me = slot(rank);
  me->pid = getpid();
  me->canaryAddr = reinterpret_cast<uint64_t>(&kCanary);
  // Every rank has mapped the segment once the counter reaches size; then it can be
  // unlinked, so it disappears with the last process whatever way that process ends.
  if (store.add(keyPrefix + "shm/opened", 1) == size) store.setString(keyPrefix + "shm/all", "1");
  store.get(keyPrefix + "shm/all", timeout);
  if (rank == 0) shm_unlink(segName_.c_str());
  for (int r = 0; r < size; ++r) {
    pids_[r] = slot(r)->pid;
    if (r != rank) pidfds_[r] = static_cast<int>(syscall(SYS_pidfd_open, pids_[r], 0));
  }
  // Probe cross-memory attach on a peer; all ranks agree on the outcome through the store.
  bool ok = true;
  if (size > 1) {
    int peer = (rank + 1) % size;
    uint64_t v = 0;
    struct iovec local{&v, sizeof(v)};
    struct iovec remote{reinterpret_cast<void*>(slot(peer)->canaryAddr), sizeof(v)};
    ok = process_vm_readv(pids_[peer], &local, 1, &remote, 1, 0) == sizeof(v) && v == kCanary;
  }
  store.setString(strCat(keyPrefix, "shm/cma/", rank), ok ? "1" : "0");
  for (int r = 0; r < size; ++r) {
    if (store.getString(strCat(keyPrefix, "shm/cma/", r), timeout) != "1") {
      release();  // the destructor does not run for a constructor that throws
      throw Error(strCat("pycomm: cross-memory attach (process_vm_readv) is not permitted between ranks (rank ",
                         r, " failed); the shm transport needs it"));
    }
  }
}

ShmTransport::~ShmTransport() { release(); }

void ShmTransport::release() {
  for (auto& segs : peerSegs_) {
    for (PeerSegment& ps : segs) {
      if (ps.local) munmap(ps.local, ps.bytes);
    }
    segs.clear();
  }
  for (int& fd : pidfds_) {
    if (fd >= 0) close(fd);
    fd = -1;
  }
  if (base_) munmap(base_, mapBytes_);
  base_ = nullptr;
}

uint64_t ShmTransport::bytesSent() const {
  return slot(rank_)->served.load(std::memory_order_relaxed);
}

ShmRankSlot* ShmTransport::slot(int r) const {
  return reinterpret_cast<ShmRankSlot*>(static_cast<char*>(base_) + slotsOffset()) + r;
}

ShmMailbox* ShmTransport::mailbox(int from, int to) const {
  return reinterpret_cast<ShmMailbox*>(static_cast<char*>(base_) + mailboxOffset(size_)) +
         (static_cast<size_t>(from) * size_ + to);
}

void ShmTransport::ring(int peer) {
  ShmRankSlot* s = slot(peer);
  s->doorbell.fetch_add(1, std::memory_order_seq_cst);
  if (s->sleepers.load(std::memory_order_seq_cst) != 0) futexWakeAll(&s->doorbell);
}

void ShmTransport::checkAbort() const {
  if (header_->abortState.load(std::memory_order_acquire) == 2) {
    throw PeerError(std::string(header_->abortMsg));
  }
}

void ShmTransport::checkPeerAlive(int peer, const OpDesc& desc, const char* what) {
  if (peer < 0 || peer == rank_) return;
  bool dead;
  if (pidfds_[peer] >= 0) {
    struct pollfd p{pidfds_[peer], POLLIN, 0};
    dead = poll(&p, 1, 0) > 0;
  } else {
    dead = !pidAlive(pids_[peer]);
  }
  if (dead) {
    std::string why = strCat("pycomm: rank ", peer, " (pid ", pids_[peer],
                             ") exited while rank ", rank_, " was waiting on it in ", desc.str(),
                             " (", what, ")");
    abort(why);
    throw PeerError(why);
  }
}

namespace {

void publishCall(ShmRankSlot* me, const OpDesc& desc) {
  uint64_t w[sizeof(OpDesc) / 8];
  memcpy(w, &desc, sizeof(w));
  bool same = true;
  for (size_t i = 0; i < sizeof(OpDesc) / 8; ++i) same = same && me->callWords[i].load(std::memory_order_relaxed) == w[i];
  if (same) return;
  const uint64_t v = me->callVer.load(std::memory_order_relaxed);
  me->callVer.store(v + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  for (size_t i = 0; i < sizeof(OpDesc) / 8; ++i) me->callWords[i].store(w[i], std::memory_order_relaxed);
  me->callVer.store(v + 2, std::memory_order_release);
}

// False when the peer was changing its record (try again later).
bool readCall(const ShmRankSlot* s, OpDesc* out) {
  const uint64_t v1 = s->callVer.load(std::memory_order_acquire);
  if (v1 & 1) return false;
  uint64_t w[sizeof(OpDesc) / 8];
  for (size_t i = 0; i < sizeof(OpDesc) / 8; ++i) w[i] = s->callWords[i].load(std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_acquire);
  if (s->callVer.load(std::memory_order_relaxed) != v1) return false;
  memcpy(static_cast<void*>(out), w, sizeof(w));
  return true;
}

}  // namespace

template <typename Pred>
void ShmTransport::waitFor(Pred done, int peer, const OpDesc& desc, const Deadline& deadline,
                           const char* what) {
  for (int i = 0; i < spinIters_; ++i) {
    if (done()) return;
    PYCOMM_CPU_RELAX();
    // The peer we wait for may need this core (always so when oversubscribed).
    if ((i + 1) % yieldEvery_ == 0) sched_yield();
  }
  ShmRankSlot* me = slot(rank_);
  // Collectives only: p2p sequence numbers are per pair and p2p calls are unordered.
  const bool collective = desc.coll != CollType::kSend;
  if (collective) publishCall(me, desc);
  auto lastCheck = std::chrono::steady_clock::now();
  while (true) {
    uint32_t bell = me->doorbell.load(std::memory_order_seq_cst);
    if (done()) return;
    checkAbort();
    if (deadline.expired()) {
      std::string why = strCat("pycomm: rank ", rank_, " timed out waiting for ",
                               peer >= 0 ? strCat("rank ", peer) : std::string("all ranks"), " in ",
                               desc.str(), " (", what, "; the group's timeout passed)");
      throw TimeoutError(why);
    }
    auto now = std::chrono::steady_clock::now();
    if (now - lastCheck > std::chrono::milliseconds(50)) {
      lastCheck = now;
      for (int r = 0; collective && r < size_; ++r) {
        OpDesc theirs;
        if (r == rank_ || !readCall(slot(r), &theirs)) continue;
        if (theirs.coll != CollType::kSend && theirs.seq == desc.seq && !theirs.sameCall(desc)) {
          std::string why = strCat("pycomm: collective mismatch between rank ", rank_, " and rank ",
                                   r, ": rank ", rank_, " runs ", desc.str(), ", rank ", r,
                                   " runs ", theirs.str());
          abort(why);
          throw MismatchError(why);
        }
      }
      if (peer >= 0) {
        checkPeerAlive(peer, desc, what);
      } else {
        for (int r = 0; r < size_; ++r) checkPeerAlive(r, desc, what);
      }
    }
    auto slice = std::min<std::chrono::nanoseconds>(deadline.remaining(), std::chrono::milliseconds(50));
    me->sleepers.fetch_add(1, std::memory_order_seq_cst);
    if (!done()) futexWait(&me->doorbell, bell, slice);
    me->sleepers.fetch_sub(1, std::memory_order_seq_cst);
  }
}

void ShmTransport::abort(const std::string& why) {
  uint32_t expected = 0;
  if (header_->abortState.compare_exchange_strong(expected, 1)) {
    size_t n = std::min(why.size(), sizeof(header_->abortMsg) - 1);
    memcpy(header_->abortMsg, why.data(), n);
    header_->abortMsg[n] = 0;
    header_->abortRank = rank_;
    header_->abortState.store(2, std::memory_order_release);
  }
  for (int r = 0; r < size_; ++r) ring(r);
}

void ShmTransport::readPeer(int peer, uint64_t remote, void* local, size_t bytes) {
  const int si = curSeg_[peer];
  if (si >= 0) {
    const PeerSegment& ps = peerSegs_[peer][si];
    if (ps.local && remote >= ps.remoteBase && remote - ps.remoteBase + bytes <= ps.bytes) {
      if (bytes) memcpy(local, static_cast<const char*>(ps.local) + (remote - ps.remoteBase), bytes);
      countMappedRead(peer, bytes);
      return;
    }
  }
  readPeerCma(peer, remote, local, bytes);
}

void ShmTransport::countMappedRead(int peer, size_t bytes) {
  stats_.bytesRecv.fetch_add(bytes, std::memory_order_relaxed);
  slot(peer)->served.fetch_add(bytes, std::memory_order_relaxed);
}

size_t ShmTransport::mappedSegments() const {
  size_t n = 0;
  for (const auto& segs : peerSegs_) {
    for (const PeerSegment& ps : segs) n += ps.local != nullptr;
  }
  return n;
}

const void* ShmTransport::mapPeerSegment(int peer, const ShmPostRecord& rec) {
  auto& segs = peerSegs_[peer];
  int idx = -1;
  for (size_t i = 0; i < segs.size(); ++i) {
    if (segs[i].segment == rec.regSeg) idx = static_cast<int>(i);
  }
  if (idx < 0) {
    // A segment this rank has not seen yet (the owner's arena grew): map it once. The
    // owner keeps the descriptor open for its life, so the number stays valid.
    PeerSegment ps;
    ps.segment = rec.regSeg;
    ps.remoteBase = rec.regBase;
    ps.bytes = rec.regBytes;
    const int fd = pidfds_[peer] >= 0
                       ? static_cast<int>(syscall(SYS_pidfd_getfd, pidfds_[peer], rec.regFd, 0))
                       : -1;
    if (fd >= 0) {
      struct stat st;
      if (fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_size) == rec.regBytes) {
        void* p = mmap(nullptr, rec.regBytes, PROT_READ, MAP_SHARED, fd, 0);
        if (p != MAP_FAILED) {
          ps.local = p;
          (void)madvise(p, rec.regBytes, MADV_HUGEPAGE);
        }
      }
      close(fd);
    }
    segs.push_back(ps);
    idx = static_cast<int>(segs.size()) - 1;
  }
  curSeg_[peer] = idx;
  const PeerSegment& ps = segs[idx];
  if (!ps.local || rec.addr < ps.remoteBase || rec.addr - ps.remoteBase + rec.bytes > ps.bytes) {
    curSeg_[peer] = -1;
    return nullptr;
  }
  return static_cast<const char*>(ps.local) + (rec.addr - ps.remoteBase);
}

void ShmTransport::readPeerCma(int peer, uint64_t remote, void* local, size_t bytes) {
  char* dst = static_cast<char*>(local);
  size_t done = 0;
  while (done < bytes) {
    struct iovec l{dst + done, bytes - done};
    struct iovec r{reinterpret_cast<void*>(remote + done), bytes - done};
    ssize_t n = process_vm_readv(pids_[peer], &l, 1, &r, 1, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      if (e == ESRCH) throw PeerError(strCat("pycomm: rank ", peer, " exited during a transfer to rank ", rank_));
      throw PeerError(strCat("pycomm: rank ", rank_, " cannot read ", bytes, " bytes from rank ", peer,
                             ": ", strerror(e)));
    }
    if (n == 0) throw PeerError(strCat("pycomm: short read from rank ", peer));
    done += static_cast<size_t>(n);
  }
  stats_.bytesRecv.fetch_add(bytes, std::memory_order_relaxed);
  slot(peer)->served.fetch_add(bytes, std::memory_order_relaxed);
}

void ShmTransport::adviseHuge(const void* buf, size_t bytes) {
  // Peers pin the pages of this buffer on every read (process_vm_readv): 2 MiB pages
  // mean 1/512 as many pins. Once per buffer (core/huge_pages.h remembers it). Opt-in.
  if (hugeAdviseBytes_ > 0 && bytes >= hugeAdviseBytes_ && buf != nullptr) {
    adviseHugePages(const_cast<void*>(buf), bytes, /*collapse=*/true);
  }
}

void ShmTransport::postSend(int peer, const void* buf, size_t bytes, const OpDesc& desc) {
  PYCOMM_CHECK_ARG(peer >= 0 && peer < size_ && peer != rank_, "invalid peer rank ", peer);
  checkAbort();
  adviseHuge(buf, bytes);
  ShmMailbox* mb = mailbox(rank_, peer);
  uint64_t seq = ++sendSeq_[peer];
  mb->desc = desc;
  mb->addr = reinterpret_cast<uint64_t>(buf);
  mb->bytes = bytes;
  mb->posted.store(seq, std::memory_order_release);
  ring(peer);
  stats_.messagesSent.fetch_add(1, std::memory_order_relaxed);
}

void ShmTransport::waitSendDone(int peer, const OpDesc& desc, const Deadline& deadline) {
  ShmMailbox* mb = mailbox(rank_, peer);
  const uint64_t seq = sendSeq_[peer];
  // The receiver reads straight from our buffer: it stays untouched until consumed.
  waitFor([&] { return mb->consumed.load(std::memory_order_acquire) >= seq; }, peer, desc, deadline,
          "send");
}

void ShmTransport::completeRecv(int peer, void* buf, size_t bytes, const OpDesc& desc,
                                const Deadline& deadline) {
  PYCOMM_CHECK_ARG(peer >= 0 && peer < size_ && peer != rank_, "invalid peer rank ", peer);
  ShmMailbox* mb = mailbox(peer, rank_);
  const uint64_t seq = ++recvSeq_[peer];
  // Wait for the sender's post: its descriptor must describe the same call.
  waitFor([&] { return mb->posted.load(std::memory_order_acquire) >= seq; }, peer, desc, deadline,
          "recv");
  OpDesc theirs = mb->desc;
  uint64_t theirBytes = mb->bytes;
  if (!theirs.sameCall(desc) || theirBytes != bytes) {
    try {
      throwMismatch(rank_, peer, desc, bytes, theirs, theirBytes);
    } catch (const MismatchError& e) {
      abort(e.what());
      throw;
    }
  }
  if (bytes > 0) readPeerCma(peer, mb->addr, buf, bytes);
  stats_.messagesRecv.fetch_add(1, std::memory_order_relaxed);
  // Release the sender's buffer.
  mb->consumed.store(seq, std::memory_order_release);
  ring(peer);
}

Transport::Peek ShmTransport::peekHeader(int peer, OpDesc* desc, size_t* bytes) {
  checkAbort();
  PYCOMM_CHECK_ARG(peer >= 0 && peer < size_ && peer != rank_, "invalid peer rank ", peer);
  ShmMailbox* mb = mailbox(peer, rank_);
  if (mb->posted.load(std::memory_order_acquire) < recvSeq_[peer] + 1) return Peek::kNothing;
  *desc = mb->desc;
  *bytes = mb->bytes;
  return Peek::kMessage;
}

void ShmTransport::send(int peer, const void* buf, size_t bytes, const OpDesc& desc,
                        const Deadline& deadline) {
  postSend(peer, buf, bytes, desc);
  waitSendDone(peer, desc, deadline);
}

void ShmTransport::recv(int peer, void* buf, size_t bytes, const OpDesc& desc,
                        const Deadline& deadline) {
  checkAbort();
  completeRecv(peer, buf, bytes, desc, deadline);
}

void ShmTransport::sendRecv(int sendPeer, const void* sendBuf, size_t sendBytes, int recvPeer,
                            void* recvBuf, size_t recvBytes, const OpDesc& desc,
                            const Deadline& deadline) {
  // Post first so the peer can pull while we pull from ours: both halves in flight.
  postSend(sendPeer, sendBuf, sendBytes, desc);
  completeRecv(recvPeer, recvBuf, recvBytes, desc, deadline);
  waitSendDone(sendPeer, desc, deadline);
}

uint64_t ShmTransport::post(const OpDesc& desc, const void* addr, size_t bytes, size_t inlineBytes) {
  checkAbort();
  PYCOMM_ASSERT(inlineBytes <= kShmInlineBytes);
  adviseHuge(addr, bytes);
  const uint64_t dseq = ++directSeq_;
  ShmRankSlot* me = slot(rank_);
  ShmPostRecord& rec = me->rec[dseq & 1];
  // Safe to overwrite: every peer posted dseq-1 before we could finish dseq-1, and a
  // peer posts dseq-1 only after it finished reading our record dseq-2 (same parity).
  rec.desc = desc;
  rec.addr = reinterpret_cast<uint64_t>(addr);
  rec.bytes = bytes;
  rec.inlineBytes = inlineBytes;
  rec.regSeg = -1;
  SharedArena::Location loc;
  if (registered_ && inlineBytes == 0 && bytes > 0 && SharedArena::instance().locate(addr, bytes, &loc)) {
    rec.regSeg = loc.segment;
    rec.regFd = loc.fd;
    rec.regBase = loc.base;
    rec.regBytes = loc.segBytes;
  }
  if (inlineBytes > 0) {
    char* dst = static_cast<char*>(base_) + inlineOffset(size_) +
                (static_cast<size_t>(rank_) * 2 + (dseq & 1)) * kShmInlineBytes;
    memcpy(dst, addr, inlineBytes);
  }
  rec.seq.store(dseq, std::memory_order_release);
  for (int r = 0; r < size_; ++r) {
    if (r != rank_) ring(r);
  }
  return dseq;
}

ShmTransport::Peer ShmTransport::peerRecord(int peer, uint64_t dseq, const OpDesc& desc, size_t bytes,
                                            const Deadline& deadline) {
  ShmRankSlot* s = slot(peer);
  ShmPostRecord& rec = s->rec[dseq & 1];
  waitFor([&] { return rec.seq.load(std::memory_order_acquire) >= dseq; }, peer, desc, deadline,
          "direct post");
  if (rec.seq.load(std::memory_order_acquire) != dseq || !rec.desc.sameCall(desc) || rec.bytes != bytes) {
    try {
      throwMismatch(rank_, peer, desc, bytes, rec.desc, rec.bytes);
    } catch (const MismatchError& e) {
      abort(e.what());
      throw;
    }
  }
  Peer p;
  p.addr = rec.addr;
  p.bytes = rec.bytes;
  curSeg_[peer] = -1;
  if (rec.regSeg >= 0 && registered_) p.mapped = mapPeerSegment(peer, rec);
  if (rec.inlineBytes > 0) {
    p.inlineData = static_cast<char*>(base_) + inlineOffset(size_) +
                   (static_cast<size_t>(peer) * 2 + (dseq & 1)) * kShmInlineBytes;
    // Inline data is traffic too: the reader consumes it, the owner "sent" it.
    stats_.bytesRecv.fetch_add(rec.inlineBytes, std::memory_order_relaxed);
    s->served.fetch_add(rec.inlineBytes, std::memory_order_relaxed);
  }
  return p;
}

void ShmTransport::barrier(const OpDesc& desc, const Deadline& deadline) {
  checkAbort();
  const uint64_t b = ++barrierSeq_;
  // The barrier carries the call: ranks that skipped every other check (a broadcast
  // whose ranks disagree on the root both act as root) meet here and compare. Safe to
  // overwrite slot b&1: every peer has left barrier b-2, which used it.
  slot(rank_)->barrierDesc[b & 1] = desc;
  slot(rank_)->barrier.store(b, std::memory_order_release);
  for (int r = 0; r < size_; ++r) {
    if (r != rank_) ring(r);
  }
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    ShmRankSlot* s = slot(r);
    waitFor([&] { return s->barrier.load(std::memory_order_acquire) >= b; }, r, desc, deadline,
            "barrier");
    // A peer past b is at b+1 at most (it waits for us there), which uses the other slot.
    const OpDesc theirs = s->barrierDesc[b & 1];
    if (!theirs.sameCall(desc)) {
      try {
        throwMismatch(rank_, r, desc, 0, theirs, 0);
      } catch (const MismatchError& e) {
        abort(e.what());
        throw;
      }
    }
  }
}

namespace {
std::string readFirstLine(const char* path) {
  std::ifstream f(path);
  std::string s;
  std::getline(f, s);
  return s;
}
std::string linkTarget(const char* path) {
  char buf[256];
  ssize_t n = readlink(path, buf, sizeof(buf) - 1);
  if (n < 0) return "?";
  buf[n] = 0;
  return buf;
}
}  // namespace

std::string localHostKey() {
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  return strCat(host, "|", readFirstLine("/proc/sys/kernel/random/boot_id"), "|",
                linkTarget("/proc/self/ns/net"), "|", linkTarget("/proc/self/ns/pid"), "|",
                linkTarget("/proc/self/ns/ipc"));
}

}  // namespace pycomm
