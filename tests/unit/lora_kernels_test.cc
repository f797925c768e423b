// Conformance of the CPU backend's segmented LoRA ops (Backend::LoraLinear, LoraEmbedding) on
// every ISA path this CPU offers, against the float64 reference in kernels/cpu/reference.h.
//
// Batches follow adapter popularity patterns over their rows (distinct: every row its own
// adapter; uniform over 8; Zipf(1.5) over 32; identical: one adapter, one segment; skewed: one
// hot adapter with 3/4 of the rows and a tail of 7), at 1, 3, 7 and 133 rows. Adapters mix ranks
// 1..128 and fuse up to three slices (q/k/v-like: different out sizes and ranks, some slices
// absent, some adapters touching none); about 1 row in 8 has no adapter, as a gap between
// segments, a segment with a null group, or one with an empty group; empty segments are
// sprinkled in. Weights are F32 or BF16; x, A, B, scales and the initial y are random and never
// zero (y's initial value exercises the accumulate).
//
// Checks:
// - Accuracy, per element (u = 2^-24):
//     |y - ref| <= 1e-5 * (|y_in| + sum_r |B_cr| * |s| * sum_k |x_k A_rk|)
//   The shrink rounds at most ceil(in/16) + 5 times (21 for in = 257, 68 for in = 1000), the
//   scale once, the expand ceil(rank/16) + 5 times and the final add once: under 80u ~ 4.8e-6 of
//   that magnitude. LoraEmbedding's gather is exact, so only the expand's rounding counts.
// - Bit identity: every ISA and thread count (1, 2, 3) gives the scalar path's bits; a row gives
//   the same bits alone as in its batch, and in another layout of the same rows (segments in
//   reverse order, split into pieces, rows shuffled within them); rows with no adapter, and the
//   columns a row's adapter does not write (absent slices, padding), keep y's bits exactly.
// - Merged vs unmerged: MatMul(x, W) followed by LoraLinear equals MatMul(x, W + s·B·A) (the
//   merged weight rounded to float32) within 1e-5 of the combined magnitude, and rows without an
//   adapter are bit-identical to the base MatMul.
// - Bad arguments return INVALID_ARGUMENT naming the op, before anything is written.
// The last test checks that every ISA the CPU offers ran both ops.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/reference.h"
#include "kernels/lora.h"
#include "tests/unit/kernel_test_util.h"

