// Placeholder until the compression kernels land.
#include <torch/extension.h>

namespace pycomm {
void initCompressionBindings(pybind11::module_& m) {}
}  // namespace pycomm
