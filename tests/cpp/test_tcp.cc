// TCP transport: ranks as threads over loopback, rendezvous through a MemStore.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/net_util.h"
#include "test_util.h"
#include "transport/tcp.h"
#include "transport/tcp_streams.h"

namespace pycomm {
namespace {

using std::chrono::milliseconds;
using testing::MemStore;
using testing::runRanks;
using Clock = std::chrono::steady_clock;

constexpr milliseconds kTimeout{20000};
constexpr char kPrefix[] = "grp0/tcp/";

using testing::filled;
using testing::makeDesc;
using testing::matches;
using testing::messageOf;

// Builds an n-rank mesh (constructors run concurrently, as on real ranks).
std::vector<std::unique_ptr<TcpTransport>> makeMesh(MemStore& store, int n,
                                                     milliseconds timeout = kTimeout) {
  return testing::makeTransports<TcpTransport>(store, kPrefix, n, timeout);
}

// A raw client socket to "host:port".
net::Fd dial(const std::string& hostPort) {
  sockaddr_in a = net::parseHostPort(hostPort);
  net::Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0)
      << std::strerror(errno);
  return fd;
}

bool readExactly(int fd, void* buf, size_t n, int timeoutMs) {
  uint8_t* p = static_cast<uint8_t*>(buf);
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    if (::poll(&pfd, 1, timeoutMs) <= 0) return false;
    ssize_t r = ::recv(fd, p, n, 0);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// True if the server closes `fd` (EOF or reset) within `timeoutMs`.
bool closedByPeer(int fd, int timeoutMs) {
  pollfd pfd{fd, POLLIN, 0};
  if (::poll(&pfd, 1, timeoutMs) <= 0) return false;
  char c;
  return ::recv(fd, &c, 1, 0) <= 0;
}

TEST(TcpTransport, SingleRankNeedsNoPeers) {
  MemStore store;
  TcpTransport t(store, kPrefix, 0, 1, kTimeout);
  EXPECT_EQ(t.size(), 1);
  EXPECT_STREQ(t.name(), "tcp");
  EXPECT_THROW(t.send(0, nullptr, 0, OpDesc{}, Deadline::after(kTimeout)), InvalidArgument);
}

TEST(TcpTransport, SendRecvSizesWithContent) {
  MemStore store;
  auto t = makeMesh(store, 2);
  uint64_t seq = 0;
  uint64_t total = 0;
  for (size_t bytes : {size_t(0), size_t(1), size_t(7919), size_t(64) << 20}) {
    OpDesc d = makeDesc(CollType::kSend, ++seq, bytes);
    total += bytes;
    runRanks(2, [&](int r) {
      auto dl = Deadline::after(kTimeout);
      if (r == 0) {
        auto buf = filled(0, bytes);
        t[0]->send(1, buf.data(), buf.size(), d, dl);
      } else {
        std::vector<uint8_t> buf(bytes, 0xee);
        t[1]->recv(0, buf.data(), buf.size(), d, dl);
        EXPECT_TRUE(matches(buf, 0)) << bytes << " bytes";
      }
    });
  }
  EXPECT_EQ(t[0]->stats().bytesSent.load(), total);
  EXPECT_EQ(t[1]->stats().bytesRecv.load(), total);
  EXPECT_EQ(t[0]->stats().messagesSent.load(), 4u);
  EXPECT_EQ(t[1]->stats().messagesRecv.load(), 4u);
}

TEST(TcpTransport, ManySmallMessagesArriveInOrder) {
  MemStore store;
  auto t = makeMesh(store, 2);
  constexpr int kMessages = 2000;
  runRanks(2, [&](int r) {
    auto dl = Deadline::after(kTimeout);
    for (int i = 0; i < kMessages; ++i) {
      OpDesc d = makeDesc(CollType::kSend, i, 4);
      uint32_t v = static_cast<uint32_t>(i);
      if (r == 0) {
        t[0]->send(1, &v, sizeof(v), d, dl);
      } else {
        uint32_t got = 0;
        t[1]->recv(0, &got, sizeof(got), d, dl);
        ASSERT_EQ(got, v);
      }
    }
  });
}

class TcpRing : public ::testing::TestWithParam<int> {};

TEST_P(TcpRing, SendRecvRingStepDoesNotDeadlock) {
  const int n = GetParam();
  MemStore store;
  auto t = makeMesh(store, n);
  // Large enough to overflow every socket buffer many times: both directions must
  // progress together or the ring deadlocks.
  const size_t big = n <= 3 ? (size_t(64) << 20) : (size_t(16) << 20);
  uint64_t seq = 0;
  for (size_t bytes : {size_t(0), size_t(3), size_t(100000), big}) {
    OpDesc d = makeDesc(CollType::kAllGather, ++seq, bytes);
    runRanks(n, [&](int r) {
      int next = (r + 1) % n, prev = (r + n - 1) % n;
      auto out = filled(r, bytes);
      std::vector<uint8_t> in(bytes, 0);
      t[r]->sendRecv(next, out.data(), out.size(), prev, in.data(), in.size(), d,
                     Deadline::after(kTimeout));
      EXPECT_TRUE(matches(in, prev)) << "rank " << r << ", " << bytes << " bytes";
    });
  }
}

INSTANTIATE_TEST_SUITE_P(Tcp, TcpRing, ::testing::Values(2, 3, 5));

TEST(TcpTransport, FullDuplexFromTwoThreads) {
  // One thread sends while another receives on the same transport (the backend's
  // p2p workers), both ranks at once, sizes far above the socket buffers.
  MemStore store;
  auto t = makeMesh(store, 2);
  const size_t bytes = size_t(24) << 20;
  runRanks(4, [&](int w) {
    int r = w / 2, peer = 1 - r;
    OpDesc d = makeDesc(CollType::kSend, 1, bytes);
    auto dl = Deadline::after(kTimeout);
    if (w % 2 == 0) {
      auto buf = filled(r, bytes);
      t[r]->send(peer, buf.data(), buf.size(), d, dl);
    } else {
      std::vector<uint8_t> buf(bytes);
      t[r]->recv(peer, buf.data(), buf.size(), d, dl);
      EXPECT_TRUE(matches(buf, peer));
    }
  });
}

TEST(TcpTransport, CountMismatchNamesBothRanks) {
  MemStore store;
  auto t = makeMesh(store, 2);
  std::string msg;
  runRanks(2, [&](int r) {
    std::vector<uint8_t> buf(40, 1);
    auto dl = Deadline::after(kTimeout);
    if (r == 0) {
      t[0]->send(1, buf.data(), 40, makeDesc(CollType::kAllReduce, 7, 10), dl);
    } else {
      try {
        t[1]->recv(0, buf.data(), 40, makeDesc(CollType::kAllReduce, 7, 11), dl);
      } catch (const MismatchError& e) {
        msg = e.what();
      }
    }
  });
  EXPECT_NE(msg.find("rank 1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rank 0"), std::string::npos) << msg;
  EXPECT_NE(msg.find("count=10"), std::string::npos) << msg;
  EXPECT_NE(msg.find("count=11"), std::string::npos) << msg;
}

TEST(TcpTransport, CollectiveMismatch) {
  MemStore store;
  auto t = makeMesh(store, 2);
  std::string msg;
  runRanks(2, [&](int r) {
    std::vector<uint8_t> buf(16, 1);
    auto dl = Deadline::after(kTimeout);
    if (r == 0) {
      t[0]->send(1, buf.data(), 16, makeDesc(CollType::kBroadcast, 3, 16), dl);
    } else {
      msg = messageOf([&] {
        t[1]->recv(0, buf.data(), 16, makeDesc(CollType::kAllReduce, 3, 16), dl);
      });
    }
  });
  EXPECT_NE(msg.find("broadcast"), std::string::npos) << msg;
  EXPECT_NE(msg.find("all_reduce"), std::string::npos) << msg;
  EXPECT_NE(msg.find("mismatch"), std::string::npos) << msg;
}

TEST(TcpTransport, SizeMismatchNeverOverflows) {
  MemStore store;
  auto t = makeMesh(store, 2);
  OpDesc d = makeDesc(CollType::kSend, 1, 0);
  // The sender announces 1 MiB; the receiver has 16 bytes of heap (ASan would see a
  // single byte written past it). Nothing may be written at all.
  auto small = std::make_unique<uint8_t[]>(16);
  std::memset(small.get(), 0x5a, 16);
  std::string msg;
  runRanks(2, [&](int r) {
    auto dl = Deadline::after(milliseconds(5000));
    if (r == 0) {
      auto big = filled(0, 1 << 20);
      // The receiver gives up on this frame; the send may complete into the socket
      // buffers or fail once rank 1 closes: either is fine.
      try {
        t[0]->send(1, big.data(), big.size(), d, dl);
      } catch (const Error&) {
      }
    } else {
      try {
        t[1]->recv(0, small.get(), 16, d, dl);
      } catch (const MismatchError& e) {
        msg = e.what();
      }
      // The stream is now out of step: later receives from rank 0 are refused.
      EXPECT_THROW(t[1]->recv(0, small.get(), 16, d, dl), PeerError);
      t[1].reset();
    }
  });
  EXPECT_NE(msg.find("1048576"), std::string::npos) << msg;
  for (int i = 0; i < 16; ++i) EXPECT_EQ(small[i], 0x5a);
}

TEST(TcpTransport, ShorterMessageThanExpectedIsMismatch) {
  MemStore store;
  auto t = makeMesh(store, 2);
  OpDesc d = makeDesc(CollType::kSend, 1, 0);
  std::string msg;
  runRanks(2, [&](int r) {
    auto dl = Deadline::after(milliseconds(5000));
    if (r == 0) {
      uint8_t b[16] = {};
      t[0]->send(1, b, sizeof(b), d, dl);
    } else {
      std::vector<uint8_t> big(1 << 20);
      msg = messageOf([&] { t[1]->recv(0, big.data(), big.size(), d, dl); });
    }
  });
  EXPECT_NE(msg.find("16 bytes"), std::string::npos) << msg;
}

TEST(TcpTransport, DestroyedPeerFailsWaiterQuickly) {
  MemStore store;
  auto t = makeMesh(store, 3);
  std::string msg;
  double waited = 0;
  runRanks(2, [&](int w) {
    if (w == 0) {
      std::this_thread::sleep_for(milliseconds(200));
      t[2].reset();  // rank 2 "dies"
    } else {
      auto start = Clock::now();
      uint8_t b[8];
      msg = messageOf([&] {
        t[0]->recv(2, b, sizeof(b), makeDesc(CollType::kAllReduce, 7, 2),
                   Deadline::after(kTimeout));
      });
      waited = std::chrono::duration<double>(Clock::now() - start).count();
    }
  });
  EXPECT_NE(msg.find("rank 2 closed the connection"), std::string::npos) << msg;
  EXPECT_NE(msg.find("all_reduce #7"), std::string::npos) << msg;
  EXPECT_LT(waited, 3.0);
  // A large send to the dead rank fails too (EPIPE / reset), never SIGPIPE.
  auto big = filled(0, 8 << 20);
  EXPECT_THROW(t[0]->send(2, big.data(), big.size(), makeDesc(CollType::kSend, 1, 0),
                          Deadline::after(kTimeout)),
               PeerError);
}

TEST(TcpTransport, AbortReachesPeersAndLocalWaiters) {
  MemStore store;
  auto t = makeMesh(store, 3);
  std::string remoteMsg, localMsg;
  double remoteWait = 0, localWait = 0;
  runRanks(3, [&](int w) {
    uint8_t b[8];
    auto start = Clock::now();
    if (w == 0) {
      std::this_thread::sleep_for(milliseconds(200));
      t[0]->abort("loss went NaN");
    } else if (w == 1) {
      // Rank 1 waits on rank 0, which aborts.
      remoteMsg = messageOf([&] {
        t[1]->recv(0, b, sizeof(b), makeDesc(CollType::kBarrier, 1, 0), Deadline::after(kTimeout));
      });
      remoteWait = std::chrono::duration<double>(Clock::now() - start).count();
    } else {
      // Another thread of rank 0 is waiting on rank 2 when rank 0 aborts.
      localMsg = messageOf([&] {
        t[0]->recv(2, b, sizeof(b), makeDesc(CollType::kBarrier, 1, 0), Deadline::after(kTimeout));
      });
      localWait = std::chrono::duration<double>(Clock::now() - start).count();
    }
  });
  EXPECT_NE(remoteMsg.find("rank 0 aborted: loss went NaN"), std::string::npos) << remoteMsg;
  EXPECT_NE(localMsg.find("loss went NaN"), std::string::npos) << localMsg;
  EXPECT_LT(remoteWait, 3.0);
  EXPECT_LT(localWait, 3.0);
  // Every later call on the aborted transport fails.
  uint8_t b[1] = {};
  EXPECT_THROW(t[0]->send(1, b, 1, OpDesc{}, Deadline::after(kTimeout)), PeerError);
  EXPECT_THROW(t[0]->recv(1, b, 1, OpDesc{}, Deadline::after(kTimeout)), PeerError);
  // Rank 1 keeps the reason too.
  std::string again = messageOf([&] { t[1]->recv(0, b, 1, OpDesc{}, Deadline::after(kTimeout)); });
  EXPECT_NE(again.find("loss went NaN"), std::string::npos) << again;
}

TEST(TcpTransport, TimeoutNamesPeerAndLeavesConnectionUsable) {
  MemStore store;
  auto t = makeMesh(store, 2, milliseconds(300));
  uint8_t b[4] = {};
  OpDesc d = makeDesc(CollType::kAllReduce, 7, 1);
  auto start = Clock::now();
  std::string msg;
  try {
    t[1]->recv(0, b, sizeof(b), d, Deadline::after(milliseconds(300)));
  } catch (const TimeoutError& e) {
    msg = e.what();
  }
  double waited = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_NE(msg.find("timeout after 300 ms waiting for rank 0 in all_reduce #7"),
            std::string::npos)
      << msg;
  EXPECT_GE(waited, 0.29);
  EXPECT_LT(waited, 2.0);
  // Nothing was consumed, so the pair still works.
  uint8_t v[4] = {1, 2, 3, 4};
  t[0]->send(1, v, 4, d, Deadline::after(kTimeout));
  t[1]->recv(0, b, 4, d, Deadline::after(kTimeout));
  EXPECT_EQ(std::memcmp(b, v, 4), 0);
}

TEST(TcpTransport, SetupTimesOutWhenAPeerNeverComes) {
  MemStore store;
  auto start = Clock::now();
  std::string msg = messageOf([&] { TcpTransport t(store, kPrefix, 0, 2, milliseconds(300)); });
  EXPECT_NE(msg.find("timeout"), std::string::npos) << msg;
  EXPECT_NE(msg.find("rank(s) 1"), std::string::npos) << msg;
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 2.0);
}

// Strangers on rank 0's published port while the mesh forms: garbage, silence, and
// connect-then-close. The mesh must form, quickly, and each stranger is logged.
TEST(TcpTransport, StrangersDoNotStopTheMesh) {
  MemStore store;
  const int n = 3;
  std::vector<std::unique_ptr<TcpTransport>> t(n);
  std::atomic<bool> strangersIn{false};
  std::atomic<bool> meshDone{false};
  net::Fd silent;
  ::testing::internal::CaptureStderr();
  auto start = Clock::now();
  runRanks(n + 1, [&](int w) {
    if (w == n) {
      std::string addr = store.getString(TcpTransport::addressKey(kPrefix, 0), kTimeout);
      net::Fd garbage = dial(addr);
      std::string junk = "GET / HTTP/1.1\r\nHost: x\r\n\r\n" + std::string(100, '\xff');
      ::send(garbage.get(), junk.data(), junk.size(), MSG_NOSIGNAL);
      silent = dial(addr);       // half-open: sends nothing, stays open
      { net::Fd quick = dial(addr); }  // connect, then close at once
      EXPECT_TRUE(closedByPeer(garbage.get(), 5000));
      strangersIn = true;
      return;
    }
    if (w != 0) {
      while (!strangersIn) std::this_thread::sleep_for(milliseconds(5));
    }
    t[w] = std::make_unique<TcpTransport>(store, kPrefix, w, n, kTimeout);
  });
  double took = std::chrono::duration<double>(Clock::now() - start).count();
  std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_LT(took, 4.0) << "a silent stranger must not hold up the mesh";
  EXPECT_NE(log.find("pycomm: rejected connection from 127.0.0.1:"), std::string::npos) << log;
  EXPECT_NE(log.find("bad magic"), std::string::npos) << log;
  EXPECT_NE(log.find("closed the connection during the handshake"), std::string::npos) << log;
  // The silent one is dropped when setup ends.
  EXPECT_TRUE(closedByPeer(silent.get(), 1000));
  // And the mesh works.
  OpDesc d = makeDesc(CollType::kAllGather, 1, 64);
  runRanks(n, [&](int r) {
    auto out = filled(r, 64);
    std::vector<uint8_t> in(64);
    t[r]->sendRecv((r + 1) % n, out.data(), 64, (r + n - 1) % n, in.data(), 64, d,
                   Deadline::after(kTimeout));
    EXPECT_TRUE(matches(in, (r + n - 1) % n));
  });
}

// Speaks the connecting side of the handshake to rank 0 at `addr`, claiming rank
// `claimFrom` but proving with a MAC made for `macFrom` under `secret`. Returns the
// connection if rank 0 accepted it (sent its own proof back), else an empty Fd.
net::Fd handshakeAs(const std::string& addr, const uint8_t* secret, int claimFrom, int macFrom,
                    int size) {
  net::Fd fd = dial(addr);
  tcp_wire::Hello hello{};
  hello.magic = tcp_wire::kHelloMagic;
  hello.version = tcp_wire::kVersion;
  hello.fromRank = claimFrom;
  hello.toRank = 0;
  hello.size = size;
  net::randomBytes(hello.nonce, sizeof(hello.nonce));
  if (::send(fd.get(), &hello, sizeof(hello), MSG_NOSIGNAL) != sizeof(hello)) return net::Fd();
  tcp_wire::Challenge ch;
  if (!readExactly(fd.get(), &ch, sizeof(ch), 5000)) return net::Fd();
  EXPECT_EQ(ch.magic, tcp_wire::kChallengeMagic);
  auto mac = tcp_wire::handshakeMac(secret, tcp_wire::kSecretSize, false, macFrom, 0, size,
                                    hello.nonce, ch.nonce);
  ::send(fd.get(), mac.data(), mac.size(), MSG_NOSIGNAL);
  uint8_t reply[tcp_wire::kMacSize];
  if (!readExactly(fd.get(), reply, sizeof(reply), 5000)) return net::Fd();
  auto want = tcp_wire::handshakeMac(secret, tcp_wire::kSecretSize, true, macFrom, 0, size,
                                     hello.nonce, ch.nonce);
  EXPECT_EQ(std::memcmp(reply, want.data(), sizeof(reply)), 0);
  return fd;
}

bool tryHandshake(const std::string& addr, const uint8_t* secret, int claimFrom, int macFrom,
                  int size) {
  return handshakeAs(addr, secret, claimFrom, macFrom, size).valid();
}

// Rank 0 is a real transport; "rank 1" is the test speaking the wire protocol with
// the real secret, then sending `frame`. Returns what rank 0's recv() raised.
std::string recvAfterRawFrame(const std::vector<uint8_t>& frame) {
  MemStore store;
  std::unique_ptr<TcpTransport> t0;
  net::Fd fake;
  runRanks(2, [&](int w) {
    if (w == 0) {
      t0 = std::make_unique<TcpTransport>(store, kPrefix, 0, 2, kTimeout);
    } else {
      std::string addr = store.getString(TcpTransport::addressKey(kPrefix, 0), kTimeout);
      auto secret = store.get(TcpTransport::secretKey(kPrefix), kTimeout);
      fake = handshakeAs(addr, secret.data(), 1, 1, 2);
    }
  });
  EXPECT_TRUE(fake.valid());
  ::send(fake.get(), frame.data(), frame.size(), MSG_NOSIGNAL);
  std::vector<uint8_t> buf(64);
  OpDesc d = makeDesc(CollType::kAllReduce, 1, 64);
  auto recvOnce = [&] {
    return messageOf([&] { t0->recv(1, buf.data(), buf.size(), d, Deadline::after(kTimeout)); });
  };
  std::string msg = recvOnce();
  // The stream is out of step afterwards: the next call is refused, not misread.
  std::string again = recvOnce();
  EXPECT_NE(again.find("unusable after an earlier error"), std::string::npos) << again;
  return msg;
}

TEST(TcpTransport, BadMagicIsInvalidFrame) {
  std::vector<uint8_t> junk(sizeof(tcp_wire::FrameHeader) + 64, 0xab);
  std::string msg = recvAfterRawFrame(junk);
  EXPECT_NE(msg.find("invalid frame from rank 1"), std::string::npos) << msg;
}

TEST(TcpTransport, HugeAbortReasonIsInvalidFrameNotAnAllocation) {
  tcp_wire::FrameHeader h;
  std::memset(static_cast<void*>(&h), 0, sizeof(h));
  h.magic = tcp_wire::kFrameMagic;
  h.version = tcp_wire::kVersion;
  h.kind = static_cast<uint16_t>(tcp_wire::FrameKind::kAbort);
  h.bytes = uint64_t(1) << 40;
  std::vector<uint8_t> frame(sizeof(h));
  std::memcpy(frame.data(), &h, sizeof(h));
  std::string msg = recvAfterRawFrame(frame);
  EXPECT_NE(msg.find("invalid frame from rank 1"), std::string::npos) << msg;
}

TEST(TcpTransport, WrongSecretAndReplayedProofAreRejected) {
  MemStore store;
  const int n = 3;
  std::vector<std::unique_ptr<TcpTransport>> t(n);
  std::atomic<bool> strangersDone{false};
  bool wrongSecretAccepted = true, otherPairAccepted = true;
  ::testing::internal::CaptureStderr();
  runRanks(n + 1, [&](int w) {
    if (w == n) {
      std::string addr = store.getString(TcpTransport::addressKey(kPrefix, 0), kTimeout);
      uint8_t wrong[tcp_wire::kSecretSize];
      net::randomBytes(wrong, sizeof(wrong));
      wrongSecretAccepted = tryHandshake(addr, wrong, 1, 1, n);
      // The right secret, but a proof made for the pair (2 -> 0) presented as rank 1.
      auto real = store.get(TcpTransport::secretKey(kPrefix), kTimeout);
      otherPairAccepted = tryHandshake(addr, real.data(), 1, 2, n);
      strangersDone = true;
      return;
    }
    if (w != 0) {
      while (!strangersDone) std::this_thread::sleep_for(milliseconds(5));
    }
    t[w] = std::make_unique<TcpTransport>(store, kPrefix, w, n, kTimeout);
  });
  std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_FALSE(wrongSecretAccepted);
  EXPECT_FALSE(otherPairAccepted);
  EXPECT_NE(log.find("authentication failed"), std::string::npos) << log;
  for (auto& x : t) EXPECT_TRUE(x != nullptr);
  uint8_t v = 42, got = 0;
  OpDesc d = makeDesc(CollType::kSend, 1, 1);
  runRanks(2, [&](int r) {
    if (r == 0) t[1]->send(0, &v, 1, d, Deadline::after(kTimeout));
    else t[0]->recv(1, &got, 1, d, Deadline::after(kTimeout));
  });
  EXPECT_EQ(got, 42);
}

// Sets an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    had_ = std::getenv(name) != nullptr;
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_, old_.c_str(), 1);
    else unsetenv(name_);
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