namespace ls {
namespace {

using ::testing::HasSubstr;

constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512};
constexpr const char* kOps[] = {"LoraLinear", "LoraEmbedding"};
constexpr double kTolerance = 1e-5;

std::vector<Isa> SupportedIsas() {
  std::vector<Isa> isas;
  for (Isa isa : kAllIsas) {
    if (IsaSupported(isa)) isas.push_back(isa);
  }
  return isas;
}

// (op, ISA) pairs some test ran; checked by the last test.
std::set<std::pair<std::string, Isa>>& Exercised() {
  static auto* exercised = new std::set<std::pair<std::string, Isa>>();
  return *exercised;
}

CpuBackend& GetBackend(Isa isa, int threads) {
  static auto* backends = new std::map<std::pair<Isa, int>, std::unique_ptr<CpuBackend>>();
  std::unique_ptr<CpuBackend>& slot = (*backends)[{isa, threads}];
  if (slot == nullptr) {
    CpuBackendOptions options;
    options.isa = isa;
    options.threads = threads;
    options.max_context = 16;
    absl::StatusOr<std::unique_ptr<CpuBackend>> backend = CpuBackend::Create(options);
    EXPECT_TRUE(backend.ok()) << backend.status();
    slot = std::move(backend).value();
  }
  return *slot;
}

// The scalar path on one thread first (the golden bits), then every supported ISA on 1, 2 and 3
// threads.
struct Config {
  CpuBackend* backend;
  std::string label;
};

std::vector<Config> Configs(const std::string& op) {
  std::vector<Config> configs;
  configs.push_back({&GetBackend(Isa::kScalar, 1), "scalar/1 thread"});
  for (Isa isa : SupportedIsas()) {
    for (int threads : {1, 2, 3}) {
      if (isa == Isa::kScalar && threads == 1) continue;
      configs.push_back(
          {&GetBackend(isa, threads), absl::StrCat(IsaName(isa), "/", threads, " threads")});
    }
    Exercised().insert({op, isa});
  }
  return configs;
}

CpuBackend& BestBackend(int threads) { return GetBackend(SupportedIsas().back(), threads); }

using kernel_test::BitEqual;
using kernel_test::Rng;
using kernel_test::TestWeight;

// ---- Adapters ----------------------------------------------------------------------------------

// A projection (possibly fused): the input width and each fused part's output width.
struct Projection {
  std::string name;
  int64_t in;
  std::vector<int64_t> outs;
  int64_t out_total() const { return std::accumulate(outs.begin(), outs.end(), int64_t{0}); }
};

// One adapter's weights on one projection, owning them. For LoraEmbedding (`embedding`) A is
// stored transposed, [vocab = in, rank_total].
struct TestAdapter {
  LoraGroup group;
  std::unique_ptr<TestWeight> a;
  std::vector<std::unique_ptr<TestWeight>> b;
};

constexpr int kRanks[] = {1, 2, 3, 4, 7, 8, 16, 17, 32, 64, 100, 128};

// Each fused part is present with probability 4/5 (all absent: an adapter that does not touch
// this projection, num_slices == 0), unless `force_present`.
std::unique_ptr<TestAdapter> MakeAdapter(Rng& rng, DType dtype, const Projection& p, bool embedding,
                                         bool force_present) {
  auto adapter = std::make_unique<TestAdapter>();
  LoraGroup& g = adapter->group;
  int64_t out_offset = 0;
  for (size_t part = 0; part < p.outs.size(); ++part) {
    const bool present = rng.Chance(0.8) || (force_present && part == 0);
    if (present) {
      LoraSlice& slice = g.slices[g.num_slices++];
      slice.rank = kRanks[rng.Int(0, static_cast<int>(std::size(kRanks)) - 1)];
      slice.rank_offset = g.rank_total;
      slice.out_offset = out_offset;
      const float alpha = static_cast<float>(1 << rng.Int(0, 5));
      slice.scale = rng.Chance(0.5) ? alpha / static_cast<float>(slice.rank)
                                    : alpha / std::sqrt(static_cast<float>(slice.rank));
      adapter->b.push_back(std::make_unique<TestWeight>(rng, dtype, p.outs[part], slice.rank));
      slice.b = adapter->b.back()->view();
      g.rank_total += slice.rank;
    }
    out_offset += p.outs[part];
  }
  if (g.num_slices > 0) {
    adapter->a = embedding ? std::make_unique<TestWeight>(rng, dtype, p.in, g.rank_total)
                           : std::make_unique<TestWeight>(rng, dtype, g.rank_total, p.in);
    g.a = adapter->a->view();
  }
  return adapter;
}

// ---- Popularity patterns and layouts -----------------------------------------------------------

enum class Pattern { kDistinct, kUniform, kZipf, kIdentical, kSkewed };
constexpr Pattern kPatterns[] = {Pattern::kDistinct, Pattern::kUniform, Pattern::kZipf,
                                 Pattern::kIdentical, Pattern::kSkewed};

const char* PatternName(Pattern p) {
  switch (p) {
    case Pattern::kDistinct:
      return "distinct";
    case Pattern::kUniform:
      return "uniform";
    case Pattern::kZipf:
      return "zipf1.5";
    case Pattern::kIdentical:
      return "identical";
    case Pattern::kSkewed:
      return "skewed";
  }
  return "?";
}

// Each row's adapter (-1: none) and the number of adapters.
std::vector<int> AssignRows(Pattern pattern, int64_t m, Rng& rng, int* num_adapters) {
  std::vector<int> rows(m);
  switch (pattern) {
    case Pattern::kDistinct:
      *num_adapters = static_cast<int>(m);
      std::iota(rows.begin(), rows.end(), 0);
      break;
    case Pattern::kUniform:
      *num_adapters = 8;
      for (int& r : rows) r = rng.Int(0, 7);
      break;
    case Pattern::kZipf: {
      *num_adapters = 32;
      std::vector<double> weights(32);
      for (int k = 0; k < 32; ++k) weights[k] = std::pow(k + 1.0, -1.5);
      std::discrete_distribution<int> zipf(weights.begin(), weights.end());
      for (int& r : rows) r = zipf(rng.engine());
      break;
    }
    case Pattern::kIdentical:
      *num_adapters = 1;
      std::fill(rows.begin(), rows.end(), 0);
      return rows;  // the one-adapter fast path: no rows without the adapter
    case Pattern::kSkewed:
      *num_adapters = 8;
      for (int& r : rows) r = rng.Chance(0.75) ? 0 : rng.Int(1, 7);
      break;
  }
  for (int& r : rows) {
    if (rng.Chance(0.125)) r = -1;
  }
  return rows;
}

// A batch layout: runs of rows that share an adapter (or have none), in row order. A run of rows
// without an adapter is a gap (no segment), a segment with a null group, or one whose group has
// no slices.
struct RowRun {
  int64_t begin;
  int64_t end;
  int adapter;    // -1: none
  int none_kind;  // for adapter == -1: 0 gap, 1 null group, 2 empty group
};

// Rows grouped by adapter, adapters in random order, the rows without one in chunks between.
std::vector<RowRun> MakeRuns(const std::vector<int>& assignment, int num_adapters, Rng& rng) {
  std::vector<int64_t> count(num_adapters, 0);
  int64_t none = 0;
  for (int a : assignment) {
    if (a < 0) {
      ++none;
    } else {
      ++count[a];
    }
  }
  std::vector<int> order(num_adapters);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng.engine());
  std::vector<RowRun> runs;
  int64_t row = 0;
  auto add_none = [&](int64_t n) {
    if (n == 0) return;
    runs.push_back({row, row + n, -1, rng.Int(0, 2)});
    row += n;
  };
  for (int a : order) {
    if (count[a] == 0) continue;
    const int64_t chunk = none > 0 && rng.Chance(0.5) ? rng.Int(1, static_cast<int>(none)) : 0;
    add_none(chunk);
    none -= chunk;
    runs.push_back({row, row + count[a], a, 0});
    row += count[a];
  }
  add_none(none);
  return runs;
}

