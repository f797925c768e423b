// CPU decode/prefill benchmark on a model with TinyLlama-1.1B's shapes (random bf16 weights made
// here): decode tokens/s at batch 1, 8 and 32 with 512 tokens of context, the weight bytes per
// second a batch-1 step achieves divided by the memory read bandwidth measured in this same
// process (same threads, best ISA, best of 5 reads of a buffer of max(1 GiB, 4 x LLC)), prefill
// tokens/s over 512 tokens, KV bytes and peak RSS against weight bytes. Writes JSON to --out.
//
//   build/bench/decode_bench --out=docs/benchmarks/cpu_decode.json [--threads=N]
//
// The weights go through the real path: a child process writes a safetensors checkpoint, the
// benchmark loads it with LoadModelWeights (so peak RSS is the serving process's, not the
// generator's).
#include <immintrin.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "bench/bench_util.h"
#include "common/dtype.h"
#include "common/huge_buffer.h"
#include "common/logging.h"
#include "common/thread_pool.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/isa.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/llama_model.h"
#include "model/safetensors.h"
#include "model/weights.h"

ABSL_FLAG(std::string, out, "", "Write the results as JSON here");
ABSL_FLAG(int, threads, 0, "Compute threads (0 = all cores)");
ABSL_FLAG(int, context, 512, "Tokens of context per sequence while decoding");
ABSL_FLAG(int, decode_steps, 8, "Decode steps timed per batch size (best step time is used)");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"1", "8", "32"}),
          "Decode batch sizes to time (at most 32)");
ABSL_FLAG(bool, prefill, true, "Also time a 512-token prefill");
ABSL_FLAG(bool, bandwidth_only, false, "Only measure the read bandwidth and exit");
ABSL_FLAG(std::string, model_dir, "", "Where the checkpoint is written (default: a temp dir)");

