#include "engine/bucket.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <thread>

#include "core/error.h"

namespace pycomm {

namespace {

/// Copies below this many bytes in total stay on the caller's thread: spawning a
/// thread costs tens of microseconds, about what one core copies in 256 KiB.
constexpr size_t kParallelCopyBytes = size_t(4) << 20;

void runSpan(const CopySpan& s) {
  if (s.bytes == 0) return;
  if (s.src == nullptr) {
    std::memset(s.dst, 0, s.bytes);
  } else {
    std::memcpy(s.dst, s.src, s.bytes);
  }
}

/// `s` advanced by `off` bytes and cut to `len` bytes.
CopySpan slice(const CopySpan& s, size_t off, size_t len) {
  CopySpan out;
  out.src = s.src == nullptr ? nullptr : static_cast<const char*>(s.src) + off;
  out.dst = static_cast<char*>(s.dst) + off;
  out.bytes = len;
  return out;
}

}  // namespace

std::vector<Bucket> planBuckets(const std::vector<BucketParam>& params, size_t bucketCapBytes,
                                size_t firstBucketBytes, const std::vector<int64_t>& order) {
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<int64_t> visit = order;
  if (visit.empty()) {
    visit.resize(n);
    for (int64_t i = 0; i < n; ++i) visit[i] = n - 1 - i;
  }
  PYCOMM_CHECK_ARG(static_cast<int64_t>(visit.size()) == n, "planBuckets: order has ", visit.size(),
                   " entries for ", n, " parameters");
  std::vector<char> seen(n, 0);
  for (int64_t idx : visit) {
    PYCOMM_CHECK_ARG(idx >= 0 && idx < n, "planBuckets: parameter index ", idx, " out of range [0, ", n, ")");
    PYCOMM_CHECK_ARG(!seen[idx], "planBuckets: parameter index ", idx, " appears twice in the order");
    seen[idx] = 1;
  }

  struct Open {
    Bucket bucket;
    size_t bytes = 0;
    int64_t firstVisit = 0;
    int closed = 0;  // buckets of this key closed so far (picks the limit)
  };
  std::map<int64_t, Open> open;                      // one open bucket per dtype class
  std::vector<std::pair<int64_t, Bucket>> done;      // (visit position of first member, bucket)
  for (int64_t pos = 0; pos < n; ++pos) {
    const int64_t idx = visit[pos];
    const BucketParam& p = params[idx];
    PYCOMM_CHECK_ARG(p.numel >= 0 && p.elementSize > 0, "planBuckets: parameter ", idx, " has numel ", p.numel,
                     " and element size ", p.elementSize);
    Open& o = open[p.key];
    if (o.bucket.params.empty()) {
      o.bucket.key = p.key;
      o.bucket.elementSize = p.elementSize;
      o.firstVisit = pos;
    }
    PYCOMM_CHECK_ARG(o.bucket.elementSize == p.elementSize, "planBuckets: parameters of one key have element sizes ",
                     o.bucket.elementSize, " and ", p.elementSize);
    o.bucket.params.push_back(idx);
    o.bucket.offsets.push_back(o.bucket.numel);
    o.bucket.numel += p.numel;
    o.bytes += static_cast<size_t>(p.numel) * p.elementSize;
    const size_t limit = o.closed == 0 ? firstBucketBytes : bucketCapBytes;
    if (o.bytes >= limit) {
      done.emplace_back(o.firstVisit, std::move(o.bucket));
      const int closed = o.closed + 1;
      o = Open();
      o.closed = closed;
    }
  }
  for (auto& kv : open) {
    if (!kv.second.bucket.params.empty()) done.emplace_back(kv.second.firstVisit, std::move(kv.second.bucket));
  }
  std::stable_sort(done.begin(), done.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<Bucket> out;
  out.reserve(done.size());
  for (auto& d : done) out.push_back(std::move(d.second));
  return out;
}

std::vector<int64_t> rebuildOrder(int64_t numParams, const std::vector<int64_t>& ready) {
  PYCOMM_CHECK_ARG(numParams >= 0, "rebuildOrder: negative parameter count");
  std::vector<char> seen(numParams, 0);
  std::vector<int64_t> out;
  out.reserve(numParams);
  for (int64_t idx : ready) {
    PYCOMM_CHECK_ARG(idx >= 0 && idx < numParams, "rebuildOrder: parameter index ", idx, " out of range [0, ",
                     numParams, ")");
    PYCOMM_CHECK_ARG(!seen[idx], "rebuildOrder: parameter ", idx, " became ready twice");
    seen[idx] = 1;
    out.push_back(idx);
  }
  for (int64_t idx = numParams - 1; idx >= 0; --idx) {
    if (!seen[idx]) out.push_back(idx);
  }
  return out;
}

void copySpans(const std::vector<CopySpan>& spans, int maxThreads) {
  size_t total = 0;
  for (const auto& s : spans) {
    PYCOMM_CHECK_ARG(s.bytes == 0 || s.dst != nullptr, "copySpans: null destination for ", s.bytes, " bytes");
    total += s.bytes;
  }
  const int threads =
      std::max(1, std::min<int>(maxThreads, static_cast<int>(total / (kParallelCopyBytes / 2) + 1)));
  if (threads <= 1 || total < kParallelCopyBytes) {
    for (const auto& s : spans) runSpan(s);
    return;
  }
  // Cut the batch into `threads` runs of about equal bytes, splitting spans at the seams.
  const size_t per = (total + threads - 1) / threads;
  std::vector<std::vector<CopySpan>> parts(threads);
  size_t part = 0, used = 0;
  for (const auto& s : spans) {
    size_t off = 0;
    while (off < s.bytes) {
      const bool last = part + 1 == parts.size();
      const size_t take = last ? s.bytes - off : std::min(s.bytes - off, per - used);
      parts[part].push_back(slice(s, off, take));
      off += take;
      used += take;
      if (used == per && part + 1 < parts.size()) {
        ++part;
        used = 0;
      }
    }
  }
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) {
    workers.emplace_back([&parts, t] {
      for (const auto& s : parts[t]) runSpan(s);
    });
  }
  for (const auto& s : parts[0]) runSpan(s);
  for (auto& w : workers) w.join();
}

}  // namespace pycomm