// The segments of a layout; `pieces` > 1 cuts adapter runs into up to that many segments. Empty
// segments with a group are sprinkled in (they must be skipped).
std::vector<LoraSegment> MakeSegments(const std::vector<RowRun>& runs,
                                      const std::vector<std::unique_ptr<TestAdapter>>& adapters,
                                      const LoraGroup* empty_group, int pieces, Rng& rng) {
  std::vector<LoraSegment> segments;
  for (const RowRun& run : runs) {
    if (rng.Chance(0.1) && !adapters.empty()) {
      segments.push_back({run.begin, run.begin, &adapters[0]->group});
    }
    if (run.adapter < 0) {
      if (run.none_kind == 1) segments.push_back({run.begin, run.end, nullptr});
      if (run.none_kind == 2) segments.push_back({run.begin, run.end, empty_group});
      continue;
    }
    const LoraGroup* group = &adapters[run.adapter]->group;
    int64_t begin = run.begin;
    for (int p = 1; p < pieces && begin < run.end; ++p) {
      const int64_t end = rng.Int(static_cast<int>(begin), static_cast<int>(run.end));
      segments.push_back({begin, end, group});
      begin = end;
    }
    segments.push_back({begin, run.end, group});
  }
  return segments;
}

// Which adapter writes row i (-1: none) and which of y's columns it writes.
std::vector<const LoraGroup*> RowGroups(const std::vector<LoraSegment>& segments, int64_t m) {
  std::vector<const LoraGroup*> groups(m, nullptr);
  for (const LoraSegment& s : segments) {
    if (s.group == nullptr || s.group->num_slices == 0) continue;
    for (int64_t i = s.row_begin; i < s.row_end; ++i) groups[i] = s.group;
  }
  return groups;
}

bool Writes(const LoraGroup* g, int64_t col) {
  if (g == nullptr) return false;
  for (int j = 0; j < g->num_slices; ++j) {
    if (col >= g->slices[j].out_offset && col < g->slices[j].out_offset + g->slices[j].b.rows) {
      return true;
    }
  }
  return false;
}

int64_t MaxRankTotal(const std::vector<std::unique_ptr<TestAdapter>>& adapters) {
  int64_t max_rank = 1;
  for (const auto& a : adapters) max_rank = std::max<int64_t>(max_rank, a->group.rank_total);
  return max_rank;
}

// Scratch full of NaN: a path that read scratch it had not written would poison y.
std::vector<float> Scratch(int64_t m, int64_t ld) {
  return std::vector<float>(static_cast<size_t>(std::max<int64_t>(m, 1) * ld),
                            std::numeric_limits<float>::quiet_NaN());
}

// The largest |y - ref| / magnitude seen, reported against kTolerance.
double& WorstError() {
  static double worst = 0.0;
  return worst;
}

// ---- The shared conformance driver --------------------------------------------------------

// Runs one op (LoraLinear when ids is null, else LoraEmbedding) with the given inputs.
absl::Status RunOp(Backend& backend, const int32_t* ids, const float* x, int64_t ldx,
                   const std::vector<LoraSegment>& segments, int64_t ld_scratch, float* y,
                   int64_t ldy, int64_t m) {
  std::vector<float> scratch = Scratch(m, ld_scratch);
  const int n = static_cast<int>(segments.size());
  if (ids != nullptr) {
    return backend.LoraEmbedding(ids, segments.data(), n, scratch.data(), ld_scratch, y, ldy);
  }
  return backend.LoraLinear(x, ldx, segments.data(), n, scratch.data(), ld_scratch, y, ldy);
}

