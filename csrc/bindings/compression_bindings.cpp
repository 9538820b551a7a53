// Torch glue for the fused compression kernels (csrc/kernels/compress.h): checks the
// tensors, allocates payloads on the input's device and dispatches to the CPU loop or,
// when built with PYCOMM_WITH_CUDA, the CUDA kernel on the current stream. Kernels run
// with the GIL released so communication callbacks can progress meanwhile.
#include <torch/extension.h>

#include <optional>

#include "kernels/compress.h"

#ifdef PYCOMM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace pycomm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#ifdef PYCOMM_WITH_CUDA
// Runs cpuCall on CPU tensors, cudaCall (with `stream` in scope) on CUDA tensors.
#define PYCOMM_COMPRESS_DISPATCH(t, cpuCall, cudaCall)                         \
  do {                                                                         \
    if ((t).is_cuda()) {                                                       \
      c10::cuda::CUDAGuard guard_((t).device());                               \
      CUstream_st* stream = at::cuda::getCurrentCUDAStream().stream();         \
      cudaCall;                                                                \
    } else {                                                                   \
      cpuCall;                                                                 \
    }                                                                          \
  } while (0)
#else
#define PYCOMM_COMPRESS_DISPATCH(t, cpuCall, cudaCall)                                      \
  do {                                                                                      \
    TORCH_CHECK(!(t).is_cuda(), "pycomm was built without CUDA; got a CUDA tensor");         \
    cpuCall;                                                                                \
  } while (0)
#endif

/// Checks a contiguous tensor of the given dtype and returns it.
const Tensor& checked(const Tensor& t, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype, what, " must be ", c10::toString(dtype), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
  return t;
}

/// Pointer of an optional float32 tensor with at least n elements on `device`, or nullptr.
float* optFloat(const OptTensor& t, size_t n, const at::Device& device, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  checked(*t, at::kFloat, what);
  TORCH_CHECK((size_t)t->numel() >= n, what, " has ", t->numel(), " elements, needs ", n);
  TORCH_CHECK(t->device() == device, what, " is on ", t->device(), ", expected ", device);
  return t->data_ptr<float>();
}

/// Element count and device of the (x, residual) input pair.
std::pair<size_t, at::Device> inputOf(const OptTensor& x, const OptTensor& residual) {
  if (x.has_value() && x->defined()) {
    checked(*x, at::kFloat, "x");
    return {(size_t)x->numel(), x->device()};
  }
  TORCH_CHECK(residual.has_value() && residual->defined(), "need x or residual");
  return {(size_t)residual->numel(), residual->device()};
}

const float* optIn(const OptTensor& x) {
  return x.has_value() && x->defined() ? x->data_ptr<float>() : nullptr;
}

at::TensorOptions bytesOn(const at::Device& d) { return at::TensorOptions().dtype(at::kByte).device(d); }

// ---------------------------------------------------------------- OneBit

Tensor oneBitCompressT(const OptTensor& x, const OptTensor& residual, int64_t chunk, int64_t numChunks) {
  auto [n, dev] = inputOf(x, residual);
  float* res = optFloat(residual, n, dev, "residual");
  Tensor out = at::empty({(int64_t)oneBitPayloadBytes(chunk) * numChunks}, bytesOn(dev));
  const float* xp = optIn(x);
  uint8_t* o = out.data_ptr<uint8_t>();
  PYCOMM_COMPRESS_DISPATCH(out, oneBitCompress(xp, res, n, chunk, numChunks, o),
                           oneBitCompressCuda(xp, res, n, chunk, numChunks, o, stream));
  return out;
}

Tensor oneBitServerReduceT(const Tensor& in, int64_t numPayloads, int64_t chunk, int64_t count, int64_t divisor,
                           const Tensor& residual) {
  checked(in, at::kByte, "payloads");
  TORCH_CHECK((size_t)in.numel() >= oneBitPayloadBytes(chunk) * numPayloads, "payloads too short");
  float* res = optFloat(residual, count, in.device(), "residual");
  Tensor out = at::empty({(int64_t)oneBitPayloadBytes(chunk)}, bytesOn(in.device()));
  const uint8_t* ip = in.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  PYCOMM_COMPRESS_DISPATCH(in, oneBitServerReduce(ip, numPayloads, chunk, count, divisor, res, o),
                           oneBitServerReduceCuda(ip, numPayloads, chunk, count, divisor, res, o, stream));
  return out;
}

