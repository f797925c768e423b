// Engine (server/engine/engine.h) over the llama_gqa fixture model on the CPU backend, with
// the fixture's PEFT adapters served by an AdapterRegistry over a temporary copy of them. Every
// greedy output is compared with the same request run alone through LlamaModel (a plain
// prefill-then-decode loop): one request, many concurrent ones from several threads on mixed
// adapters and lengths, and the same under a KV pool small enough to force preemption. Also
// cancellation and deadlines (KV blocks back to zero), a full queue (RESOURCE_EXHAUSTED),
// max_new_tokens and stop token ids, request validation, and Stop() draining or cancelling.
// Runs in the ThreadSanitizer lane (label `concurrency`).
#include "server/engine/engine.h"

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
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

namespace ls {
namespace {

constexpr int32_t kMaxRank = 64;
constexpr int64_t kModelRows = 64;

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

// One generation request of a test, and what running it alone gave.
struct Spec {
  std::vector<int32_t> prompt;
  std::string adapter;  // "" = base
  uint32_t max_new = 8;
  std::vector<int32_t> stop_ids;
  bool ignore_eos = false;
  // Filled by Reference().
  std::vector<int32_t> want;
  EngineFinishReason want_reason = EngineFinishReason::kError;
};

// Collects one request's output; Wait() blocks until OnFinish.
class CollectSink : public RequestSink {
 public:
  // Sets `cancel` once `after` tokens have arrived (0: never).
  void CancelAfter(int after, std::shared_ptr<std::atomic<bool>> cancel) {
    MutexLock lock(&mu_);
    cancel_after_ = after;
    cancel_ = std::move(cancel);
  }

  void OnTokens(absl::Span<const int32_t> ids, absl::string_view text,
                const SampleResult* sample) override {
    MutexLock lock(&mu_);
    EXPECT_FALSE(finished_) << "tokens after OnFinish";
    // A sampled token always comes with its result; the final flush never does.
    EXPECT_EQ(ids.size(), sample != nullptr ? 1u : 0u);
    if (sample != nullptr) {
      EXPECT_EQ(sample->token_id, ids[0]);
    }
    tokens_.insert(tokens_.end(), ids.begin(), ids.end());
    text_.append(text.data(), text.size());
    if (cancel_ != nullptr && cancel_after_ > 0 &&
        static_cast<int>(tokens_.size()) >= cancel_after_) {
      cancel_->store(true);
    }
  }

  void OnFinish(const EngineResult& result) override {
    MutexLock lock(&mu_);
    ++finish_calls_;
    finished_ = true;
    result_ = result;
    done_.SignalAll();
  }

  // Waits up to 60 s (TSan is slow) for OnFinish.
  EngineResult Wait() {
    MutexLock lock(&mu_);
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    while (!finished_ && absl::Now() < deadline) done_.WaitWithDeadline(&mu_, deadline);
    EXPECT_TRUE(finished_) << "request did not finish";
    return result_;
  }
  std::vector<int32_t> tokens() const {
    MutexLock lock(&mu_);
    return tokens_;
  }
  int finish_calls() const {
    MutexLock lock(&mu_);
    return finish_calls_;
  }

 private:
  mutable Mutex mu_;  // guards everything below
  CondVar done_;
  std::vector<int32_t> tokens_ ABSL_GUARDED_BY(mu_);
  std::string text_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  int finish_calls_ ABSL_GUARDED_BY(mu_) = 0;
  EngineResult result_ ABSL_GUARDED_BY(mu_);
  int cancel_after_ ABSL_GUARDED_BY(mu_) = 0;
  std::shared_ptr<std::atomic<bool>> cancel_ ABSL_GUARDED_BY(mu_);
};

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<ModelConfig> config = LoadModelConfig(FixtureDir(), ConfigOptions{});
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = new ModelConfig(*std::move(config));
    auto ckpt = SafetensorsCheckpoint::Open(FixtureDir());
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    auto weights = LoadModelWeights(**ckpt, *config_, DType::kF32);
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = weights->release();
    CpuBackendOptions backend_options;
    backend_options.threads = 2;
    backend_options.max_context = 256;
    auto backend = CpuBackend::Create(backend_options);
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = backend->release();
    auto model = LlamaModel::Create(config_, weights_, backend_, kModelRows, kMaxRank);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();