struct Case {
  const Projection* projection;
  DType dtype;
  Pattern pattern;
  int64_t m;
  bool embedding;
};

std::string CaseName(const Case& c) {
  return absl::StrCat(c.embedding ? "LoraEmbedding " : "LoraLinear ", c.projection->name, " ",
                      DTypeName(c.dtype), " ", PatternName(c.pattern), " m=", c.m);
}

void CheckCase(const Case& c, const std::vector<Config>& configs, Rng& rng) {
  SCOPED_TRACE(CaseName(c));
  const Projection& p = *c.projection;
  int num_adapters = 0;
  const std::vector<int> assignment = AssignRows(c.pattern, c.m, rng, &num_adapters);
  std::vector<std::unique_ptr<TestAdapter>> adapters;
  for (int a = 0; a < num_adapters; ++a) {
    adapters.push_back(MakeAdapter(rng, c.dtype, p, c.embedding,
                                   /*force_present=*/c.pattern == Pattern::kIdentical));
  }
  const LoraGroup empty_group;
  const std::vector<RowRun> runs = MakeRuns(assignment, num_adapters, rng);
  const std::vector<LoraSegment> segments = MakeSegments(runs, adapters, &empty_group, 1, rng);
  const std::vector<const LoraGroup*> row_groups = RowGroups(segments, c.m);

  const int64_t m = c.m;
  const int64_t ldx = p.in + 3;
  const int64_t ldy = p.out_total() + 5;
  const int64_t ld_scratch = MaxRankTotal(adapters) + 2;
  const std::vector<float> x = rng.Vector(m * ldx);
  std::vector<int32_t> ids(m);
  for (int32_t& id : ids) id = rng.Int(0, static_cast<int>(p.in) - 1);
  const int32_t* ids_or_null = c.embedding ? ids.data() : nullptr;
  const std::vector<float> y_in = rng.Vector(m * ldy);

  std::vector<double> ref(m * ldy), magnitude(m * ldy);
  const int n = static_cast<int>(segments.size());
  if (c.embedding) {
    reference::LoraEmbedding(ids.data(), segments.data(), n, y_in.data(), m, ldy, ref.data(),
                             magnitude.data());
  } else {
    reference::LoraLinear(x.data(), ldx, segments.data(), n, y_in.data(), m, ldy, ref.data(),
                          magnitude.data());
  }

  std::vector<float> golden;
  for (const Config& config : configs) {
    SCOPED_TRACE(config.label);
    std::vector<float> y = y_in;
    ASSERT_TRUE(
        RunOp(*config.backend, ids_or_null, x.data(), ldx, segments, ld_scratch, y.data(), ldy, m)
            .ok());
    if (golden.empty()) {
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t col = 0; col < ldy; ++col) {
          const int64_t e = i * ldy + col;
          if (!Writes(row_groups[i], col)) {
            // No adapter on this row, an absent slice, or padding: untouched, bit for bit.
            ASSERT_TRUE(BitEqual(&y[e], &y_in[e], 1)) << "row " << i << " column " << col;
          } else {
            const double error = std::fabs(y[e] - ref[e]);
            ASSERT_LE(error, kTolerance * magnitude[e])
                << "row " << i << " column " << col << ": " << y[e] << " vs " << ref[e];
            WorstError() = std::max(WorstError(), error / magnitude[e]);
          }
        }
      }
      golden = y;
    } else {
      ASSERT_TRUE(BitEqual(y.data(), golden.data(), y.size()));
    }
  }

  // Each row alone: the same bits as in the batch.
  CpuBackend& alone = BestBackend(1);
  for (int64_t i = 0; i < m; ++i) {
    if (row_groups[i] == nullptr) continue;
    std::vector<float> y(y_in.begin() + i * ldy, y_in.begin() + (i + 1) * ldy);
    const std::vector<LoraSegment> one = {{0, 1, row_groups[i]}};
    ASSERT_TRUE(RunOp(alone, c.embedding ? &ids[i] : nullptr, x.data() + i * ldx, ldx, one,
                      ld_scratch, y.data(), ldy, 1)
                    .ok());
    ASSERT_TRUE(BitEqual(y.data(), golden.data() + i * ldy, ldy)) << "row " << i << " alone";
  }

  // Another layout of the same rows: runs in reverse order, rows shuffled within each run, runs
  // cut into up to 3 segments; on 2 and 3 threads.
  std::vector<RowRun> reversed;
  std::vector<int64_t> source;  // new row -> old row
  for (auto run = runs.rbegin(); run != runs.rend(); ++run) {
    const int64_t begin = static_cast<int64_t>(source.size());
    for (int64_t i = run->begin; i < run->end; ++i) source.push_back(i);
    std::shuffle(source.begin() + begin, source.end(), rng.engine());
    reversed.push_back({begin, static_cast<int64_t>(source.size()), run->adapter, run->none_kind});
  }
  const std::vector<LoraSegment> segments2 = MakeSegments(reversed, adapters, &empty_group, 3, rng);
  std::vector<float> x2(m * ldx), y2_in(m * ldy);
  std::vector<int32_t> ids2(m);
  for (int64_t i = 0; i < m; ++i) {
    std::copy_n(&x[source[i] * ldx], ldx, &x2[i * ldx]);
    std::copy_n(&y_in[source[i] * ldy], ldy, &y2_in[i * ldy]);
    ids2[i] = ids[source[i]];
  }
  for (int threads : {2, 3}) {
    std::vector<float> y2 = y2_in;
    ASSERT_TRUE(RunOp(BestBackend(threads), c.embedding ? ids2.data() : nullptr, x2.data(), ldx,
                      segments2, ld_scratch, y2.data(), ldy, m)
                    .ok());
    for (int64_t i = 0; i < m; ++i) {
      ASSERT_TRUE(BitEqual(&y2[i * ldy], &golden[source[i] * ldy], ldy))
          << "row " << source[i] << " placed at row " << i << " on " << threads << " threads";
    }
  }
}

