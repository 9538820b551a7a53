// CUDA kernels of the fused compressors: the same element math as compress.cc
// (compress_math.h), laid out for the GPU:
//   - OneBit: a warp packs 32 consecutive elements with one __ballot_sync, so a word of
//     sign bits is one coalesced 128-byte read; the per-chunk mean |x| is a block
//     reduction plus one atomicAdd per block into the payload's own scale slot (no
//     scratch buffer), divided by the count in a final tiny kernel.
//   - QSGD: one thread block per 512-element scale block (max |x| in shared memory),
//     the counter RNG gives the same draw per element as the CPU.
//   - TopK: two-level radix select on the magnitude bits (65536-bin histograms) and an
//     order-preserving compaction (block scans + per-tile offsets), so the CUDA output
//     has exactly the CPU's elements, order and tie rule.
// Torch-free: the bindings pass raw device pointers and the current stream.
// Note: the float atomicAdd of the OneBit scales makes a chunk's scale depend on block
// timing in its last bits; every rank still decodes the same payload bytes, so ranks
// agree bitwise with each other.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "core/error.h"
#include "kernels/compress.h"

namespace pycomm {
namespace {

constexpr int kThreads = 256;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(strCat("pycomm CUDA ", what, ": ", cudaGetErrorString(e)));
}

unsigned gridFor(size_t n, int perBlock) {
  size_t g = (n + perBlock - 1) / perBlock;
  return (unsigned)(g == 0 ? 1 : g);
}

__device__ size_t validCountD(size_t n, size_t chunk, size_t c) {
  const size_t start = c * chunk;
  return start >= n ? 0 : (n - start < chunk ? n - start : chunk);
}

__device__ float loadScale(const uint8_t* p) { return *reinterpret_cast<const float*>(p); }

// ---------------------------------------------------------------- OneBit

// residual[i] += x[i] (if x), and each block adds sum |v| of its elements to the scale slot
// of their chunk. Grid: (blocks per chunk, numChunks).
__global__ void oneBitAbsSumKernel(const float* x, float* residual, size_t n, size_t chunk, uint8_t* out,
                                   size_t payload) {
  const size_t c = blockIdx.y;
  const size_t count = validCountD(n, chunk, c);
  float part = 0.0f;
  for (size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x; j < count; j += (size_t)gridDim.x * blockDim.x) {
    const size_t i = c * chunk + j;
    float v = residual[i];
    if (x) {
      v += x[i];
      residual[i] = v;
    }
    part += fabsf(v);
  }
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const float total = Reduce(tmp).Sum(part);
  if (threadIdx.x == 0 && total != 0.0f) atomicAdd(reinterpret_cast<float*>(out + c * payload), total);
}

// Packs signs of v (= residual) with scale = slot / count; one warp per 32-element word.
// Updates residual to the error. `base` offsets v per chunk (chunk stride) for the worker,
// or is the single server chunk.
__global__ void oneBitPackKernel(float* v, size_t n, size_t chunk, size_t numChunks, uint8_t* out,
                                 size_t payload) {
  const size_t words = chunk / 32;
  const size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const unsigned lane = threadIdx.x & 31u;
  if (warp >= words * numChunks) return;
  const size_t c = warp / words;
  const size_t w = warp % words;
  const size_t count = validCountD(n, chunk, c);
  uint8_t* p = out + c * payload;
  const float scale = count ? loadScale(p) / (float)count : 0.0f;
  const size_t j = w * 32 + lane;
  float x = 0.0f;
  const bool valid = j < count;
  if (valid) x = v[c * chunk + j];
  const unsigned word = __ballot_sync(0xffffffffu, valid && oneBitSign(x));
  if (valid) v[c * chunk + j] = x - oneBitValue(oneBitSign(x), scale);
  if (lane == 0) reinterpret_cast<uint32_t*>(p + 4)[w] = word;
}

// Turns the accumulated |v| sums in the scale slots into means (after the pack kernel read them).
__global__ void oneBitFinalizeKernel(size_t n, size_t chunk, size_t numChunks, uint8_t* out, size_t payload) {
  const size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= numChunks) return;
  const size_t count = validCountD(n, chunk, c);
  float* s = reinterpret_cast<float*>(out + c * payload);
  *s = count ? *s / (float)count : 0.0f;
}

