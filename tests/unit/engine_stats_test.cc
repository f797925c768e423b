// The engine's numbers for metrics (Engine::Stats, Engine::AdapterSets; docs/metrics.md): the
// waiting/running counts and the adapter id sets of vllm:lora_requests_info through a request's
// life, the per-step histograms (tokens, distinct adapters) against the step and row counters,
// and queue times. A reader thread polls both while requests run, as scrapes do (the test runs
// in the ThreadSanitizer lane, label `concurrency`).
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "model/adapter_store.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "server/engine/engine.h"

namespace ls {
namespace {

std::string FixtureDir() {
  const char* dir = std::getenv("LS_SOURCE_DIR");
  return absl::StrCat(dir != nullptr ? dir : ".", "/tests/golden/fixtures/llama_gqa");
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }

// Waits for OnFinish and keeps the result.
class WaitSink : public RequestSink {
 public:
  void OnTokens(absl::Span<const int32_t> ids, absl::string_view, const SampleResult*) override {
    MutexLock lock(&mu_);
    tokens_ += static_cast<int>(ids.size());
  }
  void OnFinish(const EngineResult& result) override {
    MutexLock lock(&mu_);
    result_ = result;
    finished_ = true;
    done_.SignalAll();
  }
  EngineResult Wait() {
    MutexLock lock(&mu_);
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (!finished_ && absl::Now() < deadline) done_.WaitWithDeadline(&mu_, deadline);
    EXPECT_TRUE(finished_) << "request did not finish";
    return result_;
  }
  int tokens() const {
    MutexLock lock(&mu_);
    return tokens_;
  }

 private:
  mutable Mutex mu_;
  CondVar done_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  int tokens_ ABSL_GUARDED_BY(mu_) = 0;
  EngineResult result_ ABSL_GUARDED_BY(mu_);
};

class EngineStatsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<ModelConfig> config = LoadModelConfig(FixtureDir(), ConfigOptions{});
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = *std::move(config);
    auto ckpt = SafetensorsCheckpoint::Open(FixtureDir());
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    auto weights = LoadModelWeights(**ckpt, config_, DType::kF32);
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = *std::move(weights);
    CpuBackendOptions backend_options;
    backend_options.threads = 1;
    backend_options.max_context = 256;
    auto backend = CpuBackend::Create(backend_options);
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = *std::move(backend);
    auto model = LlamaModel::Create(&config_, weights_.get(), backend_.get(), 64, 64);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);

    // Three ids over copies of one fixture adapter: three distinct adapter versions.
    std::string tmpl = ::testing::TempDir() + "/engine_stats_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    const std::string src = absl::StrCat(FixtureDir(), "/adapters/attn_r4");
    for (const char* id : {"zeta", "alpha", "mid"}) {
      const std::string dir = absl::StrCat(root_, "/", id);
      ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
      for (absl::string_view file : {kAdapterConfigFile, kAdapterWeightsFile}) {
        std::ofstream out(absl::StrCat(dir, "/", file), std::ios::binary);
        out << ReadFile(absl::StrCat(src, "/", file));
        ASSERT_TRUE(out.good());
      }
    }
    auto store = AdapterStore::Open(root_);
    ASSERT_TRUE(store.ok()) << store.status();
    AdapterRegistryOptions options;
    options.page_bytes = size_t{64} << 10;
    options.pool_bytes = size_t{8} << 20;
    options.dtype = DType::kF32;
    options.max_lora_rank = 64;
    options.loader_nice = 0;
    auto registry = AdapterRegistry::Create(*std::move(store), config_, weights_.get(), options);
    ASSERT_TRUE(registry.ok()) << registry.status();
    registry_ = *std::move(registry);

    KvCacheOptions kv;
    kv.num_layers = config_.num_hidden_layers;
    kv.num_kv_heads = config_.num_key_value_heads;
    kv.head_dim = config_.head_dim;
    kv.block_tokens = 4;
    kv.cache_bytes = KvCache::BlockBytes(kv) * 256;
    auto cache = KvCache::Create(kv);
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
    EngineOptions eo;
    eo.max_step_tokens = 64;
    eo.max_model_len = 256;
    auto engine = Engine::Create(eo, model_.get(), cache_.get(), config_, registry_.get(), nullptr);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
  }

  void TearDown() override {
    engine_.reset();  // drops the requests' adapter refs before the registry goes
    registry_.reset();
    if (!root_.empty()) ::nftw(root_.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS);
  }

  // Submits a greedy request of `max_new` tokens on `adapter` ("" = base).
  std::shared_ptr<WaitSink> Submit(const std::string& adapter, int32_t first_token,
                                   uint32_t max_new) {
    EngineRequest request;
    request.prompt_token_ids = {first_token, 17, 42, 99, 7};
    request.sampling.temperature = 0.0f;
    request.sampling.max_new_tokens = max_new;
    request.sampling.ignore_eos = true;
    if (!adapter.empty()) {
      absl::StatusOr<AdapterRef> ref = registry_->Acquire(adapter);
      EXPECT_TRUE(ref.ok()) << ref.status();
      if (ref.ok()) request.adapter = *std::move(ref);
    }
    auto sink = std::make_shared<WaitSink>();
    const absl::Status submitted = engine_->Submit(std::move(request), sink);
    EXPECT_TRUE(submitted.ok()) << submitted;
    return sink;
  }

  ModelConfig config_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<CpuBackend> backend_;
  std::unique_ptr<LlamaModel> model_;
  std::string root_;
  std::unique_ptr<AdapterRegistry> registry_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<Engine> engine_;
};

