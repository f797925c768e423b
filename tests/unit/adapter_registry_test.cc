// AdapterRegistry (server/adapters/registry.h) over the llama_gqa fixture model and copies of its
// PEFT adapters placed under fresh ids in a temporary adapter root: references that keep a
// version alive across Unload and replace, pins, LRU eviction order, eviction until a
// contiguous run fits a fragmented pool, an adapter larger than the pool, waiting with a timeout
// (RESOURCE_EXHAUSTED naming the bytes held), unknown ids, failed loads, the host cache, and a
// concurrent stress run (refs, Load/Unload/Pin/Reload and file replacement racing) whose
// invariants are that a ref's groups stay byte-identical while it lives and that every byte of
// accounting returns to zero. Runs in the ThreadSanitizer lane (label `concurrency`); the
// stress run lasts LS_REGISTRY_STRESS_MS milliseconds (default 1500).
#include "server/adapters/registry.h"

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/adapter_store.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace ls {
namespace {

using ::testing::HasSubstr;

constexpr absl::string_view kModel = "llama_gqa";
constexpr absl::string_view kAttn = "attn_r4";
constexpr absl::string_view kAllLinear = "all_linear_r16_patterns";
constexpr absl::string_view kLayers1 = "layers1_excl_r8";
constexpr absl::string_view kEmbedHead = "embed_head_r8";
constexpr absl::string_view kRslora = "rslora_r64_regex";

std::string SourceDir() {
  const char* dir = std::getenv("LS_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

std::string FixtureDir() { return absl::StrCat(SourceDir(), "/tests/golden/fixtures/", kModel); }

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
  ASSERT_TRUE(out.good()) << path;
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }

class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "/adapter_registry_test.XXXXXX";
    char* made = ::mkdtemp(tmpl.data());
    EXPECT_NE(made, nullptr);
    path_ = tmpl;
  }
  ~TempDir() { ::nftw(path_.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// FNV-1a over every matrix a group table points at (A, then each slice's B, of every group), in
// table order: equal hashes for equal bytes, whatever the addresses.
uint64_t HashBytes(uint64_t h, const void* data, size_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

uint64_t HashView(uint64_t h, const WeightView& w) {
  if (w.data == nullptr) return h;
  const size_t bytes =
      static_cast<size_t>(w.rows * w.cols) * static_cast<size_t>(DTypeBits(w.dtype) / 8);
  return HashBytes(h, w.data, bytes);
}

uint64_t HashGroup(uint64_t h, const LoraGroup& g) {
  if (g.num_slices == 0) return h;
  h = HashView(h, g.a);
  for (int j = 0; j < g.num_slices; ++j) {
    h = HashView(h, g.slices[j].b);
    h = HashBytes(h, &g.slices[j].scale, sizeof(float));
  }
  return h;
}

uint64_t HashTable(const LoraGroupTable& t) {
  uint64_t h = 1469598103934665603ull;
  for (int layer = 0; layer < t.num_layers(); ++layer) {
    for (int p = 0; p < kNumLoraProjections; ++p) {
      h = HashGroup(h, t.group(layer, static_cast<LoraProjection>(p)));
    }
  }
  h = HashGroup(h, t.lm_head());
  return HashGroup(h, t.embed());
}

// One fixture adapter as loaded directly through an AdapterStore: its size, version and bytes.
struct Expected {
  size_t packed_bytes = 0;
  std::string version;
  uint64_t hash = 0;
};

class AdapterRegistryTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<ModelConfig> config = LoadModelConfig(FixtureDir(), {});
    ASSERT_TRUE(config.ok()) << config.status();
    config_ = new ModelConfig(*config);
    absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
        SafetensorsCheckpoint::Open(FixtureDir());
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    absl::StatusOr<std::unique_ptr<ModelWeights>> weights =
        LoadModelWeights(**ckpt, *config_, DType::kBF16);
    ASSERT_TRUE(weights.ok()) << weights.status();
    weights_ = weights->release();

    // What each fixture adapter looks like when loaded directly (in a scratch root, so that no
    // version cache is written into the source tree).
    expected_ = new std::map<std::string, Expected>();
    TempDir scratch;
    for (absl::string_view name : {kAttn, kAllLinear, kLayers1, kEmbedHead, kRslora}) {
      CopyFixture(scratch.path(), std::string(name), name);
    }
    absl::StatusOr<std::unique_ptr<AdapterStore>> store = AdapterStore::Open(scratch.path());
    ASSERT_TRUE(store.ok()) << store.status();
    for (absl::string_view name : {kAttn, kAllLinear, kLayers1, kEmbedHead, kRslora}) {
      LoraLoadOptions options;
      options.base_weights = weights_;
      absl::StatusOr<LoadedAdapter> loaded = (*store)->Load(name, *config_, options);
      ASSERT_TRUE(loaded.ok()) << loaded.status();
      Expected& e = (*expected_)[std::string(name)];
      e.packed_bytes = loaded->adapter->packed_bytes();
      e.version = loaded->version.sha256;
      e.hash = HashTable(loaded->adapter->groups());
    }
  }

  static void TearDownTestSuite() {
    delete weights_;
    delete config_;
    delete expected_;
  }

  // Copies fixture adapter `fixture` into <root>/<id>/ (a plain directory).
  static void CopyFixture(const std::string& root, const std::string& id,
                          absl::string_view fixture) {
    const std::string src = absl::StrCat(FixtureDir(), "/adapters/", fixture);
    const std::string dir = absl::StrCat(root, "/", id);
    ::mkdir(dir.c_str(), 0755);
    WriteFile(absl::StrCat(dir, "/", kAdapterConfigFile),
              ReadFile(absl::StrCat(src, "/", kAdapterConfigFile)));
    WriteFile(absl::StrCat(dir, "/", kAdapterWeightsFile),
              ReadFile(absl::StrCat(src, "/", kAdapterWeightsFile)));
  }

  static const Expected& Want(absl::string_view fixture) {
    return expected_->at(std::string(fixture));
  }
  static size_t Round256(size_t n) { return (n + 255) / 256 * 256; }

  void Add(const std::string& id, absl::string_view fixture) {
    CopyFixture(root_.path(), id, fixture);
  }

  // Replaces <root>/<id>'s files by renaming new ones in, as docs/adapters.md asks.
  void Replace(const std::string& id, absl::string_view fixture,
               const std::string& config_override = "") {
    const std::string src = absl::StrCat(FixtureDir(), "/adapters/", fixture);
    const std::string dir = absl::StrCat(root_.path(), "/", id);
    const std::string config = config_override.empty()
                                   ? ReadFile(absl::StrCat(src, "/", kAdapterConfigFile))
                                   : config_override;
    WriteFile(dir + "/.new-config", config);
    WriteFile(dir + "/.new-weights", ReadFile(absl::StrCat(src, "/", kAdapterWeightsFile)));
    ASSERT_EQ(::rename((dir + "/.new-config").c_str(),
                       absl::StrCat(dir, "/", kAdapterConfigFile).c_str()),
              0);
    ASSERT_EQ(::rename((dir + "/.new-weights").c_str(),
                       absl::StrCat(dir, "/", kAdapterWeightsFile).c_str()),
              0);
  }

  std::unique_ptr<AdapterRegistry> Make(AdapterRegistryOptions options) {
    absl::StatusOr<std::unique_ptr<AdapterStore>> store = AdapterStore::Open(root_.path());
    EXPECT_TRUE(store.ok()) << store.status();
    if (!store.ok()) return nullptr;
    absl::StatusOr<std::unique_ptr<AdapterRegistry>> registry =
        AdapterRegistry::Create(*std::move(store), *config_, weights_, options);
    EXPECT_TRUE(registry.ok()) << registry.status();
    return registry.ok() ? *std::move(registry) : nullptr;
  }

  // Options for a pool of `pages` pages of `page_bytes`.
  static AdapterRegistryOptions PoolOptions(size_t page_bytes, size_t pages) {
    AdapterRegistryOptions options;
    options.page_bytes = page_bytes;
    options.pool_bytes = page_bytes * pages;
    options.host_cache_bytes = size_t{64} << 20;
    options.wait_timeout = absl::Seconds(10);
    return options;
  }

  static absl::Time Soon() { return absl::Now() + absl::Seconds(20); }

  // Acquires `id` and waits until it is resident.
  static AdapterRef AcquireResident(AdapterRegistry& registry, const std::string& id) {
    absl::StatusOr<AdapterRef> ref = registry.Acquire(id);
    EXPECT_TRUE(ref.ok()) << id << ": " << ref.status();
    if (!ref.ok()) return AdapterRef();
    const absl::Status resident = registry.WaitResident(*ref, Soon());
    EXPECT_TRUE(resident.ok()) << id << ": " << resident;
    return *std::move(ref);
  }

  // Loads `id` into the pool and lets it go (unreferenced, evictable).
  static void Touch(AdapterRegistry& registry, const std::string& id) {
    AdapterRef ref = AcquireResident(registry, id);
  }

  static AdapterInfo Info(const AdapterRegistry& registry, const std::string& id) {
    absl::StatusOr<AdapterInfo> info = registry.Get(id);
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? *info : AdapterInfo();
  }

  // Waits (up to 20 s) until the loader threads have let go of everything.
  static AdapterRegistryStats WaitDrained(const AdapterRegistry& registry) {
    const absl::Time deadline = Soon();
    AdapterRegistryStats stats = registry.Stats();
    while (
        (stats.pool_used_pages_bytes != 0 || stats.host_bytes != 0 || stats.live_versions != 0) &&
        absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(5));
      stats = registry.Stats();
    }
    return stats;
  }

  static ModelConfig* config_;
  static ModelWeights* weights_;
  static std::map<std::string, Expected>* expected_;
  TempDir root_;
};

ModelConfig* AdapterRegistryTest::config_ = nullptr;
ModelWeights* AdapterRegistryTest::weights_ = nullptr;
std::map<std::string, Expected>* AdapterRegistryTest::expected_ = nullptr;

// ---- Basics ----------------------------------------------------------------------------------

TEST(AdapterPagePool, FirstFitRunsAndFragmentation) {
  absl::StatusOr<std::unique_ptr<AdapterPoolMemory>> memory = MakeHostPoolMemory(8 * 1024);
  ASSERT_TRUE(memory.ok());
  EXPECT_EQ(AdapterPagePool::Create(nullptr, 1024).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::unique_ptr<AdapterPagePool>> made =
      AdapterPagePool::Create(*std::move(memory), 1024);
  ASSERT_TRUE(made.ok());
  AdapterPagePool& pool = **made;
  EXPECT_EQ(pool.num_pages(), 8);
  EXPECT_EQ(pool.PagesFor(0), 1);
  EXPECT_EQ(pool.PagesFor(1024), 1);
  EXPECT_EQ(pool.PagesFor(1025), 2);
  std::vector<PageRun> runs;
  for (int i = 0; i < 4; ++i) {
    std::optional<PageRun> run = pool.Allocate(2);
    ASSERT_TRUE(run.has_value());
    EXPECT_EQ(run->first, 2 * i);
    runs.push_back(*run);
  }
  EXPECT_FALSE(pool.Allocate(1).has_value());
  pool.Free(runs[1]);
  pool.Free(runs[3]);
  EXPECT_EQ(pool.free_pages(), 4);
  EXPECT_EQ(pool.LargestFreeRun(), 2);
  EXPECT_FALSE(pool.Allocate(3).has_value());  // 4 pages free, not 3 in a row
  EXPECT_FALSE(pool.FitsIfFreed(3, {}));
  EXPECT_TRUE(pool.FitsIfFreed(4, {runs[2]}));  // pages 2..7
  EXPECT_EQ(pool.free_pages(), 4);              // FitsIfFreed changes nothing
  std::optional<PageRun> one = pool.Allocate(1);
  ASSERT_TRUE(one.has_value());
  EXPECT_EQ(one->first, 2);  // first fit
  EXPECT_EQ(
      static_cast<uint8_t*>(pool.Address(*one)) - static_cast<uint8_t*>(pool.Address(runs[0])),
      2 * 1024);
  const std::vector<uint8_t> bytes(1500, 7);
  EXPECT_EQ(pool.CopyIn(*one, bytes.data(), bytes.size()).code(),
            absl::StatusCode::kInvalidArgument);  // 1500 > one page
  EXPECT_TRUE(pool.CopyIn(runs[0], bytes.data(), bytes.size()).ok());
  EXPECT_EQ(static_cast<uint8_t*>(pool.Address(runs[0]))[1499], 7);
}

TEST_F(AdapterRegistryTest, BaseModelAndUnknownIds) {
  std::unique_ptr<AdapterRegistry> registry = Make(AdapterRegistryOptions{});
  ASSERT_NE(registry, nullptr);
  absl::StatusOr<AdapterRef> base = registry->Acquire("");
  ASSERT_TRUE(base.ok());
  EXPECT_TRUE(base->is_base());
  EXPECT_EQ(base->key(), 0u);
  EXPECT_TRUE(base->resident());
  EXPECT_EQ(base->groups(), nullptr);
  EXPECT_EQ(base->id(), "");
  absl::StatusOr<bool> resident = registry->TryMakeResident(*base, absl::InfiniteFuture());
  ASSERT_TRUE(resident.ok());
  EXPECT_TRUE(*resident);

  // Never a silent fallback to the base model.
  EXPECT_EQ(registry->Acquire("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry->Acquire("../etc").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry->Get("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry->Unload("missing").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry->Pin("missing").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry->Unpin("missing").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry->Load("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry->Stats().live_versions, 0);
}

TEST_F(AdapterRegistryTest, OptionsAreValidated) {
  AdapterRegistryOptions options;
  options.page_bytes = 1000;
  EXPECT_THAT(options.Validate().message(), HasSubstr("multiple of 256"));
  options = AdapterRegistryOptions{};
  options.pool_bytes = 1024;
  options.page_bytes = 4096;
  EXPECT_THAT(options.Validate().message(), HasSubstr("at least one page"));
  options = AdapterRegistryOptions{};
  options.loader_threads = 0;
  EXPECT_FALSE(options.Validate().ok());
}

TEST_F(AdapterRegistryTest, AcquireLoadsAndPlacesTheExactBytes) {
  Add("a", kAttn);
  Add("b", kAllLinear);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);

  AdapterRef a = AcquireResident(*registry, "a");
  ASSERT_TRUE(a.resident());
  ASSERT_NE(a.groups(), nullptr);
  EXPECT_EQ(a.id(), "a");
  EXPECT_EQ(a.version(), Want(kAttn).version);
  EXPECT_EQ(a.packed_bytes(), Want(kAttn).packed_bytes);
  EXPECT_EQ(HashTable(*a.groups()), Want(kAttn).hash);
  EXPECT_EQ(a.groups()->num_layers(), config_->num_hidden_layers);

  AdapterRef a2 = AcquireResident(*registry, "a");
  EXPECT_EQ(a2.key(), a.key());
  EXPECT_EQ(a2.groups(), a.groups());
  AdapterRef b = AcquireResident(*registry, "b");
  EXPECT_NE(b.key(), a.key());
  EXPECT_EQ(HashTable(*b.groups()), Want(kAllLinear).hash);

  AdapterInfo info = Info(*registry, "a");
  EXPECT_EQ(info.state, AdapterState::kResident);
  EXPECT_EQ(info.version, Want(kAttn).version);
  EXPECT_EQ(info.refs, 2);
  EXPECT_TRUE(info.in_pool);
  ASSERT_NE(info.report, nullptr);
  EXPECT_EQ(info.report->packed_bytes, Want(kAttn).packed_bytes);

  AdapterRegistryStats stats = registry->Stats();
  EXPECT_EQ(stats.loads, 2u);
  EXPECT_EQ(stats.placements, 2u);
  EXPECT_EQ(stats.refs, 3);
  EXPECT_EQ(stats.pool_bytes, Want(kAttn).packed_bytes + Want(kAllLinear).packed_bytes);
  EXPECT_EQ(stats.pool_referenced_bytes, stats.pool_used_pages_bytes);

  a = AdapterRef();
  a2.Reset();
  b.Reset();
  info = Info(*registry, "a");
  EXPECT_EQ(info.refs, 0);
  EXPECT_EQ(info.state, AdapterState::kResident);  // cached until evicted
  stats = registry->Stats();
  EXPECT_EQ(stats.refs, 0);
  EXPECT_EQ(stats.pool_referenced_bytes, 0u);

  // A moved ref releases once.
  AdapterRef c = AcquireResident(*registry, "a");
  AdapterRef d = std::move(c);
  EXPECT_TRUE(c.is_base());  // NOLINT(bugprone-use-after-move): moved-from state is specified
  EXPECT_EQ(registry->Stats().refs, 1);
  d.Reset();
  EXPECT_EQ(registry->Stats().refs, 0);

  absl::StatusOr<std::vector<AdapterInfo>> list = registry->List();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].id, "a");
  EXPECT_EQ((*list)[1].id, "b");
}

TEST_F(AdapterRegistryTest, EngineCallsNeverWaitAndConcurrentRequestsShareOneLoad) {
  Add("a", kAllLinear);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      absl::StatusOr<AdapterRef> ref = registry->Acquire("a");
      if (!ref.ok()) return;
      // The engine's way: poll between steps.
      while (true) {
        absl::StatusOr<bool> resident = registry->TryMakeResident(*ref, absl::InfiniteFuture());
        if (!resident.ok()) return;
        if (*resident) break;
        absl::SleepFor(absl::Microseconds(200));
      }
      if (HashTable(*ref->groups()) == Want(kAllLinear).hash) ++ok;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(ok.load(), 8);
  EXPECT_EQ(registry->Stats().loads, 1u);
  EXPECT_EQ(registry->Stats().placements, 1u);
}

TEST_F(AdapterRegistryTest, FailedLoadSurfacesTheReportUntilLoadAgain) {
  Add("bad", kAttn);
  const std::string good_config = ReadFile(absl::StrCat(root_.path(), "/bad/", kAdapterConfigFile));
  const std::string bad_config =
      absl::StrReplaceAll(good_config, {{"\"use_dora\": false", "\"use_dora\": true"}});
  ASSERT_NE(bad_config, good_config);
  Replace("bad", kAttn, bad_config);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);

  // The first request learns it from its ref; later ones at Acquire.
  absl::StatusOr<AdapterRef> ref = registry->Acquire("bad");
  ASSERT_TRUE(ref.ok()) << ref.status();
  absl::Status waited = registry->WaitResident(*ref, Soon());
  EXPECT_EQ(waited.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(waited.message(), HasSubstr("use_dora"));
  EXPECT_THAT(waited.message(), HasSubstr("adapter \"bad\""));
  absl::StatusOr<bool> again = registry->TryMakeResident(*ref, absl::InfiniteFuture());
  EXPECT_EQ(again.status(), waited);
  ref->Reset();
  EXPECT_EQ(registry->Acquire("bad").status(), waited);
  AdapterInfo info = Info(*registry, "bad");
  EXPECT_EQ(info.state, AdapterState::kFailed);
  EXPECT_EQ(info.status, waited);
  EXPECT_EQ(registry->Load("bad").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry->Stats().load_failures, 2u);

  // Fixed files load once the operator asks.
  Replace("bad", kAttn);
  absl::StatusOr<AdapterInfo> loaded = registry->Load("bad");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->state, AdapterState::kResident);
  EXPECT_EQ(loaded->version, Want(kAttn).version);
  ASSERT_NE(loaded->report, nullptr);
  EXPECT_EQ(loaded->report->r, 4);
  AdapterRef good = AcquireResident(*registry, "bad");
  EXPECT_EQ(HashTable(*good.groups()), Want(kAttn).hash);
  EXPECT_EQ(registry->Stats().refs, 1);
}

TEST_F(AdapterRegistryTest, AdapterLargerThanThePoolFailsAtLoadNamingBothSizes) {
  Add("small", kAttn);
  Add("big", kAllLinear);
  const size_t page = Round256(Want(kAttn).packed_bytes);
  ASSERT_GT(Want(kAllLinear).packed_bytes, page);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(page, 1));
  ASSERT_NE(registry, nullptr);

  absl::StatusOr<AdapterRef> big = registry->Acquire("big");
  ASSERT_TRUE(big.ok());
  const absl::Status status = registry->WaitResident(*big, Soon());
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(status.message(), HasSubstr(absl::StrCat(Want(kAllLinear).packed_bytes, " bytes")));
  EXPECT_THAT(status.message(), HasSubstr(absl::StrCat(page, " bytes")));
  EXPECT_THAT(status.message(), HasSubstr("adapter_pool_bytes"));
  big->Reset();
  EXPECT_EQ(registry->Acquire("big").status(), status);
  EXPECT_EQ(registry->Load("big").status(), status);
  EXPECT_EQ(Info(*registry, "big").state, AdapterState::kFailed);

  AdapterRef small = AcquireResident(*registry, "small");
  EXPECT_EQ(HashTable(*small.groups()), Want(kAttn).hash);
}

// ---- Unload and replace ----------------------------------------------------------------------

TEST_F(AdapterRegistryTest, UnloadKeepsReferencedVersionUntilTheLastRefDrops) {
  Add("a", kAttn);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);
  AdapterRef ref = AcquireResident(*registry, "a");
  const LoraGroupTable* groups = ref.groups();
  ASSERT_NE(groups, nullptr);

  ASSERT_TRUE(registry->Unload("a").ok());
  ASSERT_TRUE(registry->Unload("a").ok());  // idempotent
  absl::StatusOr<AdapterRef> after = registry->Acquire("a");
  EXPECT_EQ(after.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(after.status().message(), HasSubstr("unloaded"));
  AdapterInfo info = Info(*registry, "a");
  EXPECT_EQ(info.state, AdapterState::kDisabled);
  EXPECT_EQ(info.refs, 1);
  ASSERT_EQ(info.versions.size(), 1u);
  EXPECT_FALSE(info.versions[0].current);
  EXPECT_TRUE(info.versions[0].in_pool);

  // The in-flight request keeps exactly its bytes.
  absl::StatusOr<bool> resident = registry->TryMakeResident(ref, absl::InfiniteFuture());
  ASSERT_TRUE(resident.ok());
  EXPECT_TRUE(*resident);
  EXPECT_EQ(ref.groups(), groups);
  EXPECT_EQ(HashTable(*ref.groups()), Want(kAttn).hash);
  EXPECT_EQ(registry->Stats().pool_bytes, Want(kAttn).packed_bytes);

  ref.Reset();
  AdapterRegistryStats stats = registry->Stats();
  EXPECT_EQ(stats.pool_used_pages_bytes, 0u);
  EXPECT_EQ(stats.host_bytes, 0u);
  EXPECT_EQ(stats.live_versions, 0);
  EXPECT_EQ(Info(*registry, "a").versions.size(), 0u);

  // Persisted: a registry started over the same root sees the id disabled.
  EXPECT_TRUE(Exists(absl::StrCat(root_.path(), "/a/", kAdapterDisabledFile)));
  {
    std::unique_ptr<AdapterRegistry> restarted = Make(PoolOptions(4096, 64));
    ASSERT_NE(restarted, nullptr);
    EXPECT_EQ(restarted->Acquire("a").status().code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(Info(*restarted, "a").state, AdapterState::kDisabled);
  }

  // Load enables it again.
  absl::StatusOr<AdapterInfo> loaded = registry->Load("a");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_FALSE(Exists(absl::StrCat(root_.path(), "/a/", kAdapterDisabledFile)));
  AdapterRef again = AcquireResident(*registry, "a");
  EXPECT_EQ(HashTable(*again.groups()), Want(kAttn).hash);
}

TEST_F(AdapterRegistryTest, ReplaceCreatesANewVersionAndOldRefsFinishOnTheOld) {
  Add("x", kAttn);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);
  AdapterRef old_ref = AcquireResident(*registry, "x");
  const LoraGroupTable* old_groups = old_ref.groups();
  EXPECT_EQ(old_ref.version(), Want(kAttn).version);

  Replace("x", kRslora);
  // Until Reload, new requests still get the version in memory.
  AdapterRef before_reload = AcquireResident(*registry, "x");
  EXPECT_EQ(before_reload.key(), old_ref.key());

  absl::StatusOr<AdapterReloadResult> reloaded = registry->Reload("x");
  ASSERT_TRUE(reloaded.ok()) << reloaded.status();
  EXPECT_TRUE(reloaded->new_version);
  EXPECT_EQ(reloaded->previous_version, Want(kAttn).version);
  EXPECT_EQ(reloaded->info.version, Want(kRslora).version);
  ASSERT_EQ(reloaded->info.versions.size(), 2u);
  EXPECT_TRUE(reloaded->info.versions[0].current);
  EXPECT_EQ(reloaded->info.versions[1].version, Want(kAttn).version);
  EXPECT_EQ(reloaded->info.versions[1].refs, 2);

  AdapterRef new_ref = AcquireResident(*registry, "x");
  EXPECT_NE(new_ref.key(), old_ref.key());
  EXPECT_EQ(new_ref.version(), Want(kRslora).version);
  EXPECT_EQ(HashTable(*new_ref.groups()), Want(kRslora).hash);
  EXPECT_EQ(old_ref.groups(), old_groups);
  EXPECT_EQ(HashTable(*old_ref.groups()), Want(kAttn).hash);
  EXPECT_EQ(HashTable(*before_reload.groups()), Want(kAttn).hash);

  // Same files: no new version.
  absl::StatusOr<AdapterReloadResult> same = registry->Reload("x");
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_FALSE(same->new_version);
  EXPECT_EQ(same->info.version, Want(kRslora).version);

  // A broken replacement leaves the current version serving.
  Replace("x", kAttn, "{not json");
  absl::StatusOr<AdapterReloadResult> broken = registry->Reload("x");
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Info(*registry, "x").version, Want(kRslora).version);
  EXPECT_EQ(Info(*registry, "x").state, AdapterState::kResident);
  AdapterRef still = AcquireResident(*registry, "x");
  EXPECT_EQ(still.key(), new_ref.key());

  old_ref.Reset();
  EXPECT_EQ(Info(*registry, "x").versions.size(), 2u);
  before_reload.Reset();
  EXPECT_EQ(Info(*registry, "x").versions.size(), 1u);  // the old version is freed
  EXPECT_EQ(registry->Stats().pool_bytes, Want(kRslora).packed_bytes);
}

