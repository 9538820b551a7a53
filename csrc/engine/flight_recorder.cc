#include "engine/flight_recorder.h"

#include <chrono>
#include <cstdio>
#include <limits>

#include "core/env.h"
#include "core/error.h"

namespace pycomm {

namespace {
constexpr uint64_t kNoRecord = std::numeric_limits<uint64_t>::max();

thread_local bool tNextSet = false;
thread_local FlightGroupInfo tNext;

// Element counts in and out of a collective whose header count is `count` (see how
// the bindings set OpDesc::count for each collective).
void inOutCounts(const OpDesc& d, int size, uint64_t& in, uint64_t& out) {
  const uint64_t n = d.count, all = d.count * static_cast<uint64_t>(size);
  switch (d.coll) {
    case CollType::kAllGather:
    case CollType::kGather: in = n, out = all; return;
    case CollType::kReduceScatter:
    case CollType::kScatter: in = all, out = n; return;
    default: in = out = n; return;
  }
}
}  // namespace

FlightRecorder& FlightRecorder::get() {
  static FlightRecorder* r = [] {
    int64_t n = 2000;
    try {
      n = envInt("PYCOMM_FLIGHT_RECORDER_ENTRIES", 2000);
    } catch (const InvalidArgument& e) {
      std::fprintf(stderr, "pycomm: %s; the flight recorder keeps 2000 entries\n", e.what());
    }
    return new FlightRecorder(static_cast<size_t>(n < 0 ? 0 : n));  // never destroyed: used at exit
  }();
  return *r;
}

FlightRecorder::FlightRecorder(size_t capacity) : capacity_(capacity), ring_(capacity) {}

int64_t FlightRecorder::nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void FlightRecorder::setNextGroupInfo(FlightGroupInfo info) {
  tNext = std::move(info);
  tNextSet = true;
}

int FlightRecorder::addGroup(int rank, int size) {
  FlightGroup g;
  g.rank = rank;
  const bool named = tNextSet && static_cast<int>(tNext.ranks.size()) == size;
  if (named) {
    g.name = tNext.name;
    g.desc = tNext.desc.empty() ? "undefined" : tNext.desc;
    g.ranks = tNext.ranks;
  } else {
    g.desc = "undefined";
    for (int r = 0; r < size; ++r) g.ranks.push_back(r);
  }
  tNextSet = false;
  std::lock_guard<std::mutex> lk(mu_);
  if (g.name.empty()) g.name = strCat("pycomm_", groups_.size());
  // A group created from Python knows its members' global ranks, so this process's
  // global rank (the dump file's name); otherwise the first group's rank stands in.
  if (globalRank_ < 0 || named) globalRank_ = g.ranks[rank];
  groups_.push_back(std::move(g));
  lastColl_.push_back(0);
  lastP2P_.push_back(0);
  dumped_.push_back(false);
  return static_cast<int>(groups_.size()) - 1;
}

uint64_t FlightRecorder::push(FlightEntry e) {
  e.recordId = next_++;
  e.createdNs = nowNs();
  ring_[e.recordId % capacity_] = e;
  return e.recordId;
}

FlightEntry* FlightRecorder::slot(uint64_t id) {
  if (capacity_ == 0 || id == kNoRecord) return nullptr;
  FlightEntry& e = ring_[id % capacity_];
  return e.recordId == id ? &e : nullptr;
}

uint64_t FlightRecorder::recordCollective(int group, int size, const OpDesc& desc, int64_t timeoutMs) {
  if (capacity_ == 0 || group < 0) return kNoRecord;
  FlightEntry e;
  e.group = group;
  e.collSeq = desc.seq;
  e.coll = desc.coll;
  e.dtype = desc.dtype;
  e.peer = desc.root;
  e.timeoutMs = timeoutMs;
  inOutCounts(desc, size, e.inCount, e.outCount);
  std::lock_guard<std::mutex> lk(mu_);
  lastColl_[group] = desc.seq;
  groups_[group].lastEnqueued = desc.seq;
  e.p2pSeq = lastP2P_[group];
  return push(e);
}

uint64_t FlightRecorder::recordP2P(int group, bool isSend, int peer, size_t bytes, int64_t timeoutMs) {
  if (capacity_ == 0 || group < 0) return kNoRecord;
  FlightEntry e;
  e.group = group;
  e.coll = CollType::kSend;
  e.isP2P = true;
  e.isSend = isSend;
  e.peer = peer;
  e.inCount = e.outCount = bytes;
  e.timeoutMs = timeoutMs;
  std::lock_guard<std::mutex> lk(mu_);
  e.p2pSeq = ++lastP2P_[group];
  e.collSeq = lastColl_[group];
  return push(e);
}

void FlightRecorder::started(uint64_t id) {
  if (capacity_ == 0 || id == kNoRecord) return;
  const int64_t t = nowNs();
  std::lock_guard<std::mutex> lk(mu_);
  if (FlightEntry* e = slot(id)) {
    e->state = FlightEntry::State::kStarted;
    e->startedNs = t;
    if (!e->isP2P) groups_[e->group].lastStarted = e->collSeq;
  }
}

void FlightRecorder::finished(uint64_t id, bool ok) {
  if (capacity_ == 0 || id == kNoRecord) return;
  const int64_t t = nowNs();
  std::lock_guard<std::mutex> lk(mu_);
  if (FlightEntry* e = slot(id)) {
    e->retired = true;
    if (ok) {
      e->state = FlightEntry::State::kCompleted;
      e->completedNs = t;
      if (!e->isP2P) groups_[e->group].lastCompleted = e->collSeq;
    }
  }
}

FlightSnapshot FlightRecorder::snapshot(const std::string& reason) const {
  FlightSnapshot s;
  s.reason = reason;
  std::lock_guard<std::mutex> lk(mu_);
  s.groups = groups_;
  s.globalRank = globalRank_ < 0 ? 0 : globalRank_;
  const uint64_t first = next_ > capacity_ ? next_ - capacity_ : 0;
  s.entries.reserve(next_ - first);
  for (uint64_t id = first; id < next_; ++id) s.entries.push_back(ring_[id % capacity_]);
  return s;
}

void FlightRecorder::setWriter(Writer w) {
  std::lock_guard<std::mutex> lk(writerMu_);
  writer_ = std::move(w);
}

std::string FlightRecorder::dump(const std::string& reason, const std::string& path) {
  std::lock_guard<std::mutex> lk(writerMu_);  // one dump at a time
  if (!writer_ || capacity_ == 0) return "";
  return writer_(snapshot(reason), path);
}

void FlightRecorder::onGroupError(int group, const std::string& why) {
  if (capacity_ == 0 || group < 0) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (dumped_[group]) return;
    dumped_[group] = true;
  }
  bool want = true;
  try {
    want = envInt("PYCOMM_FLIGHT_RECORDER_DUMP_ON_ERROR", 1) != 0;
  } catch (const InvalidArgument&) {
  }
  if (!want) return;
  try {
    const std::string file = dump(why);
    if (!file.empty()) std::fprintf(stderr, "pycomm: flight recorder dumped to %s\n", file.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pycomm: flight recorder dump failed: %s\n", e.what());
  }
}

}  // namespace pycomm
