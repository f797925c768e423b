#include "model/kv_cache.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ls {

uint64_t KvCache::BlockBytes(const KvCacheOptions& o) {
  return 2ull * static_cast<uint64_t>(o.num_layers) * static_cast<uint64_t>(o.block_tokens) *
         static_cast<uint64_t>(o.num_kv_heads) * static_cast<uint64_t>(o.head_dim) * sizeof(float);
}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const KvCacheOptions& options) {
  if (options.num_layers <= 0 || options.num_kv_heads <= 0 || options.head_dim <= 0 ||
      options.block_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache: layers, kv heads, head_dim and block_tokens must be positive, got ",
                     options.num_layers, ", ", options.num_kv_heads, ", ", options.head_dim, ", ",
                     options.block_tokens));
  }
  const uint64_t block_bytes = BlockBytes(options);
  const uint64_t blocks = options.cache_bytes / block_bytes;
  if (blocks == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv_cache_bytes=", options.cache_bytes, " holds no block: one block of ",
                     options.block_tokens, " tokens takes ", block_bytes, " bytes"));
  }
  if (blocks > (1u << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv_cache_bytes=", options.cache_bytes, " makes ", blocks,
                     " blocks; at most 2^30 are supported (raise --kv_block_tokens)"));
  }
  std::unique_ptr<KvCache> cache(new KvCache(options));
  cache->num_blocks_ = static_cast<int32_t>(blocks);
  const size_t floats_per_layer =
      static_cast<size_t>(blocks) * options.block_tokens * options.num_kv_heads * options.head_dim;
  for (int l = 0; l < options.num_layers; ++l) {
    absl::StatusOr<HugeBuffer> k = HugeBuffer::Allocate(floats_per_layer * sizeof(float));
    absl::StatusOr<HugeBuffer> v = HugeBuffer::Allocate(floats_per_layer * sizeof(float));
    if (!k.ok() || !v.ok()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("--kv_cache_bytes=", options.cache_bytes, ": cannot allocate the KV cache"));
    }
    KvLayerView view;
    view.k = static_cast<float*>(k->data());
    view.v = static_cast<float*>(v->data());
    view.num_blocks = cache->num_blocks_;
    view.block_tokens = options.block_tokens;
    view.num_kv_heads = options.num_kv_heads;
    view.head_dim = options.head_dim;
    cache->layers_.push_back(view);
    cache->storage_.push_back(*std::move(k));
    cache->storage_.push_back(*std::move(v));
  }
  cache->free_.reserve(blocks);
  for (int32_t b = cache->num_blocks_ - 1; b >= 0; --b) cache->free_.push_back(b);
  return cache;
}

absl::Status KvCache::Allocate(int32_t n, std::vector<int32_t>* table) {
  if (n < 0) return absl::InvalidArgumentError("KvCache::Allocate: negative block count");
  if (static_cast<size_t>(n) > free_.size()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache full: ", n, " blocks needed, ",
                                                     free_.size(), " free of ", num_blocks_));
  }
  for (int32_t i = 0; i < n; ++i) {
    table->push_back(free_.back());
    free_.pop_back();
  }
  used_.fetch_add(n, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status KvCache::EnsureCapacity(int64_t num_tokens, std::vector<int32_t>* table) {
  const int64_t needed = (num_tokens + options_.block_tokens - 1) / options_.block_tokens;
  const int64_t have = static_cast<int64_t>(table->size());
  if (needed <= have) return absl::OkStatus();
  return Allocate(static_cast<int32_t>(needed - have), table);
}

void KvCache::Free(std::vector<int32_t>* table) {
  for (int32_t b : *table) free_.push_back(b);
  used_.fetch_sub(static_cast<int32_t>(table->size()), std::memory_order_relaxed);
  table->clear();
}

}  // namespace ls
