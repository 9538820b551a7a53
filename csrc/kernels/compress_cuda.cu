// CUDA kernels of the fused compressors: the same element math and payload layouts as
// compress.cc (compress_math.h), laid out for the GPU:
//   - OneBit: one thread block (256 threads, 8 elements each) per 2048-element OneBit
//     block: v goes to shared memory, 16 threads form the 16 lane sums of |v| in the
//     CPU's order (oneBitLaneSum) and one thread the scale (oneBitScale), so the scale is
//     deterministic and bitwise equal to the CPU's; a warp packs 32 consecutive
//     elements with one __ballot_sync. No atomics.
//   - QSGD: one thread block per 512-element scale block (max |x| in shared memory),
//     the counter RNG gives the same draw per element as the CPU, and mulRn keeps nvcc
//     from fusing the quantiser's multiply-add, so the levels equal the CPU's.
//   - TopK: two-level radix select on the magnitude bits (65536-bin histograms) and an
//     order-preserving compaction (block scans + per-tile offsets), so the CUDA output
//     has exactly the CPU's elements, order and tie rule.
// Torch-free: the bindings pass raw device pointers and the current stream.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "core/error.h"
#include "kernels/cuda_check.h"
#include "kernels/compress.h"

namespace pycomm {
namespace {

constexpr int kThreads = 256;

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

constexpr int kOneBitThreads = 256;
constexpr int kOneBitPer = (int)kOneBitBlock / kOneBitThreads;  // elements per thread

/// Finishes one OneBit block whose thread-t values v[k] are elements t + 256k (zeros at
/// and past `valid`): scale from the 16 lane sums, sign words into out + 4, scale into
/// out, and res[j] = v - scale*sign on the valid elements when res is given.
__device__ void oneBitFinishBlock(const float (&v)[kOneBitPer], size_t valid, size_t len, float* res,
                                  uint8_t* out) {
  __shared__ float sV[kOneBitBlock];
  __shared__ float sLanes[kOneBitLanes];
  __shared__ float sScale;
  const unsigned t = threadIdx.x;
  for (int k = 0; k < kOneBitPer; ++k) sV[t + kOneBitThreads * k] = v[k];
  __syncthreads();
  if (t < kOneBitLanes) sLanes[t] = oneBitLaneSum(sV, valid, t);
  __syncthreads();
  if (t == 0) {
    sScale = oneBitScale(sLanes, valid);
    *reinterpret_cast<float*>(out) = sScale;
  }
  __syncthreads();
  const float scale = sScale;
  uint32_t* words = reinterpret_cast<uint32_t*>(out + 4);
  for (int k = 0; k < kOneBitPer; ++k) {
    const size_t j = t + kOneBitThreads * (size_t)k;
    if (j >= len) break;  // warp-uniform: len is a multiple of 32
    const bool isValid = j < valid;
    const uint32_t bit = isValid ? oneBitSign(v[k]) : 1u;  // padding encodes as a zero
    const unsigned word = __ballot_sync(0xffffffffu, bit != 0);
    if ((t & 31u) == 0) words[j / 32] = word;
    if (isValid && res) res[j] = v[k] - oneBitValue(bit, scale);
  }
}

// Worker step. Grid: (blocks per chunk, numChunks); thread block = one OneBit block.
__global__ void oneBitCompressKernel(const float* x, float* residual, size_t n, size_t chunk, uint8_t* out,
                                     size_t payload) {
  const size_t c = blockIdx.y, first = (size_t)blockIdx.x * kOneBitBlock;
  const size_t len = chunk - first < kOneBitBlock ? chunk - first : kOneBitBlock;
  const size_t count = validCountD(n, chunk, c);
  const size_t valid = first >= count ? 0 : (count - first < len ? count - first : len);
  const size_t g = c * chunk + first;
  float v[kOneBitPer];
  for (int k = 0; k < kOneBitPer; ++k) {
    const size_t j = threadIdx.x + kOneBitThreads * (size_t)k;
    v[k] = 0.0f;
    if (j < valid) v[k] = x && residual ? residual[g + j] + x[g + j] : (x ? x[g + j] : residual[g + j]);
  }
  oneBitFinishBlock(v, valid, len, residual ? residual + g : nullptr,
                    out + c * payload + oneBitPayloadOffset(first));
}

// Server step: residual += (sum_r scale_r * sign_r) / divisor (ranks in order), then
// re-compressed. Grid: one thread block per OneBit block of the chunk.
__global__ void oneBitServerKernel(const uint8_t* in, int numPayloads, size_t chunk, size_t count, float div,
                                   float* residual, uint8_t* out, size_t payload) {
  const size_t first = (size_t)blockIdx.x * kOneBitBlock;
  const size_t len = chunk - first < kOneBitBlock ? chunk - first : kOneBitBlock;
  const size_t valid = first >= count ? 0 : (count - first < len ? count - first : len);
  const size_t off = oneBitPayloadOffset(first);
  float v[kOneBitPer];
  for (int k = 0; k < kOneBitPer; ++k) {
    const size_t j = threadIdx.x + kOneBitThreads * (size_t)k;
    v[k] = 0.0f;
    if (j >= valid) continue;
    float acc = 0.0f;
    for (int r = 0; r < numPayloads; ++r) {
      const uint8_t* p = in + (size_t)r * payload + off;
      const uint32_t word = reinterpret_cast<const uint32_t*>(p + 4)[j / 32];
      acc += oneBitValue((word >> (j % 32)) & 1u, loadScale(p));
    }
    v[k] = residual[first + j] + acc / div;
  }
  oneBitFinishBlock(v, valid, len, residual + first, out + off);
}

__global__ void oneBitDecompressKernel(const uint8_t* in, size_t chunk, size_t n, size_t payload, float* out,
                                       bool accumulate) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const size_t c = i / chunk, j = i % chunk;
  const size_t jj = j % kOneBitBlock;
  const uint8_t* p = in + c * payload + oneBitPayloadOffset(j - jj);
  const uint32_t word = reinterpret_cast<const uint32_t*>(p + 4)[jj / 32];
  const float v = oneBitValue((word >> (jj % 32)) & 1u, loadScale(p));
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
                                   uint32_t seed, uint8_t* out, size_t payload, uint32_t indexBase) {
  const size_t c = blockIdx.y, b = blockIdx.x;
  const size_t count = validCountD(n, chunk, c);
  const size_t first = b * kQsgdBlock;
  const size_t padded = chunk - first < kQsgdBlock ? chunk - first : kQsgdBlock;
  const size_t m = first >= count ? 0 : (count - first < padded ? count - first : padded);
  const size_t j0 = 2 * threadIdx.x;  // element offset inside the block
  const size_t g = c * chunk + first;
  float v0 = 0.0f, v1 = 0.0f;
  // v = residual + x as on the CPU (or x, or residual alone).
  if (j0 < m) v0 = x && residual ? residual[g + j0] + x[g + j0] : (x ? x[g + j0] : residual[g + j0]);
  if (j0 + 1 < m) {
    v1 = x && residual ? residual[g + j0 + 1] + x[g + j0 + 1] : (x ? x[g + j0 + 1] : residual[g + j0 + 1]);
  }
  uint8_t* blk = out + c * payload + qsgdPayloadOffset(first, bits);  // [scale][levels]
  float d0, d1;
  // Threads past the padded block write nothing (their levels would land in the next block).
  const bool inBlock = j0 < padded;
  quantizeBlockD(v0, v1, j0, m, bits, seed, indexBase + (uint32_t)(g + j0), blk, inBlock ? blk + 4 : nullptr, &d0,
                 &d1);
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
  return qsgdDequantize(l, scale, levels);
}

__global__ void qsgdServerKernel(const uint8_t* in, int numPayloads, size_t chunk, size_t count, float div,
                                 float* residual, int bits, uint32_t seed, uint8_t* out, size_t payload,
                                 uint32_t indexBase) {
  const size_t b = blockIdx.x;
  const size_t first = b * kQsgdBlock;
  const size_t padded = chunk - first < kQsgdBlock ? chunk - first : kQsgdBlock;
  const size_t m = first >= count ? 0 : (count - first < padded ? count - first : padded);
  const size_t j0 = 2 * threadIdx.x;
  const size_t off = qsgdPayloadOffset(first, bits);
  float v[2] = {0.0f, 0.0f};
  for (int e = 0; e < 2; ++e) {
    const size_t j = j0 + e;
    if (j >= m) continue;
    float acc = 0.0f;
    for (int r = 0; r < numPayloads; ++r) {
      const uint8_t* blk = in + (size_t)r * payload + off;
      acc += dequantAt(blk + 4, j, loadScale(blk), bits);
    }
    v[e] = residual ? residual[first + j] + acc / div : acc / div;
  }
  float d0, d1;
  const bool inBlock = j0 < padded;
  quantizeBlockD(v[0], v[1], j0, m, bits, seed, indexBase + (uint32_t)(first + j0), out + off,
                 inBlock ? out + off + 4 : nullptr, &d0, &d1);
  if (residual) {
    if (j0 < m) residual[first + j0] = v[0] - d0;
    if (j0 + 1 < m) residual[first + j0 + 1] = v[1] - d1;
  }
}

__global__ void qsgdDecompressKernel(const uint8_t* in, size_t chunk, size_t n, int bits, size_t payload,
                                     float* out, bool accumulate) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const size_t c = i / chunk, j = i % chunk;
  const size_t jj = j % kQsgdBlock;
  const uint8_t* blk = in + c * payload + qsgdPayloadOffset(j - jj, bits);
  const float v = dequantAt(blk + 4, jj, loadScale(blk), bits);
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
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && n <= chunk * numChunks && (x || residual),
                   "oneBitCompressCuda: bad chunking or no input");
  if (chunk == 0 || numChunks == 0) return;
  const dim3 grid((unsigned)((chunk + kOneBitBlock - 1) / kOneBitBlock), (unsigned)numChunks);
  oneBitCompressKernel<<<grid, kOneBitThreads, 0, stream>>>(x, residual, n, chunk, out, oneBitPayloadBytes(chunk));
  cudaCheck(cudaGetLastError(), "oneBitCompress");
}

