// Collective algorithms, written once against the Transport interface (plus the
// single-copy forms when the transport offers DirectAccess, see transport.h).
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/deadline.h"
#include "algorithms/compressed.h"
#include "core/dtype.h"
#include "core/shared_arena.h"
#include "core/topology.h"
#include "transport/transport.h"

namespace pycomm {

/// Algorithm choices (from the environment, see docs/USER_GUIDE.md).
// ---- registered buffers (issue 17 item 2) ----
/// Default of AlgoConfig::registeredCopyMax (docs/USER_GUIDE.md, "Registered buffers"): 0,
/// user tensors outside the arena are read with process_vm_readv. On the quiet 2-core VM
/// the copy into registered scratch made a 64 MiB all_reduce slower (49.7 vs 37.7 ms;
/// benchmarks/results/bench_limits_4_regbuf.txt); under load it had been faster.
constexpr size_t kRegisteredCopyMaxDefault = 0;
// ---- end registered buffers ----

struct AlgoConfig {
  /// All-reduces of at most this many bytes use the latency algorithm (one-shot
  /// through shared memory, recursive doubling over TCP). PYCOMM_ALLREDUCE_SMALL_BYTES.
  size_t smallBytes = 64 * 1024;
  /// Ring segment size in bytes (pipelining granularity). PYCOMM_RING_SEGMENT_BYTES.
  size_t segmentBytes = 1 << 20;
  /// "auto", "ring", "direct" (shm only), "oneshot" (shm), "rd" (recursive doubling),
  /// "hier" (hierarchical: groups whose ranks span several hosts) or "hier_rd" (the
  /// hierarchical small-message all-reduce: recursive doubling among host leaders).
  /// PYCOMM_ALGO.
  std::string algo = "auto";
  /// Float32 bytes of each chunk piece a compressed all-reduce pipelines (rounded to
  /// whole 2048-element blocks). PYCOMM_COMPRESS_PIECE_BYTES.
  size_t compressPieceBytes = 1 << 20;
  /// Hierarchical all-reduce pipelining: calls are cut into chunks of about this many
  /// bytes, and the in-host steps of one chunk overlap the cross-host step of another.
  /// PYCOMM_HIER_CHUNK_BYTES.
  size_t hierChunkBytes = 2 << 20;

  // ---- registered buffers (issue 17 item 2; core/shared_arena.h) ----
  /// The shm direct all-reduce of a buffer outside the registered arena copies it into
  /// a registered scratch first (peers then read it with plain loads instead of
  /// process_vm_readv) when it has more than smallBytes and at most this many bytes;
  /// 0 never copies. PYCOMM_REGISTERED_COPY_MAX.
  size_t registeredCopyMax = kRegisteredCopyMaxDefault;
  // ---- end registered buffers ----