    // The adapter root: copies of the fixture adapters under ids a_<name>.
    std::string tmpl = ::testing::TempDir() + "/engine_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = new std::string(tmpl);
    for (const char* name : {"attn_r4", "all_linear_r16_patterns", "layers1_excl_r8",
                             "rslora_r64_regex", "embed_head_r8"}) {
      const std::string src = absl::StrCat(FixtureDir(), "/adapters/", name);
      const std::string dir = absl::StrCat(*root_, "/a_", name);
      ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
      for (absl::string_view file : {kAdapterConfigFile, kAdapterWeightsFile}) {
        std::ofstream out(absl::StrCat(dir, "/", file), std::ios::binary);
        out << ReadFile(absl::StrCat(src, "/", file));
        ASSERT_TRUE(out.good());
      }
    }
    auto store = AdapterStore::Open(*root_);
    ASSERT_TRUE(store.ok()) << store.status();
    AdapterRegistryOptions options;
    options.page_bytes = size_t{64} << 10;
    options.pool_bytes = size_t{32} << 20;
    options.host_cache_bytes = size_t{64} << 20;
    options.dtype = DType::kF32;
    options.max_lora_rank = kMaxRank;
    options.loader_nice = 0;
    auto registry = AdapterRegistry::Create(*std::move(store), *config_, weights_, options);
    ASSERT_TRUE(registry.ok()) << registry.status();
    registry_ = registry->release();

    KvCacheOptions kv = KvOptions(4);
    kv.cache_bytes = KvCache::BlockBytes(kv) * 80;
    auto ref_cache = KvCache::Create(kv);
    ASSERT_TRUE(ref_cache.ok()) << ref_cache.status();
    ref_cache_ = ref_cache->release();
  }

  static void TearDownTestSuite() {
    delete ref_cache_;
    delete registry_;
    if (root_ != nullptr) ::nftw(root_->c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS);
    delete root_;
    delete model_;
    delete backend_;
    delete weights_;
    delete config_;
  }

  static KvCacheOptions KvOptions(int block_tokens) {
    KvCacheOptions kv;
    kv.num_layers = config_->num_hidden_layers;
    kv.num_kv_heads = config_->num_key_value_heads;
    kv.head_dim = config_->head_dim;
    kv.block_tokens = block_tokens;
    return kv;
  }

  static AdapterRef Acquire(const std::string& id) {
    if (id.empty()) return AdapterRef();
    absl::StatusOr<AdapterRef> ref = registry_->Acquire(id);
    EXPECT_TRUE(ref.ok()) << id << ": " << ref.status();
    return ref.ok() ? *std::move(ref) : AdapterRef();
  }

  static SamplingParams Params(const Spec& spec) {
    SamplingParams p;
    p.temperature = 0.0f;
    p.max_new_tokens = spec.max_new;
    p.stop_token_ids = spec.stop_ids;
    p.ignore_eos = spec.ignore_eos;
    return p;
  }

  // Runs `spec` alone straight through LlamaModel: the whole prompt in one forward, then one
  // decode row per token. Fills spec->want and want_reason.
  static void Reference(Spec* spec) {
    AdapterRef ref = Acquire(spec->adapter);
    if (!spec->adapter.empty()) {
      ASSERT_TRUE(registry_->WaitResident(ref, absl::Now() + absl::Seconds(30)).ok());
    }
    SamplingParams params = Params(*spec);
    params.eos_token_ids = config_->eos_token_ids;
    auto sampler =
        SequenceSampler::Create(params, spec->prompt, static_cast<int32_t>(config_->vocab_size));
    ASSERT_TRUE(sampler.ok()) << sampler.status();
    std::vector<int32_t> tokens = spec->prompt;
    std::vector<int32_t> table;
    ASSERT_TRUE(
        ref_cache_->EnsureCapacity(static_cast<int64_t>(tokens.size() + spec->max_new), &table)
            .ok());
    std::vector<float> logits(static_cast<size_t>(config_->vocab_size));
    size_t pos = 0;
    spec->want.clear();
    for (;;) {
      std::vector<int32_t> ids(tokens.begin() + static_cast<ptrdiff_t>(pos), tokens.end());
      std::vector<int32_t> positions, tables;
      std::vector<const LoraGroupTable*> adapters;
      for (size_t i = pos; i < tokens.size(); ++i) {
        positions.push_back(static_cast<int32_t>(i));
        tables.insert(tables.end(), table.begin(), table.end());
        adapters.push_back(ref.groups());
      }
      const std::vector<int32_t> logits_rows = {static_cast<int32_t>(ids.size()) - 1};
      ForwardBatch batch;
      batch.token_ids = ids;
      batch.positions = positions;
      batch.block_tables = tables;
      batch.block_table_stride = static_cast<int64_t>(table.size());
      batch.logits_rows = logits_rows;
      if (ref.groups() != nullptr) batch.row_adapters = adapters;
      const absl::Status forward = model_->Forward(batch, *ref_cache_, logits.data());
      ASSERT_TRUE(forward.ok()) << forward;
      absl::StatusOr<SampleResult> sample = (*sampler)->Sample(logits);
      ASSERT_TRUE(sample.ok()) << sample.status();
      spec->want.push_back(sample->token_id);
      pos = tokens.size();
      tokens.push_back(sample->token_id);
      if (sample->finish_reason != FinishReason::kNone) {
        switch (sample->finish_reason) {
          case FinishReason::kEos:
            spec->want_reason = EngineFinishReason::kEos;
            break;
          case FinishReason::kStopToken:
            spec->want_reason = EngineFinishReason::kStop;
            break;
          default:
            spec->want_reason = EngineFinishReason::kLength;
            break;
        }
        break;
      }
    }
    ref_cache_->Free(&table);
  }

