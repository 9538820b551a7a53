// Python access to the machine-limit probes (transport/probe.h), which pycomm-bench
// runs next to the collectives it times, and to the huge-page advice (core/huge_pages.h)
// that pycomm applies to buffers it owns.
#include <torch/extension.h>

#include "core/affinity.h"
#include "core/heap_policy.h"
#include "core/huge_pages.h"
#include "transport/probe.h"

namespace pycomm {
namespace {

pybind11::dict toDict(const BandwidthProbe& p) {
  pybind11::dict d;
  d["best_gbps"] = p.bestGBps;
  d["median_gbps"] = p.medianGBps;
  d["threads"] = p.threads;
  d["bytes"] = p.bytes;
  d["reps"] = p.reps;
  d["huge_pages"] = p.hugePages;
  d["huge_backed"] = p.hugeBacked;
  d["error"] = p.error.empty() ? pybind11::object(pybind11::none()) : pybind11::object(pybind11::str(p.error));
  return d;
}

}  // namespace

void initProbeBindings(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "probe_memcpy",
      [](size_t bytes, int threads, int reps, bool huge) {
        BandwidthProbe p;
        {
          py::gil_scoped_release nogil;
          p = probeMemcpy(bytes, threads, reps, huge);
        }
        return toDict(p);
      },
      py::arg("bytes"), py::arg("threads") = 1, py::arg("reps") = 5, py::arg("huge_pages") = true,
      "memcpy bandwidth between two buffers of `bytes` split over `threads` threads (dict of GB/s)");
  m.def(
      "probe_cross_memory",
      [](size_t bytes, int threads, int reps, bool huge) {
        BandwidthProbe p;
        {
          py::gil_scoped_release nogil;
          p = probeCrossMemory(bytes, threads, reps, huge);
        }
        return toDict(p);
      },
      py::arg("bytes"), py::arg("threads") = 1, py::arg("reps") = 5, py::arg("huge_pages") = true,
      "process_vm_readv bandwidth from a child process's buffer (dict of GB/s)");
  m.def(
      "probe_futex_round_trip",
      [](int iters) {
        LatencyProbe p;
        {
          py::gil_scoped_release nogil;
          p = probeFutexRoundTrip(iters);
        }
        py::dict d;
        d["p50_us"] = p.p50us;
        d["p99_us"] = p.p99us;
        d["min_us"] = p.minus;
        d["iters"] = p.iters;
        d["error"] = p.error.empty() ? py::object(py::none()) : py::object(py::str(p.error));
        return d;
      },
      py::arg("iters") = 2000, "futex wake-up round trip between this process and a child (microseconds)");
  m.def("available_cpus", &availableCpus,
        "CPUs this process may run on (sched_getaffinity; before pycomm bound it, core/affinity.h)");
  m.def(
      "binding",
      [] {
        const BindResult r = bindingResult();
        py::dict d;
        d["decided"] = r.decided;
        d["bound"] = r.bound;
        d["cpus"] = r.cpus;
        d["before"] = r.before;
        d["local_index"] = r.localIndex;
        d["local_size"] = r.localSize;
        d["mode"] = r.mode;
        d["reason"] = r.reason;
        return d;
      },
      "what pycomm's rank-to-core binding decided in this process (PYCOMM_BIND; core/affinity.h)");
  m.def(
      "heap_policy",
      [] {
        const HeapPolicy p = heapPolicy();
        py::dict d;
        d["decided"] = p.decided;
        d["applied"] = p.applied;
        d["mmap_threshold"] = p.mmapThreshold;
        d["trim_threshold"] = p.trimThreshold;
        d["mode"] = p.mode;
        d["reason"] = p.reason;
        return d;
      },
      "what pycomm's heap policy decided in this process (PYCOMM_HEAP; core/heap_policy.h)");
  m.def("_cpu_share", &cpuShare, py::arg("allowed"), py::arg("local_index"), py::arg("local_size"),
        "the CPUs a local rank is bound to out of `allowed` (the policy's arithmetic, for tests)");
  m.def("huge_pages_available", &hugePagesAvailable,
        "whether the kernel gives anonymous memory huge pages where advised (THP always or madvise)");
  m.def(
      "advise_huge_pages",
      [](const at::Tensor& t, bool collapse) {
        TORCH_CHECK_VALUE(t.device().is_cpu(), "pycomm: advise_huge_pages needs a CPU tensor");
        return adviseHugePages(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size(), collapse);
      },
      py::arg("tensor"), py::arg("collapse") = true,
      "asks for 2 MiB pages on the tensor's memory (MADV_HUGEPAGE, and MADV_COLLAPSE for resident pages)");
}

}  // namespace pycomm