const Projection kQkv{"qkv(in=67; 37+13+13)", 67, {37, 13, 13}};
const Projection kDown{"down(in=257; 41)", 257, {41}};
const Projection kWide{"gate_up(in=1000; 600+150)", 1000, {600, 150}};
// Embedding "projections": in is the vocabulary.
const Projection kEmbed{"embed(vocab=50; 37)", 50, {37}};
const Projection kEmbedFused{"embed(vocab=300; 20+17+9)", 300, {20, 17, 9}};

TEST(LoraLinear, MatchesFloat64ReferenceAndIsBitIdenticalAcrossIsasThreadsAndLayouts) {
  const std::vector<Config> configs = Configs("LoraLinear");
  Rng rng(1);
  WorstError() = 0.0;
  for (const Projection* p : {&kQkv, &kDown, &kWide}) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (Pattern pattern : kPatterns) {
        for (int64_t m : {1, 3, 7, 133}) {
          CheckCase({p, dtype, pattern, m, /*embedding=*/false}, configs, rng);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
  std::cout << "worst error: " << WorstError() << " of the magnitude (tolerance " << kTolerance
            << ")\n";
}

TEST(LoraEmbedding, MatchesFloat64ReferenceAndIsBitIdenticalAcrossIsasThreadsAndLayouts) {
  const std::vector<Config> configs = Configs("LoraEmbedding");
  Rng rng(2);
  WorstError() = 0.0;
  for (const Projection* p : {&kEmbed, &kEmbedFused}) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (Pattern pattern : kPatterns) {
        for (int64_t m : {1, 3, 7, 133}) {
          CheckCase({p, dtype, pattern, m, /*embedding=*/true}, configs, rng);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
  std::cout << "worst error: " << WorstError() << " of the magnitude (tolerance " << kTolerance
            << ")\n";
}

// A decode-sized batch on realistic widths (TinyLlama's fused q/k/v, rank 16 and 64): the
// column split of one row across threads, and long single-adapter prefill segments cut into row
// chunks, agree with one thread bit for bit.
TEST(LoraLinear, RealisticWidthsAgreeAcrossThreadCounts) {
  const Projection qkv{"qkv(in=2048; 2048+256+256)", 2048, {2048, 256, 256}};
  Rng rng(3);
  for (int64_t m : {1, 8, 64}) {
    for (int num_adapters : {1, 8}) {
      SCOPED_TRACE(absl::StrCat("m=", m, " adapters=", num_adapters));
      std::vector<std::unique_ptr<TestAdapter>> adapters;
      for (int a = 0; a < num_adapters; ++a) {
        auto adapter = std::make_unique<TestAdapter>();
        LoraGroup& g = adapter->group;
        const int rank = a % 2 == 0 ? 16 : 64;
        int64_t out_offset = 0;
        for (int64_t out : qkv.outs) {
          LoraSlice& slice = g.slices[g.num_slices++];
          slice.rank = rank;
          slice.rank_offset = g.rank_total;
          slice.out_offset = out_offset;
          slice.scale = 2.0f;
          adapter->b.push_back(std::make_unique<TestWeight>(rng, DType::kBF16, out, rank));
          slice.b = adapter->b.back()->view();
          g.rank_total += rank;
          out_offset += out;
        }
        adapter->a = std::make_unique<TestWeight>(rng, DType::kBF16, g.rank_total, qkv.in);
        g.a = adapter->a->view();
        adapters.push_back(std::move(adapter));
      }
      std::vector<LoraSegment> segments;
      for (int a = 0; a < num_adapters; ++a) {
        segments.push_back({m * a / num_adapters, m * (a + 1) / num_adapters, &adapters[a]->group});
      }
      const int64_t ldy = qkv.out_total();
      const std::vector<float> x = rng.Vector(m * qkv.in);
      const std::vector<float> y_in = rng.Vector(m * ldy);
      std::vector<float> golden;
      for (Isa isa : SupportedIsas()) {
        for (int threads : {1, 2, 3}) {
          SCOPED_TRACE(absl::StrCat(IsaName(isa), "/", threads, " threads"));
          std::vector<float> y = y_in;
          ASSERT_TRUE(RunOp(GetBackend(isa, threads), nullptr, x.data(), qkv.in, segments, 192,
                            y.data(), ldy, m)
                          .ok());
          if (golden.empty()) {
            std::vector<double> ref(m * ldy), magnitude(m * ldy);
            reference::LoraLinear(x.data(), qkv.in, segments.data(),
                                  static_cast<int>(segments.size()), y_in.data(), m, ldy,
                                  ref.data(), magnitude.data());
            for (int64_t e = 0; e < m * ldy; ++e) {
              ASSERT_LE(std::fabs(y[e] - ref[e]), kTolerance * magnitude[e]) << "element " << e;
            }
            golden = y;
          } else {
            ASSERT_TRUE(BitEqual(y.data(), golden.data(), y.size()));
          }
        }
      }
    }
  }
}

// y = MatMul(x, W) then LoraLinear == MatMul(x, W + sum_j s_j B_j A_j) with the merged weight in
// float32 (what merging an adapter into the base does).
TEST(LoraLinear, EqualsTheMergedWeight) {
  Rng rng(4);
  const Projection& p = kQkv;
  const int64_t in = p.in;
  const int64_t out = p.out_total();
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t m : {7, 133}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " m=", m));
      const TestWeight w(rng, DType::kF32, out, in);
      int num_adapters = 0;
      const std::vector<int> assignment = AssignRows(Pattern::kUniform, m, rng, &num_adapters);
      std::vector<std::unique_ptr<TestAdapter>> adapters;
      for (int a = 0; a < num_adapters; ++a) {
        adapters.push_back(MakeAdapter(rng, dtype, p, false, true));
      }
      const LoraGroup empty_group;
      const std::vector<RowRun> runs = MakeRuns(assignment, num_adapters, rng);
      const std::vector<LoraSegment> segments = MakeSegments(runs, adapters, &empty_group, 1, rng);
      const std::vector<const LoraGroup*> row_groups = RowGroups(segments, m);
      const std::vector<float> x = rng.Vector(m * in);

      CpuBackend& backend = BestBackend(2);
      std::vector<float> base(m * out);
      ASSERT_TRUE(backend.MatMul(x.data(), m, in, w.view(), nullptr, base.data(), out, false).ok());
      std::vector<float> unmerged = base;
      std::vector<float> scratch = Scratch(m, MaxRankTotal(adapters));
      ASSERT_TRUE(backend
                      .LoraLinear(x.data(), in, segments.data(), static_cast<int>(segments.size()),
                                  scratch.data(), MaxRankTotal(adapters), unmerged.data(), out)
                      .ok());

      // The error scale: the base dot's magnitude plus the LoRA delta's.
      std::vector<double> unused(m * out), base_magnitude(m * out);
      reference::MatMul(x.data(), m, in, w.view(), nullptr, nullptr, unused.data(),
                        base_magnitude.data());
      const std::vector<float> zeros(m * out, 0.0f);
      std::vector<double> lora_magnitude(m * out);
      reference::LoraLinear(x.data(), in, segments.data(), static_cast<int>(segments.size()),
                            zeros.data(), m, out, unused.data(), lora_magnitude.data());

      for (int64_t i = 0; i < m; ++i) {
        const LoraGroup* g = row_groups[i];
        std::vector<float> merged_w = w.f32;
        if (g != nullptr) {
          for (int j = 0; j < g->num_slices; ++j) {
            const LoraSlice& s = g->slices[j];
            for (int64_t c = 0; c < s.b.rows; ++c) {
              for (int64_t k = 0; k < in; ++k) {
                double delta = 0.0;
                for (int r = 0; r < s.rank; ++r) {
                  delta += reference::WeightAt(s.b, c * s.rank + r) *
                           reference::WeightAt(g->a, (s.rank_offset + r) * in + k);
                }
                merged_w[(s.out_offset + c) * in + k] = static_cast<float>(
                    static_cast<double>(w.f32[(s.out_offset + c) * in + k]) + s.scale * delta);
              }
            }
          }
        }
        WeightView merged_view = w.view();
        merged_view.data = merged_w.data();
        std::vector<float> merged(out);
        ASSERT_TRUE(
            backend.MatMul(&x[i * in], 1, in, merged_view, nullptr, merged.data(), out, false)
                .ok());
        if (g == nullptr) {
          ASSERT_TRUE(BitEqual(&unmerged[i * out], &base[i * out], out)) << "row " << i;
          ASSERT_TRUE(BitEqual(merged.data(), &base[i * out], out)) << "row " << i;
          continue;
        }
        for (int64_t col = 0; col < out; ++col) {
          const int64_t e = i * out + col;
          ASSERT_LE(std::fabs(unmerged[e] - merged[col]),
                    kTolerance * (base_magnitude[e] + lora_magnitude[e]))
              << "row " << i << " column " << col;
        }
      }
    }
  }
}

