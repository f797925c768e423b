// The paged KV cache: one pool of fixed-size blocks, sized once at start-up, shared by every
// sequence. A sequence owns a list of block ids (its block table); token position p of a
// sequence lives in block table[p / block_tokens] at offset p % block_tokens. Blocks hold K and
// V of every layer: layer l's K of block b is layer_views()[l].k + b * block_stride, with the
// layout [block_tokens, num_kv_heads, head_dim] float32 (kernels/backend.h, KvLayerView).
#ifndef LORASERVE_MODEL_KV_CACHE_H_
#define LORASERVE_MODEL_KV_CACHE_H_

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/huge_buffer.h"
#include "kernels/backend.h"

namespace ls {

struct KvCacheOptions {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_tokens = 16;
  uint64_t cache_bytes = 0;  // the pool's size; rounded down to whole blocks
};

// Not thread-safe: owned and used by the engine thread only, except used_blocks(), which any
// thread may read (for metrics and GetModelInfo).
class KvCache {
 public:
  // Allocates the whole pool now (one allocation per layer for K and for V). INVALID_ARGUMENT
  // when the options are inconsistent or the bytes do not hold one block.
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const KvCacheOptions& options);

  // Bytes of one block across all layers (K and V).
  static uint64_t BlockBytes(const KvCacheOptions& options);

  int32_t num_blocks() const { return num_blocks_; }
  int32_t num_free_blocks() const { return static_cast<int32_t>(free_.size()); }
  int32_t used_blocks() const { return used_.load(std::memory_order_relaxed); }
  int32_t block_tokens() const { return options_.block_tokens; }
  uint64_t total_bytes() const { return BlockBytes(options_) * static_cast<uint64_t>(num_blocks_); }
  const std::vector<KvLayerView>& layer_views() const { return layers_; }

  // Takes `n` free blocks and appends their ids to `table`; RESOURCE_EXHAUSTED (and nothing
  // taken) when fewer than n are free. Never allocates memory for KV data.
  absl::Status Allocate(int32_t n, std::vector<int32_t>* table);
  // Grows `table` so that it covers `num_tokens` positions.
  absl::Status EnsureCapacity(int64_t num_tokens, std::vector<int32_t>* table);
  // Returns every block of `table` to the pool and clears it.
  void Free(std::vector<int32_t>* table);

 private:
  explicit KvCache(const KvCacheOptions& options) : options_(options) {}

  KvCacheOptions options_;
  int32_t num_blocks_ = 0;
  // 2 per layer: zeroed pages the kernel maps lazily, so an unused pool costs no resident memory
  // and no start-up time, yet no byte is ever uninitialised; huge pages for attention's reads.
  std::vector<HugeBuffer> storage_;
  std::vector<KvLayerView> layers_;
  std::vector<int32_t> free_;  // a stack; LIFO keeps recently used blocks warm in cache
  std::atomic<int32_t> used_{0};
};

}  // namespace ls

#endif  // LORASERVE_MODEL_KV_CACHE_H_