  /// Reads the PYCOMM_* variables above.
  static AlgoConfig fromEnv();
};

/// The algorithms a collective may run with, counted per call (see Collectives::stats()).
enum class Algo : uint8_t {
  kAllReduceLocal,      ///< all_reduce of a one-rank group (no communication)
  kAllReduceRing,       ///< segmented ring: reduce-scatter + all-gather (PYCOMM_ALGO=ring)
  kAllReduceRd,         ///< recursive doubling (PYCOMM_ALGO=rd)
  kAllReduceOneShot,    ///< shm one-shot: inline in the segment, every rank reduces all (oneshot)
  kAllReduceDirect,     ///< shm direct: single-copy reduce-scatter + all-gather (direct)
  kReduceScatterDirect, ///< every rank reads its block of each peer's input in place
  kReduceScatterRing,   ///< ring of partial sums
  kAllGatherDirect,     ///< every rank copies each peer's input in place
  kAllGatherRing,       ///< ring
  kAllGatherBruck,      ///< small, 3+ ranks over the network: Bruck's ceil(log2(n)) doubling rounds
  kBroadcastDirect,     ///< every rank copies the root's buffer in place
  kBroadcastChain,      ///< pipelined chain from the root
  kBroadcastTree,       ///< small, 3+ ranks over the network: binomial tree from the root (log2(n) hops)
  kReduceDirect,        ///< the root reads every peer's buffer in place
  kReduceAllReduce,     ///< small: an all-reduce of a copy, kept on the root
  kReduceChain,         ///< pipelined chain ending at the root
  kAllReduceHier,       ///< hierarchical: in-host reduce-scatter, cross-host all-reduce per shard, in-host all-gather (hier)
  kReduceScatterHier,   ///< hierarchical: in-host reduce-scatter of permuted blocks, then across hosts
  kAllGatherHier,       ///< hierarchical: across hosts, then in-host all-gather, then unpermute
  // ---- hierarchical rooted collectives and small all-reduces (hierarchical_rooted.cc) ----
  kAllReduceHierRd,     ///< small, several hosts: in-host reduce to a leader, recursive doubling among leaders, in-host broadcast (hier_rd)
  kBroadcastHier,       ///< root's data once to one rank per host (pipelined chain across hosts), then in-host
  kReduceHier,          ///< in-host reduce to one rank per host, then across hosts to the root
  // ---- end of hierarchical rooted block ----
  kCount
};

/// Stats key of an algorithm: "algo_<collective>_<algorithm>" (e.g. "algo_all_reduce_ring";
/// the all_reduce names are PYCOMM_ALGO's values).
const char* algoKey(Algo a);

/// Runs collectives over one transport. Not thread-safe: one caller at a time
/// (the backend's communication thread).
class Collectives {
 public:
  /// `transport` must outlive this object. `topology` says which ranks share a host
  /// (default: unknown, treated as one host); when it spans several hosts with several
  /// ranks on some, the hierarchical algorithms run their in-host steps over `local`
  /// (a transport of this host's ranks, e.g. shared memory; default: a view of
  /// `transport`) and their cross-host steps over a view of `transport`. `local`, if
  /// given, must outlive this object too.
  Collectives(Transport& transport, AlgoConfig config, const Topology& topology = Topology(),
              Transport* local = nullptr);

  /// In-place all-reduce of `count` elements.
  void allReduce(void* buf, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                 const Deadline& deadline);

  /// Out-of-place all-reduce: `out` = the reduction of every rank's `in` (`count`
  /// elements each), `in` unchanged. `in` equal to `out` is the in-place call; otherwise
  /// the two must not overlap. The shared-memory one-shot and direct algorithms read
  /// `in` and write `out` with no copy between them (the same work as in place); the
  /// others copy `in` into `out` and run in place. Ranks may mix in-place and
  /// out-of-place calls of one collective.
  void allReduce(const void* in, void* out, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                 const Deadline& deadline);

  /// out (countPerRank elements) = reduction of this rank's block of `in`
  /// (size() * countPerRank elements, block r for rank r). `in` may equal `out` only if
  /// countPerRank is 0.
  void reduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                     const OpDesc& desc, const Deadline& deadline);

  /// out (size() * bytesPerRank) = concatenation of every rank's `in`.
  void allGather(const void* in, void* out, size_t bytesPerRank, const OpDesc& desc,
                 const Deadline& deadline);

  /// Copies root's `buf` into every rank's `buf`.
  void broadcast(void* buf, size_t bytes, int root, const OpDesc& desc, const Deadline& deadline);

  /// Root's `buf` = reduction of every rank's `buf`; other ranks' buffers are unchanged.
  void reduce(void* buf, size_t count, DType dtype, ReduceOp op, int root, const OpDesc& desc,
              const Deadline& deadline);

  /// Root's `out` (size() * bytes) = concatenation of every rank's `in` (bytes each).
  void gather(const void* in, void* out, size_t bytes, int root, const OpDesc& desc,
              const Deadline& deadline);

  /// Every rank's `out` (bytes) = block `rank` of root's `in` (size() * bytes).
  void scatter(const void* in, void* out, size_t bytes, int root, const OpDesc& desc,
               const Deadline& deadline);