// ---- Edge cases and argument errors -------------------------------------------------------------

TEST(LoraLinear, NothingToDoIsANoOp) {
  CpuBackend& backend = BestBackend(2);
  EXPECT_TRUE(backend.LoraLinear(nullptr, 0, nullptr, 0, nullptr, 0, nullptr, 0).ok());
  const LoraGroup empty_group;
  Rng rng(5);
  // Groups on empty segments are still checked (ld_scratch), but nothing is read or written.
  for (bool embedding : {false, true}) {
    auto adapter = MakeAdapter(rng, DType::kF32, embedding ? kEmbed : kQkv, embedding, true);
    const LoraSegment segments[] = {
        {0, 3, nullptr}, {3, 5, &empty_group}, {5, 5, &adapter->group}, {7, 7, nullptr}};
    const int64_t ld = adapter->group.rank_total;
    EXPECT_TRUE(embedding
                    ? backend.LoraEmbedding(nullptr, segments, 4, nullptr, ld, nullptr, 0).ok()
                    : backend.LoraLinear(nullptr, 0, segments, 4, nullptr, ld, nullptr, 0).ok());
  }
}

class LoraArgumentTest : public ::testing::Test {
 protected:
  LoraArgumentTest()
      : rng_(6),
        adapter_(MakeAdapter(rng_, DType::kF32, kQkv, false, true)),
        x_(rng_.Vector(8 * kQkv.in)),
        y_(rng_.Vector(8 * kQkv.out_total())),
        scratch_(8 * 400) {}

