#include "server/adapters/adapter_pool.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/huge_buffer.h"
#include "common/logging.h"

namespace ls {
namespace {

constexpr size_t kPoolAlignment = 256;  // LoraAdapter::kPackAlignment

class HostPoolMemory final : public AdapterPoolMemory {
 public:
  explicit HostPoolMemory(HugeBuffer buffer) : buffer_(std::move(buffer)) {}

  absl::string_view kind() const override { return "host"; }
  void* base() const override { return buffer_.data(); }
  size_t bytes() const override { return buffer_.size(); }

  absl::Status CopyIn(size_t offset, const void* src, size_t bytes) override {
    if (offset > buffer_.size() || bytes > buffer_.size() - offset) {
      return absl::InvalidArgumentError(absl::StrCat("copy of ", bytes, " bytes at offset ", offset,
                                                     " does not fit the ", buffer_.size(),
                                                     "-byte host adapter pool"));
    }
    if (bytes != 0) std::memcpy(static_cast<uint8_t*>(buffer_.data()) + offset, src, bytes);
    return absl::OkStatus();
  }

 private:
  HugeBuffer buffer_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<AdapterPoolMemory>> MakeHostPoolMemory(size_t bytes) {
  absl::StatusOr<HugeBuffer> buffer = HugeBuffer::Allocate(bytes);
  if (!buffer.ok()) {
    return absl::ResourceExhaustedError(absl::StrCat("adapter pool: ", buffer.status().message()));
  }
  return std::unique_ptr<AdapterPoolMemory>(new HostPoolMemory(*std::move(buffer)));
}

absl::StatusOr<std::unique_ptr<AdapterPagePool>> AdapterPagePool::Create(
    std::unique_ptr<AdapterPoolMemory> memory, size_t page_bytes) {
  if (memory == nullptr) return absl::InvalidArgumentError("adapter pool: no memory");
  if (page_bytes == 0 || page_bytes % kPoolAlignment != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter page size must be a positive multiple of ", kPoolAlignment,
                     " bytes, got ", page_bytes));
  }
  if (page_bytes > memory->bytes()) {
    return absl::InvalidArgumentError(absl::StrCat("adapter page size ", page_bytes,
                                                   " is larger than the adapter pool (",
                                                   memory->bytes(), " bytes)"));
  }
  if (reinterpret_cast<uintptr_t>(memory->base()) % kPoolAlignment != 0) {
    return absl::InvalidArgumentError("adapter pool memory is not 256-byte aligned");
  }
  const int64_t pages = static_cast<int64_t>(memory->bytes() / page_bytes);
  return std::unique_ptr<AdapterPagePool>(
      new AdapterPagePool(std::move(memory), page_bytes, pages));
}

AdapterPagePool::AdapterPagePool(std::unique_ptr<AdapterPoolMemory> memory, size_t page_bytes,
                                 int64_t pages)
    : memory_(std::move(memory)),
      page_bytes_(page_bytes),
      used_(static_cast<size_t>(pages), 0),
      free_pages_(pages) {}

int64_t AdapterPagePool::PagesFor(size_t bytes) const {
  return std::max<int64_t>(1, static_cast<int64_t>((bytes + page_bytes_ - 1) / page_bytes_));
}

namespace {

// First index of a run of `count` zero flags, or -1.
int64_t FirstFit(const std::vector<uint8_t>& used, int64_t count) {
  int64_t run = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(used.size()); ++i) {
    run = used[static_cast<size_t>(i)] ? 0 : run + 1;
    if (run == count) return i - count + 1;
  }
  return -1;
}

}  // namespace

int64_t AdapterPagePool::LargestFreeRun() const {
  int64_t best = 0;
  int64_t run = 0;
  for (const uint8_t u : used_) {
    run = u ? 0 : run + 1;
    best = std::max(best, run);
  }
  return best;
}

std::optional<PageRun> AdapterPagePool::Allocate(int64_t count) {
  if (count < 1 || count > free_pages_) return std::nullopt;
  const int64_t first = FirstFit(used_, count);
  if (first < 0) return std::nullopt;
  std::fill(used_.begin() + first, used_.begin() + first + count, uint8_t{1});
  free_pages_ -= count;
  return PageRun{first, count};
}

void AdapterPagePool::Free(const PageRun& run) {
  LS_CHECK(run.valid() && run.count > 0 && run.first + run.count <= num_pages())
      << "adapter pool: freeing an invalid run " << run.first << "+" << run.count;
  for (int64_t i = run.first; i < run.first + run.count; ++i) {
    LS_CHECK(used_[static_cast<size_t>(i)]) << "adapter pool: page " << i << " freed twice";
    used_[static_cast<size_t>(i)] = 0;
  }
  free_pages_ += run.count;
}

bool AdapterPagePool::FitsIfFreed(int64_t count, absl::Span<const PageRun> also_free) const {
  std::vector<uint8_t> used = used_;
  for (const PageRun& run : also_free) {
    std::fill(used.begin() + run.first, used.begin() + run.first + run.count, uint8_t{0});
  }
  return count >= 1 && FirstFit(used, count) >= 0;
}

void* AdapterPagePool::Address(const PageRun& run) const {
  return static_cast<uint8_t*>(memory_->base()) + static_cast<size_t>(run.first) * page_bytes_;
}

absl::Status AdapterPagePool::CopyIn(const PageRun& run, const void* src, size_t bytes) {
  if (!run.valid() || bytes > static_cast<size_t>(run.count) * page_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("adapter pool: ", bytes,
                                                   " bytes do not fit a run of ", run.count,
                                                   " pages of ", page_bytes_, " bytes"));
  }
  return memory_->CopyIn(static_cast<size_t>(run.first) * page_bytes_, src, bytes);
}

}  // namespace ls