void oneBitDecompressT(const Tensor& in, int64_t numChunks, int64_t chunk, Tensor out, bool accumulate) {
  checked(in, at::kByte, "payloads");
  checked(out, at::kFloat, "out");
  TORCH_CHECK(in.device() == out.device(), "payloads and out on different devices");
  TORCH_CHECK((size_t)in.numel() >= oneBitPayloadBytes(chunk) * numChunks, "payloads too short");
  const size_t n = out.numel();
  const uint8_t* ip = in.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  PYCOMM_COMPRESS_DISPATCH(in, oneBitDecompress(ip, numChunks, chunk, n, o, accumulate),
                           oneBitDecompressCuda(ip, numChunks, chunk, n, o, accumulate, stream));
}

// ---------------------------------------------------------------- QSGD

Tensor qsgdCompressT(const OptTensor& x, const OptTensor& residual, int64_t chunk, int64_t numChunks,
                     int64_t bits, int64_t seed, int64_t indexBase) {
  auto [n, dev] = inputOf(x, residual);
  float* res = optFloat(residual, n, dev, "residual");
  Tensor out = at::empty({(int64_t)qsgdPayloadBytes(chunk, bits) * numChunks}, bytesOn(dev));
  const float* xp = optIn(x);
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint32_t s = (uint32_t)seed;
  const uint32_t ib = (uint32_t)indexBase;
  PYCOMM_COMPRESS_DISPATCH(out, qsgdCompress(xp, res, n, chunk, numChunks, bits, s, o, ib),
                           qsgdCompressCuda(xp, res, n, chunk, numChunks, bits, s, o, stream, ib));
  return out;
}

Tensor qsgdServerReduceT(const Tensor& in, int64_t numPayloads, int64_t chunk, int64_t count, int64_t divisor,
                         const OptTensor& residual, int64_t bits, int64_t seed, int64_t indexBase) {
  checked(in, at::kByte, "payloads");
  TORCH_CHECK((size_t)in.numel() >= qsgdPayloadBytes(chunk, bits) * numPayloads, "payloads too short");
  float* res = optFloat(residual, count, in.device(), "residual");
  Tensor out = at::empty({(int64_t)qsgdPayloadBytes(chunk, bits)}, bytesOn(in.device()));
  const uint8_t* ip = in.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint32_t s = (uint32_t)seed;
  const uint32_t ib = (uint32_t)indexBase;
  PYCOMM_COMPRESS_DISPATCH(in, qsgdServerReduce(ip, numPayloads, chunk, count, divisor, res, bits, s, o, ib),
                           qsgdServerReduceCuda(ip, numPayloads, chunk, count, divisor, res, bits, s, o, stream, ib));
  return out;
}

void qsgdDecompressT(const Tensor& in, int64_t numChunks, int64_t chunk, int64_t bits, Tensor out,
                     bool accumulate) {
  checked(in, at::kByte, "payloads");
  checked(out, at::kFloat, "out");
  TORCH_CHECK(in.device() == out.device(), "payloads and out on different devices");
  TORCH_CHECK((size_t)in.numel() >= qsgdPayloadBytes(chunk, bits) * numChunks, "payloads too short");
  const size_t n = out.numel();
  const uint8_t* ip = in.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  PYCOMM_COMPRESS_DISPATCH(in, qsgdDecompress(ip, numChunks, chunk, n, bits, o, accumulate),
                           qsgdDecompressCuda(ip, numChunks, chunk, n, bits, o, accumulate, stream));
}

// ---------------------------------------------------------------- FP16 / BF16 / float

at::ScalarType halfType(bool bf16) { return bf16 ? at::kBFloat16 : at::kHalf; }

