#pragma once
// One error check for every CUDA runtime call of pycomm's .cu files.
#include <cuda_runtime.h>

#include "core/error.h"

namespace pycomm {

/// Throws pycomm::Error naming `what` when `e` is not cudaSuccess. The runtime's
/// last-error state is cleared first, so a later, unrelated check is not blamed for a
/// non-sticky error already reported here.
inline void cudaCheck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw Error(strCat("pycomm CUDA ", what, ": ", cudaGetErrorString(e)));
  }
}

}  // namespace pycomm