void oneBitServerReduceCuda(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                            float* residual, uint8_t* out, CUstream_st* stream) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && count <= chunk && residual && divisor >= 1,
                   "oneBitServerReduceCuda: bad arguments");
  if (chunk == 0) return;
  const unsigned blocks = (unsigned)((chunk + kOneBitBlock - 1) / kOneBitBlock);
  oneBitServerKernel<<<blocks, kOneBitThreads, 0, stream>>>(in, numPayloads, chunk, count, (float)divisor, residual,
                                                            out, oneBitPayloadBytes(chunk));
  cudaCheck(cudaGetLastError(), "oneBitServerReduce");
}

void oneBitDecompressCuda(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, float* out, bool accumulate,
                          CUstream_st* stream) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && n <= chunk * numChunks, "oneBitDecompressCuda: bad chunking");
  if (n == 0) return;
  oneBitDecompressKernel<<<gridFor(n, kThreads), kThreads, 0, stream>>>(in, chunk, n, oneBitPayloadBytes(chunk),
                                                                         out, accumulate);
  cudaCheck(cudaGetLastError(), "oneBitDecompress");
}

void qsgdCompressCuda(const float* x, float* residual, size_t n, size_t chunk, size_t numChunks, int bits,
                      uint32_t seed, uint8_t* out, CUstream_st* stream, uint32_t indexBase) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && n <= chunk * numChunks && (bits == 8 || bits == 4) &&
                       (x || residual),
                   "qsgdCompressCuda: bad arguments");
  if (chunk == 0 || numChunks == 0) return;
  dim3 grid((unsigned)qsgdNumBlocks(chunk), (unsigned)numChunks);
  qsgdCompressKernel<<<grid, kQsgdThreads, 0, stream>>>(x, residual, n, chunk, bits, seed, out,
                                                        qsgdPayloadBytes(chunk, bits), indexBase);
  cudaCheck(cudaGetLastError(), "qsgdCompress");
}