TEST(TcpAddress, DefaultNeverBindsEverything) {
  ScopedEnv a("PYCOMM_SOCKET_IFNAME", nullptr);
  ScopedEnv b("PYCOMM_SOCKET_ADDR", nullptr);
  auto la = net::chooseListenAddress();
  EXPECT_NE(la.bindHost, "0.0.0.0");
  EXPECT_TRUE(net::isLocalAddress(la.bindHost)) << la.bindHost;
}

TEST(TcpAddress, InterfaceByName) {
  ScopedEnv a("PYCOMM_SOCKET_IFNAME", "lo");
  auto la = net::chooseListenAddress();
  EXPECT_EQ(la.bindHost, "127.0.0.1");
  MemStore store;
  auto mesh = makeMesh(store, 2);
  EXPECT_EQ(mesh[0]->listenAddress().rfind("127.0.0.1:", 0), 0u) << mesh[0]->listenAddress();
}

TEST(TcpAddress, UnknownInterfaceIsInvalidArgument) {
  ScopedEnv a("PYCOMM_SOCKET_IFNAME", "nosuchif0");
  MemStore store;
  std::string msg;
  try {
    TcpTransport t(store, kPrefix, 0, 2, kTimeout);
  } catch (const InvalidArgument& e) {
    msg = e.what();
  }
  EXPECT_NE(msg.find("nosuchif0"), std::string::npos) << msg;
}

