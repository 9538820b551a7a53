// The flight recorder: a per-process ring buffer of the last collectives and
// point-to-point operations of every group (sequence number, collective, group,
// element counts, dtype, state and timestamps), kept so that a hang or a failure can
// be explained after the fact. On a group's first failure (timeout, dead peer,
// mismatch, abort) the recorder hands a snapshot to the dump writer the bindings
// install (bindings/flight_recorder_bindings.cpp writes torch's flight-recorder dump
// format, which `python -m torch.distributed.flight_recorder.fr_trace` analyses).
// Torch-free; see docs/RELIABILITY.md.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "transport/transport.h"

namespace pycomm {

/// One recorded operation (a copy, as the snapshot returns it).
struct FlightEntry {
  enum class State : uint8_t { kScheduled = 0, kStarted = 1, kCompleted = 2 };

  uint64_t recordId = 0;   ///< position in the process's history (0, 1, 2, ...)
  int32_t group = -1;      ///< index into FlightSnapshot::groups
  uint64_t collSeq = 0;    ///< group's collective sequence number (p2p: the last collective's)
  uint64_t p2pSeq = 0;     ///< group's point-to-point sequence number (collectives: the last p2p's)
  CollType coll = CollType::kBarrier;
  DType dtype = DType::kUInt8;
  bool isP2P = false;
  bool isSend = false;     ///< p2p: send (else receive)
  bool retired = false;    ///< finished, completed or failed
  State state = State::kScheduled;
  int32_t peer = -1;       ///< p2p: the other rank (group rank); -1: receive from any source
  uint64_t inCount = 0;    ///< elements in (p2p: bytes)
  uint64_t outCount = 0;   ///< elements out (p2p: bytes)
  int64_t createdNs = 0;   ///< wall clock (ns since the epoch) when submitted
  int64_t startedNs = 0;   ///< when it started running, 0 if not yet
  int64_t completedNs = 0; ///< when it completed, 0 if not (or if it failed)
  int64_t timeoutMs = 0;
};

/// A recorded group: what torch's dump calls the process group's config.
struct FlightGroup {
  std::string name;        ///< torch's group name ("0", ...), or "pycomm_<n>"
  std::string desc;        ///< torch's group description ("default_pg", ...) or "undefined"
  std::vector<int> ranks;  ///< global ranks of the members, in group-rank order
  int rank = 0;            ///< this process's rank in the group
  uint64_t lastEnqueued = 0, lastStarted = 0, lastCompleted = 0;  ///< collective seqs
};

/// What a dump contains.
struct FlightSnapshot {
  std::vector<FlightGroup> groups;
  std::vector<FlightEntry> entries;  ///< oldest first
  int globalRank = 0;                ///< this process's rank in the world (for the file name)
  std::string reason;                ///< why the dump was taken
};

/// Identity of the next group to be created on this thread (set by the Python backend
/// creator just before it creates the group, which then claims it).
struct FlightGroupInfo {
  std::string name, desc;
  std::vector<int> ranks;
};

class FlightRecorder {
 public:
  /// The process's recorder. Its capacity comes from PYCOMM_FLIGHT_RECORDER_ENTRIES
  /// (default 2000; 0 turns recording off) when first used.
  static FlightRecorder& get();

  explicit FlightRecorder(size_t capacity);

  /// Entries kept (0: recording is off).
  size_t capacity() const { return capacity_; }

  /// Sets the identity the next group created on this thread takes (see claimGroup).
  static void setNextGroupInfo(FlightGroupInfo info);

  /// Registers a group of `size` ranks in which this process is `rank`; takes the
  /// identity set by setNextGroupInfo on this thread if any (else "pycomm_<n>", ranks
  /// 0..size-1). Returns the group's index.
  int addGroup(int rank, int size);

  /// Records a collective (`desc` as every rank sends it) submitted on group `group`
  /// of `size` ranks; returns its record id (UINT64_MAX when recording is off).
  uint64_t recordCollective(int group, int size, const OpDesc& desc, int64_t timeoutMs);
  /// Records a send (`isSend`) or receive of `bytes` with `peer` (group rank).
  uint64_t recordP2P(int group, bool isSend, int peer, size_t bytes, int64_t timeoutMs);

  /// The operation began running.
  void started(uint64_t id);
  /// The operation ended: completed if `ok`, else it stays started/scheduled (as torch
  /// records a failed collective), retired either way.
  void finished(uint64_t id, bool ok);

  /// A copy of the recorded history and groups.
  FlightSnapshot snapshot(const std::string& reason) const;

  /// Writes a snapshot somewhere (installed by the bindings); returns where, or "".
  using Writer = std::function<std::string(const FlightSnapshot&, const std::string& path)>;
  /// Installs the writer that dump() and failures use.
  void setWriter(Writer w);

  /// Writes a snapshot with the installed writer to `path` ("": the default file
  /// the writer picks); returns the file written, "" if none (no writer, or off).
  std::string dump(const std::string& reason, const std::string& path = "");

  /// Called on group `group`'s failure: dumps once per group (on its first failure),
  /// if PYCOMM_FLIGHT_RECORDER_DUMP_ON_ERROR is not 0. Never throws.
  void onGroupError(int group, const std::string& why);

  /// Wall clock in ns since the epoch.
  static int64_t nowNs();

 private:
  uint64_t push(FlightEntry e);
  FlightEntry* slot(uint64_t id);  // under mu_; null if overwritten or unknown

  const size_t capacity_;
  mutable std::mutex mu_;
  std::vector<FlightEntry> ring_;
  uint64_t next_ = 0;  // record id of the next entry
  std::vector<FlightGroup> groups_;
  std::vector<uint64_t> lastColl_, lastP2P_;  // per group
  std::vector<bool> dumped_;                  // per group: dumped on error already
  int globalRank_ = -1;
  std::mutex writerMu_;
  Writer writer_;
};

}  // namespace pycomm
