// Segmented LoRA on the CPU backend against the base GEMMs it rides on: one TinyLlama-1.1B
// layer's projections (hidden 2048; fused q/k/v 2048+256+256; o 2048; fused gate/up 2 x 5632;
// down 5632 -> 2048), bf16 weights, rank-16 adapters on every linear module ("all-linear"), for
// batches of 1..64 rows spread evenly over 1..64 distinct adapters (contiguous segments).
//
//   build/bench/lora_bench --out=docs/benchmarks/lora_kernels.json [--threads=N]
//
// Per projection, in model order, it times Backend::MatMul over the batch (what the model runs
// for the base weight) and then Backend::LoraLinear over the same rows (shrink + scale + expand
// of every segment), each with its own clock reads, so the ratio comes from the same run and
// the same cache state. To keep both honest about memory traffic the benchmark cycles through
// several layers' worth of distinct weights (base and adapters), at least 2 x the last-level
// cache of base weights, as a real forward pass does: nothing is served warm from the previous
// repetition. Reported: per-layer times (median over repetitions) and the median of the
// per-repetition ratio LoRA / base, with its min and max as the noise band.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
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
#include "bench/bench_util.h"
#include "common/dtype.h"
#include "common/huge_buffer.h"
#include "common/logging.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/isa.h"
#include "kernels/lora.h"

ABSL_FLAG(std::string, out, "", "Write the results as JSON here");
ABSL_FLAG(int, threads, 0, "Compute threads (0 = all cores)");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"1", "8", "32", "64"}),
          "Batch sizes (rows)");
ABSL_FLAG(std::vector<std::string>, adapters, std::vector<std::string>({"1", "8", "32", "64"}),
          "Distinct adapters per batch (only those <= the batch run)");
ABSL_FLAG(int, rank, 16, "LoRA rank of every module");
ABSL_FLAG(int, reps, 9, "Timed repetitions per configuration (after one warm-up)");
ABSL_FLAG(int, layers, 0, "Distinct layers cycled through (0: enough for 2 x the LLC)");

namespace ls {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kHidden = 2048;
constexpr int64_t kKv = 256;  // 4 kv heads x 64
constexpr int64_t kInter = 5632;

// The four projections of a layer, in model order.
struct ProjectionShape {
  const char* name;
  int64_t in;
  std::vector<int64_t> outs;  // fused parts
  int64_t out() const {
    int64_t total = 0;
    for (int64_t o : outs) total += o;
    return total;
  }
};

const ProjectionShape kProjections[] = {
    {"qkv", kHidden, {kHidden, kKv, kKv}},
    {"o", kHidden, {kHidden}},
    {"gate_up", kHidden, {kInter, kInter}},
    {"down", kInter, {kHidden}},
};
constexpr int kNumProjections = 4;

// Bump allocation of bf16 matrices out of one huge-page buffer, filled with small random values.
class Bf16Arena {
 public:
  explicit Bf16Arena(size_t elements) {
    auto buffer = HugeBuffer::Allocate(elements * sizeof(uint16_t));
    LS_CHECK(buffer.ok()) << buffer.status();
    buffer_ = std::move(buffer).value();
    capacity_ = elements;
  }
  WeightView Matrix(int64_t rows, int64_t cols, std::mt19937& rng) {
    const size_t n = static_cast<size_t>(rows * cols);
    LS_CHECK(used_ + n <= capacity_);
    uint16_t* data = static_cast<uint16_t*>(buffer_.data()) + used_;
    used_ += n;
    // Random bf16 in about [-0.06, 0.06]: sign, an exponent of 2^-5..2^-11, a random mantissa.
    for (size_t i = 0; i < n; ++i) {
      const uint32_t r = rng();
      data[i] = static_cast<uint16_t>(((r & 1u) << 15) | ((0x79u + (r >> 1) % 7u) << 7) |
                                      ((r >> 8) & 0x7fu));
    }
    WeightView w;
    w.data = data;
    w.dtype = DType::kBF16;
    w.rows = rows;
    w.cols = cols;
    return w;
  }