TEST(TcpAddress, ExplicitAddress) {
  ScopedEnv a("PYCOMM_SOCKET_IFNAME", nullptr);
  ScopedEnv b("PYCOMM_SOCKET_ADDR", "127.0.0.1");
  EXPECT_EQ(net::chooseListenAddress().bindHost, "127.0.0.1");
  ScopedEnv c("PYCOMM_SOCKET_ADDR", "0.0.0.0");
  auto la = net::chooseListenAddress();
  EXPECT_EQ(la.bindHost, "0.0.0.0");
  EXPECT_NE(la.advertiseHost, "0.0.0.0");
  MemStore store;
  auto mesh = makeMesh(store, 2);  // peers dial the advertised address
  uint8_t v = 7, got = 0;
  OpDesc d = makeDesc(CollType::kSend, 1, 1);
  mesh[0]->send(1, &v, 1, d, Deadline::after(kTimeout));
  mesh[1]->recv(0, &got, 1, d, Deadline::after(kTimeout));
  EXPECT_EQ(got, 7);
}

// ---------------------------------------------------------------------------------
// Several streams per pair (PYCOMM_TCP_STREAMS) and striping.

TEST(TcpStreams, StripesCoverTheMessageContiguously) {
  using tcp_streams::kMinStripe;
  using tcp_streams::stripeCount;
  using tcp_streams::stripeOf;
  // Below two minimum stripes, or with one stream: one stripe (stream 0 only).
  EXPECT_EQ(stripeCount(0, 4), 1);
  EXPECT_EQ(stripeCount(2 * kMinStripe - 1, 8), 1);
  EXPECT_EQ(stripeCount(size_t(64) << 20, 1), 1);
  // Above: one stripe per kMinStripe, at most the pair's streams.
  EXPECT_EQ(stripeCount(2 * kMinStripe, 4), 2);
  EXPECT_EQ(stripeCount(3 * kMinStripe + 5, 4), 3);
  EXPECT_EQ(stripeCount(size_t(64) << 20, 4), 4);
  EXPECT_EQ(stripeCount(size_t(64) << 20, 3), 3);
  const size_t sizes[] = {0, 1, 2, 3, 7, 1021, 2 * kMinStripe, 2 * kMinStripe + 1, 786433 * 4 + 3, size_t(64) << 20};
  for (size_t bytes : sizes) {
    for (int count = 1; count <= tcp_streams::kMaxStreams; ++count) {
      size_t next = 0, shortest = bytes, longest = 0;
      for (int i = 0; i < count; ++i) {
        auto st = stripeOf(bytes, count, i);
        EXPECT_EQ(st.begin, next) << bytes << " bytes, stripe " << i << " of " << count;
        next = st.begin + st.length;
        shortest = std::min(shortest, st.length);
        longest = std::max(longest, st.length);
      }
      EXPECT_EQ(next, bytes) << bytes << " bytes in " << count;
      EXPECT_LE(longest - shortest, 1u) << bytes << " bytes in " << count;
    }
  }
}