uint64_t Sum(const uint64_t* counts, int n) {
  uint64_t total = 0;
  for (int i = 0; i < n; ++i) total += counts[i];
  return total;
}

TEST_F(EngineStatsTest, CountsAdapterSetsAndStepHistogramsThroughARequestsLife) {
  // Resident first (refs dropped; nothing evicts them from the roomy pool), so the engine can
  // run all six requests from its first step.
  for (const char* id : {"zeta", "alpha", "mid"}) {
    absl::StatusOr<AdapterRef> ref = registry_->Acquire(id);
    ASSERT_TRUE(ref.ok()) << ref.status();
    ASSERT_TRUE(registry_->WaitResident(*ref, absl::Now() + absl::Seconds(30)).ok());
  }
  // Submitted before the engine starts: all waiting, every adapter id listed once, sorted.
  std::vector<std::shared_ptr<WaitSink>> sinks;
  const std::vector<std::string> adapters = {"zeta", "alpha", "mid", "", "zeta", "alpha"};
  for (size_t i = 0; i < adapters.size(); ++i) {
    sinks.push_back(Submit(adapters[i], static_cast<int32_t>(3 + i), 24));
  }
  EngineStats before = engine_->Stats();
  EXPECT_EQ(before.num_waiting, 6);
  EXPECT_EQ(before.num_running, 0);
  EngineAdapterSets sets = engine_->AdapterSets();
  EXPECT_EQ(sets.waiting, (std::vector<std::string>{"alpha", "mid", "zeta"}));
  EXPECT_TRUE(sets.running.empty());

  // A reader polls while the engine runs, as scrapes do.
  std::atomic<bool> stop{false};
  std::atomic<int> saw_running{0};
  std::thread reader([&] {
    while (!stop.load()) {
      const EngineStats s = engine_->Stats();
      const EngineAdapterSets now = engine_->AdapterSets();
      EXPECT_GE(s.num_waiting, 0);
      EXPECT_LE(s.num_waiting + s.num_running, 6);
      EXPECT_LE(now.running.size(), 3u);
      for (size_t i = 1; i < now.running.size(); ++i) EXPECT_LT(now.running[i - 1], now.running[i]);
      if (!now.running.empty()) saw_running.fetch_add(1);
      std::this_thread::yield();
    }
  });
  ASSERT_TRUE(engine_->Start().ok());
  int tokens = 0;
  for (auto& sink : sinks) {
    const EngineResult result = sink->Wait();
    EXPECT_EQ(result.reason, EngineFinishReason::kLength) << result.status;
    EXPECT_NE(result.queue_time, absl::InfiniteDuration());
    EXPECT_GE(result.queue_time, absl::ZeroDuration());
    tokens += sink->tokens();
  }
  stop.store(true);
  reader.join();

  const EngineStats s = engine_->Stats();
  EXPECT_EQ(s.num_waiting, 0);
  EXPECT_EQ(s.num_running, 0);
  EXPECT_EQ(s.kv_used_blocks, 0);
  sets = engine_->AdapterSets();
  EXPECT_TRUE(sets.running.empty() && sets.waiting.empty());
  EXPECT_EQ(tokens, 6 * 24);
  EXPECT_EQ(s.tokens_generated, static_cast<uint64_t>(tokens));
  // Each step is in exactly one bucket of each histogram; the rows add up.
  EXPECT_GT(s.steps, 0u);
  EXPECT_EQ(Sum(s.step_rows_buckets, EngineStats::kNumStepRowsBuckets + 1), s.steps);
  EXPECT_EQ(Sum(s.step_adapters_buckets, EngineStats::kNumStepAdaptersBuckets + 1), s.steps);
  EXPECT_EQ(s.step_rows_sum, s.rows_prefill + s.rows_decode);
  EXPECT_EQ(s.rows_prefill, 6u * 5u);  // the prompts, each fed once (no preemption here)
  EXPECT_EQ(s.rows_decode, 6u * 23u);  // the last sampled token is never fed back
  // The first step ran all six together: three distinct adapters (the bucket le=3).
  EXPECT_GE(s.step_adapters_buckets[3], 1u);
  EXPECT_EQ(EngineStats::kStepAdaptersBounds[3], 3);
  EXPECT_GE(s.step_adapters_sum, 3u);
}

TEST_F(EngineStatsTest, StopBeforeStartClearsTheWaitingCounts) {
  auto sink = Submit("alpha", 5, 4);
  EXPECT_EQ(engine_->Stats().num_waiting, 1);
  engine_->Stop();
  EXPECT_EQ(sink->Wait().reason, EngineFinishReason::kCancelled);
  EXPECT_EQ(engine_->Stats().num_waiting, 0);
  EXPECT_TRUE(engine_->AdapterSets().waiting.empty());
}

}  // namespace
}  // namespace ls
