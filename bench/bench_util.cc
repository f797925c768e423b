#include "bench/bench_util.h"

#include <immintrin.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "common/huge_buffer.h"
#include "common/logging.h"
#include "common/thread_pool.h"
#include "model/safetensors.h"

namespace ls::bench {

const char kTinyLlamaConfig[] = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
  "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
  "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
  "max_position_embeddings": 2048, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
  "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
})";

// Writes a random bf16 checkpoint with the config's tensor names into `dir` (in a child
// process, so that the generator's memory never counts toward the benchmark's peak RSS).
void WriteCheckpoint(const ModelConfig& c, const std::string& dir) {
  const pid_t pid = fork();
  LS_CHECK(pid >= 0) << "fork failed";
  if (pid > 0) {
    int status = 0;
    waitpid(pid, &status, 0);
    LS_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "checkpoint writer failed";
    return;
  }
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  const int64_t h = c.hidden_size, f = c.intermediate_size, v = c.vocab_size;
  shapes.push_back({"model.embed_tokens.weight", {v, h}});
  shapes.push_back({"lm_head.weight", {v, h}});
  shapes.push_back({"model.norm.weight", {h}});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    shapes.push_back({p + "input_layernorm.weight", {h}});
    shapes.push_back({p + "post_attention_layernorm.weight", {h}});
    shapes.push_back({p + "self_attn.q_proj.weight", {c.q_dim(), h}});
    shapes.push_back({p + "self_attn.k_proj.weight", {c.kv_dim(), h}});
    shapes.push_back({p + "self_attn.v_proj.weight", {c.kv_dim(), h}});
    shapes.push_back({p + "self_attn.o_proj.weight", {h, c.q_dim()}});
    shapes.push_back({p + "mlp.gate_proj.weight", {f, h}});
    shapes.push_back({p + "mlp.up_proj.weight", {f, h}});
    shapes.push_back({p + "mlp.down_proj.weight", {h, f}});
  }
  std::vector<std::vector<uint16_t>> data;
  std::vector<SafetensorsTensorRef> refs;
  std::mt19937_64 rng(42);
  for (const auto& [name, shape] : shapes) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<uint16_t> values(static_cast<size_t>(n));
    const bool norm = shape.size() == 1;
    // Values in about [-0.05, 0.05] (norms near 1): fast, not all zero, no NaN.
    for (auto& x : values) {
      const float u = static_cast<float>(rng() >> 40) / static_cast<float>(1 << 24) - 0.5f;
      x = FloatToBf16(norm ? 1.0f + 0.1f * u : 0.1f * u);
    }
    data.push_back(std::move(values));
  }
  for (size_t i = 0; i < shapes.size(); ++i) {
    SafetensorsTensorRef ref;
    ref.name = shapes[i].first;
    ref.dtype = DType::kBF16;
    ref.shape = Shape(shapes[i].second.begin(), shapes[i].second.end());
    ref.data = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(data[i].data()),
                                         data[i].size() * sizeof(uint16_t));
    refs.push_back(std::move(ref));
  }
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << kTinyLlamaConfig;
  const absl::Status s = WriteSafetensors(dir + "/model.safetensors", refs);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
    _exit(1);
  }
  _exit(0);
}

namespace {

// Read bandwidth: every thread sums its slice of `buf` with the widest loads this CPU has. Two
// access patterns are tried, one sequential stream with eight accumulators and a software
// prefetch ahead, and eight interleaved streams (more misses in flight); the faster counts, so
// the ratio is taken against the best this machine gave in this run.
constexpr size_t kBandwidthPrefetchBytes = 2048;

__attribute__((target("avx512f"))) float SumAvx512(const float* p, size_t n, bool streams) {
  __m512 a[8];
  for (auto& x : a) x = _mm512_setzero_ps();
  if (streams) {
    const size_t part = n / 8;
    for (size_t i = 0; i + 16 <= part; i += 16) {
      for (int j = 0; j < 8; ++j) a[j] = _mm512_add_ps(a[j], _mm512_loadu_ps(p + j * part + i));
    }
  } else {
    for (size_t i = 0; i + 128 <= n; i += 128) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i) + kBandwidthPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + i) + kBandwidthPrefetchBytes + 256,
                   _MM_HINT_T0);
      for (int j = 0; j < 8; ++j) a[j] = _mm512_add_ps(a[j], _mm512_loadu_ps(p + i + 16 * j));
    }
  }
  for (int j = 1; j < 8; ++j) a[0] = _mm512_add_ps(a[0], a[j]);
  // A plain store and loop: GCC 12's _mm512_reduce_add_ps trips -Wuninitialized in its header.
  alignas(64) float out[16];
  _mm512_store_ps(out, a[0]);
  float s = 0;
  for (float x : out) s += x;
  return s;
}