// Server pass 1: residual[j] += (sum_r scale_r * sign_r[j]) / divisor; |.| summed into the slot.
__global__ void oneBitServerSumKernel(const uint8_t* in, int numPayloads, size_t chunk, size_t count, float div,
                                      float* residual, uint8_t* out, size_t payload) {
  float part = 0.0f;
  for (size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x; j < count; j += (size_t)gridDim.x * blockDim.x) {
    float acc = 0.0f;
    for (int r = 0; r < numPayloads; ++r) {
      const uint8_t* p = in + (size_t)r * payload;
      const uint32_t word = reinterpret_cast<const uint32_t*>(p + 4)[j / 32];
      acc += oneBitValue((word >> (j % 32)) & 1u, loadScale(p));
    }
    const float v = residual[j] + acc / div;
    residual[j] = v;
    part += fabsf(v);
  }
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const float total = Reduce(tmp).Sum(part);
  if (threadIdx.x == 0 && total != 0.0f) atomicAdd(reinterpret_cast<float*>(out), total);
}

__global__ void oneBitDecompressKernel(const uint8_t* in, size_t chunk, size_t n, size_t payload, float* out,
                                       bool accumulate) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const size_t c = i / chunk;
  const size_t j = i % chunk;
  const uint8_t* p = in + c * payload;
  const uint32_t word = reinterpret_cast<const uint32_t*>(p + 4)[j / 32];
  const float v = oneBitValue((word >> (j % 32)) & 1u, loadScale(p));
  out[i] = accumulate ? out[i] + v : v;
}

// ---------------------------------------------------------------- QSGD

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

constexpr int kQsgdThreads = (int)kQsgdBlock / 2;  // two elements per thread

// Quantises the block of 2*blockDim elements whose values thread t holds in v0/v1 (zeros
// past `m`), writing scale and levels. Returns the dequantised values for error feedback.
__device__ void quantizeBlockD(float v0, float v1, size_t j0, size_t m, int bits, uint32_t seed, uint32_t index0,
                               uint8_t* scaleSlot, uint8_t* data, float* d0, float* d1) {
  using Reduce = cub::BlockReduce<float, kQsgdThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float sMax;
  const float local = fmaxf(j0 < m ? fabsf(v0) : 0.0f, j0 + 1 < m ? fabsf(v1) : 0.0f);
  const float mx = Reduce(tmp).Reduce(local, MaxOp());
  if (threadIdx.x == 0) {
    sMax = mx;
    *reinterpret_cast<float*>(scaleSlot) = mx;
  }
  __syncthreads();
  const float scale = sMax;
  const int levels = qsgdLevels(bits);
  const float inv = scale > 0.0f ? (float)levels / scale : 0.0f;
  int l0 = 0, l1 = 0;
  if (j0 < m) l0 = qsgdQuantize(v0, inv, levels, counterUniform(seed, index0));
  if (j0 + 1 < m) l1 = qsgdQuantize(v1, inv, levels, counterUniform(seed, index0 + 1));
  *d0 = qsgdDequantize(l0, scale, levels);
  *d1 = qsgdDequantize(l1, scale, levels);
  if (data == nullptr) return;
  if (bits == 8) {
    data[j0] = (uint8_t)(int8_t)l0;
    data[j0 + 1] = (uint8_t)(int8_t)l1;
  } else {
    data[j0 / 2] = (uint8_t)(qsgdNibble(l0) | (qsgdNibble(l1) << 4));
  }
}

