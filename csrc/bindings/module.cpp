// The pycomm._C module: each area registers its bindings here.
#include <torch/extension.h>

namespace pycomm {
void initBackendBindings(pybind11::module_& m);      // backend.cpp (backend.h)
void initCompressionBindings(pybind11::module_& m);  // compression_bindings.cpp
void initBucketBindings(pybind11::module_& m);       // bucket_bindings.cpp
void initPowerSgdBindings(pybind11::module_& m);     // powersgd_bindings.cpp
void initReduceBindings(pybind11::module_& m);       // reduce_bindings.cpp
void initFlightRecorderBindings(pybind11::module_& m);  // flight_recorder_bindings.cpp
void initProbeBindings(pybind11::module_& m);        // probe_bindings.cpp
}  // namespace pycomm

PYBIND11_MODULE(_C, m) {
  m.doc() = "pycomm native core: collectives, transports, compression kernels";
#ifdef PYCOMM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  pycomm::initBackendBindings(m);
  pycomm::initCompressionBindings(m);
  pycomm::initBucketBindings(m);
  pycomm::initPowerSgdBindings(m);
  pycomm::initReduceBindings(m);
  pycomm::initFlightRecorderBindings(m);
  pycomm::initProbeBindings(m);
}