  // Expects INVALID_ARGUMENT naming LoraLinear, with y untouched.
  void ExpectInvalid(const std::vector<LoraSegment>& segments, int64_t ld_scratch = 400,
                     int64_t ldx = kQkv.in, int64_t ldy = kQkv.out_total()) {
    std::vector<float> y = y_;
    const absl::Status status = BestBackend(2).LoraLinear(
        x_.data(), ldx, segments.data(), static_cast<int>(segments.size()), scratch_.data(),
        ld_scratch, y.data(), ldy);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr("LoraLinear"));
    EXPECT_TRUE(BitEqual(y.data(), y_.data(), y.size()));
    std::cout << "  " << status.message() << "\n";
  }

  Rng rng_;
  std::unique_ptr<TestAdapter> adapter_;
  std::vector<float> x_;
  std::vector<float> y_;
  std::vector<float> scratch_;
};

TEST_F(LoraArgumentTest, LoraLinearRejectsBadArguments) {
  const LoraGroup* g = &adapter_->group;
  // The valid call, for contrast.
  std::vector<float> y = y_;
  ASSERT_TRUE(BestBackend(2)
                  .LoraLinear(x_.data(), kQkv.in, std::vector<LoraSegment>{{0, 8, g}}.data(), 1,
                              scratch_.data(), g->rank_total, y.data(), kQkv.out_total())
                  .ok());

  ExpectInvalid({{0, 8, g}}, /*ld_scratch=*/g->rank_total - 1);
  ExpectInvalid({{0, 3, g}, {2, 5, g}});        // overlapping
  ExpectInvalid({{4, 6, g}, {0, 2, g}});        // out of order
  ExpectInvalid({{4, 6, nullptr}, {0, 2, g}});  // out of order, even next to no adapter
  ExpectInvalid({{-1, 2, g}});                  // negative row
  ExpectInvalid({{3, 2, g}});                   // row_end < row_begin
  ExpectInvalid({{0, 8, g}}, 400, /*ldx=*/kQkv.in - 1);
  ExpectInvalid({{0, 8, g}}, 400, kQkv.in, /*ldy=*/g->slices[g->num_slices - 1].out_offset);
  {
    const std::vector<LoraSegment> segments = {{0, 8, g}};
    std::vector<float> y2 = y_;
    const absl::Status status = BestBackend(1).LoraLinear(
        nullptr, kQkv.in, segments.data(), 1, scratch_.data(), 400, y2.data(), kQkv.out_total());
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr("LoraLinear"));
  }

  // Broken groups.
  auto broken = [&](auto mutate) {
    LoraGroup copy = *g;
    mutate(copy);
    ExpectInvalid({{0, 8, &copy}});
  };
  broken([](LoraGroup& c) { c.num_slices = kMaxLoraSlices + 1; });
  broken([](LoraGroup& c) { c.rank_total += 1; });
  broken([](LoraGroup& c) { c.a.dtype = DType::kF16; });
  broken([](LoraGroup& c) { c.a.data = nullptr; });
  broken([](LoraGroup& c) { c.slices[0].rank_offset = 1; });
  broken([](LoraGroup& c) { c.slices[0].b.dtype = DType::kBF16; });
  broken([](LoraGroup& c) { c.slices[0].b.cols += 1; });
  broken([](LoraGroup& c) { c.slices[0].out_offset = -1; });
  if (g->num_slices >= 2) {
    broken([](LoraGroup& c) { c.slices[1].out_offset = c.slices[0].out_offset; });
  }
  // Groups that disagree on `in`.
  auto other = MakeAdapter(rng_, DType::kF32, kDown, false, true);
  ExpectInvalid({{0, 4, g}, {4, 8, &other->group}});
}

