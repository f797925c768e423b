// LoRA at the model level, on TinyLlama-1.1B shapes (random bf16 weights, as decode_bench):
//  (b) decode steps where every request has its own rank-16 all-linear adapter, at batch 8 and
//      32, against the same step on the base model alone, measured in alternating trials of one
//      run; each step placed on the roofline: its bytes (weights, adapters, KV read) at the read
//      bandwidth and its FLOPs at the GEMM rate, both measured in the same run;
//  (c) adapter load latency: read, validate, convert and place one such adapter, from a warm
//      page cache with its version cached (AdapterStore::Load + a copy into pool memory).
// Results as JSON (--out); docs/benchmarks/lora.md has the numbers.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "common/dtype.h"
#include "common/huge_buffer.h"
#include "common/logging.h"
#include "kernels/cpu/cpu_backend.h"
#include "model/adapter_store.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/llama_model.h"
#include "model/lora_adapter.h"
#include "model/safetensors.h"
#include "model/weights.h"

ABSL_FLAG(std::string, out, "", "Write the results as JSON here");
ABSL_FLAG(int, threads, 0, "Compute threads (0 = all cores)");
ABSL_FLAG(std::string, model_dir, "/tmp/ls_bench_tinyllama",
          "Checkpoint and adapters are written here once and reused");
ABSL_FLAG(int, adapters, 32, "Distinct adapters (one per request, up to the batch size)");
ABSL_FLAG(int, rank, 16, "LoRA rank of every module");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"8", "32"}),
          "Decode batch sizes");
ABSL_FLAG(int, context, 512, "Tokens of context per sequence");
ABSL_FLAG(int, trials, 5, "Alternating base/LoRA trials per batch size (best step each)");

namespace ls {
namespace {

using bench::Clock;
using bench::Seconds;

constexpr const char* kModules[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                    "mlp.down_proj"};

// A PEFT adapter on every linear module of every layer, random bf16 A and B.
void WriteAdapter(const ModelConfig& c, int rank, uint64_t seed, const std::string& dir) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/adapter_config.json") << absl::StrFormat(
      R"({"peft_type": "LORA", "r": %d, "lora_alpha": %d, "target_modules": ["q_proj", )"
      R"("k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], )"
      R"("task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0})",
      rank, 2 * rank);
  const int64_t h = c.hidden_size, f = c.intermediate_size;
  const int64_t in[] = {h, h, h, c.q_dim(), h, h, f};
  const int64_t out[] = {c.q_dim(), c.kv_dim(), c.kv_dim(), h, f, f, h};
  std::mt19937_64 rng(seed);
  std::vector<std::vector<uint16_t>> data;
  std::vector<SafetensorsTensorRef> refs;
  auto add = [&](std::string name, int64_t rows, int64_t cols) {
    std::vector<uint16_t> values(static_cast<size_t>(rows * cols));
    for (auto& x : values) {
      const float u = static_cast<float>(rng() >> 40) / static_cast<float>(1 << 24) - 0.5f;
      x = FloatToBf16(0.02f * u);
    }
    SafetensorsTensorRef ref;
    ref.name = std::move(name);
    ref.dtype = DType::kBF16;
    ref.shape = Shape{rows, cols};
    data.push_back(std::move(values));
    refs.push_back(std::move(ref));
  };
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    for (int m = 0; m < 7; ++m) {
      const std::string p = absl::StrCat("base_model.model.model.layers.", l, ".", kModules[m]);
      add(p + ".lora_A.weight", rank, in[m]);
      add(p + ".lora_B.weight", out[m], rank);
    }
  }
  for (size_t i = 0; i < refs.size(); ++i) {
    refs[i].data = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(data[i].data()),
                                             data[i].size() * sizeof(uint16_t));
  }
  const absl::Status s = WriteSafetensors(dir + "/adapter_model.safetensors", refs);
  LS_CHECK(s.ok()) << s;
}

// FLOP/s of the prefill GEMM path: 256 rows against a [5632, 2048] bf16 matrix, best of 5.
double MeasureGemmRate(Backend& backend, const WeightView& w) {
  const int64_t m = 256;
  std::vector<float> x(static_cast<size_t>(m * w.cols), 0.25f);
  std::vector<float> y(static_cast<size_t>(m * w.rows));
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    LS_CHECK(backend.MatMul(x.data(), m, w.cols, w, nullptr, y.data(), w.rows, false).ok());
    best = std::max(best, 2.0 * m * w.rows * w.cols / Seconds(Clock::now() - t0));
  }
  return best;
}

