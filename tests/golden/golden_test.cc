// The model against Hugging Face: for every fixture in tests/golden/fixtures (tiny random
// Llama/Qwen2/Mistral models written and run by tools/make_fixtures.py), logits within 1e-4
// relative (max |ours - HF| over a row / max |HF| of that row) and 32-token greedy
// continuations token-identical, with fp32 weights and with bf16 weights (against HF run on
// the bf16-rounded weights). Then batch invariance: every row's logits are bit-identical alone,
// batched with other sequences, in prefill chunks of any size, and in decode steps mixed with
// other sequences' prefill.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/llama_model.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace ls {
namespace {

constexpr double kRelTolerance = 1e-4;
constexpr int kGreedySteps = 32;

std::string FixturesDir() {
  const char* src = std::getenv("LS_SOURCE_DIR");
  return std::string(src != nullptr ? src : ".") + "/tests/golden/fixtures";
}

std::vector<std::string> FixtureNames() {
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
  Harness(const std::string& dir, DType weights_dtype) {
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
    auto model = LlamaModel::Create(&config_, weights_.get(), backend_.get(), 256);
    EXPECT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
  }

  int vocab() const { return config_.vocab_size; }

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
  };

  // Runs the rows as one batch; returns the logits of the rows that asked, in order.
  std::vector<std::vector<float>> Run(const std::vector<Row>& rows) {
    size_t stride = 0;
    for (const auto& t : tables_) stride = std::max(stride, t.size());
    std::vector<int32_t> ids, positions, tables, logits_rows;
    for (size_t i = 0; i < rows.size(); ++i) {
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

int32_t Argmax(const std::vector<float>& row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

double RelativeError(const std::vector<float>& ours, const float* ref, int vocab) {
  double max_diff = 0, max_ref = 0;
  for (int v = 0; v < vocab; ++v) {
    max_diff = std::max(max_diff, std::abs(static_cast<double>(ours[v]) - ref[v]));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(ref[v])));
  }
  return max_diff / max_ref;
}

std::vector<Prompt> ReadExpected(const std::string& dir, const std::string& suffix) {
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

struct Param {
  std::string fixture;
  DType dtype;
};

class GoldenTest : public testing::TestWithParam<Param> {};

TEST_P(GoldenTest, MatchesHuggingFace) {
  const std::string dir = FixturesDir() + "/" + GetParam().fixture;
  const std::string suffix = GetParam().dtype == DType::kF32 ? "f32" : "bf16";
  Harness h(dir, GetParam().dtype);
  const int vocab = h.vocab();
  const std::vector<Prompt> prompts = ReadExpected(dir, suffix);

  // Each prompt alone: prefill with logits at every position, then greedy decode.
  std::vector<std::vector<std::vector<float>>> alone_prefill, alone_decode;
  for (const Prompt& p : prompts) {
    const int len = static_cast<int>(p.ids.size());
    const int seq = h.NewSequence(len + kGreedySteps);
    std::vector<Harness::Row> rows;
    for (int t = 0; t < len; ++t) rows.push_back({seq, p.ids[t], t, true});
    auto logits = h.Run(rows);
    for (int t = 0; t < len; ++t) {
      EXPECT_LE(RelativeError(logits[t], p.logits.data() + static_cast<size_t>(t) * vocab, vocab),
                kRelTolerance)
          << "position " << t << " of a " << len << "-token prompt";
    }
    std::vector<std::vector<float>> steps;
    int32_t next = Argmax(logits.back());
    std::vector<int32_t> generated;
    for (int s = 0; s < kGreedySteps; ++s) {
      generated.push_back(next);
      auto step = h.Run({{seq, next, len + s, true}});
      steps.push_back(step[0]);
      next = Argmax(step[0]);
    }
    EXPECT_EQ(generated, p.greedy) << "greedy continuation of a " << len << "-token prompt";
    alone_prefill.push_back(std::move(logits));
    alone_decode.push_back(std::move(steps));
  }

  // All prompts in one prefill batch: bit-identical to alone.
  {
    std::vector<Harness::Row> rows;
    std::vector<int> seqs;
    for (const Prompt& p : prompts) {
      const int seq = h.NewSequence(static_cast<int>(p.ids.size()) + kGreedySteps);
      seqs.push_back(seq);
      for (size_t t = 0; t < p.ids.size(); ++t) {
        rows.push_back({seq, p.ids[t], static_cast<int32_t>(t), true});
      }
    }
    auto logits = h.Run(rows);
    size_t k = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      for (size_t t = 0; t < prompts[i].ids.size(); ++t, ++k) {
        ASSERT_EQ(logits[k], alone_prefill[i][t])
            << "batched prefill, prompt " << i << " pos " << t;
      }
    }
    // Decode all sequences together, one step at a time: bit-identical to alone decode.
    for (int s = 0; s < kGreedySteps; ++s) {
      std::vector<Harness::Row> step;
      for (size_t i = 0; i < prompts.size(); ++i) {
        const int32_t token =
            s == 0 ? Argmax(alone_prefill[i].back()) : Argmax(alone_decode[i][s - 1]);
        step.push_back({seqs[i], token, static_cast<int32_t>(prompts[i].ids.size()) + s, true});
      }
      auto out = h.Run(step);
      for (size_t i = 0; i < prompts.size(); ++i) {
        ASSERT_EQ(out[i], alone_decode[i][s]) << "batched decode, prompt " << i << " step " << s;
      }
    }
  }

  // Chunked prefill (chunks of 1, 3 and 7 rows), each chunk sharing its batch with a decode row
  // of another sequence: bit-identical to alone.
  for (int chunk : {1, 3, 7}) {
    const Prompt& p = prompts.back();  // the longest prompts come last
    const int len = static_cast<int>(p.ids.size());
    const int seq = h.NewSequence(len + kGreedySteps);
    const Prompt& other = prompts.front();
    const int other_len = static_cast<int>(other.ids.size());
    const int other_seq = h.NewSequence(other_len + kGreedySteps);
    std::vector<Harness::Row> warm;
    for (int t = 0; t < other_len; ++t) warm.push_back({other_seq, other.ids[t], t, false});
    h.Run(warm);
    int decode_step = 0;
    for (int start = 0; start < len; start += chunk) {
      std::vector<Harness::Row> rows;
      const int32_t other_token = decode_step == 0 ? Argmax(alone_prefill[0].back())
                                                   : Argmax(alone_decode[0][decode_step - 1]);
      const bool other_active = decode_step < kGreedySteps;
      if (other_active) rows.push_back({other_seq, other_token, other_len + decode_step, true});
      for (int t = start; t < std::min(len, start + chunk); ++t) {
        rows.push_back({seq, p.ids[t], t, true});
      }
      auto out = h.Run(rows);
      size_t k = 0;
      if (other_active) {
        ASSERT_EQ(out[k++], alone_decode[0][decode_step]) << "decode beside a chunk of " << chunk;
        ++decode_step;
      }
      for (int t = start; t < std::min(len, start + chunk); ++t) {
        ASSERT_EQ(out[k++], alone_prefill.back()[t]) << "chunk " << chunk << " position " << t;
      }
    }
  }
}

std::vector<Param> AllParams() {
  std::vector<Param> params;
  for (const std::string& name : FixtureNames()) {
    params.push_back({name, DType::kF32});
    params.push_back({name, DType::kBF16});
  }
  return params;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenTest, testing::ValuesIn(AllParams()),
                         [](const testing::TestParamInfo<Param>& info) {
                           return info.param.fixture + "_" +
                                  (info.param.dtype == DType::kF32 ? "f32" : "bf16");
                         });

TEST(GoldenFixtures, Present) {
  // The suite above would silently instantiate nothing without fixtures.
  EXPECT_GE(FixtureNames().size(), 4u) << "no fixtures under " << FixturesDir();
}

}  // namespace
}  // namespace ls