Tensor halfCompressT(const Tensor& x, const OptTensor& residual, int64_t outCount, bool bf16) {
  checked(x, at::kFloat, "x");
  const size_t n = x.numel();
  TORCH_CHECK(outCount >= (int64_t)n, "out_count < numel");
  float* res = optFloat(residual, n, x.device(), "residual");
  Tensor out = at::empty({outCount}, x.options().dtype(halfType(bf16)));
  const float* xp = x.data_ptr<float>();
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  PYCOMM_COMPRESS_DISPATCH(x, halfCompress(xp, res, n, outCount, bf16, o),
                           halfCompressCuda(xp, res, n, outCount, bf16, o, stream));
  return out;
}

Tensor halfServerReduceT(const Tensor& in, int64_t numPayloads, int64_t chunk, int64_t count, int64_t divisor,
                         const OptTensor& residual) {
  TORCH_CHECK(in.scalar_type() == at::kHalf || in.scalar_type() == at::kBFloat16, "payloads must be half");
  TORCH_CHECK(in.is_contiguous() && in.numel() >= chunk * numPayloads, "payloads too short or strided");
  TORCH_CHECK(count <= chunk, "count > chunk");
  const bool bf16 = in.scalar_type() == at::kBFloat16;
  float* res = optFloat(residual, count, in.device(), "residual");
  Tensor out = at::empty({chunk}, in.options());
  const uint16_t* ip = reinterpret_cast<const uint16_t*>(in.data_ptr());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  PYCOMM_COMPRESS_DISPATCH(in, halfServerReduce(ip, numPayloads, chunk, count, divisor, res, bf16, o),
                           halfServerReduceCuda(ip, numPayloads, chunk, count, divisor, res, bf16, o, stream));
  return out;
}

void halfDecompressT(const Tensor& in, Tensor out) {
  TORCH_CHECK(in.scalar_type() == at::kHalf || in.scalar_type() == at::kBFloat16, "payloads must be half");
  TORCH_CHECK(in.is_contiguous() && in.numel() >= out.numel(), "payloads too short or strided");
  checked(out, at::kFloat, "out");
  const bool bf16 = in.scalar_type() == at::kBFloat16;
  const size_t n = out.numel();
  const uint16_t* ip = reinterpret_cast<const uint16_t*>(in.data_ptr());
  float* o = out.data_ptr<float>();
  PYCOMM_COMPRESS_DISPATCH(in, halfDecompress(ip, n, bf16, o), halfDecompressCuda(ip, n, bf16, o, stream));
}

Tensor floatServerReduceT(const Tensor& in, int64_t numPayloads, int64_t chunk, int64_t count, int64_t divisor) {
  checked(in, at::kFloat, "payloads");
  TORCH_CHECK(in.numel() >= chunk * numPayloads, "payloads too short");
  TORCH_CHECK(count <= chunk, "count > chunk");
  Tensor out = at::empty({chunk}, in.options());
  const float* ip = in.data_ptr<float>();
  float* o = out.data_ptr<float>();
  PYCOMM_COMPRESS_DISPATCH(in, floatServerReduce(ip, numPayloads, chunk, count, divisor, o),
                           floatServerReduceCuda(ip, numPayloads, chunk, count, divisor, o, stream));
  return out;
}

// ---------------------------------------------------------------- TopK

Tensor topkCompressT(const OptTensor& x, const OptTensor& residual, int64_t k) {
  auto [n, dev] = inputOf(x, residual);
  float* res = optFloat(residual, n, dev, "residual");
  k = std::min<int64_t>(k, (int64_t)n);
  Tensor out = at::empty({2 * k}, at::TensorOptions().dtype(at::kInt).device(dev));
  const float* xp = optIn(x);
  int32_t* o = out.data_ptr<int32_t>();
  float* vals = reinterpret_cast<float*>(o);
  PYCOMM_COMPRESS_DISPATCH(out, topkCompress(xp, res, n, k, vals, o + k),
                           topkCompressCuda(xp, res, n, k, vals, o + k, stream));
  return out;
}

void topkDecompressT(const Tensor& in, int64_t numPayloads, int64_t k, Tensor out, int64_t divisor) {
  checked(in, at::kInt, "payloads");
  checked(out, at::kFloat, "out");
  TORCH_CHECK(in.numel() >= 2 * k * numPayloads, "payloads too short");
  TORCH_CHECK(in.device() == out.device(), "payloads and out on different devices");
  const size_t n = out.numel();
  const int32_t* ip = in.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  PYCOMM_COMPRESS_DISPATCH(in, topkDecompress(ip, numPayloads, k, n, divisor, o),
                           topkDecompressCuda(ip, numPayloads, k, n, divisor, o, stream));
}

}  // namespace