  // A cache of `blocks` blocks of `block_tokens` tokens and an engine over it (not started).
  void MakeEngine(int32_t blocks, int block_tokens, EngineOptions options) {
    engine_.reset();
    KvCacheOptions kv = KvOptions(block_tokens);
    kv.cache_bytes = KvCache::BlockBytes(kv) * static_cast<uint64_t>(blocks);
    auto cache = KvCache::Create(kv);
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
    auto engine = Engine::Create(options, model_, cache_.get(), *config_, registry_, nullptr);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
  }

  void TearDown() override {
    if (engine_ != nullptr) engine_->Stop(absl::InfinitePast());
    engine_.reset();
    if (cache_ != nullptr) {
      EXPECT_EQ(cache_->used_blocks(), 0);
    }
  }

  absl::Status Submit(const Spec& spec, std::shared_ptr<CollectSink> sink,
                      std::shared_ptr<std::atomic<bool>> cancel = nullptr,
                      absl::Time deadline = absl::InfiniteFuture()) {
    EngineRequest request;
    request.prompt_token_ids = spec.prompt;
    request.sampling = Params(spec);
    request.adapter = Acquire(spec.adapter);
    request.cancelled = std::move(cancel);
    request.deadline = deadline;
    return engine_->Submit(std::move(request), std::move(sink));
  }

  // Mixed lengths and adapters (5 adapters and the base model), with references.
  static std::vector<Spec> MixedSpecs(int n) {
    static const char* const kAdapters[] = {"",
                                            "a_attn_r4",
                                            "a_all_linear_r16_patterns",
                                            "a_layers1_excl_r8",
                                            "a_rslora_r64_regex",
                                            "a_embed_head_r8"};
    static const int kLengths[] = {1, 3, 5, 8, 13, 21, 34, 40, 2, 17};
    std::mt19937 rng(1234);
    std::uniform_int_distribution<int32_t> token(3, static_cast<int32_t>(config_->vocab_size) - 1);
    std::vector<Spec> specs(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      Spec& s = specs[static_cast<size_t>(i)];
      s.prompt.resize(static_cast<size_t>(kLengths[i % 10]));
      for (int32_t& t : s.prompt) t = token(rng);
      s.adapter = kAdapters[i % 6];
      s.max_new = static_cast<uint32_t>(4 + (i * 5) % 13);
      s.ignore_eos = i % 3 != 0;
      Reference(&s);
    }
    return specs;
  }

  // Submits every spec from `threads` threads, waits, and checks each output against its
  // reference. Returns the total number of preemptions.
  int RunAndCheck(const std::vector<Spec>& specs, int threads) {
    std::vector<std::shared_ptr<CollectSink>> sinks;
    for (size_t i = 0; i < specs.size(); ++i) sinks.push_back(std::make_shared<CollectSink>());
    std::vector<std::thread> submitters;
    for (int t = 0; t < threads; ++t) {
      submitters.emplace_back([&, t] {
        for (size_t i = static_cast<size_t>(t); i < specs.size();
             i += static_cast<size_t>(threads)) {
          const absl::Status status = Submit(specs[i], sinks[i]);
          EXPECT_TRUE(status.ok()) << status;
        }
      });
    }
    for (std::thread& t : submitters) t.join();
    int preemptions = 0;
    for (size_t i = 0; i < specs.size(); ++i) {
      const EngineResult result = sinks[i]->Wait();
      EXPECT_TRUE(result.status.ok()) << i << ": " << result.status;
      EXPECT_EQ(sinks[i]->tokens(), specs[i].want)
          << "request " << i << " adapter " << specs[i].adapter;
      EXPECT_EQ(result.reason, specs[i].want_reason) << i;
      EXPECT_EQ(result.usage.completion_tokens, static_cast<int32_t>(specs[i].want.size()));
      EXPECT_EQ(result.usage.prompt_tokens, static_cast<int32_t>(specs[i].prompt.size()));
      EXPECT_EQ(result.adapter_id, specs[i].adapter);
      EXPECT_EQ(sinks[i]->finish_calls(), 1);
      preemptions += result.usage.num_preemptions;
    }
    return preemptions;
  }