// ---- Pins, LRU, fragmentation, waiting -------------------------------------------------------

TEST_F(AdapterRegistryTest, PinsPreventEviction) {
  for (const char* id : {"p", "a", "b"}) Add(id, kAttn);
  const size_t page = Round256(Want(kAttn).packed_bytes);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(page, 2));
  ASSERT_NE(registry, nullptr);

  ASSERT_TRUE(registry->Pin("p").ok());
  EXPECT_EQ(Info(*registry, "p").pins, 1);
  EXPECT_EQ(Info(*registry, "p").state, AdapterState::kResident);
  Touch(*registry, "a");
  Touch(*registry, "b");  // evicts a: p is older but pinned
  EXPECT_TRUE(Info(*registry, "p").in_pool);
  EXPECT_FALSE(Info(*registry, "a").in_pool);
  EXPECT_TRUE(Info(*registry, "b").in_pool);
  Touch(*registry, "a");  // evicts b
  EXPECT_TRUE(Info(*registry, "p").in_pool);
  EXPECT_FALSE(Info(*registry, "b").in_pool);
  EXPECT_EQ(registry->Stats().pool_pinned_bytes, page);

  ASSERT_TRUE(registry->Unpin("p").ok());
  EXPECT_EQ(registry->Unpin("p").code(), absl::StatusCode::kFailedPrecondition);
  Touch(*registry, "b");  // now p, the least recently used, goes
  EXPECT_FALSE(Info(*registry, "p").in_pool);
  EXPECT_TRUE(Info(*registry, "a").in_pool);
  EXPECT_EQ(registry->Stats().pool_evictions, 3u);
}