// Grid: (blocks per chunk, numChunks); block b of chunk c covers kQsgdBlock elements.
__global__ void qsgdCompressKernel(const float* x, float* residual, size_t n, size_t chunk, int bits,
                                   uint32_t seed, uint8_t* out, size_t payload, size_t blocks,
                                   uint32_t indexBase) {
  const size_t c = blockIdx.y, b = blockIdx.x;
  const size_t count = validCountD(n, chunk, c);
  const size_t first = b * kQsgdBlock;
  const size_t padded = chunk - first < kQsgdBlock ? chunk - first : kQsgdBlock;
  const size_t m = first >= count ? 0 : (count - first < padded ? count - first : padded);
  const size_t j0 = 2 * threadIdx.x;  // element offset inside the block
  const size_t g = c * chunk + first;
  float v0 = 0.0f, v1 = 0.0f;
  if (j0 < m) v0 = (residual ? residual[g + j0] : 0.0f) + (x ? x[g + j0] : 0.0f);
  if (j0 + 1 < m) v1 = (residual ? residual[g + j0 + 1] : 0.0f) + (x ? x[g + j0 + 1] : 0.0f);
  uint8_t* p = out + c * payload;
  float d0, d1;
  // Threads past the padded block write nothing (their levels would land in the next block).
  const bool inBlock = j0 < padded;
  quantizeBlockD(v0, v1, j0, m, bits, seed, indexBase + (uint32_t)(g + j0), p + 4 * b,
                 inBlock ? p + 4 * blocks + (bits == 8 ? first : first / 2) : nullptr, &d0, &d1);
  if (residual) {
    if (j0 < m) residual[g + j0] = v0 - d0;
    if (j0 + 1 < m) residual[g + j0 + 1] = v1 - d1;
  }
}

__device__ float dequantAt(const uint8_t* data, size_t j, float scale, int bits) {
  const int levels = qsgdLevels(bits);
  int l;
  if (bits == 8) {
    l = (int8_t)data[j];
  } else {
    const uint32_t byte = data[j / 2];
    l = (j & 1) ? qsgdHighLevel(byte) : qsgdLowLevel(byte);
  }
  return (float)l * (scale / (float)levels);
}

__global__ void qsgdServerKernel(const uint8_t* in, int numPayloads, size_t chunk, size_t count, float div,
                                 float* residual, int bits, uint32_t seed, uint8_t* out, size_t payload,
                                 size_t blocks, uint32_t indexBase) {
  const size_t b = blockIdx.x;
  const size_t first = b * kQsgdBlock;
  const size_t padded = chunk - first < kQsgdBlock ? chunk - first : kQsgdBlock;
  const size_t m = first >= count ? 0 : (count - first < padded ? count - first : padded);
  const size_t j0 = 2 * threadIdx.x;
  float v[2] = {0.0f, 0.0f};
  for (int e = 0; e < 2; ++e) {
    const size_t j = j0 + e;
    if (j >= m) continue;
    float acc = 0.0f;
    for (int r = 0; r < numPayloads; ++r) {
      const uint8_t* p = in + (size_t)r * payload;
      acc += dequantAt(p + 4 * blocks, first + j, loadScale(p + 4 * b), bits);
    }
    v[e] = acc / div + (residual ? residual[first + j] : 0.0f);
  }
  float d0, d1;
  const bool inBlock = j0 < padded;
  quantizeBlockD(v[0], v[1], j0, m, bits, seed, indexBase + (uint32_t)(first + j0), out + 4 * b,
                 inBlock ? out + 4 * blocks + (bits == 8 ? first : first / 2) : nullptr, &d0, &d1);
  if (residual) {
    if (j0 < m) residual[first + j0] = v[0] - d0;
    if (j0 + 1 < m) residual[first + j0 + 1] = v[1] - d1;
  }
}

__global__ void qsgdDecompressKernel(const uint8_t* in, size_t chunk, size_t n, int bits, size_t payload,
                                     size_t blocks, float* out, bool accumulate) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const size_t c = i / chunk, j = i % chunk;
  const uint8_t* p = in + c * payload;
  const float v = dequantAt(p + 4 * blocks, j, loadScale(p + 4 * (j / kQsgdBlock)), bits);
  out[i] = accumulate ? out[i] + v : v;
}

// ---------------------------------------------------------------- FP16 / BF16 / float