void qsgdServerReduceCuda(const uint8_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                          float* residual, int bits, uint32_t seed, uint8_t* out, CUstream_st* stream,
                          uint32_t indexBase) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && count <= chunk && (bits == 8 || bits == 4) && divisor >= 1,
                   "qsgdServerReduceCuda: bad arguments");
  if (chunk == 0) return;
  qsgdServerKernel<<<(unsigned)qsgdNumBlocks(chunk), kQsgdThreads, 0, stream>>>(
      in, numPayloads, chunk, count, (float)divisor, residual, bits, seed, out, qsgdPayloadBytes(chunk, bits),
      indexBase);
  cudaCheck(cudaGetLastError(), "qsgdServerReduce");
}

void qsgdDecompressCuda(const uint8_t* in, size_t numChunks, size_t chunk, size_t n, int bits, float* out,
                        bool accumulate, CUstream_st* stream) {
  PYCOMM_CHECK_ARG(chunk % kCompressAlign == 0 && n <= chunk * numChunks, "qsgdDecompressCuda: bad chunking");
  if (n == 0) return;
  qsgdDecompressKernel<<<gridFor(n, kThreads), kThreads, 0, stream>>>(in, chunk, n, bits,
                                                                       qsgdPayloadBytes(chunk, bits), out, accumulate);
  cudaCheck(cudaGetLastError(), "qsgdDecompress");
}

