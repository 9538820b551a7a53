// The flight recorder's dump writer and Python API (pycomm/flight_recorder.py): turns
// the engine's snapshot (engine/flight_recorder.h) into the dump torch's own flight
// recorder writes for NCCL/Gloo (a pickled dict: version, pg_config, pg_status,
// entries), pickled with torch's pickler, so that torch's trace analyser
// (`python -m torch.distributed.flight_recorder.fr_trace DIR`) reads pycomm's dumps.
#include <pybind11/stl.h>
#include <torch/csrc/distributed/c10d/TraceUtils.h>
#include <torch/extension.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "core/env.h"
#include "core/error.h"
#include "engine/flight_recorder.h"

namespace pycomm {
namespace {

// The dump format version of torch 2.14's flight recorder (FlightRecorder.hpp
// version_val); its analyser picks its matching rules by it.
constexpr const char* kDumpVersion = "2.10";
// torch's analyser accepts only the backend names it knows (nccl, gloo, ...) in
// profiling names; pycomm is a CPU backend in Gloo's place and records as "gloo".
constexpr const char* kProfilingBackend = "gloo";

c10::Dict<c10::IValue, c10::IValue> newDict() {
  return c10::Dict<c10::IValue, c10::IValue>(c10::AnyType::get(), c10::AnyType::get());
}
c10::List<c10::IValue> newList() { return c10::List<c10::IValue>(c10::AnyType::get()); }

at::ScalarType scalarType(DType d) {
  switch (d) {
    case DType::kFloat32: return at::kFloat;
    case DType::kFloat64: return at::kDouble;
    case DType::kFloat16: return at::kHalf;
    case DType::kBFloat16: return at::kBFloat16;
    case DType::kInt8: return at::kChar;
    case DType::kUInt8: return at::kByte;
    case DType::kInt32: return at::kInt;
    case DType::kInt64: return at::kLong;
    case DType::kBool: return at::kBool;
  }
  return at::kByte;
}

// The collective's name as torch's analyser knows it (types.py COLLECTIVES / P2P).
std::string opName(const FlightEntry& e, int rank) {
  if (e.isP2P && e.peer < 0) return strCat("recv ", rank, "<-any");  // receive from any source
  if (e.isP2P) return e.isSend ? strCat("send ", rank, "->", e.peer) : strCat("recv ", rank, "<-", e.peer);
  switch (e.coll) {
    case CollType::kCompressed: return "all_reduce";
    case CollType::kSend: return "send";
    default: return collName(e.coll);
  }
}

std::string ranksStr(const std::vector<int>& ranks) {
  std::string s = "[";
  for (size_t i = 0; i < ranks.size(); ++i) s += strCat(i ? ", " : "", ranks[i]);
  return s + "]";
}

c10::IValue dumpValue(const FlightSnapshot& s) {
  auto d = newDict();
  d.insert("version", kDumpVersion);
  d.insert("comm_lib_version", "pycomm");
  d.insert("reason", s.reason);
  auto pgConfig = newDict();
  auto pgStatus = newDict();
  for (size_t i = 0; i < s.groups.size(); ++i) {
    const FlightGroup& g = s.groups[i];
    auto info = newDict();
    info.insert("name", g.name);
    info.insert("desc", g.desc);
    info.insert("ranks", ranksStr(g.ranks));
    pgConfig.insert(g.name, info);
    auto st = newDict();
    st.insert("last_enqueued_collective", static_cast<int64_t>(g.lastEnqueued));
    st.insert("last_started_collective", static_cast<int64_t>(g.lastStarted));
    st.insert("last_completed_collective", static_cast<int64_t>(g.lastCompleted));
    pgStatus.insert(std::to_string(i), st);
  }
  d.insert("pg_config", pgConfig);
  d.insert("pg_status", pgStatus);
  auto entries = newList();
  for (const FlightEntry& e : s.entries) {
    const FlightGroup& g = s.groups.at(static_cast<size_t>(e.group));
    auto x = newDict();
    x.insert("record_id", static_cast<int64_t>(e.recordId));
    x.insert("pg_id", static_cast<int64_t>(e.group));
    x.insert("process_group", c10::ivalue::Tuple::create(g.name, g.desc));
    x.insert("collective_seq_id", static_cast<int64_t>(e.collSeq));
    x.insert("p2p_seq_id", static_cast<int64_t>(e.p2pSeq));
    x.insert("op_id", static_cast<int64_t>(e.isP2P ? e.p2pSeq : e.collSeq));
    x.insert("profiling_name", strCat(kProfilingBackend, ":", opName(e, g.rank)));
    x.insert("time_created_ns", e.createdNs);
    const bool bytes = e.isP2P || e.coll == CollType::kBarrier;
    const std::string dtype = c10::toString(bytes ? at::kByte : scalarType(e.dtype));
    auto sizes = [](uint64_t n) {
      auto outer = newList();
      outer.push_back(c10::List<int64_t>({static_cast<int64_t>(n)}));
      return outer;
    };
    x.insert("input_sizes", sizes(e.inCount));
    x.insert("input_dtypes", std::vector<std::string>{dtype});
    x.insert("output_sizes", sizes(e.outCount));
    x.insert("output_dtypes", std::vector<std::string>{dtype});
    x.insert("state", e.state == FlightEntry::State::kCompleted ? "completed"
                      : e.state == FlightEntry::State::kStarted ? "started"
                                                                : "scheduled");
    x.insert("time_discovered_started_ns", e.startedNs ? c10::IValue(e.startedNs) : c10::IValue());
    x.insert("time_discovered_completed_ns", e.completedNs ? c10::IValue(e.completedNs) : c10::IValue());
    x.insert("duration", e.completedNs && e.startedNs ? c10::IValue((e.completedNs - e.startedNs) / 1e6)
                                                      : c10::IValue());
    x.insert("retired", e.retired);
    x.insert("timeout_ms", e.timeoutMs);
    x.insert("is_p2p", e.isP2P);
    x.insert("frames", newList());
    entries.push_back(x);
  }
  d.insert("entries", entries);
  return d;
}

// torch's convention: TORCH_FR_DUMP_TEMP_FILE is the file prefix, the rank follows.
std::string defaultPath(int globalRank) {
  return strCat(envStr("TORCH_FR_DUMP_TEMP_FILE", "/tmp/pycomm_trace_rank_"), globalRank);
}

// Writes atomically (a reader never sees half a dump): to a temporary, then renamed.
std::string writeDump(const FlightSnapshot& s, const std::string& path) {
  const std::string file = path.empty() ? defaultPath(s.globalRank) : path;
  const std::string bytes = c10d::pickle_str(dumpValue(s));
  const std::string tmp = file + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw Error(strCat("cannot write the flight recorder dump to ", tmp));
  }
  if (std::rename(tmp.c_str(), file.c_str()) != 0) {
    throw Error(strCat("cannot rename ", tmp, " to ", file));
  }
  return file;
}

}  // namespace

