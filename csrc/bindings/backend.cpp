// Placeholder: the c10d backend lands here.
#include <torch/extension.h>

namespace pycomm {
void initBackendBindings(pybind11::module_& m) {}
}  // namespace pycomm
