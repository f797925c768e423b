// Large, long-lived buffers (the weight arena, the KV pool, benchmark buffers): anonymous memory,
// 2 MiB aligned and advised for transparent huge pages (MADV_HUGEPAGE), so that streaming
// through gigabytes of weights costs one TLB entry per 2 MiB instead of one per 4 KiB. The
// kernel zero-fills pages on first touch, so untouched parts (an idle KV pool) cost no memory.
// Where huge pages are unavailable the advice is ignored and the buffer is ordinary memory.
#ifndef LORASERVE_COMMON_HUGE_BUFFER_H_
#define LORASERVE_COMMON_HUGE_BUFFER_H_

#include <cstddef>

#include "absl/status/statusor.h"

namespace ls {

class HugeBuffer {
 public:
  static constexpr size_t kAlignment = size_t{2} << 20;

  HugeBuffer() = default;
  // RESOURCE_EXHAUSTED when the memory cannot be mapped. `bytes` may be 0 (an empty buffer).
  static absl::StatusOr<HugeBuffer> Allocate(size_t bytes);

  HugeBuffer(HugeBuffer&& other) noexcept;
  HugeBuffer& operator=(HugeBuffer&& other) noexcept;
  HugeBuffer(const HugeBuffer&) = delete;
  HugeBuffer& operator=(const HugeBuffer&) = delete;
  ~HugeBuffer();

  void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void Release();
  void* data_ = nullptr;
  size_t size_ = 0;
  void* map_ = nullptr;  // the whole mapping (data_ rounded to kAlignment inside it)
  size_t map_bytes_ = 0;
};

}  // namespace ls

#endif  // LORASERVE_COMMON_HUGE_BUFFER_H_