TEST(TcpStreams, SettingIsCheckedAndNamesTheRank) {
  {
    ScopedEnv e("PYCOMM_TCP_STREAMS", nullptr);
    int n = tcp_streams::configuredStreams(0, 3);
    EXPECT_GE(n, 1);
    EXPECT_LE(n, tcp_streams::kAutoMaxStreams);
    ScopedEnv f("PYCOMM_TCP_STREAMS", "auto");
    EXPECT_EQ(tcp_streams::configuredStreams(0, 3), n);
  }
  // "auto": kAutoMaxStreams (2), unless the sockets to every peer would use over a
  // quarter of the fd limit.
  EXPECT_EQ(tcp_streams::autoStreams(2, 1024), tcp_streams::kAutoMaxStreams);
  EXPECT_EQ(tcp_streams::autoStreams(129, 1024), 2);
  EXPECT_EQ(tcp_streams::autoStreams(200, 1024), 1);
  EXPECT_EQ(tcp_streams::autoStreams(1000, 1024), 1);
  EXPECT_EQ(tcp_streams::autoStreams(1, 0), 1);
  // The host's ranks share its link: "auto" divides its streams among them.
  EXPECT_EQ(tcp_streams::autoStreams(4, 1024, 1), 2);
  EXPECT_EQ(tcp_streams::autoStreams(4, 1024, 2), 1);
  EXPECT_EQ(tcp_streams::autoStreams(8, 1024, 4), 1);
  EXPECT_EQ(tcp_streams::autoStreams(4, 1024, 0), 2);
  {
    ScopedEnv e("PYCOMM_TCP_STREAMS", "3");
    EXPECT_EQ(tcp_streams::configuredStreams(0, 3), 3);
    EXPECT_EQ(tcp_streams::configuredStreams(0, 3, 2), 3);  // an explicit count is kept
  }
  {
    ScopedEnv e("PYCOMM_TCP_STREAMS", "auto");
    EXPECT_EQ(tcp_streams::configuredStreams(0, 4, 2), 1);
  }
  for (const char* bad : {"0", "9", "two", "4x", "-1"}) {
    ScopedEnv e("PYCOMM_TCP_STREAMS", bad);
    MemStore store;
    std::string msg = messageOf([&] { TcpTransport t(store, kPrefix, 1, 2, kTimeout); });
    EXPECT_NE(msg.find("PYCOMM_TCP_STREAMS"), std::string::npos) << bad << ": " << msg;
    EXPECT_NE(msg.find("rank 1"), std::string::npos) << bad << ": " << msg;
    EXPECT_THROW(TcpTransport(store, kPrefix, 0, 1, kTimeout), InvalidArgument) << bad;
  }
}