  /// Sends sendBytes[p] bytes at in+sendOffsets[p] to rank p and receives recvBytes[p]
  /// bytes from rank p into out+recvOffsets[p] (pairwise exchange).
  void allToAll(const void* in, const std::vector<size_t>& sendOffsets,
                const std::vector<size_t>& sendBytes, void* out,
                const std::vector<size_t>& recvOffsets, const std::vector<size_t>& recvBytes,
                const OpDesc& desc, const Deadline& deadline);

  /// Returns once every rank has entered the barrier.
  void barrier(const OpDesc& desc, const Deadline& deadline);

  /// Pipelined compressed all-reduce of a float32 tensor (see algorithms/compressed.h);
  /// the codec and the receives run on two helper threads started on first use.
  void compressedAllReduce(PieceCodec& codec, const CompressedArgs& args, const OpDesc& desc,
                           const Deadline& deadline);

  // ---- hierarchical compressed all-reduce (hier_compressed.cc) -------------------------
  // Compression on the cross-host hop only: exact float32 reduce-scatter inside each
  // host, the compressed all-reduce of this rank's shard among the ranks that own it on
  // every host (error feedback on that shard), exact all-gather inside the host.

  /// What one hierarchical compressed all-reduce of `count` float32 elements needs and
  /// sends on this rank (the same cuts the call itself makes).
  struct HierCompressedPlan {
    bool hierarchical = false;   ///< the group spans several hosts with several ranks on some
    int hosts = 1;               ///< hosts of the group
    size_t workerElems = 0;      ///< worker residual floats (this rank's shards, all chunks)
    size_t serverElems = 0;      ///< server residual floats (its cross-host chunks)
    uint64_t crossBytes = 0;     ///< codec payload bytes this rank sends across hosts (with `codec`)
  };
  HierCompressedPlan hierCompressedPlan(size_t count, const PieceCodec* codec) const;

  /// Parameters of one hierarchical compressed all-reduce (residual sizes: the plan's).
  struct HierCompressedArgs {
    float* data = nullptr;            ///< the tensor (n float32), reduced in place
    size_t n = 0;
    int divisor = 1;                  ///< 1 for SUM, the group size for AVG
    float* workerResidual = nullptr;  ///< plan.workerElems floats, or null (codec keeps none)
    float* serverResidual = nullptr;  ///< plan.serverElems floats, or null
  };
  /// Runs it; InvalidArgument unless the plan says hierarchical. Ranks end bitwise identical.
  void hierCompressedAllReduce(PieceCodec& codec, const HierCompressedArgs& args, const OpDesc& desc,
                               const Deadline& deadline);
  // ---- end hierarchical compressed all-reduce -------------------------------------------

  /// The transport collectives run over.
  Transport& transport() { return transport_; }

  /// Calls run with each algorithm, under algoKey() names (every algorithm listed, zeros
  /// included). Safe to call from any thread.
  std::map<std::string, uint64_t> stats() const;

  ~Collectives();

