#include "engine/group.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <thread>

#include "core/affinity.h"
#include "core/heap_policy.h"
#include "core/env.h"
#include "core/error.h"
#include "engine/flight_recorder.h"
#include "transport/mixed.h"
#include "transport/shm.h"
#include "transport/tcp.h"

namespace pycomm {

std::string groupHostKey() {
  const std::string over = envStr("PYCOMM_HOST_KEY", "");
  return over.empty() ? localHostKey() : strCat(over, "#", localHostKey());
}

std::string kernelKeyOf(const std::string& hostKey) {
  // localHostKey() is "hostname|boot id|namespaces...", behind "override#" when
  // PYCOMM_HOST_KEY is set: the first two fields name the machine's running kernel.
  const size_t hash = hostKey.rfind('#');
  const std::string k = hash == std::string::npos ? hostKey : hostKey.substr(hash + 1);
  const size_t bar = k.find('|');
  const size_t bar2 = bar == std::string::npos ? std::string::npos : k.find('|', bar + 1);
  return k.substr(0, bar2);
}

GroupTransport makeGroupTransport(Store& store, const std::string& keyPrefix, int rank, int size,
                                  std::chrono::milliseconds timeout) {
  const std::string want = envStr("PYCOMM_TRANSPORT", "auto");
  PYCOMM_CHECK_ARG(want == "auto" || want == "shm" || want == "tcp",
                   "PYCOMM_TRANSPORT must be auto, shm or tcp (got '", want, "')");
  // Every rank learns every rank's host key through the store, so all compute the
  // same topology.
  store.setString(strCat(keyPrefix, "host/", rank), groupHostKey());
  std::vector<std::string> rawKeys;
  auto readKeys = [&] {
    rawKeys.assign(size, std::string());
    for (int r = 0; r < size; ++r) rawKeys[r] = store.getString(strCat(keyPrefix, "host/", r), timeout);
    return Topology::fromKeys(rawKeys);
  };
  GroupTransport g;
  // hostShare: how many of the group's ranks share this rank's host (and its link).
  auto tcp = [&](int hostShare = 1) {
    return std::make_unique<TcpTransport>(store, keyPrefix + "t/", rank, size, timeout, hostShare);
  };
  auto oneHostPerRank = [&] {
    std::vector<int> h(size);
    for (int r = 0; r < size; ++r) h[r] = r;
    return Topology{h};
  };
  // Ranks of one host that outnumber its cores are bound to them (once per process; before
  // any transport starts a thread, which then inherits the mask): core/affinity.h.
  try {
    bindMode();  // a bad PYCOMM_BIND fails here, before any rank waits on the store
    // The heap keeps a step's freed buffers for the next one (once per process):
    // core/heap_policy.h.
    applyHeapPolicy();
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(strCat("pycomm: rank ", rank, ": ", e.what()));
  }
  const std::string pid = std::to_string(getpid());
  store.setString(strCat(keyPrefix, "pid/", rank), pid);
  // The ranks that share this rank's CPUs are those on its kernel: a host in the group's
  // sense (namespaces, PYCOMM_HOST_KEY) may be one of several emulated on one machine.
  auto bind = [&] {
    std::vector<std::string> kernels(size);
    for (int r = 0; r < size; ++r) kernels[r] = kernelKeyOf(rawKeys[r]);
    const Topology t = Topology::fromKeys(kernels);
    const std::vector<int> local = t.ranksOn(t.hostOf[rank]);
    auto sharesProcess = [&] {
      for (int r : local) {
        if (r != rank && store.getString(strCat(keyPrefix, "pid/", r), timeout) == pid) return true;
      }
      return false;
    };
    try {
      bindLocalRank(t.localIndex(rank), static_cast<int>(local.size()), sharesProcess);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(strCat("pycomm: rank ", rank, ": ", e.what()));
    }
  };
  if (want == "tcp") {
    // The mesh first: ranks listen (and refuse strangers) while late ranks arrive; every
    // host key is in the store once the mesh is up.
    g.transport = tcp();
    g.topology = readKeys();
    bind();
    return g;
  }
  const Topology keyed = readKeys();
  bind();
  if (keyed.numHosts() == 1) {
    try {
      auto shm = std::make_unique<ShmTransport>(store, keyPrefix + "s/", rank, size, timeout);
      g.local = shm.get();
      g.transport = std::move(shm);
      g.topology = keyed;
      return g;
    } catch (const InvalidArgument&) {
      throw;
    } catch (const Error& e) {
      if (want == "shm") throw;
      if (rank == 0) std::fprintf(stderr, "pycomm: shared memory unavailable (%s); using TCP\n", e.what());
    }
    g.transport = tcp();
    g.topology = oneHostPerRank();
    return g;
  }
  if (want == "shm") {
    throw InvalidArgument(strCat("PYCOMM_TRANSPORT=shm, but the group's ranks are not all on one host (",
                                 keyed.str(), ")"));
  }
  // Several hosts: shared memory among each host's ranks, confirmed by its probe (the
  // ShmTransport constructor fails on every rank of the host alike when cross-memory
  // attach does not work); every rank learns every host's outcome.
  const int host = keyed.hostOf[rank];
  const std::vector<int> mine = keyed.ranksOn(host);
  std::unique_ptr<Transport> local;
  bool ok = true;
  if (mine.size() > 1) {
    try {
      local = std::make_unique<ShmTransport>(store, strCat(keyPrefix, "s", host, "/"), keyed.localIndex(rank),
                                             static_cast<int>(mine.size()), timeout);
    } catch (const InvalidArgument&) {
      throw;
    } catch (const Error& e) {
      ok = false;
      if (mine[0] == rank) {
        std::fprintf(stderr, "pycomm: shared memory unavailable among ranks of host %d (%s); using TCP\n", host,
                     e.what());
      }
    }
  }
  store.setString(strCat(keyPrefix, "shmok/", rank), ok ? "1" : "0");
  std::vector<bool> hostOk(keyed.numHosts(), true);
  for (int r = 0; r < size; ++r) {
    if (store.getString(strCat(keyPrefix, "shmok/", r), timeout) != "1") hostOk[keyed.hostOf[r]] = false;
  }
  if (!hostOk[host]) local.reset();
  std::vector<std::string> confirmed(size);
  for (int r = 0; r < size; ++r) {
    confirmed[r] = hostOk[keyed.hostOf[r]] ? strCat("h", keyed.hostOf[r]) : strCat("r", r);
  }
  g.topology = Topology::fromKeys(confirmed);
  if (local) {
    g.local = local.get();
    g.transport = std::make_unique<MixedTransport>(mine, std::move(local), tcp(static_cast<int>(mine.size())));
  } else {
    g.transport = tcp(static_cast<int>(mine.size()));
  }
  return g;
}

std::unique_ptr<Transport> makeTransport(Store& store, const std::string& keyPrefix, int rank,
                                         int size, std::chrono::milliseconds timeout) {
  return makeGroupTransport(store, keyPrefix, rank, size, timeout).transport;
}

IpcConfig IpcConfig::fromEnv() {
  IpcConfig c;
  c.enabled = envInt("PYCOMM_CUDA_IPC", 1) != 0;
  c.bufferBytes = static_cast<size_t>(std::max<int64_t>(4096, envInt("PYCOMM_CUDA_IPC_BUFFER_BYTES", 8 << 20)));
  c.oneShotBytes = static_cast<size_t>(std::max<int64_t>(0, envInt("PYCOMM_CUDA_IPC_ONESHOT_BYTES", 256 << 10)));
  return c;
}

Group::Group(Store& store, int rank, int size, std::chrono::milliseconds timeout)
    : rank_(rank),
      size_(size),
      timeout_(timeout),
      store_(store),
      ipcConfig_(IpcConfig::fromEnv()),
      sendSeq_(size, 0),
      recvSeq_(size, 0) {
  PYCOMM_CHECK_ARG(size >= 1 && rank >= 0 && rank < size, "invalid rank ", rank, " for group size ", size);
  // Keys must be fresh for every group instance (transports read what they find):
  // torch reuses a store prefix when a group is destroyed and created again (the
  // default group after destroy_process_group(), for one), so each rank counts the
  // groups it has built under this prefix; ranks build them in the same order.
  const int64_t gen = store.add(strCat("pycomm/instances/", rank), 1);
  const std::string prefix = strCat("g", gen, "/");
  keyPrefix_ = prefix;
  GroupTransport gt = makeGroupTransport(store, prefix + "c/", rank, size, timeout);
  coll_ = std::move(gt.transport);
  topology_ = gt.topology;
  p2p_ = makeTransport(store, prefix + "p/", rank, size, timeout);
  algos_ = std::make_unique<Collectives>(*coll_, AlgoConfig::fromEnv(), topology_, gt.local);
  collQueue_ = std::make_unique<WorkQueue>("pycomm-coll");
  sendQueue_ = std::make_unique<WorkQueue>("pycomm-send");
  recvQueue_ = std::make_unique<WorkQueue>("pycomm-recv");
  frGroup_ = FlightRecorder::get().addGroup(rank, size);
}

Group::~Group() {
  // Queued work fails with `why`. An operation still running (its caller gave up on
  // it, e.g. Work.wait(timeout)) would only end at its deadline: abort the transports
  // so it fails now, here and on the peers waiting for it (see docs/RELIABILITY.md).
  const std::string why = strCat("pycomm: rank ", rank_, " destroyed its process group");
  if (collQueue_->busy() || sendQueue_->busy() || recvQueue_->busy()) {
    abort(strCat(why, " while one of its operations was still running"));
  }
  collQueue_->shutdown(why);
  sendQueue_->shutdown(why);
  recvQueue_->shutdown(why);
}

std::shared_ptr<Completion> Group::submitCollective(
    bool runInline, std::function<void(Collectives&, const Deadline&)> fn, const OpDesc& desc) {
  FlightRecorder& fr = FlightRecorder::get();
  const uint64_t rec = desc.seq == 0 ? UINT64_MAX : fr.recordCollective(frGroup_, size_, desc, timeout_.count());
  auto task = [this, fn = std::move(fn), rec, &fr] {
    const Deadline deadline = Deadline::after(timeout_);
    fr.started(rec);
    try {
      fn(*algos_, deadline);
      collectivesRun_.fetch_add(1, std::memory_order_relaxed);
      fr.finished(rec, true);
    } catch (const InvalidArgument&) {
      fr.finished(rec, false);
      throw;  // local argument errors are raised before anything was sent
    } catch (const Error& e) {
      fr.finished(rec, false);
      // The group is unusable after a failed collective: make every rank fail fast.
      coll_->abort(e.what());
      p2p_->abort(e.what());
      fr.onGroupError(frGroup_, e.what());
      throw;
    }
  };
  return runInline ? collQueue_->runInlineOrPush(std::move(task)) : collQueue_->push(std::move(task));
}

namespace {
// Header of the next point-to-point message between this rank and `peer`, numbered
// per direction so each send pairs with the matching receive.
OpDesc p2pDesc(std::vector<uint64_t>& seqs, int peer, size_t bytes, uint32_t tag) {
  OpDesc desc;
  desc.coll = CollType::kSend;
  desc.seq = ++seqs[peer];
  desc.tag = tag;
  desc.count = bytes;
  return desc;
}

// Flight-recorder states of one point-to-point operation: started on construction,
// finished (completed if `ok` was set) when the operation's task ends, even by throwing.
struct P2PRecord {
  P2PRecord(int group, uint64_t id) : group(group), id(id) { FlightRecorder::get().started(id); }
  ~P2PRecord() {
    FlightRecorder::get().finished(id, ok);
    if (!ok && std::uncaught_exceptions() > 0) FlightRecorder::get().onGroupError(group, "point-to-point failure");
  }
  int group;
  uint64_t id;
  bool ok = false;
};
}  // namespace

std::shared_ptr<Completion> Group::submitSend(int peer, const void* buf, size_t bytes, uint32_t tag,
                                              std::function<void()> before) {
  PYCOMM_CHECK_ARG(peer >= 0 && peer < size_ && peer != rank_, "send: invalid destination rank ", peer,
                   " (this is rank ", rank_, " of ", size_, ")");
  const OpDesc desc = p2pDesc(sendSeq_, peer, bytes, tag);
  const uint64_t rec = FlightRecorder::get().recordP2P(frGroup_, true, peer, bytes, timeout_.count());
  return sendQueue_->push([this, peer, buf, bytes, desc, rec, before = std::move(before)] {
    P2PRecord r(frGroup_, rec);
    if (before) before();
    p2p_->send(peer, buf, bytes, desc, Deadline::after(timeout_));
    r.ok = true;
  });
}

std::shared_ptr<Completion> Group::submitRecv(int peer, void* buf, size_t bytes, uint32_t tag,
                                              std::function<void()> after) {
  PYCOMM_CHECK_ARG(peer >= 0 && peer < size_ && peer != rank_, "recv: invalid source rank ", peer,
                   " (this is rank ", rank_, " of ", size_, ")");
  const uint64_t rec = FlightRecorder::get().recordP2P(frGroup_, false, peer, bytes, timeout_.count());
  // Numbered on the receive thread, in queue order: a receive from any source before
  // this one learns its peer (and takes that pair's next number) only when it runs.
  return recvQueue_->push([this, peer, buf, bytes, tag, rec, after = std::move(after)] {
    P2PRecord r(frGroup_, rec);
    p2p_->recv(peer, buf, bytes, p2pDesc(recvSeq_, peer, bytes, tag), Deadline::after(timeout_));
    if (after) after();
    r.ok = true;
  });
}

std::shared_ptr<Completion> Group::submitRecvAny(void* buf, size_t bytes, uint32_t tag,
                                                 std::shared_ptr<std::atomic<int>> source,
                                                 std::function<void()> after) {
  PYCOMM_CHECK_ARG(size_ > 1, "recv from any source: rank ", rank_, " is alone in its group");
  const uint64_t rec = FlightRecorder::get().recordP2P(frGroup_, false, -1, bytes, timeout_.count());
  return recvQueue_->push([this, buf, bytes, tag, rec, source = std::move(source), after = std::move(after)] {
    P2PRecord r(frGroup_, rec);
    const Deadline deadline = Deadline::after(timeout_);
    // Poll the head of every peer's stream until one holds this receive's message.
    auto pause = std::chrono::microseconds(20);
    for (const int start = (rank_ + 1) % size_;;) {
      for (int i = 0; i < size_; ++i) {
        const int peer = (start + i) % size_;
        if (peer == rank_) continue;
        OpDesc theirs;
        size_t theirBytes = 0;
        const Transport::Peek seen = p2p_->peekHeader(peer, &theirs, &theirBytes);
        const bool ours = seen == Transport::Peek::kMessage && theirs.coll == CollType::kSend &&
                          theirs.seq == recvSeq_[peer] + 1 && theirs.tag == tag;
        if (ours || seen == Transport::Peek::kBroken) {
          // A broken stream: the receive reports why. A size mismatch: it names both sides.
          p2p_->recv(peer, buf, bytes, p2pDesc(recvSeq_, peer, bytes, tag), deadline);
          source->store(peer);
          if (after) after();
          r.ok = true;
          return;
        }
      }
      if (deadline.expired()) {
        throw TimeoutError(strCat("pycomm: rank ", rank_, " received no message with tag ", tag,
                                  " from any rank within ", timeout_.count(), " ms (recv from any source)"));
      }
      std::this_thread::sleep_for(pause);
      pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(1));
    }
  });
}

