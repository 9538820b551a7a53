// CUDA IPC implementation of IpcDevice (transport/ipc_device.h): cudaMalloc'd buffers
// exported with cudaIpcGetMemHandle and mapped by peers with cudaIpcOpenMemHandle, one
// interprocess event per rank, all work on one CUDA stream. Works for ranks sharing a
// GPU (different processes may map each other's memory on the same device) and for
// ranks on different GPUs of one host (peer access is enabled lazily when mapping).
// Only compiled when PYCOMM_WITH_CUDA is defined; this header needs no CUDA headers.
#pragma once

#include <memory>

#include "transport/ipc_device.h"

struct CUstream_st;
/// Same type as the CUDA runtime's cudaStream_t (redeclaring the typedef is allowed).
typedef struct CUstream_st* cudaStream_t;

namespace pycomm {

/// An IpcDevice on CUDA device `device` whose operations run on `stream` (the group's
/// comm stream for that device, which must outlive the returned object).
std::unique_ptr<IpcDevice> makeCudaIpcDevice(int device, cudaStream_t stream);

}  // namespace pycomm