TEST_F(AdapterRegistryTest, EvictsLeastRecentlyUsedFirst) {
  for (const char* id : {"a", "b", "c", "d", "e"}) Add(id, kAttn);
  const size_t page = Round256(Want(kAttn).packed_bytes);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(page, 3));
  ASSERT_NE(registry, nullptr);
  Touch(*registry, "a");
  Touch(*registry, "b");
  Touch(*registry, "c");
  Touch(*registry, "a");  // LRU order now b, c, a
  Touch(*registry, "d");
  EXPECT_FALSE(Info(*registry, "b").in_pool);
  EXPECT_TRUE(Info(*registry, "a").in_pool);
  EXPECT_TRUE(Info(*registry, "c").in_pool);
  Touch(*registry, "e");
  EXPECT_FALSE(Info(*registry, "c").in_pool);
  EXPECT_TRUE(Info(*registry, "a").in_pool);
  EXPECT_TRUE(Info(*registry, "d").in_pool);
  EXPECT_EQ(registry->Stats().pool_evictions, 2u);
  // Evicted versions stayed in the host cache: nothing was read from disk again.
  EXPECT_EQ(Info(*registry, "b").state, AdapterState::kHost);
  Touch(*registry, "b");
  EXPECT_EQ(registry->Stats().loads, 5u);
}