bool Group::ipcWanted() const { return size_ > 1 && transportName() == "shm" && ipcConfig_.enabled; }

IpcCollectives* Group::ipcCollectives(Collectives& coll, const IpcDeviceFactory& makeDevice, const OpDesc& desc,
                                      const Deadline& deadline) {
  if (!ipcTried_) {
    ipcTried_ = true;
    std::string why;
    ipc_ = IpcCollectives::create(makeDevice, store_, keyPrefix_ + "ipc/", coll, ipcConfig_.bufferBytes,
                                  ipcConfig_.oneShotBytes, desc, deadline, &why);
    if (ipc_) {
      ipcView_.store(ipc_.get());
    } else {
      std::fprintf(stderr,
                   "pycomm rank %d: CUDA IPC unavailable (%s); CUDA collectives are staged through host "
                   "memory\n",
                   rank_, why.c_str());
    }
  }
  return ipc_.get();
}

std::map<std::string, uint64_t> Group::stats() const {
  std::map<std::string, uint64_t> s = algos_->stats();
  if (const IpcCollectives* ipc = ipcView_.load()) {
    for (const auto& [k, v] : ipc->stats()) s[k] = v;
  }
  s["collectives"] = collectivesRun_.load();
  // Counters per underlying transport ("bytes_sent_shm", "bytes_sent_tcp"; a mixed
  // transport's parts counted apart), and their totals.
  uint64_t sent = 0, recv = 0, msgs = 0;
  std::function<void(const Transport&)> add = [&](const Transport& t) {
    if (auto* m = dynamic_cast<const MixedTransport*>(&t)) {
      add(m->localPart());
      add(m->remotePart());
      return;
    }
    s[strCat("bytes_sent_", t.name())] += t.bytesSent();
    s[strCat("bytes_recv_", t.name())] += t.stats().bytesRecv.load();
    sent += t.bytesSent();
    recv += t.stats().bytesRecv.load();
    msgs += t.stats().messagesSent.load();
  };
  add(*coll_);
  add(*p2p_);
  s["messages_sent"] = msgs;
  s["bytes_sent"] = sent;
  s["bytes_recv"] = recv;
  return s;
}

void Group::abort(const std::string& why) {
  coll_->abort(why);
  p2p_->abort(why);
  FlightRecorder::get().onGroupError(frGroup_, why);
}

}  // namespace pycomm
