// Placeholder until the bucket bindings land.
#include <torch/extension.h>

namespace pycomm {
void initBucketBindings(pybind11::module_& m) {}
}  // namespace pycomm
