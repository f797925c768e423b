// The resident tier of the adapter registry: one region of compute memory (RAM on the CPU
// backend, device memory on CUDA) cut into fixed-size pages, in which each resident adapter
// occupies one contiguous run of pages holding its packed bytes (model/lora_adapter.h) exactly
// as LoraAdapter::packed_data() lays them out, so LoraAdapter::GroupsAt(Address(run)) addresses
// them. A run is as long as the adapter's true packed size needs (never padded to a maximum
// rank); the tail of its last page is unused.
//
// Two parts: AdapterPoolMemory, the small backend-specific interface (where the region is and
// how host bytes are copied into it), and AdapterPagePool, the page bookkeeping over it
// (first-fit allocation of contiguous runs), which is the same for every backend.
#ifndef LORASERVE_SERVER_ADAPTERS_ADAPTER_POOL_H_
#define LORASERVE_SERVER_ADAPTERS_ADAPTER_POOL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace ls {

// The pool's memory. Implementations: host RAM (MakeHostPoolMemory); CUDA device memory later
// (cudaMalloc + cudaMemcpy on a copy stream).
//
// Thread safety: base(), bytes() and kind() are immutable. CopyIn may run concurrently on
// disjoint byte ranges (the registry copies different adapters from different loader threads).
class AdapterPoolMemory {
 public:
  virtual ~AdapterPoolMemory() = default;

  // "host" or "cuda", for logs and errors.
  virtual absl::string_view kind() const = 0;
  // The region: bytes() bytes at base(), base() aligned to at least 256 bytes. On a device the
  // address is a device pointer and is never dereferenced on the host.
  virtual void* base() const = 0;
  virtual size_t bytes() const = 0;
  // Copies `bytes` bytes of host memory at `src` to [offset, offset + bytes) of the region and
  // returns once they are in place (the kernels may read them right after). INVALID_ARGUMENT
  // when the range does not fit; a device error otherwise.
  virtual absl::Status CopyIn(size_t offset, const void* src, size_t bytes) = 0;
};

// Host RAM from one HugeBuffer (2 MiB aligned, transparent huge pages; untouched pages cost no
// memory). RESOURCE_EXHAUSTED when it cannot be mapped.
absl::StatusOr<std::unique_ptr<AdapterPoolMemory>> MakeHostPoolMemory(size_t bytes);

// A run of pages: [first, first + count).
struct PageRun {
  int64_t first = -1;
  int64_t count = 0;
  bool valid() const { return first >= 0; }
};

// Page bookkeeping over one AdapterPoolMemory. Allocation is first-fit: the lowest-addressed
// free run of `count` pages.
//
// Thread safety: Allocate, Free and the queries are not synchronized; the owner (the registry)
// calls them under its mutex. CopyIn and Address touch no bookkeeping, so the owner of a run may
// call them without that mutex, concurrently with other runs' copies and with Allocate/Free.
class AdapterPagePool {
 public:
  // `page_bytes` must be a positive multiple of 256 (LoraAdapter::kPackAlignment) and at most
  // memory->bytes(); the pool has floor(bytes / page_bytes) pages. INVALID_ARGUMENT otherwise.
  static absl::StatusOr<std::unique_ptr<AdapterPagePool>> Create(
      std::unique_ptr<AdapterPoolMemory> memory, size_t page_bytes);

  AdapterPagePool(const AdapterPagePool&) = delete;
  AdapterPagePool& operator=(const AdapterPagePool&) = delete;

  absl::string_view kind() const { return memory_->kind(); }
  size_t page_bytes() const { return page_bytes_; }
  int64_t num_pages() const { return static_cast<int64_t>(used_.size()); }
  // num_pages() * page_bytes(): what adapters can use.
  size_t capacity_bytes() const { return used_.size() * page_bytes_; }
  int64_t free_pages() const { return free_pages_; }
  // The longest run of free pages.
  int64_t LargestFreeRun() const;

  // Pages an adapter of `bytes` packed bytes occupies (at least 1).
  int64_t PagesFor(size_t bytes) const;

  // The first free run of `count` pages (1 <= count), marked used; nullopt when none exists.
  std::optional<PageRun> Allocate(int64_t count);
  // Returns a run obtained from Allocate. Freeing a run twice is a broken invariant (aborts).
  void Free(const PageRun& run);

  // Whether a run of `count` pages would exist if `also_free` (allocated runs) were freed too.
  // Changes nothing; the registry asks before evicting anything, so that it never evicts
  // adapters when even evicting all candidates would not make a long enough run.
  bool FitsIfFreed(int64_t count, absl::Span<const PageRun> also_free) const;

  // The address of the run's first page (device address on CUDA).
  void* Address(const PageRun& run) const;
  // Copies `bytes` (<= run.count * page_bytes()) host bytes to the start of `run`.
  absl::Status CopyIn(const PageRun& run, const void* src, size_t bytes);

 private:
  AdapterPagePool(std::unique_ptr<AdapterPoolMemory> memory, size_t page_bytes, int64_t pages);

  std::unique_ptr<AdapterPoolMemory> memory_;
  const size_t page_bytes_;
  std::vector<uint8_t> used_;  // one flag per page
  int64_t free_pages_ = 0;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_ADAPTERS_ADAPTER_POOL_H_