__global__ void halfCompressKernel(const float* x, float* residual, size_t n, size_t outCount, bool bf16,
                                   uint16_t* out) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= outCount) return;
  if (i >= n) {
    out[i] = 0;
    return;
  }
  const float v = x[i] + (residual ? residual[i] : 0.0f);
  const uint16_t h = toHalfBits(v, bf16);
  out[i] = h;
  if (residual) residual[i] = v - fromHalfBits(h, bf16);
}

__global__ void halfServerKernel(const uint16_t* in, int numPayloads, size_t chunk, size_t count, float div,
                                 float* residual, bool bf16, uint16_t* out) {
  const size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= chunk) return;
  if (j >= count) {
    out[j] = 0;
    return;
  }
  float acc = 0.0f;
  for (int r = 0; r < numPayloads; ++r) acc += fromHalfBits(in[(size_t)r * chunk + j], bf16);
  float v = acc / div;
  if (residual) v += residual[j];
  const uint16_t h = toHalfBits(v, bf16);
  out[j] = h;
  if (residual) residual[j] = v - fromHalfBits(h, bf16);
}

__global__ void halfDecompressKernel(const uint16_t* in, size_t n, bool bf16, float* out) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = fromHalfBits(in[i], bf16);
}

__global__ void floatServerKernel(const float* in, int numPayloads, size_t chunk, size_t count, int divisor,
                                  float* out) {
  const size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= chunk) return;
  if (j >= count) {
    out[j] = 0.0f;
    return;
  }
  float acc = 0.0f;
  for (int r = 0; r < numPayloads; ++r) acc += in[(size_t)r * chunk + j];
  out[j] = divisor == 1 ? acc : acc / (float)divisor;
}

// ---------------------------------------------------------------- TopK

constexpr int kTopkItems = 4;
constexpr int kTopkTile = kThreads * kTopkItems;
constexpr int kBins = 65536;

// State in device memory: [0, kBins) histogram, then threshold, ties, above.
struct TopkScratch {
  uint32_t hist[kBins];
  uint32_t hi;
  uint32_t threshold;
  unsigned long long ties;  // keys equal to the threshold that are taken
};

__global__ void topkHistHiKernel(const float* x, float* residual, size_t n, uint32_t* hist) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float v;
    if (residual) {
      v = residual[i] + (x ? x[i] : 0.0f);
      residual[i] = v;
    } else {
      v = x[i];
    }
    atomicAdd(&hist[magnitudeKey(v) >> 16], 1u);
  }
}

__global__ void topkHistLoKernel(const float* v, size_t n, TopkScratch* s) {
  const uint32_t hi = s->hi;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const uint32_t key = magnitudeKey(v[i]);
    if ((key >> 16) == hi) atomicAdd(&s->hist[key & 0xffffu], 1u);
  }
}

// One block of 256 threads: finds the highest bin b with (count above b) + hist[b] >= k,
// starting from `above` already counted. Each thread owns 256 consecutive bins.
// level 0 -> writes s->hi and keeps `above` in s->ties; level 1 -> writes threshold and ties.
__global__ void topkFindKernel(TopkScratch* s, unsigned long long k, int level) {
  __shared__ unsigned long long strip[kThreads];
  const int per = kBins / kThreads;
  unsigned long long sum = 0;
  for (int b = 0; b < per; ++b) sum += s->hist[threadIdx.x * per + b];
  strip[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x != 0) return;
  unsigned long long above = level == 0 ? 0ull : s->ties;
  int t = kThreads - 1;
  for (; t > 0; --t) {
    if (above + strip[t] >= k) break;
    above += strip[t];
  }
  int bin = t * per + per - 1;
  for (; bin > t * per; --bin) {
    if (above + s->hist[bin] >= k) break;
    above += s->hist[bin];
  }
  if (level == 0) {
    s->hi = (uint32_t)bin;
    s->ties = above;  // count strictly above bucket hi, consumed by level 1
  } else {
    s->threshold = (s->hi << 16) | (uint32_t)bin;
    s->ties = k - above;
  }
}

