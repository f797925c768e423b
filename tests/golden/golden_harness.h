// Shared by the golden tests: the fixture directory, a Harness that loads one fixture model on
// the CPU backend with its own paged cache and runs batches of rows from several sequences
// (each row optionally with a LoRA adapter), and comparison helpers.
#ifndef LORASERVE_TESTS_GOLDEN_GOLDEN_HARNESS_H_
#define LORASERVE_TESTS_GOLDEN_GOLDEN_HARNESS_H_

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/llama_model.h"
#include "model/lora_adapter.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace ls {
namespace golden {

constexpr double kRelTolerance = 1e-4;
constexpr int kGreedySteps = 32;

inline std::string FixturesDir() {
  const char* src = std::getenv("LS_SOURCE_DIR");
  return std::string(src != nullptr ? src : ".") + "/tests/golden/fixtures";
}

inline std::vector<std::string> FixtureNames() {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(FixturesDir(), ec)) {
    if (entry.is_directory() && std::filesystem::exists(entry.path() / "expected.safetensors")) {
      names.push_back(entry.path().filename().string());
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

struct Prompt {
  std::vector<int32_t> ids;
  std::vector<float> logits;  // [len, vocab]
  std::vector<int32_t> greedy;
};

// One loaded model with its own cache; runs batches of rows from several sequences.
class Harness {
 public:
  Harness(const std::string& dir, DType weights_dtype, int32_t max_lora_rank = 0) {
    auto config = LoadModelConfig(dir, ConfigOptions{});
    EXPECT_TRUE(config.ok()) << config.status();
    config_ = std::move(*config);
    auto ckpt = SafetensorsCheckpoint::Open(dir);
    EXPECT_TRUE(ckpt.ok()) << ckpt.status();
    auto weights = LoadModelWeights(**ckpt, config_, weights_dtype);
    EXPECT_TRUE(weights.ok()) << weights.status();
    weights_ = std::move(*weights);
    CpuBackendOptions options;
    options.threads = 2;
    options.max_context = 256;
    auto backend = CpuBackend::Create(options);
    EXPECT_TRUE(backend.ok()) << backend.status();
    backend_ = std::move(*backend);
    KvCacheOptions kv;
    kv.num_layers = config_.num_hidden_layers;
    kv.num_kv_heads = config_.num_key_value_heads;
    kv.head_dim = config_.head_dim;
    kv.block_tokens = 4;  // small blocks: sequences span many, non-contiguous ones
    kv.cache_bytes = KvCache::BlockBytes(kv) * 1024;
    auto cache = KvCache::Create(kv);
    EXPECT_TRUE(cache.ok()) << cache.status();
    cache_ = std::move(*cache);
    auto model = LlamaModel::Create(&config_, weights_.get(), backend_.get(), 256, max_lora_rank);
    EXPECT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
  }

  int vocab() const { return config_.vocab_size; }
  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return *weights_; }

  // A new sequence with room for `tokens` positions; returns its index. Every other block of
  // the pool is skipped so that no table is contiguous.
  int NewSequence(int tokens) {
    tables_.emplace_back();
    const int blocks = (tokens + cache_->block_tokens() - 1) / cache_->block_tokens();
    for (int b = 0; b < blocks; ++b) {
      EXPECT_TRUE(cache_->Allocate(1, &tables_.back()).ok());
      EXPECT_TRUE(cache_->Allocate(1, &spare_).ok());
    }
    return static_cast<int>(tables_.size()) - 1;
  }

  struct Row {
    int seq;
    int32_t token;
    int32_t pos;
    bool logits;
    const LoraGroupTable* adapter = nullptr;  // null: the base model
  };

  // Runs the rows as one batch; returns the logits of the rows that asked, in order.
  std::vector<std::vector<float>> Run(const std::vector<Row>& rows) {
    size_t stride = 0;
    for (const auto& t : tables_) stride = std::max(stride, t.size());
    std::vector<int32_t> ids, positions, tables, logits_rows;
    std::vector<const LoraGroupTable*> adapters;
    bool any_adapter = false;
    for (size_t i = 0; i < rows.size(); ++i) {
      adapters.push_back(rows[i].adapter);
      any_adapter = any_adapter || rows[i].adapter != nullptr;
      ids.push_back(rows[i].token);
      positions.push_back(rows[i].pos);
      const auto& t = tables_[static_cast<size_t>(rows[i].seq)];
      std::vector<int32_t> padded(stride, -1);
      std::copy(t.begin(), t.end(), padded.begin());
      tables.insert(tables.end(), padded.begin(), padded.end());
      if (rows[i].logits) logits_rows.push_back(static_cast<int32_t>(i));
    }
    ForwardBatch batch;
    batch.token_ids = ids;
    batch.positions = positions;
    batch.block_tables = tables;
    batch.block_table_stride = static_cast<int64_t>(stride);
    batch.logits_rows = logits_rows;
    if (any_adapter) batch.row_adapters = adapters;
    std::vector<float> out(logits_rows.size() * static_cast<size_t>(vocab()));
    const absl::Status status = model_->Forward(batch, *cache_, out.data());
    EXPECT_TRUE(status.ok()) << status;
    std::vector<std::vector<float>> result;
    for (size_t j = 0; j < logits_rows.size(); ++j) {
      result.emplace_back(out.begin() + static_cast<ptrdiff_t>(j * vocab()),
                          out.begin() + static_cast<ptrdiff_t>((j + 1) * vocab()));
    }
    return result;
  }

 private:
  ModelConfig config_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<CpuBackend> backend_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<LlamaModel> model_;
  std::vector<std::vector<int32_t>> tables_;
  std::vector<int32_t> spare_;
};

inline int32_t Argmax(const std::vector<float>& row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

inline double RelativeError(const std::vector<float>& ours, const float* ref, int vocab) {
  double max_diff = 0, max_ref = 0;
  for (int v = 0; v < vocab; ++v) {
    max_diff = std::max(max_diff, std::abs(static_cast<double>(ours[v]) - ref[v]));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(ref[v])));
  }
  return max_diff / max_ref;
}

inline std::vector<Prompt> ReadExpected(const std::string& dir, const std::string& suffix) {
  auto file = SafetensorsFile::Open(dir + "/expected.safetensors");
  EXPECT_TRUE(file.ok()) << file.status();
  std::vector<Prompt> prompts;
  for (int i = 0;; ++i) {
    const std::string p = "prompt" + std::to_string(i);
    const SafetensorsEntry* ids = (*file)->Find(p + ".ids");
    if (ids == nullptr) break;
    Prompt prompt;
    prompt.ids.resize(static_cast<size_t>(ids->numel()));
    SafetensorsFile::CopyTo(*ids, prompt.ids.data());
    const SafetensorsEntry* greedy = (*file)->Find(p + ".greedy_" + suffix);
    const SafetensorsEntry* logits = (*file)->Find(p + ".logits_" + suffix);
    EXPECT_NE(greedy, nullptr);
    EXPECT_NE(logits, nullptr);
    if (greedy == nullptr || logits == nullptr) break;
    prompt.greedy.resize(static_cast<size_t>(greedy->numel()));
    SafetensorsFile::CopyTo(*greedy, prompt.greedy.data());
    auto values = (*file)->ReadAsFloat32(*logits);
    EXPECT_TRUE(values.ok()) << values.status();
    prompt.logits = std::move(*values);
    prompts.push_back(std::move(prompt));
  }
  EXPECT_GE(prompts.size(), 4u) << dir;
  return prompts;
}

}  // namespace golden
}  // namespace ls

#endif  // LORASERVE_TESTS_GOLDEN_GOLDEN_HARNESS_H_