void initFlightRecorderBindings(pybind11::module_& m) {
  namespace py = pybind11;
  FlightRecorder::get().setWriter(writeDump);
  m.def(
      "_flight_recorder_next_group",
      [](const std::string& name, const std::string& desc, const std::vector<int>& ranks) {
        FlightRecorder::setNextGroupInfo(FlightGroupInfo{name, desc, ranks});
      },
      py::arg("name"), py::arg("desc"), py::arg("ranks"),
      "Names the next pycomm group created on this thread in the flight recorder (the backend creator calls it)");
  m.def(
      "flight_recorder_dump",
      [](const std::string& path, const std::string& reason) {
        std::string file;
        {
          py::gil_scoped_release noGil;
          file = FlightRecorder::get().dump(reason, path);
        }
        return file;
      },
      py::arg("path") = "", py::arg("reason") = "on demand",
      "Writes the flight recorder's dump (torch's format) to `path` (default: TORCH_FR_DUMP_TEMP_FILE + rank); "
      "returns the file, '' when recording is off");
  m.def(
      "flight_recorder_dump_bytes",
      [](const std::string& reason) {
        FlightSnapshot s = FlightRecorder::get().snapshot(reason);
        return py::bytes(c10d::pickle_str(dumpValue(s)));
      },
      py::arg("reason") = "on demand", "The dump writer's pickle, as bytes");
  m.def(
      "flight_recorder_capacity", [] { return FlightRecorder::get().capacity(); },
      "Entries the flight recorder keeps (PYCOMM_FLIGHT_RECORDER_ENTRIES; 0: off)");
}

}  // namespace pycomm