class TcpStriped : public ::testing::TestWithParam<int> {};

// Every size around the striping thresholds, odd byte counts (stripes of unequal
// length), over a 3-rank ring in both directions at once, then as plain send/recv.
TEST_P(TcpStriped, RingOfAwkwardSizesKeepsContentAndOrder) {
  const int streams = GetParam();
  ScopedEnv e("PYCOMM_TCP_STREAMS", std::to_string(streams).c_str());
  const int n = 3;
  MemStore store;
  auto t = makeMesh(store, n);
  for (int r = 0; r < n; ++r) {
    for (int p = 0; p < n; ++p) {
      if (p != r) {
        EXPECT_EQ(t[r]->streams(p), streams);
      }
    }
  }
  using tcp_streams::kMinStripe;
  uint64_t seq = 0;
  for (size_t bytes : {size_t(0), size_t(1), 2 * kMinStripe - 1, 2 * kMinStripe, 3 * kMinStripe + 7,
                       size_t(4000037), size_t(24) << 20}) {
    OpDesc d = makeDesc(CollType::kAllGather, ++seq, bytes);
    runRanks(n, [&](int r) {
      int next = (r + 1) % n, prev = (r + n - 1) % n;
      auto out = filled(r, bytes);
      std::vector<uint8_t> in(bytes, 0);
      t[r]->sendRecv(next, out.data(), out.size(), prev, in.data(), in.size(), d, Deadline::after(kTimeout));
      EXPECT_TRUE(matches(in, prev)) << "rank " << r << ", " << bytes << " bytes, " << streams << " streams";
    });
  }
  // Back-to-back messages of alternating size on one pair arrive whole and in order.
  runRanks(2, [&](int r) {
    for (int i = 0; i < 12; ++i) {
      size_t bytes = i % 2 ? size_t(1000003) : size_t(17 + i);
      OpDesc d = makeDesc(CollType::kSend, 100 + i, bytes);
      auto dl = Deadline::after(kTimeout);
      if (r == 0) {
        auto buf = filled(i, bytes);
        t[0]->send(1, buf.data(), buf.size(), d, dl);
      } else {
        std::vector<uint8_t> buf(bytes);
        t[1]->recv(0, buf.data(), buf.size(), d, dl);
        EXPECT_TRUE(matches(buf, i)) << "message " << i;
      }
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Tcp, TcpStriped, ::testing::Values(1, 2, 4));

TEST(TcpStreams, PeekSeesTheWholeStripedMessage) {
  ScopedEnv e("PYCOMM_TCP_STREAMS", "4");
  MemStore store;
  auto t = makeMesh(store, 2);
  const size_t bytes = 3000017;
  OpDesc d = makeDesc(CollType::kSend, 1, bytes);
  runRanks(2, [&](int r) {
    if (r == 0) {
      auto buf = filled(0, bytes);
      t[0]->send(1, buf.data(), buf.size(), d, Deadline::after(kTimeout));
      return;
    }
    OpDesc got{};
    size_t gotBytes = 0;
    auto until = Clock::now() + kTimeout;
    while (t[1]->peekHeader(0, &got, &gotBytes) == Transport::Peek::kNothing && Clock::now() < until) {
      std::this_thread::sleep_for(milliseconds(1));
    }
    EXPECT_EQ(gotBytes, bytes);
    EXPECT_TRUE(got.sameCall(d));
    std::vector<uint8_t> buf(gotBytes);
    t[1]->recv(0, buf.data(), buf.size(), got, Deadline::after(kTimeout));
    EXPECT_TRUE(matches(buf, 0));
  });
}

TEST(TcpStreams, StripedSizeMismatchNamesBothSizes) {
  ScopedEnv e("PYCOMM_TCP_STREAMS", "4");
  MemStore store;
  auto t = makeMesh(store, 2);
  OpDesc d = makeDesc(CollType::kSend, 1, 0);
  std::string msg;
  runRanks(2, [&](int r) {
    auto dl = Deadline::after(milliseconds(5000));
    if (r == 0) {
      auto big = filled(0, 4 << 20);
      try {
        t[0]->send(1, big.data(), big.size(), d, dl);
      } catch (const Error&) {
      }
    } else {
      std::vector<uint8_t> buf(2 << 20, 0x5a);
      msg = messageOf([&] { t[1]->recv(0, buf.data(), buf.size(), d, dl); });
      EXPECT_THROW(t[1]->recv(0, buf.data(), buf.size(), d, dl), PeerError);
      t[1].reset();
    }
  });
  EXPECT_NE(msg.find("4194304"), std::string::npos) << msg;
  EXPECT_NE(msg.find("2097152"), std::string::npos) << msg;
}

TEST(TcpStreams, PairOpensTheSmallerCount) {
  // Rank 0 allows 4 streams, rank 1 only 2: the pair has 2. (Rank 0 reads the setting
  // before it publishes its count; rank 1 starts after that.)
  MemStore store;
  std::vector<std::unique_ptr<TcpTransport>> t(2);
  {
    ScopedEnv e("PYCOMM_TCP_STREAMS", "4");
    std::thread r0([&] { t[0] = std::make_unique<TcpTransport>(store, kPrefix, 0, 2, kTimeout); });
    EXPECT_EQ(store.getString(TcpTransport::streamsKey(kPrefix, 0), kTimeout), "4");
    {
      ScopedEnv f("PYCOMM_TCP_STREAMS", "2");
      t[1] = std::make_unique<TcpTransport>(store, kPrefix, 1, 2, kTimeout);
    }
    r0.join();
  }
  EXPECT_EQ(t[0]->streams(1), 2);
  EXPECT_EQ(t[1]->streams(0), 2);
  const size_t bytes = size_t(8) << 20;
  OpDesc d = makeDesc(CollType::kSend, 1, bytes);
  runRanks(2, [&](int r) {
    if (r == 0) {
      auto buf = filled(0, bytes);
      t[0]->send(1, buf.data(), buf.size(), d, Deadline::after(kTimeout));
    } else {
      std::vector<uint8_t> buf(bytes);
      t[1]->recv(0, buf.data(), buf.size(), d, Deadline::after(kTimeout));
      EXPECT_TRUE(matches(buf, 0));
    }
  });
}

TEST(TcpStreams, DestroyedPeerFailsStripedWaitersQuickly) {
  ScopedEnv e("PYCOMM_TCP_STREAMS", "4");
  MemStore store;
  auto t = makeMesh(store, 3);
  std::string recvMsg, sendMsg;
  double waited = 0;
  const size_t bytes = size_t(32) << 20;  // far beyond the socket buffers: mid-stripe
  runRanks(3, [&](int w) {
    auto start = Clock::now();
    if (w == 0) {
      std::this_thread::sleep_for(milliseconds(300));
      t[2].reset();  // rank 2 "dies" while both others wait on all four of its streams
    } else if (w == 1) {
      std::vector<uint8_t> b(bytes);
      recvMsg = messageOf([&] {
        t[0]->recv(2, b.data(), b.size(), makeDesc(CollType::kAllReduce, 7, 2), Deadline::after(kTimeout));
      });
      waited = std::max(waited, std::chrono::duration<double>(Clock::now() - start).count());
    } else {
      // Keeps sending (the socket buffers of four streams may take a whole message)
      // until the death is noticed.
      auto b = filled(1, bytes);
      sendMsg = messageOf([&] {
        for (int i = 0; i < 64; ++i) {
          t[1]->send(2, b.data(), b.size(), makeDesc(CollType::kAllReduce, 7 + i, 2), Deadline::after(kTimeout));
        }
      });
    }
  });
  EXPECT_NE(recvMsg.find("rank 2 closed the connection"), std::string::npos) << recvMsg;
  EXPECT_NE(sendMsg.find("rank 2"), std::string::npos) << sendMsg;
  EXPECT_LT(waited, 3.0);
}

}  // namespace
}  // namespace pycomm