namespace ls {
namespace {

using bench::BandwidthBufferBytes;
using bench::Clock;
using bench::CpuFlags;
using bench::CpuModel;
using bench::kTinyLlamaConfig;
using bench::MeasureReadBandwidth;
using bench::PeakRssBytes;
using bench::Seconds;
using bench::WriteCheckpoint;

int Main() {
  if (absl::GetFlag(FLAGS_bandwidth_only)) {
    int threads = absl::GetFlag(FLAGS_threads);
    if (threads <= 0) threads = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
    const Isa isa = DetectIsa() == Isa::kAvx512 ? Isa::kAvx512 : Isa::kAvx2;
    std::printf("read bandwidth (%d threads, %s): %.2f GB/s\n", threads,
                std::string(IsaName(isa)).c_str(),
                MeasureReadBandwidth(threads, isa, BandwidthBufferBytes()) / 1e9);
    return 0;
  }
  auto config = ParseModelConfig(kTinyLlamaConfig, "", ConfigOptions{});
  LS_CHECK(config.ok()) << config.status();
  const ModelConfig& c = *config;
  std::string dir = absl::GetFlag(FLAGS_model_dir);
  const bool temp_dir = dir.empty();
  if (temp_dir)
    dir = absl::StrCat(std::filesystem::temp_directory_path().string(), "/ls_decode_bench_",
                       getpid());
  if (!std::filesystem::exists(dir + "/model.safetensors")) {
    std::fprintf(stderr, "writing a random bf16 checkpoint to %s ...\n", dir.c_str());
    WriteCheckpoint(c, dir);
  }
  auto ckpt = SafetensorsCheckpoint::Open(dir);
  LS_CHECK(ckpt.ok()) << ckpt.status();
  const auto load_t0 = Clock::now();
  auto weights = LoadModelWeights(**ckpt, c, DType::kBF16);
  LS_CHECK(weights.ok()) << weights.status();
  const double load_seconds = Seconds(Clock::now() - load_t0);
  ckpt->reset();  // unmap the file: only the arena stays resident
  // Peak so far: what loading a model costs, before this benchmark fills KV and probes memory.
  const int64_t peak_rss_after_load = PeakRssBytes();
  if (temp_dir) std::filesystem::remove_all(dir);

  const int context = absl::GetFlag(FLAGS_context);
  const int steps = absl::GetFlag(FLAGS_decode_steps);
  std::vector<int> batches;
  for (const std::string& b : absl::GetFlag(FLAGS_batches)) {
    int value = 0;
    LS_CHECK(absl::SimpleAtoi(b, &value) && value >= 1 && value <= 32) << "--batches: " << b;
    batches.push_back(value);
  }
  CpuBackendOptions bo;
  bo.threads = absl::GetFlag(FLAGS_threads);
  bo.max_context = context + steps + 1;
  auto backend = CpuBackend::Create(bo);
  LS_CHECK(backend.ok()) << backend.status();
  KvCacheOptions kv;
  kv.num_layers = c.num_hidden_layers;
  kv.num_kv_heads = c.num_key_value_heads;
  kv.head_dim = c.head_dim;
  kv.block_tokens = 16;
  const int64_t tokens_per_seq = context + steps + 1;
  kv.cache_bytes = KvCache::BlockBytes(kv) *
                   static_cast<uint64_t>(32 * ((tokens_per_seq + 15) / 16) + (context + 15) / 16);
  auto cache = KvCache::Create(kv);
  LS_CHECK(cache.ok()) << cache.status();
  // Random K/V stand in for 512 prefilled tokens: attention costs the same whatever the values.
  bench::FillKvRandom(**cache);
  auto model = LlamaModel::Create(&c, weights->get(), backend->get(), std::max(32, context));
  LS_CHECK(model.ok()) << model.status();

  // Bytes of weights one decode step streams: every matrix except the embedding (gathered).
  uint64_t step_weight_bytes = 0;
  auto add = [&](const WeightView& w) {
    step_weight_bytes += static_cast<uint64_t>(w.rows * w.cols) * (w.dtype == DType::kBF16 ? 2 : 4);
  };
  for (const LayerWeights& l : (*weights)->layers()) {
    add(l.qkv);
    add(l.o);
    add(l.gate_up);
    add(l.down);
  }
  add((*weights)->lm_head());

  std::vector<std::vector<int32_t>> tables(32);
  for (auto& t : tables) LS_CHECK((*cache)->EnsureCapacity(tokens_per_seq, &t).ok());
  const size_t stride = tables[0].size();
  std::vector<float> logits(static_cast<size_t>(32) * c.vocab_size);

  std::string json = "{\n";
  absl::StrAppendFormat(&json, "  \"date\": \"%s\",\n", "2026-11-29");
  absl::StrAppendFormat(&json, "  \"cpu\": \"%s\",\n", CpuModel());
  absl::StrAppendFormat(&json, "  \"cpu_flags\": \"%s\",\n", CpuFlags());
  absl::StrAppendFormat(&json, "  \"isa\": \"%s\",\n", IsaName((*backend)->isa()));
  absl::StrAppendFormat(&json, "  \"threads\": %d,\n", (*backend)->threads());
  absl::StrAppendFormat(&json, "  \"model\": \"TinyLlama-1.1B shapes, random bf16\",\n");
  absl::StrAppendFormat(&json, "  \"context\": %d,\n", context);
  absl::StrAppendFormat(&json, "  \"weight_bytes\": %d,\n", (*weights)->arena_bytes());
  absl::StrAppendFormat(&json, "  \"step_weight_bytes\": %d,\n", step_weight_bytes);
  absl::StrAppendFormat(&json, "  \"load_seconds\": %.3f,\n", load_seconds);
  // Best step time of `b` sequences decoding together (one warm-up step, then `steps` timed).
  auto best_step = [&](int b) {
    std::vector<int32_t> ids(b, 3), positions(b), block_tables, logits_rows(b);
    for (int i = 0; i < b; ++i) {
      logits_rows[i] = i;
      block_tables.insert(block_tables.end(), tables[i].begin(), tables[i].end());
    }
    double best = 1e30;
    for (int s = 0; s <= steps; ++s) {
      for (int i = 0; i < b; ++i) positions[i] = context + s;
      ForwardBatch batch;
      batch.token_ids = ids;
      batch.positions = positions;
      batch.block_tables = block_tables;
      batch.block_table_stride = static_cast<int64_t>(stride);
      batch.logits_rows = logits_rows;
      const auto t0 = Clock::now();
      const absl::Status st = (*model)->Forward(batch, **cache, logits.data());
      const double t = Seconds(Clock::now() - t0);
      LS_CHECK(st.ok()) << st;
      if (s > 0) best = std::min(best, t);  // step 0 warms caches and pages
    }
    return best;
  };
  // Where a batch-1 step's time goes: the same weight matrices multiplied back to back with
  // nothing else in between (best of `steps` passes).
  auto best_matmuls_only = [&]() {
    const int64_t widest = std::max<int64_t>(c.vocab_size, 2 * c.intermediate_size);
    std::vector<float> x(static_cast<size_t>(std::max<int64_t>(c.hidden_size, c.intermediate_size)),
                         0.5f);
    std::vector<float> y(static_cast<size_t>(widest));
    Backend& be = **backend;
    double best = 1e30;
    for (int s = 0; s <= steps; ++s) {
      const auto t0 = Clock::now();
      for (const LayerWeights& l : (*weights)->layers()) {
        for (const WeightView* w : {&l.qkv, &l.o, &l.gate_up, &l.down}) {
          LS_CHECK(be.MatMul(x.data(), 1, w->cols, *w, nullptr, y.data(), w->rows, false).ok());
        }
      }
      const WeightView& head = (*weights)->lm_head();
      LS_CHECK(be.MatMul(x.data(), 1, head.cols, head, nullptr, y.data(), head.rows, false).ok());
      const double t = Seconds(Clock::now() - t0);
      if (s > 0) best = std::min(best, t);
    }
    return best;
  };
  json += "  \"decode\": [\n";
  for (size_t bi = 0; bi < batches.size(); ++bi) {
    const int b = batches[bi];
    const double best = best_step(b);
    absl::StrAppendFormat(&json,
                          "    {\"batch\": %d, \"step_seconds\": %.6f, \"tokens_per_second\": "
                          "%.2f}%s\n",
                          b, best, b / best, bi + 1 < batches.size() ? "," : "");
    std::fprintf(stderr, "decode batch %2d: %.2f tokens/s (step %.1f ms)\n", b, b / best,
                 best * 1e3);
  }
  json += "  ],\n";

  // Prefill of 512 tokens of one sequence (in one batch).
  if (absl::GetFlag(FLAGS_prefill)) {
    const int n = context;
    std::vector<int32_t> ids(n), positions(n), block_tables, logits_rows = {n - 1};
    for (int i = 0; i < n; ++i) {
      ids[i] = 3 + i % 1000;
      positions[i] = i;
    }
    std::vector<int32_t> table;
    LS_CHECK((*cache)->EnsureCapacity(n, &table).ok());
    table.resize(stride, table.back());
    for (int i = 0; i < n; ++i) block_tables.insert(block_tables.end(), table.begin(), table.end());
    ForwardBatch batch;
    batch.token_ids = ids;
    batch.positions = positions;
    batch.block_tables = block_tables;
    batch.block_table_stride = static_cast<int64_t>(stride);
    batch.logits_rows = logits_rows;
    const auto t0 = Clock::now();
    const absl::Status st = (*model)->Forward(batch, **cache, logits.data());
    const double t = Seconds(Clock::now() - t0);
    LS_CHECK(st.ok()) << st;
    absl::StrAppendFormat(&json,
                          "  \"prefill\": {\"tokens\": %d, \"seconds\": %.3f, "
                          "\"tokens_per_second\": %.2f},\n",
                          n, t, n / t);
    std::fprintf(stderr, "prefill %d tokens: %.2f tokens/s\n", n, n / t);
  }

  // Batch-1 weight stream against read bandwidth: the machine is shared, so five trials each
  // measure the bandwidth and then time batch-1 steps right after it; the median ratio counts.
  const Isa bw_isa = (*backend)->isa() == Isa::kAvx512 ? Isa::kAvx512 : Isa::kAvx2;
  struct Trial {
    double bandwidth, achieved, ratio, matmuls_only;
  };
  std::vector<Trial> trials;
  for (int t = 0; t < 5; ++t) {
    const double bandwidth =
        MeasureReadBandwidth((*backend)->threads(), bw_isa, BandwidthBufferBytes());
    const double achieved = static_cast<double>(step_weight_bytes) / best_step(1);
    const double matmuls_only = static_cast<double>(step_weight_bytes) / best_matmuls_only();
    trials.push_back({bandwidth, achieved, achieved / bandwidth, matmuls_only});
    std::fprintf(stderr,
                 "trial %d: batch-1 weight stream %.2f GB/s of %.2f GB/s read: %.3f "
                 "(its MatMuls alone: %.2f GB/s, %.3f)\n",
                 t, achieved / 1e9, bandwidth / 1e9, achieved / bandwidth, matmuls_only / 1e9,
                 matmuls_only / bandwidth);
  }
  std::vector<Trial> sorted = trials;
  std::sort(sorted.begin(), sorted.end(),
            [](const Trial& a, const Trial& b) { return a.ratio < b.ratio; });
  const Trial& median = sorted[sorted.size() / 2];
  absl::StrAppendFormat(&json, "  \"read_bandwidth_buffer_bytes\": %d,\n", BandwidthBufferBytes());
  json += "  \"batch1_trials\": [\n";
  for (size_t t = 0; t < trials.size(); ++t) {
    absl::StrAppendFormat(&json,
                          "    {\"read_bandwidth_bytes_per_second\": %.0f, "
                          "\"weight_bytes_per_second\": %.0f, \"ratio\": %.3f, "
                          "\"matmuls_only_bytes_per_second\": %.0f, "
                          "\"matmuls_only_ratio\": %.3f}%s\n",
                          trials[t].bandwidth, trials[t].achieved, trials[t].ratio,
                          trials[t].matmuls_only, trials[t].matmuls_only / trials[t].bandwidth,
                          t + 1 < trials.size() ? "," : "");
  }
  json += "  ],\n";
  absl::StrAppendFormat(&json, "  \"read_bandwidth_bytes_per_second\": %.0f,\n", median.bandwidth);
  absl::StrAppendFormat(&json, "  \"batch1_weight_bytes_per_second\": %.0f,\n", median.achieved);
  absl::StrAppendFormat(&json, "  \"batch1_bandwidth_ratio\": %.3f,\n", median.ratio);
  absl::StrAppendFormat(&json, "  \"kv_bytes_per_token\": %d,\n",
                        KvCache::BlockBytes(kv) / static_cast<uint64_t>(kv.block_tokens));
  absl::StrAppendFormat(&json, "  \"kv_cache_bytes\": %d,\n", (*cache)->total_bytes());
  absl::StrAppendFormat(&json, "  \"peak_rss_after_load_bytes\": %d,\n", peak_rss_after_load);
  absl::StrAppendFormat(
      &json, "  \"peak_rss_after_load_over_weight_bytes\": %.3f,\n",
      static_cast<double>(peak_rss_after_load) / static_cast<double>((*weights)->arena_bytes()));
  absl::StrAppendFormat(&json, "  \"peak_rss_bytes\": %d,\n", PeakRssBytes());
  absl::StrAppendFormat(
      &json, "  \"peak_rss_over_weight_bytes\": %.3f\n}\n",
      static_cast<double>(PeakRssBytes()) / static_cast<double>((*weights)->arena_bytes()));
  std::fprintf(stderr, "median batch-1 ratio: %.3f\n", median.ratio);
  std::fputs(json.c_str(), stdout);
  const std::string out = absl::GetFlag(FLAGS_out);
  if (!out.empty()) std::ofstream(out) << json;
  return 0;
}

}  // namespace
}  // namespace ls

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ls::Main();
}
