#include "transport/cuda_ipc.h"

#include <cuda_runtime.h>

#include <chrono>
#include <cstring>
#include <map>
#include <thread>
#include <vector>

#include "core/error.h"
#include "kernels/cuda_check.h"
#include "kernels/reduce_cuda.h"

namespace pycomm {

namespace {

/// Sets `device` current for the scope (the comm thread may have another one current).
/// `nothrow`: for destructors, which may run while the CUDA runtime is shutting down.
class DeviceScope {
 public:
  explicit DeviceScope(int device, bool nothrow = false) {
    if (nothrow) {
      if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
      if (prev_ >= 0 && prev_ != device) cudaSetDevice(device);
      return;
    }
    cudaCheck(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) cudaCheck(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }

 private:
  int prev_ = -1;
};

template <typename H>
std::string toString(const H& h) {
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

template <typename H>
H fromString(const std::string& s, const char* what) {
  if (s.size() != sizeof(H)) throw Error(strCat("malformed ", what, " handle (", s.size(), " bytes)"));
  H h;
  std::memcpy(&h, s.data(), sizeof(H));
  return h;
}

class CudaIpcDevice : public IpcDevice {
 public:
  CudaIpcDevice(int device, cudaStream_t stream) : device_(device), stream_(stream) {
    DeviceScope d(device_);
    // Interprocess events must be created without timing.
    cudaCheck(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming | cudaEventInterprocess),
          "cudaEventCreateWithFlags(interprocess)");
  }

  ~CudaIpcDevice() override {
    // Destructors run after the last operation's closing barrier: nothing of ours is
    // queued and no peer reads our buffers any more, but peers may still have them
    // mapped, so they are freed only if freeOnDestroy() said every peer has closed them
    // (else the process's exit reclaims them). Errors are ignored: the runtime may be
    // shutting down at process exit.
    DeviceScope d(device_, /*nothrow=*/true);
    closePeersNoThrow();
    if (freeOwned_) {
      for (void* p : owned_) cudaFree(p);
    }
    if (event_) cudaEventDestroy(event_);
  }

  void closePeers() override {
    DeviceScope d(device_);
    closePeersNoThrow();
  }

  void freeOnDestroy() override { freeOwned_ = true; }

  void* allocate(size_t bytes, std::string* handle) override {
    DeviceScope d(device_);
    void* p = nullptr;
    cudaCheck(cudaMalloc(&p, bytes), "cudaMalloc (IPC buffer)");
    owned_.push_back(p);
    cudaIpcMemHandle_t h;
    cudaCheck(cudaIpcGetMemHandle(&h, p), "cudaIpcGetMemHandle");
    *handle = toString(h);
    return p;
  }

  void* openPeer(const std::string& handle) override {
    DeviceScope d(device_);
    void* p = nullptr;
    cudaCheck(cudaIpcOpenMemHandle(&p, fromString<cudaIpcMemHandle_t>(handle, "memory"),
                               cudaIpcMemLazyEnablePeerAccess),
          "cudaIpcOpenMemHandle");
    opened_.push_back(p);
    return p;
  }

  std::string eventHandle() override {
    cudaIpcEventHandle_t h;
    cudaCheck(cudaIpcGetEventHandle(&h, event_), "cudaIpcGetEventHandle");
    return toString(h);
  }

  void openPeerEvent(int peer, const std::string& handle) override {
    DeviceScope d(device_);
    cudaEvent_t ev = nullptr;
    cudaCheck(cudaIpcOpenEventHandle(&ev, fromString<cudaIpcEventHandle_t>(handle, "event")),
          "cudaIpcOpenEventHandle");
    peerEvents_[peer] = ev;
  }

  void record() override {
    DeviceScope d(device_);
    cudaCheck(cudaEventRecord(event_, stream_), "cudaEventRecord");
  }

  void waitPeers() override {
    DeviceScope d(device_);
    for (auto& [peer, ev] : peerEvents_) cudaCheck(cudaStreamWaitEvent(stream_, ev, 0), "cudaStreamWaitEvent");
  }

  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    DeviceScope d(device_);
    cudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_), "cudaMemcpyAsync");
  }

  void reduceMany(void* dst, const void* const* srcs, int n, size_t count, DType dtype, ReduceOp op) override {
    DeviceScope d(device_);
    reduceManyCuda(dst, srcs, n, count, dtype, op, stream_);
  }

  void synchronize(const Deadline& deadline) override {
    DeviceScope d(device_);
    // Polled rather than cudaStreamSynchronize: a peer that died leaves our stream
    // waiting on its event forever, and the caller must get an error at its deadline.
    auto sleep = std::chrono::microseconds(2);
    for (;;) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) cudaCheck(e, "IPC collective stream");
      if (deadline.expired()) {
        throw TimeoutError(strCat("pycomm: CUDA IPC collective on ", name(),
                                  " did not finish on the device before the deadline (a peer's "
                                  "device work never completed)"));
      }
      std::this_thread::sleep_for(sleep);
      if (sleep < std::chrono::microseconds(200)) sleep *= 2;
    }
  }

  int maxSources() const override { return kMaxReduceSources; }

  void closePeersNoThrow() {
    for (void* p : opened_) cudaIpcCloseMemHandle(p);
    opened_.clear();
    for (auto& [peer, ev] : peerEvents_) cudaEventDestroy(ev);
    peerEvents_.clear();
  }

  std::string name() const override { return strCat("cuda:", device_, " (IPC)"); }

 private:
  int device_;
  cudaStream_t stream_;
  cudaEvent_t event_ = nullptr;
  std::vector<void*> owned_;
  std::vector<void*> opened_;
  std::map<int, cudaEvent_t> peerEvents_;
  bool freeOwned_ = false;  // see freeOnDestroy()
};

}  // namespace

std::unique_ptr<IpcDevice> makeCudaIpcDevice(int device, cudaStream_t stream) {
  return std::make_unique<CudaIpcDevice>(device, stream);
}

}  // namespace pycomm