__attribute__((target("avx2"))) float SumAvx2(const float* p, size_t n, bool streams) {
  __m256 a[8];
  for (auto& x : a) x = _mm256_setzero_ps();
  if (streams) {
    const size_t part = n / 8;
    for (size_t i = 0; i + 8 <= part; i += 8) {
      for (int j = 0; j < 8; ++j) a[j] = _mm256_add_ps(a[j], _mm256_loadu_ps(p + j * part + i));
    }
  } else {
    for (size_t i = 0; i + 64 <= n; i += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i) + kBandwidthPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + i) + kBandwidthPrefetchBytes + 128,
                   _MM_HINT_T0);
      for (int j = 0; j < 8; ++j) a[j] = _mm256_add_ps(a[j], _mm256_loadu_ps(p + i + 8 * j));
    }
  }
  for (int j = 1; j < 8; ++j) a[0] = _mm256_add_ps(a[0], a[j]);
  alignas(32) float out[8];
  _mm256_store_ps(out, a[0]);
  float s = 0;
  for (float x : out) s += x;
  return s;
}

}  // namespace

double MeasureReadBandwidth(int threads, Isa isa, size_t bytes) {
  // The same kind of memory as the weight arena (huge pages where the kernel offers them), so
  // the ratio compares access patterns, not page sizes.
  absl::StatusOr<HugeBuffer> memory = HugeBuffer::Allocate(bytes);
  LS_CHECK(memory.ok()) << memory.status();
  const absl::Span<float> buf(static_cast<float*>(memory->data()), bytes / sizeof(float));
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i & 1023);
  ThreadPool pool(threads);
  std::vector<float> sinks(static_cast<size_t>(threads));
  double best = 0;
  for (int rep = 0; rep < 10; ++rep) {
    const bool streams = rep % 2 == 1;  // best of 5 for each access pattern
    const auto t0 = Clock::now();
    pool.ParallelFor(threads, [&](int64_t begin, int64_t end, int) {
      for (int64_t t = begin; t < end; ++t) {
        const size_t chunk = buf.size() / static_cast<size_t>(threads);
        const float* p = buf.data() + static_cast<size_t>(t) * chunk;
        sinks[static_cast<size_t>(t)] =
            isa == Isa::kAvx512 ? SumAvx512(p, chunk, streams) : SumAvx2(p, chunk, streams);
      }
    });
    best = std::max(best, static_cast<double>(bytes) / Seconds(Clock::now() - t0));
  }
  float sink = 0;
  for (float s : sinks) sink += s;
  LS_CHECK(sink != -1.0f);  // keeps the reads alive
  return best;
}

// The ISA-relevant CPU flags from /proc/cpuinfo, space-separated.
std::string CpuFlags() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::string out;
    std::istringstream words(line.substr(line.find(':') + 1));
    std::string w;
    while (words >> w) {
      if (w.find("avx") != std::string::npos || w == "fma" || w == "f16c" ||
          w.find("amx") != std::string::npos) {
        absl::StrAppend(&out, out.empty() ? "" : " ", w);
      }
    }
    return out;
  }
  return "";
}

// The last-level cache size from sysfs (e.g. "266240K"), 0 when unknown.
uint64_t LastLevelCacheBytes() {
  uint64_t best = 0;
  for (int index = 0; index < 8; ++index) {
    std::ifstream in(absl::StrCat("/sys/devices/system/cpu/cpu0/cache/index", index, "/size"));
    std::string text;
    if (!(in >> text) || text.empty()) continue;
    uint64_t scale = 1;
    if (text.back() == 'K') scale = 1ull << 10;
    if (text.back() == 'M') scale = 1ull << 20;
    if (scale != 1) text.pop_back();
    best = std::max<uint64_t>(best, std::strtoull(text.c_str(), nullptr, 10) * scale);
  }
  return best;
}

// At least 1 GiB and 4x the last-level cache, so no part of it is served from cache.
size_t BandwidthBufferBytes() {
  return static_cast<size_t>(std::max<uint64_t>(1ull << 30, 4 * LastLevelCacheBytes()));
}

void FillKvRandom(const KvCache& cache) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const size_t floats = static_cast<size_t>(cache.num_blocks()) * cache.block_tokens() *
                        cache.layer_views()[0].num_kv_heads * cache.layer_views()[0].head_dim;
  for (const KvLayerView& layer : cache.layer_views()) {
    for (size_t i = 0; i < floats; ++i) {
      layer.k[i] = u(rng);
      layer.v[i] = u(rng);
    }
  }
}

int64_t PeakRssBytes() {
  rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return int64_t{usage.ru_maxrss} * 1024;
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

}  // namespace ls::bench