__device__ void tileFlags(const float* v, size_t n, size_t base, uint32_t threshold, int (&gt)[kTopkItems],
                          int (&eq)[kTopkItems]) {
  for (int it = 0; it < kTopkItems; ++it) {
    const size_t i = base + threadIdx.x * kTopkItems + it;
    gt[it] = eq[it] = 0;
    if (i < n) {
      const uint32_t key = magnitudeKey(v[i]);
      gt[it] = key > threshold;
      eq[it] = key == threshold;
    }
  }
}

// Per tile: number of keys above the threshold and equal to it.
__global__ void topkTileCountKernel(const float* v, size_t n, const TopkScratch* s, int2* counts) {
  int gt[kTopkItems], eq[kTopkItems];
  tileFlags(v, n, (size_t)blockIdx.x * kTopkTile, s->threshold, gt, eq);
  int a = 0, b = 0;
  for (int it = 0; it < kTopkItems; ++it) {
    a += gt[it];
    b += eq[it];
  }
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int ga = Reduce(tmp).Sum(a);
  __syncthreads();
  const int gb = Reduce(tmp).Sum(b);
  if (threadIdx.x == 0) counts[blockIdx.x] = make_int2(ga, gb);
}

// Exclusive scan of the tile counts (one thread; tiles are few relative to n).
__global__ void topkScanKernel(int2* counts, size_t tiles) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int a = 0, b = 0;
  for (size_t t = 0; t < tiles; ++t) {
    const int2 c = counts[t];
    counts[t] = make_int2(a, b);
    a += c.x;
    b += c.y;
  }
}

__global__ void topkEmitKernel(const float* v, float* residual, size_t n, const TopkScratch* s,
                               const int2* offsets, float* values, int32_t* indices) {
  int gt[kTopkItems], eq[kTopkItems];
  const size_t base = (size_t)blockIdx.x * kTopkTile;
  tileFlags(v, n, base, s->threshold, gt, eq);
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int eqPrefix[kTopkItems];
  Scan(tmp).ExclusiveSum(eq, eqPrefix);
  __syncthreads();
  const long long ties = (long long)s->ties;
  const int2 off = offsets[blockIdx.x];
  int take[kTopkItems], pos[kTopkItems];
  for (int it = 0; it < kTopkItems; ++it) take[it] = gt[it] || (eq[it] && (long long)(off.y + eqPrefix[it]) < ties);
  Scan(tmp).ExclusiveSum(take, pos);
  const long long tiesBefore = off.y < ties ? off.y : ties;
  for (int it = 0; it < kTopkItems; ++it) {
    if (!take[it]) continue;
    const size_t i = base + threadIdx.x * kTopkItems + it;
    const size_t o = (size_t)(off.x + tiesBefore + pos[it]);
    values[o] = v[i];
    indices[o] = (int32_t)i;
    if (residual) residual[i] = 0.0f;
  }
}

__global__ void topkScatterKernel(const int32_t* in, int r, size_t k, float* out) {
  const size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const int32_t* p = in + (size_t)r * 2 * k;
  // Each rank's indices are distinct, so one launch per rank (in rank order) adds without races.
  out[p[k + j]] += __int_as_float(p[j]);
}

__global__ void divideKernel(float* out, size_t n, float div) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] /= div;
}

}  // namespace

// ---------------------------------------------------------------- entry points

void oneBitCompressCuda(const float* x, float* residual, size_t n, size_t chunk, size_t numChunks, uint8_t* out,
                        CUstream_st* stream) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && n <= chunk * numChunks && residual,
                   "oneBitCompressCuda: bad chunking or no residual");
  const size_t payload = oneBitPayloadBytes(chunk);
  for (size_t c = 0; c < numChunks; ++c) check(cudaMemsetAsync(out + c * payload, 0, 4, stream), "memset");
  dim3 grid(gridFor(chunk, kThreads * 8) > 1024 ? 1024 : gridFor(chunk, kThreads * 8), (unsigned)numChunks);
  oneBitAbsSumKernel<<<grid, kThreads, 0, stream>>>(x, residual, n, chunk, out, payload);
  oneBitPackKernel<<<gridFor(numChunks * chunk, kThreads), kThreads, 0, stream>>>(residual, n, chunk, numChunks,
                                                                                    out, payload);
  oneBitFinalizeKernel<<<gridFor(numChunks, kThreads), kThreads, 0, stream>>>(n, chunk, numChunks, out, payload);
  check(cudaGetLastError(), "oneBitCompress");
}