TEST_F(AdapterRegistryTest, FragmentedPoolEvictsLruUntilAContiguousRunFits) {
  for (const char* id : {"s1", "s2", "s3", "s4"}) Add(id, kAttn);
  Add("big", kAllLinear);
  // Small adapters take one page, the big one two.
  const size_t page =
      Round256(std::max(Want(kAttn).packed_bytes, (Want(kAllLinear).packed_bytes + 1) / 2));
  ASSERT_GT(Want(kAllLinear).packed_bytes, page);
  AdapterRegistryOptions options = PoolOptions(page, 4);
  options.wait_timeout = absl::Milliseconds(100);
  std::unique_ptr<AdapterRegistry> registry = Make(options);
  ASSERT_NE(registry, nullptr);

  for (const char* id : {"s1", "s2", "s3", "s4"}) Touch(*registry, id);
  EXPECT_EQ(Info(*registry, "s1").pool_run.first, 0);
  EXPECT_EQ(Info(*registry, "s2").pool_run.first, 1);
  EXPECT_EQ(Info(*registry, "s3").pool_run.first, 2);
  EXPECT_EQ(Info(*registry, "s4").pool_run.first, 3);
  // s1 and s3 in use: pages 0 and 2 held, so evicting s2 and s4 (pages 1, 3) cannot make a
  // two-page run, and nothing is evicted for nothing.
  AdapterRef s1 = AcquireResident(*registry, "s1");
  AdapterRef s3 = AcquireResident(*registry, "s3");
  absl::StatusOr<AdapterRef> big = registry->Acquire("big");
  ASSERT_TRUE(big.ok());
  const absl::Status waited = registry->WaitResident(*big, Soon());
  EXPECT_EQ(waited.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(waited.message(), HasSubstr("needs 2 contiguous pages"));
  EXPECT_THAT(waited.message(), HasSubstr(absl::StrCat("holds ", 2 * page, " bytes (")));
  EXPECT_THAT(waited.message(), HasSubstr("for 2 referenced adapters"));
  EXPECT_THAT(waited.message(), HasSubstr("0 bytes for 0 pinned adapters"));
  EXPECT_EQ(registry->Stats().pool_evictions, 0u);
  EXPECT_TRUE(Info(*registry, "s2").in_pool);
  EXPECT_TRUE(Info(*registry, "s4").in_pool);
  EXPECT_EQ(registry->Stats().waiting_versions, 1);

  // Releasing s3 makes room: s2, s4, s3 are evicted in LRU order until pages 1-2 are free.
  s3.Reset();
  AdapterRef big2 = AcquireResident(*registry, "big");
  EXPECT_EQ(HashTable(*big2.groups()), Want(kAllLinear).hash);
  EXPECT_EQ(Info(*registry, "big").pool_run.first, 1);
  EXPECT_EQ(Info(*registry, "big").pool_run.count, 2);
  EXPECT_TRUE(Info(*registry, "s1").in_pool);
  EXPECT_FALSE(Info(*registry, "s2").in_pool);
  EXPECT_FALSE(Info(*registry, "s3").in_pool);
  EXPECT_FALSE(Info(*registry, "s4").in_pool);
  EXPECT_EQ(registry->Stats().pool_evictions, 3u);
  EXPECT_EQ(registry->Stats().waiting_versions, 0);
  EXPECT_EQ(HashTable(*s1.groups()), Want(kAttn).hash);
}

TEST_F(AdapterRegistryTest, FullPoolWaitsThenFailsNamingBytesHeld) {
  for (const char* id : {"p", "r", "c"}) Add(id, kAttn);
  const size_t page = Round256(Want(kAttn).packed_bytes);
  AdapterRegistryOptions options = PoolOptions(page, 2);
  options.wait_timeout = absl::Milliseconds(300);
  std::unique_ptr<AdapterRegistry> registry = Make(options);
  ASSERT_NE(registry, nullptr);
  ASSERT_TRUE(registry->Pin("p").ok());
  AdapterRef r = AcquireResident(*registry, "r");

  // The engine's path: pending at first, then the timeout (the request has no deadline).
  absl::StatusOr<AdapterRef> c = registry->Acquire("c");
  ASSERT_TRUE(c.ok());
  const absl::Time start = absl::Now();
  absl::StatusOr<bool> resident = registry->TryMakeResident(*c, absl::InfiniteFuture());
  ASSERT_TRUE(resident.ok());
  EXPECT_FALSE(*resident);
  while (resident.ok() && absl::Now() - start < absl::Seconds(20)) {
    absl::SleepFor(absl::Milliseconds(5));
    resident = registry->TryMakeResident(*c, absl::InfiniteFuture());
  }
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(300));
  EXPECT_EQ(resident.status().code(), absl::StatusCode::kResourceExhausted);
  // "the pool holds 7168 bytes (7.0 KiB) for 1 referenced adapter and 7168 bytes (7.0 KiB) for
  // 1 pinned adapter (0 bytes evictable, ...)"
  EXPECT_THAT(resident.status().message(), HasSubstr(absl::StrCat("holds ", page, " bytes (")));
  EXPECT_THAT(resident.status().message(),
              HasSubstr(absl::StrCat("for 1 referenced adapter and ", page, " bytes (")));
  EXPECT_THAT(resident.status().message(), HasSubstr("for 1 pinned adapter ("));
  EXPECT_THAT(resident.status().message(), HasSubstr("adapter \"c\""));
  c->Reset();

  // A request deadline shorter than the timeout cuts the wait.
  absl::StatusOr<AdapterRef> c2 = registry->Acquire("c");
  ASSERT_TRUE(c2.ok());
  EXPECT_EQ(registry->WaitResident(*c2, absl::Now() + absl::Milliseconds(20)).code(),
            absl::StatusCode::kResourceExhausted);
  c2->Reset();
  EXPECT_GE(registry->Stats().wait_timeouts, 2u);

  // Room made in time: the waiter gets it.
  AdapterRef c3 = registry->Acquire("c").value();
  std::thread releaser([&] {
    absl::SleepFor(absl::Milliseconds(20));
    r.Reset();
  });
  EXPECT_TRUE(registry->WaitResident(c3, absl::Now() + absl::Seconds(20)).ok());
  releaser.join();
  EXPECT_EQ(HashTable(*c3.groups()), Want(kAttn).hash);
  EXPECT_TRUE(Info(*registry, "p").in_pool);
  EXPECT_FALSE(Info(*registry, "r").in_pool);
}