  static ModelConfig* config_;
  static ModelWeights* weights_;
  static CpuBackend* backend_;
  static LlamaModel* model_;
  static std::string* root_;
  static AdapterRegistry* registry_;
  static KvCache* ref_cache_;

  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<Engine> engine_;
};

ModelConfig* EngineTest::config_ = nullptr;
ModelWeights* EngineTest::weights_ = nullptr;
CpuBackend* EngineTest::backend_ = nullptr;
LlamaModel* EngineTest::model_ = nullptr;
std::string* EngineTest::root_ = nullptr;
AdapterRegistry* EngineTest::registry_ = nullptr;
KvCache* EngineTest::ref_cache_ = nullptr;

EngineOptions SmallSteps() {
  EngineOptions options;
  options.max_step_tokens = 32;  // long prompts prefill in chunks, mixed with decode rows
  options.max_loras_per_step = 3;
  options.max_model_len = 256;
  options.max_queued_requests = 64;
  return options;
}

TEST_F(EngineTest, GreedyOutputEqualsSoloRun) {
  std::vector<Spec> specs(2);
  specs[0].prompt = {5, 17, 99, 42, 7, 250, 13, 8, 64};
  specs[0].max_new = 20;
  specs[0].ignore_eos = true;
  specs[1] = specs[0];
  specs[1].adapter = "a_all_linear_r16_patterns";
  for (Spec& s : specs) Reference(&s);
  EXPECT_NE(specs[0].want, specs[1].want) << "the adapter should change the output";
  MakeEngine(64, 4, SmallSteps());
  ASSERT_TRUE(engine_->Start().ok());
  for (const Spec& s : specs) {
    auto sink = std::make_shared<CollectSink>();
    ASSERT_TRUE(Submit(s, sink).ok());
    const EngineResult result = sink->Wait();
    EXPECT_TRUE(result.status.ok()) << result.status;
    EXPECT_EQ(result.reason, EngineFinishReason::kLength);
    EXPECT_EQ(sink->tokens(), s.want);
    if (!s.adapter.empty()) {
      EXPECT_FALSE(result.adapter_version.empty());
    }
  }
}

TEST_F(EngineTest, ConcurrentMixedAdaptersEqualSoloRuns) {
  const std::vector<Spec> specs = MixedSpecs(30);
  MakeEngine(256, 4, SmallSteps());
  ASSERT_TRUE(engine_->Start().ok());
  RunAndCheck(specs, 4);
  const EngineStats stats = engine_->Stats();
  EXPECT_GT(stats.steps, 0u);
  EXPECT_EQ(stats.num_in_flight, 0);
  EXPECT_EQ(stats.num_queued, 0);
  EXPECT_EQ(cache_->used_blocks(), 0);
}

TEST_F(EngineTest, PreemptionKeepsOutputs) {
  const std::vector<Spec> specs = MixedSpecs(18);
  // 16 blocks of 4 tokens: the longest request (40 + 16 tokens) fits alone, few fit together.
  MakeEngine(16, 4, SmallSteps());
  ASSERT_TRUE(engine_->Start().ok());
  const int preemptions = RunAndCheck(specs, 3);
  EXPECT_GT(preemptions, 0) << "the pool should have been too small";
  EXPECT_GT(engine_->Stats().preemptions, 0u);
  EXPECT_EQ(cache_->used_blocks(), 0);
}