void oneBitServerReduceCuda(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                            float* residual, uint8_t* out, CUstream_st* stream) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && count <= chunk && residual && divisor >= 1,
                   "oneBitServerReduceCuda: bad arguments");
  const size_t payload = oneBitPayloadBytes(chunk);
  check(cudaMemsetAsync(out, 0, 4, stream), "memset");
  const unsigned g = gridFor(count, kThreads * 8) > 1024 ? 1024 : gridFor(count, kThreads * 8);
  oneBitServerSumKernel<<<g, kThreads, 0, stream>>>(in, numPayloads, chunk, count, (float)divisor, residual, out,
                                                    payload);
  oneBitPackKernel<<<gridFor(chunk, kThreads), kThreads, 0, stream>>>(residual, count, chunk, 1, out, payload);
  oneBitFinalizeKernel<<<1, 32, 0, stream>>>(count, chunk, 1, out, payload);
  check(cudaGetLastError(), "oneBitServerReduce");
}

void oneBitDecompressCuda(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, float* out, bool accumulate,
                          CUstream_st* stream) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && n <= chunk * numChunks, "oneBitDecompressCuda: bad chunking");
  if (n == 0) return;
  oneBitDecompressKernel<<<gridFor(n, kThreads), kThreads, 0, stream>>>(in, chunk, n, oneBitPayloadBytes(chunk),
                                                                         out, accumulate);
  check(cudaGetLastError(), "oneBitDecompress");
}

void qsgdCompressCuda(const float* x, float* residual, size_t n, size_t chunk, size_t numChunks, int bits,
                      uint32_t seed, uint8_t* out, CUstream_st* stream, uint32_t indexBase) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && n <= chunk * numChunks && (bits == 8 || bits == 4),
                   "qsgdCompressCuda: bad arguments");
  const size_t blocks = qsgdNumBlocks(chunk);
  dim3 grid((unsigned)blocks, (unsigned)numChunks);
  qsgdCompressKernel<<<grid, kQsgdThreads, 0, stream>>>(x, residual, n, chunk, bits, seed, out,
                                                        qsgdPayloadBytes(chunk, bits), blocks, indexBase);
  check(cudaGetLastError(), "qsgdCompress");
}

void qsgdServerReduceCuda(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                          float* residual, int bits, uint32_t seed, uint8_t* out, CUstream_st* stream,
                          uint32_t indexBase) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && count <= chunk && (bits == 8 || bits == 4) && divisor >= 1,
                   "qsgdServerReduceCuda: bad arguments");
  const size_t blocks = qsgdNumBlocks(chunk);
  qsgdServerKernel<<<(unsigned)blocks, kQsgdThreads, 0, stream>>>(in, numPayloads, chunk, count, (float)divisor,
                                                                  residual, bits, seed, out,
                                                                  qsgdPayloadBytes(chunk, bits), blocks, indexBase);
  check(cudaGetLastError(), "qsgdServerReduce");
}

void qsgdDecompressCuda(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, int bits, float* out,
                        bool accumulate, CUstream_st* stream) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && n <= chunk * numChunks, "qsgdDecompressCuda: bad chunking");
  if (n == 0) return;
  qsgdDecompressKernel<<<gridFor(n, kThreads), kThreads, 0, stream>>>(
      in, chunk, n, bits, qsgdPayloadBytes(chunk, bits), qsgdNumBlocks(chunk), out, accumulate);
  check(cudaGetLastError(), "qsgdDecompress");
}