TEST_F(LoraArgumentTest, LoraEmbeddingRejectsBadIdsAndScratch) {
  Rng rng(7);
  auto adapter = MakeAdapter(rng, DType::kBF16, kEmbed, /*embedding=*/true, true);
  const LoraGroup* g = &adapter->group;
  const int64_t ldy = kEmbed.out_total();
  std::vector<int32_t> ids = {0, 49, 3, 50};  // 50 is out of range (vocab 50)
  std::vector<float> y = rng.Vector(4 * ldy);
  const std::vector<float> y0 = y;
  std::vector<float> scratch(4 * g->rank_total);
  auto run = [&](const std::vector<LoraSegment>& segments, int64_t ld_scratch) {
    return BestBackend(2).LoraEmbedding(ids.data(), segments.data(),
                                        static_cast<int>(segments.size()), scratch.data(),
                                        ld_scratch, y.data(), ldy);
  };
  for (int32_t bad : {50, -1, 1 << 30}) {
    ids[3] = bad;
    const absl::Status status = run({{0, 4, g}}, g->rank_total);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr("LoraEmbedding"));
    EXPECT_THAT(std::string(status.message()), HasSubstr("ids[3]"));
    EXPECT_TRUE(BitEqual(y.data(), y0.data(), y.size()));
  }
  // An out-of-range id on a row without an adapter is never read.
  ASSERT_TRUE(run({{0, 3, g}, {3, 4, nullptr}}, g->rank_total).ok());
  const absl::Status status = run({{0, 3, g}}, g->rank_total - 1);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("LoraEmbedding"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("ld_scratch"));
}

// ---- Coverage (keep last) --------------------------------------------------------------------

TEST(LoraKernelsCoverage, EveryOfferedIsaRanEveryOp) {
  if (Exercised().empty()) GTEST_SKIP() << "run the whole suite: nothing was recorded";
  std::vector<std::string> ran;
  for (Isa isa : kAllIsas) {
    if (!IsaSupported(isa)) {
      std::cout << IsaName(isa) << ": not offered by this CPU, skipped\n";
      continue;
    }
    for (const char* op : kOps) {
      EXPECT_TRUE(Exercised().count({op, isa}) == 1) << op << " never ran on " << IsaName(isa);
    }
    ran.emplace_back(IsaName(isa));
  }
  std::cout << "ISA paths exercised: " << absl::StrJoin(ran, ", ") << "\n";
}

}  // namespace
}  // namespace ls