TEST_F(AdapterRegistryTest, HostCacheIsLruAndEvictedAdaptersReloadFromDisk) {
  Add("a", kAttn);
  Add("b", kAttn);
  const size_t page = Round256(Want(kAttn).packed_bytes);
  AdapterRegistryOptions options = PoolOptions(page, 1);
  options.host_cache_bytes = Want(kAttn).packed_bytes;  // one adapter
  std::unique_ptr<AdapterRegistry> registry = Make(options);
  ASSERT_NE(registry, nullptr);
  Touch(*registry, "a");
  EXPECT_EQ(Info(*registry, "a").state, AdapterState::kResident);
  EXPECT_TRUE(Info(*registry, "a").in_host);
  Touch(*registry, "b");  // evicts a from the pool, then a's host copy
  EXPECT_EQ(Info(*registry, "a").state, AdapterState::kOnDisk);
  AdapterRegistryStats stats = registry->Stats();
  EXPECT_EQ(stats.host_bytes, Want(kAttn).packed_bytes);
  EXPECT_LE(stats.host_bytes, options.host_cache_bytes);
  EXPECT_GE(stats.host_evictions, 1u);
  AdapterRef a = AcquireResident(*registry, "a");  // read from disk again
  EXPECT_EQ(HashTable(*a.groups()), Want(kAttn).hash);
  EXPECT_EQ(registry->Stats().loads, 3u);
}

// ---- Concurrency -----------------------------------------------------------------------------

int StressMillis() {
  const char* env = std::getenv("LS_REGISTRY_STRESS_MS");
  return env != nullptr ? std::atoi(env) : 1500;
}

bool Allowed(const absl::Status& status) {
  // Outcomes a request or operator may see while others unload, replace and fill the pool.
  switch (status.code()) {
    case absl::StatusCode::kOk:
    case absl::StatusCode::kNotFound:            // unloaded
    case absl::StatusCode::kResourceExhausted:   // pool full of referenced / pinned
    case absl::StatusCode::kDeadlineExceeded:    // still loading at the deadline
    case absl::StatusCode::kAborted:             // unloaded or superseded meanwhile
    case absl::StatusCode::kFailedPrecondition:  // unpin of an unpinned id
      return true;
    default:
      return false;
  }
}

