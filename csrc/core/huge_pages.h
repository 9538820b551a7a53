// Transparent huge pages for buffers pycomm reads across processes.
//
// process_vm_readv pins every page of the remote range it copies, on every call; with
// 2 MiB pages that costs 1/512 of what 4 KiB pages cost. The kernel of this project's
// machines backs anonymous memory with huge pages only where a range asks for them
// (/sys/kernel/mm/transparent_hugepage/enabled = madvise), and torch's allocator asks
// only when THP_MEM_ALLOC_ENABLE=1 is set before the process starts. adviseHugePages
// asks for them on a buffer pycomm is handed or owns, and (`collapse`) turns the pages
// already there into huge ones (MADV_COLLAPSE, Linux >= 6.1): a one-time copy per
// buffer that later calls skip.
#pragma once

#include <cstddef>

namespace pycomm {

/// 2 MiB: the huge-page size adviseHugePages assumes (x86-64, arm64 with 4 KiB base pages).
constexpr size_t kHugePageBytes = size_t{2} << 20;

/// Advises huge pages (MADV_HUGEPAGE) on the 2 MiB-aligned interior of [p, p + bytes) and,
/// with `collapse`, collapses its resident pages into huge pages (MADV_COLLAPSE). A
/// buffer whose interior is empty is left alone. Ranges already handled are remembered
/// (per thread, a few of them) and skipped. Best effort: returns true if the advice was
/// accepted; failures (old kernel, THP disabled, no memory) change nothing.
bool adviseHugePages(void* p, size_t bytes, bool collapse);

/// Whether the kernel backs anonymous memory with huge pages where advised: "always"
/// or "madvise" in /sys/kernel/mm/transparent_hugepage/enabled.
bool hugePagesAvailable();

}  // namespace pycomm
