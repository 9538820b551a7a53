// Fusion buckets for data parallelism, torch-free: which gradients share one flat
// buffer (and one all-reduce), where each lies inside it, and the copies in and out.
//
// The rule is DDP's: visit the parameters in reverse registration order (backward
// produces the last layers' gradients first), append each to the open bucket of its
// dtype class, and close a bucket once it holds at least its limit -- `firstBucketBytes`
// for the first bucket of a class, `bucketCapBytes` after that. After the first
// iteration the plan is rebuilt once from the order gradients actually became ready.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pycomm {

/// One fusion bucket: a flat buffer of `numel` elements of one dtype class.
struct Bucket {
  /// Opaque dtype/device class shared by every parameter of the bucket.
  int64_t key = 0;
  /// Size of one element in bytes.
  size_t elementSize = 0;
  /// Parameter indices, in the order they occupy the buffer.
  std::vector<int64_t> params;
  /// Element offset of each parameter inside the buffer (parallel to `params`).
  std::vector<int64_t> offsets;
  /// Total elements of the buffer.
  int64_t numel = 0;
};

/// Description of one parameter for planning.
struct BucketParam {
  /// Number of elements.
  int64_t numel = 0;
  /// Size of one element in bytes.
  size_t elementSize = 0;
  /// dtype/device class: only parameters with equal keys share a bucket.
  int64_t key = 0;
};

/// Plans buckets over `params`, visiting them in `order` (a permutation of the indices,
/// or empty for reverse index order -- DDP's first-iteration guess). Returns the
/// buckets in the order their first member is visited (the order they should fill).
/// A parameter larger than the limit gets a bucket of its own. Limits of 0 put every
/// parameter in its own bucket. Throws InvalidArgument if `order` is not a permutation.
std::vector<Bucket> planBuckets(const std::vector<BucketParam>& params, size_t bucketCapBytes,
                                size_t firstBucketBytes, const std::vector<int64_t>& order = {});

/// The visiting order for a rebuild from an observed ready order: `ready` lists the
/// parameters whose gradients arrived, in arrival order (each at most once); the ones
/// that never arrived follow in reverse index order. Throws InvalidArgument on an index
/// out of range or a repeated index.
std::vector<int64_t> rebuildOrder(int64_t numParams, const std::vector<int64_t>& ready);

/// One contiguous copy: `bytes` from `src` to `dst`; a null `src` zero-fills `dst`.
struct CopySpan {
  /// Source bytes, or nullptr to zero-fill.
  const void* src = nullptr;
  /// Destination bytes.
  void* dst = nullptr;
  /// Length of the copy.
  size_t bytes = 0;
};

/// Performs every copy of `spans` (non-overlapping); spreads large batches over up to
/// `maxThreads` threads (1 = on the caller's thread only). This is flatten (gradients
/// into a bucket) and unflatten (bucket back into gradients) alike.
void copySpans(const std::vector<CopySpan>& spans, int maxThreads = 1);

}  // namespace pycomm