int Main() {
  auto parsed = ParseModelConfig(bench::kTinyLlamaConfig, "", ConfigOptions{});
  LS_CHECK(parsed.ok()) << parsed.status();
  const ModelConfig& c = *parsed;
  const std::string dir = absl::GetFlag(FLAGS_model_dir);
  const int rank = absl::GetFlag(FLAGS_rank);
  const int num_adapters = absl::GetFlag(FLAGS_adapters);
  if (!std::filesystem::exists(dir + "/model.safetensors")) {
    std::fprintf(stderr, "writing a random bf16 checkpoint to %s ...\n", dir.c_str());
    bench::WriteCheckpoint(c, dir);
  }
  const std::string root = absl::StrCat(dir, "/adapters_r", rank);
  for (int a = 0; a < num_adapters; ++a) {
    const std::string id = absl::StrFormat("a%02d", a);
    if (!std::filesystem::exists(root + "/" + id + "/adapter_model.safetensors")) {
      std::fprintf(stderr, "writing adapter %s ...\n", id.c_str());
      WriteAdapter(c, rank, 1000 + a, root + "/" + id);
    }
  }
  auto ckpt = SafetensorsCheckpoint::Open(dir);
  LS_CHECK(ckpt.ok()) << ckpt.status();
  auto weights = LoadModelWeights(**ckpt, c, DType::kBF16);
  LS_CHECK(weights.ok()) << weights.status();
  ckpt->reset();

  // Files written moments ago are cached too (the store's racy-file window is for live roots).
  AdapterStoreOptions store_options;
  store_options.racy_window_ns = 0;
  auto store = AdapterStore::Open(root, store_options);
  LS_CHECK(store.ok()) << store.status();
  LoraLoadOptions load_options;
  load_options.dtype = DType::kBF16;
  std::vector<std::unique_ptr<LoraAdapter>> adapters;
  for (int a = 0; a < num_adapters; ++a) {
    auto loaded = (*store)->Load(absl::StrFormat("a%02d", a), c, load_options);
    LS_CHECK(loaded.ok()) << loaded.status();
    adapters.push_back(std::move(loaded->adapter));
  }
  const size_t adapter_bytes = adapters[0]->packed_bytes();

  // (c) Load latency of one adapter: page cache warm and version cached by the loads above.
  std::vector<double> load_ms;
  {
    auto pool = HugeBuffer::Allocate(adapter_bytes);
    LS_CHECK(pool.ok()) << pool.status();
    for (int rep = 0; rep < 7; ++rep) {
      const auto t0 = Clock::now();
      auto loaded = (*store)->Load("a00", c, load_options);
      LS_CHECK(loaded.ok()) << loaded.status();
      LS_CHECK(loaded->adapter->PackInto(pool->data(), pool->size()).ok());
      load_ms.push_back(1e3 * Seconds(Clock::now() - t0));
    }
  }
  std::sort(load_ms.begin(), load_ms.end());
  std::fprintf(stderr, "adapter load (%.1f MB packed): median %.1f ms, best %.1f ms\n",
               adapter_bytes / 1e6, load_ms[load_ms.size() / 2], load_ms.front());

  CpuBackendOptions bo;
  bo.threads = absl::GetFlag(FLAGS_threads);
  const int context = absl::GetFlag(FLAGS_context);
  const int trials = absl::GetFlag(FLAGS_trials);
  bo.max_context = context + 2 * trials + 2;
  auto backend = CpuBackend::Create(bo);
  LS_CHECK(backend.ok()) << backend.status();
  KvCacheOptions kv;
  kv.num_layers = c.num_hidden_layers;
  kv.num_kv_heads = c.num_key_value_heads;
  kv.head_dim = c.head_dim;
  kv.block_tokens = 16;
  const int64_t tokens_per_seq = bo.max_context;
  kv.cache_bytes =
      KvCache::BlockBytes(kv) * static_cast<uint64_t>(32 * ((tokens_per_seq + 15) / 16));
  auto cache = KvCache::Create(kv);
  LS_CHECK(cache.ok()) << cache.status();
  // Random K/V stand in for 512 prefilled tokens: attention costs the same whatever the values.
  bench::FillKvRandom(**cache);
  auto model = LlamaModel::Create(&c, weights->get(), backend->get(), 64, rank);
  LS_CHECK(model.ok()) << model.status();
  std::vector<std::vector<int32_t>> tables(32);
  for (auto& t : tables) LS_CHECK((*cache)->EnsureCapacity(tokens_per_seq, &t).ok());
  const size_t stride = tables[0].size();
  std::vector<float> logits(static_cast<size_t>(32) * c.vocab_size);

  uint64_t weight_bytes = 0;
  int64_t weight_params = 0;
  for (const LayerWeights& l : (*weights)->layers()) {
    for (const WeightView* w : {&l.qkv, &l.o, &l.gate_up, &l.down}) {
      weight_bytes += static_cast<uint64_t>(w->rows * w->cols) * 2;
      weight_params += w->rows * w->cols;
    }
  }
  weight_bytes += static_cast<uint64_t>(c.vocab_size) * c.hidden_size * 2;
  weight_params += int64_t{c.vocab_size} * c.hidden_size;
  const int64_t adapter_params = adapters[0]->report().num_parameters;

  const double bandwidth = bench::MeasureReadBandwidth(
      (*backend)->threads(), (*backend)->isa() == Isa::kAvx512 ? Isa::kAvx512 : Isa::kAvx2,
      bench::BandwidthBufferBytes());
  const double gemm_rate = MeasureGemmRate(**backend, (*weights)->layers()[0].gate_up);
  std::fprintf(stderr, "read bandwidth %.2f GB/s, GEMM rate %.1f GFLOP/s\n", bandwidth / 1e9,
               gemm_rate / 1e9);

  auto step = [&](int b, int s, bool lora) {
    std::vector<int32_t> ids(b, 3), positions(b, context + s), block_tables, logits_rows(b);
    std::vector<const LoraGroupTable*> row_adapters(b);
    for (int i = 0; i < b; ++i) {
      logits_rows[i] = i;
      block_tables.insert(block_tables.end(), tables[i].begin(), tables[i].end());
      row_adapters[i] = &adapters[static_cast<size_t>(i % num_adapters)]->groups();
    }
    ForwardBatch batch;
    batch.token_ids = ids;
    batch.positions = positions;
    batch.block_tables = block_tables;
    batch.block_table_stride = static_cast<int64_t>(stride);
    batch.logits_rows = logits_rows;
    if (lora) batch.row_adapters = row_adapters;
    const auto t0 = Clock::now();
    const absl::Status st = (*model)->Forward(batch, **cache, logits.data());
    LS_CHECK(st.ok()) << st;
    return Seconds(Clock::now() - t0);
  };

  std::string json = "{\n";
  absl::StrAppendFormat(&json, "  \"cpu\": \"%s\",\n  \"threads\": %d,\n", bench::CpuModel(),
                        (*backend)->threads());
  absl::StrAppendFormat(&json, "  \"rank\": %d,\n  \"adapter_packed_bytes\": %d,\n", rank,
                        adapter_bytes);
  absl::StrAppendFormat(&json, "  \"adapter_parameters\": %d,\n", adapter_params);
  absl::StrAppendFormat(&json,
                        "  \"adapter_load_ms\": {\"median\": %.2f, \"best\": %.2f, "
                        "\"runs\": %d},\n",
                        load_ms[load_ms.size() / 2], load_ms.front(), load_ms.size());
  absl::StrAppendFormat(&json, "  \"read_bandwidth_bytes_per_second\": %.0f,\n", bandwidth);
  absl::StrAppendFormat(&json, "  \"gemm_flops_per_second\": %.0f,\n", gemm_rate);
  json += "  \"steps\": [\n";
  std::vector<int> batches;
  for (const std::string& b : absl::GetFlag(FLAGS_batches)) {
    int v = 0;
    LS_CHECK(absl::SimpleAtoi(b, &v) && v >= 1 && v <= 32) << b;
    batches.push_back(v);
  }
  for (size_t bi = 0; bi < batches.size(); ++bi) {
    const int b = batches[bi];
    step(b, 0, true);  // warm-up: pages, caches
    double base = 1e30, lora = 1e30;
    for (int t = 0; t < trials; ++t) {
      base = std::min(base, step(b, 1 + 2 * t, false));
      lora = std::min(lora, step(b, 2 + 2 * t, true));
    }
    const int distinct = std::min(b, num_adapters);
    const double kv_bytes = static_cast<double>(b) * context * KvCache::BlockBytes(kv) / 16;
    const double base_bytes = static_cast<double>(weight_bytes) + kv_bytes;
    const double lora_bytes = base_bytes + static_cast<double>(distinct) * adapter_bytes;
    const double attn_flops =
        4.0 * b * context * c.num_attention_heads * c.head_dim * c.num_hidden_layers;
    const double base_flops = 2.0 * b * weight_params + attn_flops;
    const double lora_flops = base_flops + 2.0 * b * adapter_params;
    auto roof = [&](double bytes, double flops) {
      return std::max(bytes / bandwidth, flops / gemm_rate);
    };
    absl::StrAppendFormat(
        &json,
        "    {\"batch\": %d, \"distinct_adapters\": %d, \"base_step_seconds\": %.6f, "
        "\"lora_step_seconds\": %.6f, \"ratio\": %.3f, \"base_bytes\": %.0f, "
        "\"lora_bytes\": %.0f, \"base_flops\": %.0f, \"lora_flops\": %.0f, "
        "\"base_roofline_seconds\": %.6f, \"lora_roofline_seconds\": %.6f}%s\n",
        b, distinct, base, lora, lora / base, base_bytes, lora_bytes, base_flops, lora_flops,
        roof(base_bytes, base_flops), roof(lora_bytes, lora_flops),
        bi + 1 < batches.size() ? "," : "");
    std::fprintf(stderr,
                 "batch %2d, %2d adapters: base %.1f ms, LoRA %.1f ms, ratio %.3f; roofline "
                 "base %.1f ms, LoRA %.1f ms\n",
                 b, distinct, base * 1e3, lora * 1e3, lora / base,
                 roof(base_bytes, base_flops) * 1e3, roof(lora_bytes, lora_flops) * 1e3);
  }
  json += "  ]\n}\n";
  const std::string out = absl::GetFlag(FLAGS_out);
  if (!out.empty()) std::ofstream(out) << json;
  std::printf("%s", json.c_str());
  return 0;
}

}  // namespace
}  // namespace ls

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ls::Main();
}