/// Registers the compression kernels on pycomm._C.
void initCompressionBindings(pybind11::module_& m) {
  namespace py = pybind11;
  using py::arg;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.attr("COMPRESS_ALIGN") = (int64_t)kCompressAlign;
  m.attr("QSGD_BLOCK") = (int64_t)kQsgdBlock;
  m.def("one_bit_payload_bytes", [](int64_t chunk) { return (int64_t)oneBitPayloadBytes(chunk); }, arg("chunk"),
        "Bytes of one OneBit chunk payload (per 2048-element block: scale + packed signs).");
  m.attr("ONE_BIT_BLOCK") = (int64_t)kOneBitBlock;
  m.def("qsgd_payload_bytes", [](int64_t chunk, int64_t bits) { return (int64_t)qsgdPayloadBytes(chunk, bits); },
        arg("chunk"), arg("bits"), "Bytes of one QSGD chunk payload.");
  m.def("one_bit_compress", &oneBitCompressT, arg("x"), arg("residual"), arg("chunk"), arg("num_chunks"), nogil,
        "Fused x+residual -> per-chunk scale + packed signs; residual becomes the new error.");
  m.def("one_bit_server_reduce", &oneBitServerReduceT, arg("payloads"), arg("num_payloads"), arg("chunk"),
        arg("count"), arg("divisor"), arg("residual"), nogil,
        "Sums the ranks' payloads of this chunk, divides, adds the server error, re-compresses.");
  m.def("one_bit_decompress", &oneBitDecompressT, arg("payloads"), arg("num_chunks"), arg("chunk"), arg("out"),
        arg("accumulate") = false, nogil, "Unpacks payloads into out (or adds into it).");
  m.def("qsgd_compress", &qsgdCompressT, arg("x"), arg("residual"), arg("chunk"), arg("num_chunks"), arg("bits"),
        arg("seed"), arg("index_base") = 0, nogil,
        "Fused per-block scale + stochastic rounding + packing (+ error feedback); element i draws the RNG "
        "at index_base + i.");
  m.def("qsgd_server_reduce", &qsgdServerReduceT, arg("payloads"), arg("num_payloads"), arg("chunk"),
        arg("count"), arg("divisor"), arg("residual"), arg("bits"), arg("seed"), arg("index_base") = 0, nogil,
        "Dequantises and sums the ranks' payloads, divides, re-quantises (RNG at index_base + j).");
  m.def("qsgd_decompress", &qsgdDecompressT, arg("payloads"), arg("num_chunks"), arg("chunk"), arg("bits"),
        arg("out"), arg("accumulate") = false, nogil, "Dequantises payloads into out (or adds into it).");
  m.def("half_compress", &halfCompressT, arg("x"), arg("residual"), arg("out_count"), arg("bf16"), nogil,
        "Casts x+residual to fp16/bf16 (zero padded to out_count); residual becomes the rounding error.");
  m.def("half_server_reduce", &halfServerReduceT, arg("payloads"), arg("num_payloads"), arg("chunk"),
        arg("count"), arg("divisor"), arg("residual"), nogil,
        "Sums half payloads in float32 in rank order, divides, rounds once.");
  m.def("half_decompress", &halfDecompressT, arg("payloads"), arg("out"), nogil, "Widens half payloads into out.");
  m.def("float_server_reduce", &floatServerReduceT, arg("payloads"), arg("num_payloads"), arg("chunk"),
        arg("count"), arg("divisor"), nogil, "Sums float32 payloads in rank order and divides.");
  m.def("topk_compress", &topkCompressT, arg("x"), arg("residual"), arg("k"), nogil,
        "Selects the k largest |x+residual| -> int32 payload [k value bits | k indices].");
  m.def("topk_decompress", &topkDecompressT, arg("payloads"), arg("num_payloads"), arg("k"), arg("out"),
        arg("divisor"), nogil, "Scatter-adds the ranks' top-k payloads in rank order into out, divides.");
}

}  // namespace pycomm