void halfCompressCuda(const float* x, float* residual, size_t n, size_t outCount, bool bf16, uint16_t* out,
                      CUstream_st* stream) {
  if (outCount == 0) return;
  halfCompressKernel<<<gridFor(outCount, kThreads), kThreads, 0, stream>>>(x, residual, n, outCount, bf16, out);
  check(cudaGetLastError(), "halfCompress");
}

void halfServerReduceCuda(const uint16_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                          float* residual, bool bf16, uint16_t* out, CUstream_st* stream) {
  if (chunk == 0) return;
  halfServerKernel<<<gridFor(chunk, kThreads), kThreads, 0, stream>>>(in, numPayloads, chunk, count, (float)divisor,
                                                                      residual, bf16, out);
  check(cudaGetLastError(), "halfServerReduce");
}

void halfDecompressCuda(const uint16_t* in, size_t n, bool bf16, float* out, CUstream_st* stream) {
  if (n == 0) return;
  halfDecompressKernel<<<gridFor(n, kThreads), kThreads, 0, stream>>>(in, n, bf16, out);
  check(cudaGetLastError(), "halfDecompress");
}

void floatServerReduceCuda(const float* in, int numPayloads, size_t chunk, size_t count, int divisor, float* out,
                           CUstream_st* stream) {
  if (chunk == 0) return;
  floatServerKernel<<<gridFor(chunk, kThreads), kThreads, 0, stream>>>(in, numPayloads, chunk, count, divisor, out);
  check(cudaGetLastError(), "floatServerReduce");
}

void topkCompressCuda(const float* x, float* residual, size_t n, size_t k, float* values, int32_t* indices,
                      CUstream_st* stream) {
  PYCOMM_CHECK_ARG(n <= (size_t)INT32_MAX, "topkCompressCuda: too many elements for int32 indices");
  k = k < n ? k : n;
  if (n == 0) return;
  const size_t tiles = (n + kTopkTile - 1) / kTopkTile;
  TopkScratch* s = nullptr;
  int2* counts = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&s), sizeof(TopkScratch), stream), "malloc");
  check(cudaMallocAsync(reinterpret_cast<void**>(&counts), tiles * sizeof(int2), stream), "malloc");
  const unsigned g = gridFor(n, kThreads * 8) > 4096 ? 4096 : gridFor(n, kThreads * 8);
  check(cudaMemsetAsync(s->hist, 0, sizeof(s->hist), stream), "memset");
  topkHistHiKernel<<<g, kThreads, 0, stream>>>(x, residual, n, s->hist);
  const float* v = residual ? residual : x;
  if (k > 0) {
    topkFindKernel<<<1, kThreads, 0, stream>>>(s, k, 0);
    check(cudaMemsetAsync(s->hist, 0, sizeof(s->hist), stream), "memset");
    topkHistLoKernel<<<g, kThreads, 0, stream>>>(v, n, s);
    topkFindKernel<<<1, kThreads, 0, stream>>>(s, k, 1);
    topkTileCountKernel<<<(unsigned)tiles, kThreads, 0, stream>>>(v, n, s, counts);
    topkScanKernel<<<1, 1, 0, stream>>>(counts, tiles);
    topkEmitKernel<<<(unsigned)tiles, kThreads, 0, stream>>>(v, residual, n, s, counts, values, indices);
  }
  check(cudaFreeAsync(counts, stream), "free");
  check(cudaFreeAsync(s, stream), "free");
  check(cudaGetLastError(), "topkCompress");
}

void topkDecompressCuda(const int32_t* in, int numPayloads, size_t k, size_t n, int divisor, float* out,
                        CUstream_st* stream) {
  if (n == 0) return;
  check(cudaMemsetAsync(out, 0, n * sizeof(float), stream), "memset");
  if (k > 0) {
    for (int r = 0; r < numPayloads; ++r) {
      topkScatterKernel<<<gridFor(k, kThreads), kThreads, 0, stream>>>(in, r, k, out);
    }
  }
  if (divisor > 1) divideKernel<<<gridFor(n, kThreads), kThreads, 0, stream>>>(out, n, (float)divisor);
  check(cudaGetLastError(), "topkDecompress");
}

}  // namespace pycomm