 private:
  HugeBuffer buffer_;
  size_t capacity_ = 0;
  size_t used_ = 0;
};

std::string LoadAverage() {
  std::ifstream in("/proc/loadavg");
  std::string one, five, fifteen;
  in >> one >> five >> fifteen;
  return absl::StrCat(one, " ", five, " ", fifteen);
}

std::string Today() {
  const std::time_t now = std::time(nullptr);
  char text[16];
  std::strftime(text, sizeof(text), "%Y-%m-%d", std::gmtime(&now));
  return text;
}

std::vector<int> IntList(const std::vector<std::string>& items) {
  std::vector<int> out;
  for (const std::string& s : items) {
    int v = 0;
    LS_CHECK(absl::SimpleAtoi(s, &v) && v > 0) << "bad list item " << s;
    out.push_back(v);
  }
  return out;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int Main() {
  const int rank = absl::GetFlag(FLAGS_rank);
  const int reps = absl::GetFlag(FLAGS_reps);
  const std::vector<int> batches = IntList(absl::GetFlag(FLAGS_batches));
  const std::vector<int> adapter_counts = IntList(absl::GetFlag(FLAGS_adapters));
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  int max_adapters = 0;
  for (int a : adapter_counts) {
    if (a <= max_batch) max_adapters = std::max(max_adapters, a);
  }
  LS_CHECK(rank >= 1 && reps >= 1 && max_adapters >= 1);

  CpuBackendOptions options;
  options.threads = absl::GetFlag(FLAGS_threads);
  options.max_context = 16;
  auto backend = CpuBackend::Create(options);
  LS_CHECK(backend.ok()) << backend.status();
  CpuBackend& cpu = **backend;

  // Elements per layer: base weights and one adapter's A and B matrices.
  int64_t base_elements = 0;
  int64_t adapter_elements = 0;
  for (const ProjectionShape& p : kProjections) {
    base_elements += p.out() * p.in;
    adapter_elements += static_cast<int64_t>(rank) * p.outs.size() * p.in + rank * p.out();
  }
  int layers = absl::GetFlag(FLAGS_layers);
  if (layers <= 0) {
    const uint64_t want = std::max<uint64_t>(512ull << 20, 2 * bench::LastLevelCacheBytes());
    layers = static_cast<int>((want + 2 * base_elements - 1) / (2 * base_elements));
  }
  std::fprintf(stderr, "%s, %d threads, %s; %d layers of %.1f MB base + %d adapters x %.2f MB\n",
               bench::CpuModel().c_str(), cpu.threads(), std::string(IsaName(cpu.isa())).c_str(),
               layers, 2e-6 * base_elements, max_adapters, 2e-6 * adapter_elements);

  // Weights: [layer][projection] base matrices and [layer][adapter][projection] groups.
  std::mt19937 rng(1);
  Bf16Arena base_arena(static_cast<size_t>(layers) * base_elements);
  Bf16Arena adapter_arena(static_cast<size_t>(layers) * max_adapters * adapter_elements);
  std::vector<WeightView> base(static_cast<size_t>(layers) * kNumProjections);
  std::vector<LoraGroup> groups(static_cast<size_t>(layers) * max_adapters * kNumProjections);
  for (int l = 0; l < layers; ++l) {
    for (int p = 0; p < kNumProjections; ++p) {
      const ProjectionShape& shape = kProjections[p];
      base[l * kNumProjections + p] = base_arena.Matrix(shape.out(), shape.in, rng);
      for (int a = 0; a < max_adapters; ++a) {
        LoraGroup& g = groups[(static_cast<size_t>(l) * max_adapters + a) * kNumProjections + p];
        g.num_slices = static_cast<int>(shape.outs.size());
        g.rank_total = rank * g.num_slices;
        g.a = adapter_arena.Matrix(g.rank_total, shape.in, rng);
        int64_t out_offset = 0;
        for (int j = 0; j < g.num_slices; ++j) {
          LoraSlice& s = g.slices[j];
          s.rank = rank;
          s.rank_offset = rank * j;
          s.out_offset = out_offset;
          s.scale = 32.0f / static_cast<float>(rank);
          s.b = adapter_arena.Matrix(shape.outs[j], rank, rng);
          out_offset += shape.outs[j];
        }
      }
    }
  }

  // Activations: x is wide enough for down's input; y for gate_up's output.
  const int64_t ldx = kInter;
  const int64_t ldy = 2 * kInter;
  std::vector<float> x(static_cast<size_t>(max_batch) * ldx);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (float& v : x) v = uniform(rng);
  std::vector<float> y(static_cast<size_t>(max_batch) * ldy, 0.0f);
  const int64_t ld_scratch = 3 * rank;
  std::vector<float> scratch(static_cast<size_t>(max_batch) * ld_scratch);

  const std::string load_before = LoadAverage();
  std::string results;
  std::fprintf(stderr, "%6s %8s %12s %12s %8s %17s\n", "batch", "adapters", "base ms/layer",
               "lora ms/layer", "ratio", "ratio min..max");
  for (int batch : batches) {
    for (int num_adapters : adapter_counts) {
      if (num_adapters > batch) continue;
      std::vector<LoraSegment> segments(num_adapters);
      std::vector<double> base_seconds, lora_seconds, ratios;
      double projection_base[kNumProjections] = {};
      double projection_lora[kNumProjections] = {};
      for (int rep = -1; rep < reps; ++rep) {  // rep -1 warms up
        double base_total = 0.0;
        double lora_total = 0.0;
        for (int l = 0; l < layers; ++l) {
          for (int p = 0; p < kNumProjections; ++p) {
            for (int a = 0; a < num_adapters; ++a) {
              segments[a].row_begin = static_cast<int64_t>(batch) * a / num_adapters;
              segments[a].row_end = static_cast<int64_t>(batch) * (a + 1) / num_adapters;
              segments[a].group =
                  &groups[(static_cast<size_t>(l) * max_adapters + a) * kNumProjections + p];
            }
            const WeightView& w = base[l * kNumProjections + p];
            const bool residual = p == 1 || p == 3;  // o and down add into the hidden state
            const Clock::time_point t0 = Clock::now();
            LS_CHECK(cpu.MatMul(x.data(), batch, ldx, w, nullptr, y.data(), ldy, residual).ok());
            const Clock::time_point t1 = Clock::now();
            LS_CHECK(cpu.LoraLinear(x.data(), ldx, segments.data(), num_adapters, scratch.data(),
                                    ld_scratch, y.data(), ldy)
                         .ok());
            const Clock::time_point t2 = Clock::now();
            const double b = std::chrono::duration<double>(t1 - t0).count();
            const double r = std::chrono::duration<double>(t2 - t1).count();
            base_total += b;
            lora_total += r;
            if (rep >= 0) {
              projection_base[p] += b / (static_cast<double>(reps) * layers);
              projection_lora[p] += r / (static_cast<double>(reps) * layers);
            }
          }
          // Keep y bounded: the residual projections accumulate into it every layer.
          if (rep >= 0 && l == layers - 1) std::fill(y.begin(), y.end(), 0.0f);
        }
        if (rep < 0) continue;
        base_seconds.push_back(base_total / layers);
        lora_seconds.push_back(lora_total / layers);
        ratios.push_back(lora_total / base_total);
      }
      const double base_ms = 1e3 * Median(base_seconds);
      const double lora_ms = 1e3 * Median(lora_seconds);
      const double ratio = Median(ratios);
      const double ratio_min = *std::min_element(ratios.begin(), ratios.end());
      const double ratio_max = *std::max_element(ratios.begin(), ratios.end());
      std::fprintf(stderr, "%6d %8d %12.3f %12.3f %8.4f %8.4f..%.4f\n", batch, num_adapters,
                   base_ms, lora_ms, ratio, ratio_min, ratio_max);
      std::string per_projection;
      for (int p = 0; p < kNumProjections; ++p) {
        absl::StrAppendFormat(&per_projection, "%s\"%s\": {\"base_ms\": %.4f, \"lora_ms\": %.4f}",
                              p == 0 ? "" : ", ", kProjections[p].name, 1e3 * projection_base[p],
                              1e3 * projection_lora[p]);
      }
      absl::StrAppendFormat(
          &results,
          "%s    {\"batch\": %d, \"adapters\": %d, \"base_ms_per_layer\": %.4f, "
          "\"lora_ms_per_layer\": %.4f, \"ratio\": %.5f, \"ratio_min\": %.5f, "
          "\"ratio_max\": %.5f, \"base_ms_min\": %.4f, \"lora_ms_min\": %.4f,\n"
          "     \"per_projection_mean\": {%s}}",
          results.empty() ? "" : ",\n", batch, num_adapters, base_ms, lora_ms, ratio, ratio_min,
          ratio_max, 1e3 * *std::min_element(base_seconds.begin(), base_seconds.end()),
          1e3 * *std::min_element(lora_seconds.begin(), lora_seconds.end()), per_projection);
    }
  }
  const std::string load_after = LoadAverage();
  std::fprintf(stderr, "load average before %s, after %s\n", load_before.c_str(),
               load_after.c_str());

  std::string json = "{\n";
  absl::StrAppendFormat(&json, "  \"date\": \"%s\",\n", Today());
  absl::StrAppendFormat(&json, "  \"cpu\": \"%s\",\n", bench::CpuModel());
  absl::StrAppendFormat(&json, "  \"isa\": \"%s\",\n", IsaName(cpu.isa()));
  absl::StrAppendFormat(&json, "  \"threads\": %d,\n", cpu.threads());
  absl::StrAppendFormat(&json,
                        "  \"model\": \"TinyLlama-1.1B layer (hidden 2048, q/k/v 2048+256+256, o "
                        "2048, gate/up 2x5632, down 5632->2048), random bf16\",\n");
  absl::StrAppendFormat(&json, "  \"rank\": %d,\n", rank);
  absl::StrAppendFormat(&json, "  \"layers_cycled\": %d,\n", layers);
  absl::StrAppendFormat(&json, "  \"base_bytes_per_layer\": %d,\n", 2 * base_elements);
  absl::StrAppendFormat(&json, "  \"adapter_bytes_per_layer\": %d,\n", 2 * adapter_elements);
  absl::StrAppendFormat(&json, "  \"reps\": %d,\n", reps);
  absl::StrAppendFormat(&json, "  \"load_average_before\": \"%s\",\n", load_before);
  absl::StrAppendFormat(&json, "  \"load_average_after\": \"%s\",\n", load_after);
  json += "  \"results\": [\n" + results + "\n  ]\n}\n";
  const std::string out = absl::GetFlag(FLAGS_out);
  if (!out.empty()) {
    std::ofstream(out) << json;
    std::fprintf(stderr, "wrote %s\n", out.c_str());
  } else {
    std::fputs(json.c_str(), stdout);
  }
  return 0;
}

}  // namespace
}  // namespace ls

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ls::Main();
}