TEST_F(EngineTest, CancelMidGenerationFreesBlocks) {
  MakeEngine(64, 4, SmallSteps());
  ASSERT_TRUE(engine_->Start().ok());
  Spec spec;
  spec.prompt = {11, 12, 13, 14, 15, 16, 17, 18, 19, 20};
  spec.max_new = 200;
  spec.ignore_eos = true;
  spec.adapter = "a_attn_r4";
  auto cancel = std::make_shared<std::atomic<bool>>(false);
  auto sink = std::make_shared<CollectSink>();
  sink->CancelAfter(3, cancel);
  ASSERT_TRUE(Submit(spec, sink, cancel).ok());
  const EngineResult result = sink->Wait();
  EXPECT_EQ(result.reason, EngineFinishReason::kCancelled);
  EXPECT_EQ(result.status.code(), absl::StatusCode::kCancelled);
  EXPECT_GE(sink->tokens().size(), 3u);
  EXPECT_LT(sink->tokens().size(), 200u);
  EXPECT_EQ(cache_->used_blocks(), 0);  // freed before OnFinish

  // A deadline that has passed: dropped at the next step boundary.
  auto late = std::make_shared<CollectSink>();
  ASSERT_TRUE(Submit(spec, late, nullptr, absl::Now() - absl::Seconds(1)).ok());
  const EngineResult timed_out = late->Wait();
  EXPECT_EQ(timed_out.reason, EngineFinishReason::kDeadline);
  EXPECT_EQ(timed_out.status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(cache_->used_blocks(), 0);
}

TEST_F(EngineTest, QueueFullIsResourceExhausted) {
  EngineOptions options = SmallSteps();
  options.max_queued_requests = 2;
  MakeEngine(64, 4, options);
  Spec spec;
  spec.prompt = {3, 4, 5};
  spec.max_new = 4;
  spec.ignore_eos = true;
  Reference(&spec);
  auto a = std::make_shared<CollectSink>();
  auto b = std::make_shared<CollectSink>();
  auto c = std::make_shared<CollectSink>();
  ASSERT_TRUE(Submit(spec, a).ok());
  ASSERT_TRUE(Submit(spec, b).ok());
  EXPECT_EQ(Submit(spec, c).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(engine_->Stats().num_queued, 2);
  ASSERT_TRUE(engine_->Start().ok());
  EXPECT_EQ(a->Wait().reason, EngineFinishReason::kLength);
  EXPECT_EQ(b->Wait().reason, EngineFinishReason::kLength);
  EXPECT_EQ(a->tokens(), spec.want);
  EXPECT_EQ(b->tokens(), spec.want);
  EXPECT_EQ(c->finish_calls(), 0);
  ASSERT_TRUE(Submit(spec, c).ok());  // room again
  EXPECT_EQ(c->Wait().reason, EngineFinishReason::kLength);
}

// max_queue_seconds: a request still waiting for its first step at its queue deadline ends
// with RESOURCE_EXHAUSTED; others run as usual.
TEST_F(EngineTest, QueueDeadlineEndsWaitingRequests) {
  MakeEngine(64, 4, SmallSteps());
  Spec spec;
  spec.prompt = {3, 4, 5};
  spec.max_new = 4;
  spec.ignore_eos = true;
  Reference(&spec);
  const auto submit = [&](absl::Time queue_deadline, std::shared_ptr<CollectSink> sink) {
    EngineRequest request;
    request.prompt_token_ids = spec.prompt;
    request.sampling = Params(spec);
    request.queue_deadline = queue_deadline;
    return engine_->Submit(std::move(request), std::move(sink));
  };
  auto expired = std::make_shared<CollectSink>();
  auto generous = std::make_shared<CollectSink>();
  auto unlimited = std::make_shared<CollectSink>();
  ASSERT_TRUE(submit(absl::Now() + absl::Milliseconds(20), expired).ok());
  ASSERT_TRUE(submit(absl::Now() + absl::Hours(1), generous).ok());
  ASSERT_TRUE(submit(absl::InfiniteFuture(), unlimited).ok());
  absl::SleepFor(absl::Milliseconds(50));  // the engine has not started: all three still wait
  ASSERT_TRUE(engine_->Start().ok());
  const EngineResult result = expired->Wait();
  EXPECT_EQ(result.reason, EngineFinishReason::kError);
  EXPECT_EQ(result.status.code(), absl::StatusCode::kResourceExhausted) << result.status;
  EXPECT_TRUE(expired->tokens().empty());
  EXPECT_EQ(generous->Wait().reason, EngineFinishReason::kLength);
  EXPECT_EQ(unlimited->Wait().reason, EngineFinishReason::kLength);
  EXPECT_EQ(generous->tokens(), spec.want);
  EXPECT_EQ(unlimited->tokens(), spec.want);
}

TEST_F(EngineTest, MaxTokensAndStopTokenIds) {
  MakeEngine(64, 4, SmallSteps());
  ASSERT_TRUE(engine_->Start().ok());
  Spec spec;
  spec.prompt = {40, 41, 42, 43, 44};
  spec.max_new = 5;
  spec.ignore_eos = true;
  Reference(&spec);
  auto sink = std::make_shared<CollectSink>();
  ASSERT_TRUE(Submit(spec, sink).ok());
  EXPECT_EQ(sink->Wait().reason, EngineFinishReason::kLength);
  EXPECT_EQ(sink->tokens(), spec.want);
  EXPECT_EQ(sink->tokens().size(), 5u);

  // Stop at the first occurrence of the run's fourth token (the token itself is emitted).
  Spec stop = spec;
  stop.max_new = 12;
  Reference(&stop);
  const int32_t stop_id = stop.want[3];
  const size_t first = static_cast<size_t>(std::find(stop.want.begin(), stop.want.end(), stop_id) -
                                           stop.want.begin());
  stop.stop_ids = {stop_id};
  Reference(&stop);
  ASSERT_EQ(stop.want_reason, EngineFinishReason::kStop);
  ASSERT_EQ(stop.want.size(), first + 1);
  auto stopped = std::make_shared<CollectSink>();
  ASSERT_TRUE(Submit(stop, stopped).ok());
  const EngineResult result = stopped->Wait();
  EXPECT_EQ(result.reason, EngineFinishReason::kStop);
  EXPECT_TRUE(result.status.ok());
  EXPECT_EQ(stopped->tokens(), stop.want);
}

TEST_F(EngineTest, InvalidRequestsAreRefused) {
  MakeEngine(16, 4, SmallSteps());
  auto sink = std::make_shared<CollectSink>();
  Spec spec;
  spec.prompt = {1, 2, 300};  // 300 is outside the 256-token vocabulary
  EXPECT_EQ(Submit(spec, sink).code(), absl::StatusCode::kInvalidArgument);
  spec.prompt = {};
  EXPECT_EQ(Submit(spec, sink).code(), absl::StatusCode::kInvalidArgument);
  spec.prompt = std::vector<int32_t>(60, 7);  // 60 + 8 tokens > the 64-token pool
  EXPECT_EQ(Submit(spec, sink).code(), absl::StatusCode::kInvalidArgument);
  spec.prompt = {7};
  spec.max_new = 0;
  EXPECT_EQ(Submit(spec, sink).code(), absl::StatusCode::kInvalidArgument);
  EngineRequest request;
  request.prompt_token_ids = {7};
  request.sampling.max_new_tokens = 4;
  request.stop_strings = {"x"};  // no Detokenizer
  EXPECT_EQ(engine_->Submit(std::move(request), sink).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sink->finish_calls(), 0);
}

TEST_F(EngineTest, StopDrainsOrCancels) {
  MakeEngine(64, 4, SmallSteps());
  Spec spec;
  spec.prompt = {9, 8, 7, 6};
  spec.max_new = 6;
  spec.ignore_eos = true;
  Reference(&spec);
  auto drained = std::make_shared<CollectSink>();
  ASSERT_TRUE(Submit(spec, drained).ok());
  ASSERT_TRUE(engine_->Start().ok());
  engine_->Stop();  // drains: the queued request runs to the end
  EXPECT_EQ(drained->Wait().reason, EngineFinishReason::kLength);
  EXPECT_EQ(drained->tokens(), spec.want);
  EXPECT_EQ(Submit(spec, std::make_shared<CollectSink>()).code(), absl::StatusCode::kUnavailable);

  // A fresh engine stopped at once: in-flight requests are cancelled, blocks freed.
  MakeEngine(64, 4, SmallSteps());
  spec.max_new = 200;
  std::vector<std::shared_ptr<CollectSink>> sinks;
  for (int i = 0; i < 3; ++i) {
    sinks.push_back(std::make_shared<CollectSink>());
    ASSERT_TRUE(Submit(spec, sinks.back()).ok());
  }
  ASSERT_TRUE(engine_->Start().ok());
  engine_->Stop(absl::InfinitePast());
  for (const auto& sink : sinks) {
    const EngineResult result = sink->Wait();
    EXPECT_EQ(result.reason, EngineFinishReason::kCancelled);
    EXPECT_EQ(sink->finish_calls(), 1);
  }
  EXPECT_EQ(cache_->used_blocks(), 0);
}

}  // namespace
}  // namespace ls