TEST_F(AdapterRegistryTest, ConcurrentRefsWithLoadUnloadPinAndReplace) {
  // Ids are symlinks to versioned directories, swapped atomically on replace, so a load always
  // sees a consistent pair of files.
  const std::vector<std::string> ids = {"s0", "s1", "s2", "s3"};
  const std::vector<absl::string_view> contents = {kAttn, kLayers1};
  std::map<std::string, uint64_t> hash_of_version;
  for (absl::string_view c : contents) hash_of_version[Want(c).version] = Want(c).hash;
  std::atomic<int> generation{0};
  auto point = [&](const std::string& id, absl::string_view fixture) {
    const std::string dir = absl::StrCat(id, "@", generation.fetch_add(1));
    CopyFixture(root_.path(), dir, fixture);
    const std::string tmp = absl::StrCat(root_.path(), "/.link-", dir);
    ASSERT_EQ(::symlink(dir.c_str(), tmp.c_str()), 0);
    ASSERT_EQ(::rename(tmp.c_str(), absl::StrCat(root_.path(), "/", id).c_str()), 0);
  };
  for (size_t i = 0; i < ids.size(); ++i) point(ids[i], contents[i % 2]);

  const size_t largest = std::max(Want(kAttn).packed_bytes, Want(kLayers1).packed_bytes);
  AdapterRegistryOptions options = PoolOptions(1024, (2 * largest + largest / 2) / 1024 + 1);
  options.wait_timeout = absl::Milliseconds(30);
  options.host_cache_bytes = 2 * largest;
  options.loader_threads = 2;
  options.persist_disabled = false;  // the markers would live in the versioned directories
  std::unique_ptr<AdapterRegistry> registry = Make(options);
  ASSERT_NE(registry, nullptr);

  const absl::Time end = absl::Now() + absl::Milliseconds(StressMillis());
  std::atomic<int64_t> served{0}, refused{0}, violations{0};
  std::atomic<int64_t> refused_by_code[17] = {};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<uint32_t>(t + 1));
      while (absl::Now() < end) {
        const std::string& id = ids[rng() % ids.size()];
        absl::StatusOr<AdapterRef> ref = registry->Acquire(id);
        if (!ref.ok()) {
          if (!Allowed(ref.status())) ++violations;
          ++refused;
          ++refused_by_code[static_cast<int>(ref.status().code()) % 17];
          continue;
        }
        absl::Status status;
        if (t % 2 == 0) {
          status = registry->WaitResident(*ref, absl::Now() + absl::Milliseconds(50));
        } else {  // the engine's polling
          while (true) {
            absl::StatusOr<bool> r = registry->TryMakeResident(*ref, absl::InfiniteFuture());
            if (!r.ok()) {
              status = r.status();
              break;
            }
            if (*r) break;
            std::this_thread::yield();
          }
        }
        if (!status.ok()) {
          if (!Allowed(status)) {
            ADD_FAILURE() << status;
            ++violations;
          }
          ++refused;
          ++refused_by_code[static_cast<int>(status.code()) % 17];
          continue;
        }
        // The bytes are those of the version the ref names, and stay so while it lives.
        const uint64_t h = HashTable(*ref->groups());
        const auto it = hash_of_version.find(ref->version());
        if (it == hash_of_version.end() || it->second != h) ++violations;
        std::this_thread::yield();
        if (HashTable(*ref->groups()) != h) ++violations;
        ++served;
      }
    });
  }
  threads.emplace_back([&] {  // operator
    std::mt19937 rng(99);
    while (absl::Now() < end) {
      const std::string& id = ids[rng() % ids.size()];
      absl::Status status;
      switch (rng() % 10) {
        case 0:
        case 1:
        case 2:
          status = registry->Load(id, absl::Now() + absl::Milliseconds(50)).status();
          break;
        case 3:
          status = registry->Unload(id);
          break;
        case 4:
        case 5:
          status = registry->Pin(id, absl::Now() + absl::Milliseconds(50));
          break;
        case 6:
        case 7:
          status = registry->Unpin(id);
          break;
        default:
          status = registry->Reload(id, absl::Now() + absl::Milliseconds(50)).status();
          break;
      }
      if (!Allowed(status)) {
        ADD_FAILURE() << status;
        ++violations;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  });
  threads.emplace_back([&] {  // replaces files and reloads
    std::mt19937 rng(7);
    while (absl::Now() < end) {
      const std::string& id = ids[rng() % ids.size()];
      point(id, contents[rng() % 2]);
      const absl::Status status =
          registry->Reload(id, absl::Now() + absl::Milliseconds(50)).status();
      if (!Allowed(status)) {
        ADD_FAILURE() << status;
        ++violations;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  for (std::thread& t : threads) t.join();

  EXPECT_EQ(violations.load(), 0);
  EXPECT_GT(served.load(), 0);
  AdapterRegistryStats stats = registry->Stats();
  EXPECT_EQ(stats.refs, 0);
  EXPECT_EQ(stats.load_failures, 0u);
  // Nothing is left once every id is unloaded.
  for (const std::string& id : ids) {
    while (registry->Unpin(id).ok()) {
    }
    ASSERT_TRUE(registry->Unload(id).ok());
  }
  stats = WaitDrained(*registry);
  EXPECT_EQ(stats.pool_used_pages_bytes, 0u);
  EXPECT_EQ(stats.pool_bytes, 0u);
  EXPECT_EQ(stats.host_bytes, 0u);
  EXPECT_EQ(stats.live_versions, 0);
  EXPECT_EQ(stats.waiting_versions, 0);
  std::printf("stress: %lld served, %lld refused, %llu loads, %llu evictions, %llu placements\n",
              static_cast<long long>(served.load()), static_cast<long long>(refused.load()),
              static_cast<unsigned long long>(stats.loads),
              static_cast<unsigned long long>(stats.pool_evictions),
              static_cast<unsigned long long>(stats.placements));
  for (int code = 0; code < 17; ++code) {
    if (refused_by_code[code].load() == 0) continue;
    std::printf("  refused %s: %lld\n",
                absl::StatusCodeToString(static_cast<absl::StatusCode>(code)).c_str(),
                static_cast<long long>(refused_by_code[code].load()));
  }
}

TEST_F(AdapterRegistryTest, LoadsRacingUnloads) {
  Add("x", kAllLinear);
  Add("y", kAttn);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);
  const absl::Time end = absl::Now() + absl::Milliseconds(StressMillis() / 3);
  std::atomic<int> violations{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      const std::string id = t == 0 ? "x" : "y";
      while (absl::Now() < end) {
        absl::StatusOr<AdapterRef> ref = registry->Acquire(id);  // queues a load
        if (t == 2) {
          if (!registry->Unload(id).ok()) ++violations;
          if (!Allowed(registry->Load(id, absl::Now() + absl::Milliseconds(20)).status())) {
            ++violations;
          }
        }
        if (ref.ok()) {
          const absl::Status s = registry->WaitResident(*ref, absl::Now() + absl::Seconds(5));
          if (s.ok()) {
            const uint64_t want = Want(id == "x" ? kAllLinear : kAttn).hash;
            if (HashTable(*ref->groups()) != want) ++violations;
          } else if (!Allowed(s)) {
            ++violations;
          }
        } else if (!Allowed(ref.status())) {
          ++violations;
        }
        if (t == 0) {
          if (!registry->Unload(id).ok()) ++violations;
          (void)registry->Load(id, absl::Now() + absl::Milliseconds(20));
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(violations.load(), 0);
  ASSERT_TRUE(registry->Unload("x").ok());
  ASSERT_TRUE(registry->Unload("y").ok());
  const AdapterRegistryStats stats = WaitDrained(*registry);
  EXPECT_EQ(stats.refs, 0);
  EXPECT_EQ(stats.pool_used_pages_bytes, 0u);
  EXPECT_EQ(stats.host_bytes, 0u);
  EXPECT_EQ(stats.live_versions, 0);
}

// ---- Delete, served counts, load on demand ----------------------------------------------------

TEST_F(AdapterRegistryTest, DeleteRefusesEnabledWithoutForceAndRemovesFilesAfterTheLastRef) {
  Add("d", kAttn);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);
  AdapterRef ref = AcquireResident(*registry, "d");
  const uint64_t hash = HashTable(*ref.groups());

  absl::StatusOr<AdapterDeleteResult> refused = registry->Delete("d", /*force=*/false);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), HasSubstr("enabled"));
  EXPECT_TRUE(Exists(root_.path() + "/d/adapter_model.safetensors"));

  absl::StatusOr<AdapterDeleteResult> deleted = registry->Delete("d", /*force=*/true);
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_EQ(deleted->info.state, AdapterState::kDisabled);
  EXPECT_GT(deleted->freed_disk_bytes, 0u);
  // The id is gone at once: no directory under its name, NOT_FOUND everywhere.
  EXPECT_FALSE(Exists(root_.path() + "/d"));
  EXPECT_EQ(registry->Acquire("d").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry->Get("d").status().code(), absl::StatusCode::kNotFound);
  absl::StatusOr<std::vector<AdapterInfo>> list = registry->List();
  ASSERT_TRUE(list.ok());
  EXPECT_TRUE(list->empty());
  // The in-flight request keeps its bytes; the renamed-away files wait for it.
  EXPECT_EQ(HashTable(*ref.groups()), hash);
  bool trash_present = false;
  for (const auto& e : std::filesystem::directory_iterator(root_.path())) {
    trash_present |= absl::StartsWith(e.path().filename().string(), ".deleted-d-");
  }
  EXPECT_TRUE(trash_present);
  ref.Reset();
  const absl::Time deadline = Soon();
  while (absl::Now() < deadline && !std::filesystem::is_empty(root_.path())) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_TRUE(std::filesystem::is_empty(root_.path()));
  EXPECT_EQ(WaitDrained(*registry).live_versions, 0);

  // A new directory under the old name is a new adapter (what an upload does).
  Add("d", kLayers1);
  AdapterRef again = AcquireResident(*registry, "d");
  EXPECT_EQ(again.version(), Want(kLayers1).version);
}

TEST_F(AdapterRegistryTest, DeleteOfADisabledIdNeedsNoForce) {
  Add("e", kAttn);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);
  ASSERT_TRUE(registry->Unload("e").ok());
  absl::StatusOr<AdapterDeleteResult> deleted = registry->Delete("e", /*force=*/false);
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_TRUE(std::filesystem::is_empty(root_.path()));
  EXPECT_EQ(registry->Delete("e", true).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry->Delete("../e", true).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AdapterRegistryTest, UnloadOfAPinnedIdNeedsForce) {
  Add("p", kAttn);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);
  ASSERT_TRUE(registry->Pin("p", Soon()).ok());
  absl::Status refused = registry->Unload("p", /*force=*/false);
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.message(), HasSubstr("pinned"));
  EXPECT_EQ(Info(*registry, "p").state, AdapterState::kResident);
  ASSERT_TRUE(registry->Unload("p", /*force=*/true).ok());
  EXPECT_EQ(Info(*registry, "p").state, AdapterState::kDisabled);
  EXPECT_EQ(Info(*registry, "p").pins, 0);
}

TEST_F(AdapterRegistryTest, RequestsServedCountsDroppedRequestRefsNotPins) {
  Add("s", kAttn);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);
  ASSERT_TRUE(registry->Pin("s", Soon()).ok());
  EXPECT_EQ(Info(*registry, "s").requests_served, 0u);
  for (int i = 0; i < 3; ++i) Touch(*registry, "s");
  AdapterRef held = AcquireResident(*registry, "s");
  EXPECT_EQ(Info(*registry, "s").requests_served, 3u);
  held.CountTokens(5);
  AdapterRef moved = std::move(held);  // the count travels with the ref
  moved.CountTokens(2);
  moved.Reset();
  AdapterInfo info = Info(*registry, "s");
  EXPECT_EQ(info.requests_served, 4u);
  EXPECT_EQ(info.tokens_served, 7u);
  EXPECT_EQ(info.last_loaded_version, Want(kAttn).version);
}

TEST_F(AdapterRegistryTest, WithoutLoadOnDemandOnlyOperatorLoadedIdsAreServed) {
  Add("x", kAttn);
  Add("y", kLayers1);
  AdapterRegistryOptions options = PoolOptions(4096, 64);
  options.load_on_demand = false;
  std::unique_ptr<AdapterRegistry> registry = Make(options);
  ASSERT_NE(registry, nullptr);
  EXPECT_TRUE(registry->RegisterAll().empty());
  absl::StatusOr<AdapterRef> refused = registry->Acquire("x");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(refused.status().message(), HasSubstr("--load_on_demand"));
  ASSERT_TRUE(registry->Load("x", Soon()).ok());
  AdapterRef ref = AcquireResident(*registry, "x");
  EXPECT_EQ(ref.version(), Want(kAttn).version);
  EXPECT_EQ(registry->Acquire("y").status().code(), absl::StatusCode::kNotFound);
  ref.Reset();
  // Unload takes the admission back; Load gives it again.
  ASSERT_TRUE(registry->Unload("x").ok());
  ASSERT_TRUE(registry->Load("x", Soon()).ok());
  EXPECT_TRUE(registry->Acquire("x").ok());
}

// ---- The last load's record (GetAdapter's last_load_report)
// ---------------------------------------

TEST_F(AdapterRegistryTest, LastLoadRecordsEveryLoadSuccessfulOrNot) {
  Add("r", kAttn);
  const std::string good_config = ReadFile(absl::StrCat(root_.path(), "/r/", kAdapterConfigFile));
  const std::string bad_config =
      absl::StrReplaceAll(good_config, {{"\"use_dora\": false", "\"use_dora\": true"}});
  ASSERT_NE(bad_config, good_config);
  Replace("r", kAttn, bad_config);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(4096, 64));
  ASSERT_NE(registry, nullptr);
  EXPECT_EQ(Info(*registry, "r").last_load, nullptr);  // never loaded here

  // A failed load (asked for by a request) is recorded with its error and no version.
  {
    absl::StatusOr<AdapterRef> ref = registry->Acquire("r");
    ASSERT_TRUE(ref.ok()) << ref.status();
    EXPECT_EQ(registry->WaitResident(*ref, Soon()).code(), absl::StatusCode::kInvalidArgument);
  }
  AdapterInfo info = Info(*registry, "r");
  ASSERT_NE(info.last_load, nullptr);
  EXPECT_EQ(info.last_load->status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(info.last_load->status.message(), HasSubstr("use_dora"));
  EXPECT_EQ(info.last_load->version, "");
  EXPECT_EQ(info.last_load->report, nullptr);
  EXPECT_GT(info.last_load->seconds, 0.0);

  // The fixed files: a success replaces the record (nothing was READY before: no previous).
  Replace("r", kAttn);
  ASSERT_TRUE(registry->Load("r", Soon()).ok());
  info = Info(*registry, "r");
  ASSERT_NE(info.last_load, nullptr);
  EXPECT_TRUE(info.last_load->status.ok());
  EXPECT_EQ(info.last_load->version, Want(kAttn).version);
  EXPECT_EQ(info.last_load->previous_version, "");
  EXPECT_FALSE(info.last_load->unchanged);
  ASSERT_NE(info.last_load->report, nullptr);
  EXPECT_EQ(info.last_load->report->r, 4);

  // A reload of the same files: unchanged. Of new files: the previous version is named.
  ASSERT_TRUE(registry->Reload("r", Soon()).ok());
  info = Info(*registry, "r");
  EXPECT_TRUE(info.last_load->unchanged);
  EXPECT_EQ(info.last_load->version, Want(kAttn).version);
  Replace("r", kLayers1);
  ASSERT_TRUE(registry->Reload("r", Soon()).ok());
  info = Info(*registry, "r");
  EXPECT_FALSE(info.last_load->unchanged);
  EXPECT_EQ(info.last_load->version, Want(kLayers1).version);
  EXPECT_EQ(info.last_load->previous_version, Want(kAttn).version);

  // A reload that fails leaves the id serving, and is still the last load.
  Replace("r", kAttn, bad_config);
  EXPECT_EQ(registry->Reload("r", Soon()).status().code(), absl::StatusCode::kInvalidArgument);
  info = Info(*registry, "r");
  EXPECT_EQ(info.state, AdapterState::kResident);
  EXPECT_EQ(info.version, Want(kLayers1).version);
  EXPECT_EQ(info.last_load->status.code(), absl::StatusCode::kInvalidArgument);

  // After an Unload, the next load has nothing READY to compare with.
  Replace("r", kLayers1);
  ASSERT_TRUE(registry->Unload("r").ok());
  ASSERT_TRUE(registry->Load("r", Soon()).ok());
  info = Info(*registry, "r");
  EXPECT_TRUE(info.last_load->status.ok());
  EXPECT_FALSE(info.last_load->unchanged);
  EXPECT_EQ(info.last_load->previous_version, "");
}

TEST_F(AdapterRegistryTest, LastLoadOfAnAdapterLargerThanThePoolKeepsItsReport) {
  Add("big", kAllLinear);
  const size_t page = Round256(Want(kAttn).packed_bytes);
  std::unique_ptr<AdapterRegistry> registry = Make(PoolOptions(page, 1));
  ASSERT_NE(registry, nullptr);
  EXPECT_EQ(registry->Load("big", Soon()).status().code(), absl::StatusCode::kResourceExhausted);
  const AdapterInfo info = Info(*registry, "big");
  ASSERT_NE(info.last_load, nullptr);
  EXPECT_EQ(info.last_load->status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(info.last_load->version, "");
  ASSERT_NE(info.last_load->report, nullptr);
  EXPECT_EQ(info.last_load->report->packed_bytes, Want(kAllLinear).packed_bytes);
}

// ---- The adapter_load_pause failpoint (docs/adapters.md, "Testing")
// --------------------------------

// Sets LORASERVE_FAILPOINTS for the registries made while it lives (read at creation).
class ScopedFailpoints {
 public:
  explicit ScopedFailpoints(const std::string& value) {
    ::setenv("LORASERVE_FAILPOINTS", value.c_str(), 1);
  }
  ~ScopedFailpoints() { ::unsetenv("LORASERVE_FAILPOINTS"); }
};

TEST_F(AdapterRegistryTest, LoadPauseFailpointHoldsLoadsWhileItsFileExists) {
  Add("resident", kAttn);
  Add("held", kLayers1);
  Add("held2", kAllLinear);
  TempDir scratch;
  const std::string pause = scratch.path() + "/pause";
  std::unique_ptr<AdapterRegistry> registry;
  {
    ScopedFailpoints failpoints(absl::StrCat("adapter_load_pause=", pause));
    registry = Make(PoolOptions(4096, 64));
  }
  ASSERT_NE(registry, nullptr);
  // Without the file, loads run as usual.
  AdapterRef resident = AcquireResident(*registry, "resident");

  WriteFile(pause, "");
  absl::StatusOr<AdapterRef> held = registry->Acquire("held");
  absl::StatusOr<AdapterRef> held2 = registry->Acquire("held2");
  ASSERT_TRUE(held.ok() && held2.ok());
  absl::SleepFor(absl::Milliseconds(300));
  // Both loader threads are held; the engine's calls still answer at once, and a resident
  // adapter is still served.
  const absl::Time before = absl::Now();
  EXPECT_EQ(registry->TryMakeResident(*held, Soon()).value_or(true), false);
  EXPECT_EQ(registry->TryMakeResident(*held2, Soon()).value_or(true), false);
  absl::StatusOr<AdapterRef> again = registry->Acquire("resident");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(registry->TryMakeResident(*again, Soon()).value_or(false), true);
  EXPECT_EQ(HashTable(*again->groups()), Want(kAttn).hash);
  EXPECT_LT(absl::Now() - before, absl::Seconds(2));  // the load is held far longer
  EXPECT_EQ(Info(*registry, "held").state, AdapterState::kLoading);
  EXPECT_EQ(registry->Stats().loading_versions, 2);
  // An operator's Load waits for the paused load, up to its deadline.
  EXPECT_EQ(registry->Load("held", absl::Now() + absl::Milliseconds(50)).status().code(),
            absl::StatusCode::kDeadlineExceeded);

  ASSERT_EQ(::unlink(pause.c_str()), 0);
  ASSERT_TRUE(registry->WaitResident(*held, Soon()).ok());
  ASSERT_TRUE(registry->WaitResident(*held2, Soon()).ok());
  EXPECT_EQ(HashTable(*held->groups()), Want(kLayers1).hash);
  EXPECT_EQ(HashTable(*held2->groups()), Want(kAllLinear).hash);

  // A registry destroyed while a load is paused does not wait for the file.
  WriteFile(pause, "");
  ASSERT_TRUE(registry->Unload("held").ok());
  held->Reset();
  EXPECT_EQ(registry->Load("held", absl::Now() + absl::Milliseconds(50)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(Info(*registry, "held").state, AdapterState::kLoading);
  held2->Reset();
  resident.Reset();
  again->Reset();
  const absl::Time stopping = absl::Now();
  registry.reset();
  EXPECT_LT(absl::Now() - stopping, absl::Seconds(5));
}

TEST_F(AdapterRegistryTest, RequestsDuringADeleteDoNotBringTheIdBack) {
  Add("d", kAttn);
  TempDir scratch;
  const std::string pause = scratch.path() + "/pause";
  std::unique_ptr<AdapterRegistry> registry;
  {
    ScopedFailpoints failpoints(absl::StrCat("adapter_load_pause=", pause));
    registry = Make(PoolOptions(4096, 64));
  }
  ASSERT_NE(registry, nullptr);
  WriteFile(pause, "");
  absl::StatusOr<AdapterRef> early = registry->Acquire("d");  // its load is held
  ASSERT_TRUE(early.ok()) << early.status();
  absl::StatusOr<AdapterDeleteResult> deleted = absl::UnknownError("not run");
  std::thread deleter([&] { deleted = registry->Delete("d", /*force=*/true, Soon()); });
  // Delete waits for the held load with the directory still in place; meanwhile the id is gone
  // for new requests and Get (a request must not re-register it from the directory).
  const absl::Time deadline = Soon();
  while (registry->Get("d").ok() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_TRUE(Exists(absl::StrCat(root_.path(), "/d")));
  EXPECT_EQ(registry->Acquire("d").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry->Get("d").status().code(), absl::StatusCode::kNotFound);
  ASSERT_EQ(::unlink(pause.c_str()), 0);
  deleter.join();
  ASSERT_TRUE(deleted.ok()) << deleted.status();
  EXPECT_FALSE(Exists(absl::StrCat(root_.path(), "/d")));
  EXPECT_EQ(registry->Acquire("d").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(registry->Get("d").status().code(), absl::StatusCode::kNotFound);
  // The request admitted before the Delete is served from the load it was waiting for.
  ASSERT_TRUE(registry->WaitResident(*early, Soon()).ok());
  EXPECT_EQ(HashTable(*early->groups()), Want(kAttn).hash);
}

}  // namespace
}  // namespace ls