void halfCompressCuda(const float* x, float* residual, size_t n, size_t outCount, bool bf16, uint16_t* out,
                      CUstream_st* stream) {
  if (outCount == 0) return;
  halfCompressKernel<<<gridFor(outCount, kThreads), kThreads, 0, stream>>>(x, residual, n, outCount, bf16, out);
  cudaCheck(cudaGetLastError(), "halfCompress");
}

void halfServerReduceCuda(const uint16_t* in, int numPayloads, size_t chunk, size_t count, int divisor,
                          float* residual, bool bf16, uint16_t* out, CUstream_st* stream) {
  if (chunk == 0) return;
  halfServerKernel<<<gridFor(chunk, kThreads), kThreads, 0, stream>>>(in, numPayloads, chunk, count, (float)divisor,
                                                                      residual, bf16, out);
  cudaCheck(cudaGetLastError(), "halfServerReduce");
}

void halfDecompressCuda(const uint16_t* in, size_t n, bool bf16, float* out, CUstream_st* stream) {
  if (n == 0) return;
  halfDecompressKernel<<<gridFor(n, kThreads), kThreads, 0, stream>>>(in, n, bf16, out);
  cudaCheck(cudaGetLastError(), "halfDecompress");
}

void floatServerReduceCuda(const float* in, int numPayloads, size_t chunk, size_t count, int divisor, float* out,
                           CUstream_st* stream) {
  if (chunk == 0) return;
  floatServerKernel<<<gridFor(chunk, kThreads), kThreads, 0, stream>>>(in, numPayloads, chunk, count, divisor, out);
  cudaCheck(cudaGetLastError(), "floatServerReduce");
}

void topkCompressCuda(const float* x, float* residual, size_t n, size_t k, float* values, int32_t* indices,
                      CUstream_st* stream) {
  PYCOMM_CHECK_ARG(n <= (size_t)INT32_MAX, "topkCompressCuda: too many elements for int32 indices");
  k = k < n ? k : n;
  if (n == 0) return;
  const size_t tiles = (n + kTopkTile - 1) / kTopkTile;
  TopkScratch* s = nullptr;
  int2* counts = nullptr;
  cudaCheck(cudaMallocAsync(reinterpret_cast<void**>(&s), sizeof(TopkScratch), stream), "malloc");
  cudaCheck(cudaMallocAsync(reinterpret_cast<void**>(&counts), tiles * sizeof(int2), stream), "malloc");
  const unsigned g = gridFor(n, kThreads * 8) > 4096 ? 4096 : gridFor(n, kThreads * 8);
  cudaCheck(cudaMemsetAsync(s->hist, 0, sizeof(s->hist), stream), "memset");
  topkHistHiKernel<<<g, kThreads, 0, stream>>>(x, residual, n, s->hist);
  const float* v = residual ? residual : x;
  if (k > 0) {
    topkFindKernel<<<1, kThreads, 0, stream>>>(s, k, 0);
    cudaCheck(cudaMemsetAsync(s->hist, 0, sizeof(s->hist), stream), "memset");
    topkHistLoKernel<<<g, kThreads, 0, stream>>>(v, n, s);
    topkFindKernel<<<1, kThreads, 0, stream>>>(s, k, 1);
    topkTileCountKernel<<<(unsigned)tiles, kThreads, 0, stream>>>(v, n, s, counts);
    topkScanKernel<<<1, 1, 0, stream>>>(counts, tiles);
    topkEmitKernel<<<(unsigned)tiles, kThreads, 0, stream>>>(v, residual, n, s, counts, values, indices);
  }
  cudaCheck(cudaFreeAsync(counts, stream), "free");
  cudaCheck(cudaFreeAsync(s, stream), "free");
  cudaCheck(cudaGetLastError(), "topkCompress");
}

void topkDecompressCuda(const int32_t* in, int numPayloads, size_t k, size_t n, int divisor, float* out,
                        CUstream_st* stream) {
  if (n == 0) return;
  cudaCheck(cudaMemsetAsync(out, 0, n * sizeof(float), stream), "memset");
  if (k > 0) {
    for (int r = 0; r < numPayloads; ++r) {
      topkScatterKernel<<<gridFor(k, kThreads), kThreads, 0, stream>>>(in, r, k, out);
    }
  }
  if (divisor > 1) divideKernel<<<gridFor(n, kThreads), kThreads, 0, stream>>>(out, n, (float)divisor);
  cudaCheck(cudaGetLastError(), "topkDecompress");
}

}  // namespace pycomm