 private:
  /// Picks and runs the all-reduce algorithm; returns the one that ran.
  Algo runAllReduce(const void* in, void* out, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                    const Deadline& deadline);
  /// Counts one call run with `a`.
  void ran(Algo a) { ran_[static_cast<size_t>(a)].fetch_add(1, std::memory_order_relaxed); }
  void ringAllReduce(void* buf, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                     const Deadline& deadline);
  void recursiveDoublingAllReduce(void* buf, size_t count, DType dtype, ReduceOp op,
                                  const OpDesc& desc, const Deadline& deadline);
  void shmOneShotAllReduce(const void* in, void* out, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                           const Deadline& deadline);
  // Binomial tree from `root`: a rank receives once from its parent, then sends to its
  // children, farthest subtree first; ceil(log2(n)) hops from the root to the last rank.
  // True if a broadcast / all_gather moving `bytes` over the network takes the log2(n)-round
  // form (tree, Bruck): 3+ ranks, and PYCOMM_ALGO=rd, or not ring and at most smallBytes.
  bool logRounds(size_t bytes) const;
  // Bruck's all-gather: in round k every rank sends the min(2^k, n-2^k) blocks it holds
  // to rank-2^k and receives as many from rank+2^k; ceil(log2(n)) rounds for any n.
  void bruckAllGather(char* out, size_t bytesPerRank, const OpDesc& desc, const Deadline& deadline);
  void treeBroadcast(char* buf, size_t bytes, int root, const OpDesc& desc, const Deadline& deadline);
  void chainReduce(char* buf, size_t count, DType dtype, ReduceOp op, int root, const OpDesc& desc,
                   const Deadline& deadline);
  void shmDirectAllReduce(const void* in, void* out, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                          const Deadline& deadline);
  void hierAllReduce(void* buf, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                     const Deadline& deadline);
  // The hierarchical all-reduce's steps on elements [lo, lo+n) of buf (hierarchical.cc).
  void hierLocalReduce(char* b, size_t n, DType dtype, ReduceOp op, const OpDesc& desc, const Deadline& deadline);
  void hierCross(char* b, size_t n, DType dtype, ReduceOp op, const OpDesc& desc, const Deadline& deadline);
  void hierLocalGather(char* b, size_t n, DType dtype, const OpDesc& desc, const Deadline& deadline);
  // After a failure inside a pipelined hierarchical call: fails this group's transport and
  // the in-host one with `why`, so steps still queued or running (and peers waiting on
  // them) fail fast instead of waiting out the deadline (hierarchical.cc).
  void hierAbort(const std::string& why);
  // True if reduce_scatter / all_gather of `bytes` in all go hierarchical.
  bool hierBlocks(size_t bytes) const;
  void hierReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                         const OpDesc& desc, const Deadline& deadline);
  void hierAllGather(const void* in, void* out, size_t bytesPerRank, const OpDesc& desc, const Deadline& deadline);
  // reduce_scatter / all_gather on hosts of unequal rank counts, each holding 2 or more
  // (hier_uneven.cc): true if a call moving `bytes` in all goes that way.
  bool hierUneven(size_t bytes) const;
  void hierUnevenReduceScatter(const void* in, void* out, size_t countPerRank, DType dtype, ReduceOp op,
                               const OpDesc& desc, const Deadline& deadline);
  void hierUnevenAllGather(const void* in, void* out, size_t bytesPerRank, const OpDesc& desc,
                           const Deadline& deadline);
  // Each group rank's place in the host-by-host order; *perHost: ranks on each host.
  std::vector<size_t> hostMajorPositions(std::vector<size_t>* perHost) const;
  // Ring reduce-scatter / all-gather with blocks of unequal size (counts[i] elements /
  // bytes[i] bytes for rank i, laid end to end): `out` gets block rank()'s reduction of
  // every rank's `blocks`; the all-gather fills every block of `blocks` from its owner.
  void ringReduceScatterV(const char* blocks, char* out, const std::vector<size_t>& counts, DType dtype,
                          ReduceOp op, const OpDesc& desc, const Deadline& deadline);
  void ringAllGatherV(char* blocks, const std::vector<size_t>& bytes, const OpDesc& desc, const Deadline& deadline);
  // Hierarchical compressed all-reduce: one chunk of the call and this rank's part of it
  // (hier_compressed.cc).
  struct HierPart {
    size_t lo, n;              // the chunk: elements [lo, lo + n) of the tensor
    size_t shardLo, shardLen;  // this rank's shard of it (chunk-relative)
    size_t crossChunk;         // elements per cross-host rank's chunk of the shard (0: no step)
    size_t workerOff, serverOff;  // its residuals' offsets
  };
  std::vector<HierPart> hierCompressedParts(size_t count) const;
  // Sets up the in-host and cross-host sub-collectives (hierarchical.cc).
  void initHierarchy(Transport* local);
  // ---- hierarchical rooted collectives and small all-reduces (hierarchical_rooted.cc) ----
  // True if broadcast / reduce go hierarchical (several hosts, several ranks on some;
  // PYCOMM_ALGO auto, hier or hier_rd).
  bool hierRooted() const;
  void hierSmallAllReduce(void* buf, size_t count, DType dtype, ReduceOp op, const OpDesc& desc,
                          const Deadline& deadline);
  void hierBroadcast(void* buf, size_t bytes, int root, const OpDesc& desc, const Deadline& deadline);
  void hierReduce(void* buf, size_t count, DType dtype, ReduceOp op, int root, const OpDesc& desc,
                  const Deadline& deadline);
  // The rank that carries a rooted collective across hosts on `host`: the root on its
  // own host, the host's first rank elsewhere.
  int rootedPathRank(int host, int root) const;
  // Sub-collectives over rootedPathRank(h, root) of every host h (in host order), for
  // the ranks on that path; created on first use.
  Collectives& rootedCross(int root);
  // Broadcast from `root` of a buffer that fits the shm inline record (one post, every
  // rank reads every record: no cross-memory read); the flat broadcast otherwise. Run on
  // the in-host sub-collectives.
  void smallLocalBroadcast(void* buf, size_t bytes, int root, const OpDesc& desc, const Deadline& deadline);
  // Runs `chunks` steps of a rooted collective: for every chunk c, `local(c)` on this
  // thread and, if `cross` is set, `cross(c)` on crossThread_ (when the in-host steps
  // have their own transport; one after the other otherwise). crossFirst: chunk c's
  // cross-host step comes before its in-host step (broadcast), else after (reduce).
  void hierPipeline(size_t chunks, bool crossFirst, bool waitCross, const std::function<void(size_t)>& local,
                    const std::function<void(size_t)>& cross);
  // ---- end of hierarchical rooted block ----
  char* scratch(size_t bytes);

  Transport& transport_;
  DirectAccess* direct_;  // the transport's direct access (shared memory), or null
  AlgoConfig config_;
  int rank_;
  int size_;
  std::vector<char> scratch_;
  std::unique_ptr<WorkQueue> codecThread_;  // compressed all-reduces: encode/decode
  std::unique_ptr<WorkQueue> recvThread_;   // compressed all-reduces: receives
  std::vector<uint8_t> compressScratch_;  // their payload buffers
  std::array<std::atomic<uint64_t>, static_cast<size_t>(Algo::kCount)> ran_{};  // per Algo

  // Hierarchy (set when the topology spans several hosts and some host holds several
  // ranks): the buffer is cut into shards_ shards (the fewest ranks any host holds);
  // the rank with local index k < shards_ runs shard k's cross-host all-reduce.
  Topology topology_;
  int localIndex_ = 0;
  int localSize_ = 1;
  int shards_ = 0;                              // 0: no hierarchy
  std::unique_ptr<Transport> localView_;        // this host's ranks, when no `local` was given
  std::unique_ptr<Transport> crossView_;        // ranks with local index localIndex_ on every host
  std::unique_ptr<Collectives> local_;          // in-host steps
  std::unique_ptr<Collectives> cross_;          // cross-host steps (local index < shards_ only)
  bool localSeparate_ = false;                  // in-host steps run over their own transport
  bool uniform_ = false;                        // every host holds shards_ ranks
  std::vector<int> permBlocks_;                 // group rank of block j = l * hosts + h (rank l of host h)
  std::unique_ptr<WorkQueue> crossThread_;      // runs cross-host steps while in-host ones go on
  std::vector<char> hierScratch_;
  // ---- hierarchical rooted block: rootedCross() views, by root ----
  std::map<int, std::pair<std::unique_ptr<Transport>, std::unique_ptr<Collectives>>> rootedCross_;
  std::vector<char> rootedScratch_;  // a non-root path rank's reduce partials

  // ---- registered buffers (issue 17 item 2) ----
  // The direct all-reduce's copy of a user buffer that is not registered (in the arena).
  ArenaBuffer registeredScratch_;
  // ---- end registered buffers ----
};

}  // namespace pycomm
