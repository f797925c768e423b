// CPU backend conformance: every op on every ISA path this CPU offers (scalar, AVX2, AVX-512,
// skipping those CPUID says are missing) against the float64 reference in
// kernels/cpu/reference.h, on odd shapes, F32 and BF16 weights and random non-zero inputs.
//
// Two kinds of check:
// - Accuracy against float64, per element, with these tolerances (u = 2^-24 ~ 6e-8):
//     MatMul     |y - ref| <= 1e-5 * (sum_k |x_k w_k| + |bias| + |y_in|) + 1e-6
//                (the canonical order rounds at most ceil(K/16) + 5 times, ~21u for K = 257)
//     RmsNorm    |out - ref| <= 2e-5 * |ref| + 1e-30
//     Rope       |out - ref| <= 1e-6 * (|a| + |b|)   (a, b the rotated pair)
//     Attention  |out - ref| <= 2e-5 * max|v|         (the output is a convex mix of v rows)
//     SiluMul    |out - ref| <= 1e-6 * |ref| + 1e-30
//     Embedding, WriteKv: exact.
// - Bit identity, which the canonical reduction order guarantees: every ISA and thread count
//   gives the same bits as the scalar path on one thread; a MatMul row gives the same bits alone
//   and anywhere in batches of 1..133 rows (both the skinny path, m <= 8, and the tiled path);
//   an attention row gives the same bits alone or mixed with other sequences, whatever blocks
//   its KV sits in.
// The last test checks that every ISA the CPU offers was exercised for every op.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
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
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/reference.h"
#include "tests/unit/kernel_test_util.h"

namespace ls {
namespace {

constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512};
constexpr const char* kOps[] = {"MatMul",    "RmsNorm", "Rope",     "WriteKv",
                                "Attention", "SiluMul", "Embedding"};

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

// One backend per (ISA, threads), created on first use.
CpuBackend& GetBackend(Isa isa, int threads) {
  static auto* backends = new std::map<std::pair<Isa, int>, std::unique_ptr<CpuBackend>>();
  std::unique_ptr<CpuBackend>& slot = (*backends)[{isa, threads}];
  if (slot == nullptr) {
    CpuBackendOptions options;
    options.isa = isa;
    options.threads = threads;
    options.max_context = 1024;
    absl::StatusOr<std::unique_ptr<CpuBackend>> backend = CpuBackend::Create(options);
    EXPECT_TRUE(backend.ok()) << backend.status();
    slot = std::move(backend).value();
  }
  return *slot;
}

// The backends a test compares: first the scalar path on one thread (the golden bits), then
// every supported ISA on one and on two threads. Records (op, ISA) for the coverage test.
struct Config {
  Isa isa;
  int threads;
  CpuBackend* backend;
  std::string label;
};

std::vector<Config> Configs(const std::string& op) {
  std::vector<Config> configs;
  configs.push_back({Isa::kScalar, 1, &GetBackend(Isa::kScalar, 1), "scalar/1 thread"});
  for (Isa isa : SupportedIsas()) {
    for (int threads : {1, 2}) {
      if (isa == Isa::kScalar && threads == 1) continue;
      configs.push_back({isa, threads, &GetBackend(isa, threads),
                         absl::StrCat(IsaName(isa), "/", threads, " threads")});
    }
    Exercised().insert({op, isa});
  }
  return configs;
}

using kernel_test::BitEqual;
using kernel_test::Rng;
using kernel_test::TestWeight;

::testing::AssertionResult BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes differ";
  return BitEqual(a.data(), b.data(), a.size());
}

// ---- Create ----------------------------------------------------------------------------------

TEST(CpuBackendCreate, AutoPicksTheBestIsa) {
  absl::StatusOr<std::unique_ptr<CpuBackend>> backend = CpuBackend::Create({});
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->isa(), DetectIsa());
  EXPECT_EQ((*backend)->name(), absl::StrCat("cpu-", IsaName(DetectIsa())));
  EXPECT_GE((*backend)->threads(), 1);
  EXPECT_TRUE(IsaSupported(Isa::kScalar));
  EXPECT_TRUE(IsaSupported(Isa::kAuto));
  std::vector<std::string> names;
  for (Isa isa : SupportedIsas()) names.emplace_back(IsaName(isa));
  std::cout << "ISA paths this CPU offers: " << absl::StrJoin(names, ", ") << "\n";
}

TEST(CpuBackendCreate, RejectsBadOptions) {
  CpuBackendOptions options;
  options.threads = -1;
  EXPECT_EQ(CpuBackend::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.threads = 1;
  options.max_context = 0;
  EXPECT_EQ(CpuBackend::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(CpuBackendCreate, ForcingAnIsaTheCpuLacksFails) {
  for (Isa isa : kAllIsas) {
    CpuBackendOptions options;
    options.isa = isa;
    options.threads = 1;
    absl::StatusOr<std::unique_ptr<CpuBackend>> backend = CpuBackend::Create(options);
    if (IsaSupported(isa)) {
      ASSERT_TRUE(backend.ok()) << backend.status();
      EXPECT_EQ((*backend)->isa(), isa);
    } else {
      EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition)
          << IsaName(isa) << ": " << backend.status();
    }
  }
}

// ---- MatMul ----------------------------------------------------------------------------------

struct MatMulCase {
  int64_t m;
  int64_t k;
  int64_t n;
  DType dtype;
  bool bias;
  bool accumulate;
};

std::string CaseName(const MatMulCase& c) {
  return absl::StrCat("m=", c.m, " K=", c.k, " N=", c.n, " ", DTypeName(c.dtype),
                      c.bias ? " bias" : "", c.accumulate ? " accumulate" : "");
}

TEST(CpuMatMul, MatchesFloat64ReferenceAndIsBitIdenticalAcrossIsasAndThreads) {
  const std::vector<Config> configs = Configs("MatMul");
  Rng rng(1);
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t k : {1, 15, 16, 17, 64, 100, 257}) {
      for (int64_t n : {1, 7, 37}) {
        const TestWeight w(rng, dtype, n, k);
        const std::vector<float> bias = rng.Vector(n);
        for (int64_t m : {1, 3, 7, 133}) {
          for (int mode = 0; mode < 3; ++mode) {
            const MatMulCase c{m, k, n, dtype, mode >= 1, mode == 2};
            SCOPED_TRACE(CaseName(c));
            const int64_t ldx = k + 3;
            const int64_t ldy = n + 2;
            const std::vector<float> x = rng.Vector(m * ldx);
            const std::vector<float> y_in = rng.Vector(m * ldy);
            std::vector<float> y_in_dense(m * n);
            for (int64_t i = 0; i < m; ++i) {
              std::copy_n(&y_in[i * ldy], n, &y_in_dense[i * n]);
            }
            std::vector<double> ref(m * n), magnitude(m * n);
            reference::MatMul(x.data(), m, ldx, w.view(), c.bias ? bias.data() : nullptr,
                              c.accumulate ? y_in_dense.data() : nullptr, ref.data(),
                              magnitude.data());
            std::vector<float> golden;
            for (const Config& config : configs) {
              SCOPED_TRACE(config.label);
              std::vector<float> y = y_in;
              ASSERT_TRUE(config.backend
                              ->MatMul(x.data(), m, ldx, w.view(), c.bias ? bias.data() : nullptr,
                                       y.data(), ldy, c.accumulate)
                              .ok());
              for (int64_t i = 0; i < m; ++i) {
                for (int64_t j = 0; j < n; ++j) {
                  const double tolerance = 1e-5 * magnitude[i * n + j] + 1e-6;
                  ASSERT_NEAR(y[i * ldy + j], ref[i * n + j], tolerance)
                      << "y[" << i << ", " << j << "]";
                }
                // Padding between rows is untouched.
                for (int64_t j = n; j < ldy && i + 1 < m; ++j) {
                  ASSERT_EQ(y[i * ldy + j], y_in[i * ldy + j]);
                }
              }
              if (golden.empty()) {
                golden = y;
              } else {
                ASSERT_TRUE(BitEqual(y, golden));
              }
            }
          }
        }
      }
    }
  }
}

// A row's result must not depend on the batch it is in: same bits alone (m = 1) and at the start,
// middle and end of batches on the skinny path (m <= 8) and the tiled path (m > 8), with a
// different row stride, on every ISA and thread count. The big shape makes the threads split the
// columns and the tiled path use several weight blocks.
TEST(CpuMatMul, RowIsBitIdenticalAloneAndAnywhereInAnyBatch) {
  const std::vector<Config> configs = Configs("MatMul");
  Rng rng(2);
  struct Shape {
    int64_t k;
    int64_t n;
    std::vector<int64_t> batches;
  };
  const Shape shapes[] = {
      {17, 37, {1, 2, 3, 7, 8, 9, 133}},
      {257, 37, {1, 3, 7, 8, 9, 133}},
      {1000, 301, {1, 5, 8, 20}},
  };
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (const Shape& shape : shapes) {
      const int64_t k = shape.k;
      const int64_t n = shape.n;
      SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " K=", k, " N=", n));
      const TestWeight w(rng, dtype, n, k);
      const std::vector<float> bias = rng.Vector(n);
      const std::vector<float> row = rng.Vector(k);
      std::vector<float> alone;
      for (const Config& config : configs) {
        SCOPED_TRACE(config.label);
        std::vector<float> y(n);
        ASSERT_TRUE(
            config.backend->MatMul(row.data(), 1, k, w.view(), bias.data(), y.data(), n, false)
                .ok());
        if (alone.empty()) {
          alone = y;
        } else {
          ASSERT_TRUE(BitEqual(y, alone));
        }
        for (int64_t m : shape.batches) {
          for (int64_t at : {int64_t{0}, m / 2, m - 1}) {
            SCOPED_TRACE(absl::StrCat("batch of ", m, ", row at ", at));
            const int64_t ldx = k + 5;
            std::vector<float> x = rng.Vector(m * ldx);
            std::copy(row.begin(), row.end(), x.begin() + at * ldx);
            std::vector<float> batch_y(m * n);
            ASSERT_TRUE(
                config.backend
                    ->MatMul(x.data(), m, ldx, w.view(), bias.data(), batch_y.data(), n, false)
                    .ok());
            ASSERT_TRUE(BitEqual(batch_y.data() + at * n, alone.data(), n));
          }
        }
      }
    }
  }
}

// The canonical order leaves a lane that has no element in the tail chunk untouched: a lane
// holding -0 (products too small for float32, rounded to -0) stays -0, so the sum is -0. A path
// that padded the tail with zeros and ran a plain FMA over them would turn it into +0.
TEST(CpuMatMul, TailKeepsTheSignOfZeroLanes) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t k : {17, 33, 47}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " K=", k));
      std::vector<float> x(k, -1e-30f);
      std::vector<float> w_f32(k, 1e-30f);
      std::vector<uint16_t> w_bf16(k);
      FloatToBf16(w_f32.data(), w_bf16.data(), k);
      const WeightView w{dtype == DType::kBF16 ? static_cast<const void*>(w_bf16.data())
                                               : static_cast<const void*>(w_f32.data()),
                         dtype, 1, k};
      for (const Config& config : Configs("MatMul")) {
        SCOPED_TRACE(config.label);
        float y = 1.0f;
        ASSERT_TRUE(config.backend->MatMul(x.data(), 1, k, w, nullptr, &y, 1, false).ok());
        EXPECT_EQ(y, 0.0f);
        EXPECT_TRUE(std::signbit(y)) << "expected -0";
      }
    }
  }
}

TEST(CpuMatMul, ZeroSizesAreNoOps) {
  CpuBackend& backend = GetBackend(DetectIsa(), 2);
  Rng rng(3);
  const TestWeight w(rng, DType::kF32, 5, 0);
  std::vector<float> y(10, 7.0f);
  // K = 0: the dot product is +0, so y = bias (or y + bias).
  const std::vector<float> bias = {1, 2, 3, 4, 5};
  ASSERT_TRUE(backend.MatMul(nullptr, 2, 0, w.view(), bias.data(), y.data(), 5, false).ok());
  EXPECT_EQ(y, std::vector<float>({1, 2, 3, 4, 5, 1, 2, 3, 4, 5}));
  ASSERT_TRUE(backend.MatMul(nullptr, 0, 0, w.view(), nullptr, nullptr, 5, false).ok());
}

TEST(CpuMatMul, RejectsBadArguments) {
  CpuBackend& backend = GetBackend(DetectIsa(), 1);
  std::vector<float> x(64), y(64);
  std::vector<uint16_t> f16(64);
  WeightView w{f16.data(), DType::kF16, 4, 8};
  absl::Status status = backend.MatMul(x.data(), 2, 8, w, nullptr, y.data(), 4, false);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("F16"), absl::string_view::npos) << status;
  w.dtype = DType::kF32;
  EXPECT_EQ(backend.MatMul(x.data(), 2, 7, w, nullptr, y.data(), 4, false).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend.MatMul(x.data(), 2, 8, w, nullptr, y.data(), 3, false).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend.MatMul(x.data(), -1, 8, w, nullptr, y.data(), 4, false).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- RmsNorm ---------------------------------------------------------------------------------

TEST(CpuRmsNorm, MatchesFloat64ReferenceAndIsBitIdenticalAcrossIsasAndThreads) {
  const std::vector<Config> configs = Configs("RmsNorm");
  Rng rng(4);
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t d : {1, 15, 16, 17, 64, 100, 257, 2048}) {
      const TestWeight weight(rng, dtype, 1, d);
      for (int64_t m : {1, 3, 7, 133}) {
        for (float eps : {1e-5f, 1e-6f}) {
          SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " d=", d, " m=", m, " eps=", eps));
          const std::vector<float> x = rng.Vector(m * d, 3.0f);
          std::vector<double> ref(m * d);
          reference::RmsNorm(x.data(), m, d, weight.view(), eps, ref.data());
          std::vector<float> golden;
          for (const Config& config : configs) {
            SCOPED_TRACE(config.label);
            std::vector<float> out(m * d);
            ASSERT_TRUE(
                config.backend->RmsNorm(x.data(), m, d, weight.view(), eps, out.data()).ok());
            for (int64_t i = 0; i < m * d; ++i) {
              ASSERT_NEAR(out[i], ref[i], 2e-5 * std::fabs(ref[i]) + 1e-30) << "element " << i;
            }
            // In place gives the same bits.
            std::vector<float> in_place = x;
            ASSERT_TRUE(
                config.backend->RmsNorm(in_place.data(), m, d, weight.view(), eps, in_place.data())
                    .ok());
            ASSERT_TRUE(BitEqual(in_place, out));
            if (golden.empty()) {
              golden = out;
            } else {
              ASSERT_TRUE(BitEqual(out, golden));
            }
          }
        }
      }
    }
  }
}

// A row alone and inside a batch: same bits.
TEST(CpuRmsNorm, RowIsBitIdenticalAloneAndInABatch) {
  Rng rng(5);
  const int64_t d = 257;
  const TestWeight weight(rng, DType::kBF16, 1, d);
  const std::vector<float> row = rng.Vector(d);
  for (const Config& config : Configs("RmsNorm")) {
    SCOPED_TRACE(config.label);
    std::vector<float> alone(d);
    ASSERT_TRUE(config.backend->RmsNorm(row.data(), 1, d, weight.view(), 1e-5f, alone.data()).ok());
    const int64_t m = 133;
    std::vector<float> x = rng.Vector(m * d);
    std::copy(row.begin(), row.end(), x.begin() + 77 * d);
    std::vector<float> out(m * d);
    ASSERT_TRUE(config.backend->RmsNorm(x.data(), m, d, weight.view(), 1e-5f, out.data()).ok());
    EXPECT_TRUE(BitEqual(out.data() + 77 * d, alone.data(), d));
  }
}

TEST(CpuRmsNorm, RejectsBadArguments) {
  CpuBackend& backend = GetBackend(DetectIsa(), 1);
  std::vector<float> x(16), w(16), out(16);
  const WeightView weight{w.data(), DType::kF32, 1, 8};
  EXPECT_EQ(backend.RmsNorm(x.data(), 2, 16, weight, 1e-5f, out.data()).code(),
            absl::StatusCode::kInvalidArgument);
  const WeightView wrong_dtype{w.data(), DType::kF16, 1, 8};
  EXPECT_EQ(backend.RmsNorm(x.data(), 2, 8, wrong_dtype, 1e-5f, out.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- Rope ------------------------------------------------------------------------------------

// inv_freq as Hugging Face computes it: 1 / theta^(2j / d), in float32.
std::vector<float> InvFreq(int head_dim, float theta) {
  std::vector<float> inv_freq(head_dim / 2);
  for (int j = 0; j < head_dim / 2; ++j) {
    inv_freq[j] = 1.0f / std::pow(theta, static_cast<float>(2 * j) / static_cast<float>(head_dim));
  }
  return inv_freq;
}

TEST(CpuRope, MatchesFloat64ReferenceAndIsBitIdenticalAcrossIsasAndThreads) {
  const std::vector<Config> configs = Configs("Rope");
  Rng rng(6);
  const std::vector<int32_t> all_positions = {0, 1, 5, 100, 4095, 32767, 2, 77};
  for (int num_heads : {1, 3, 8}) {
    for (int head_dim : {2, 8, 64, 128}) {
      for (int64_t m : {1, 3, 7, 133}) {
        SCOPED_TRACE(absl::StrCat("heads=", num_heads, " head_dim=", head_dim, " m=", m));
        const std::vector<float> inv_freq = InvFreq(head_dim, 10000.0f);
        const int64_t width = static_cast<int64_t>(num_heads) * head_dim;
        const int64_t ld = width + 3;
        const std::vector<float> x = rng.Vector(m * ld);
        std::vector<int32_t> positions(m);
        for (int64_t i = 0; i < m; ++i) positions[i] = all_positions[i % all_positions.size()];
        std::vector<double> ref(m * width);
        reference::Rope(x.data(), m, ld, num_heads, head_dim, positions.data(), inv_freq.data(),
                        ref.data());
        std::vector<float> golden;
        for (const Config& config : configs) {
          SCOPED_TRACE(config.label);
          std::vector<float> out = x;
          ASSERT_TRUE(
              config.backend
                  ->Rope(out.data(), m, ld, num_heads, head_dim, positions.data(), inv_freq.data())
                  .ok());
          const int half = head_dim / 2;
          for (int64_t i = 0; i < m; ++i) {
            for (int h = 0; h < num_heads; ++h) {
              for (int j = 0; j < head_dim; ++j) {
                const int64_t at = i * ld + h * head_dim;
                const double tolerance =
                    1e-6 * (std::fabs(x[at + j % half]) + std::fabs(x[at + j % half + half]));
                ASSERT_NEAR(out[at + j], ref[i * width + h * head_dim + j], tolerance)
                    << "row " << i << " head " << h << " j " << j;
              }
            }
            for (int64_t j = width; j < ld; ++j) ASSERT_EQ(out[i * ld + j], x[i * ld + j]);
          }
          if (golden.empty()) {
            golden = out;
          } else {
            ASSERT_TRUE(BitEqual(out, golden));
          }
        }
      }
    }
  }
}

TEST(CpuRope, RejectsBadArguments) {
  CpuBackend& backend = GetBackend(DetectIsa(), 1);
  std::vector<float> x(32);
  const std::vector<float> inv_freq = InvFreq(8, 10000.0f);
  const int32_t bad_position = -1;
  EXPECT_EQ(backend.Rope(x.data(), 1, 8, 1, 8, &bad_position, inv_freq.data()).code(),
            absl::StatusCode::kInvalidArgument);
  const int32_t position = 3;
  EXPECT_EQ(backend.Rope(x.data(), 1, 8, 1, 7, &position, inv_freq.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- WriteKv and Attention -------------------------------------------------------------------

// A paged KV cache with random non-zero contents.
struct TestCache {
  TestCache(Rng& rng, int32_t num_blocks, int32_t block_tokens, int32_t num_kv_heads,
            int32_t head_dim) {
    const size_t size = static_cast<size_t>(num_blocks) * block_tokens * num_kv_heads * head_dim;
    k = rng.Vector(size);
    v = rng.Vector(size);
    view.k = k.data();
    view.v = v.data();
    view.num_blocks = num_blocks;
    view.block_tokens = block_tokens;
    view.num_kv_heads = num_kv_heads;
    view.head_dim = head_dim;
  }
  int64_t token_width() const { return static_cast<int64_t>(view.num_kv_heads) * view.head_dim; }
  // Copies token t of a sequence stored under table `from` to its place under table `to`.
  void CopyToken(const std::vector<int32_t>& from, const std::vector<int32_t>& to, int64_t t) {
    const int64_t bt = view.block_tokens;
    const int64_t src = (from[t / bt] * bt + t % bt) * token_width();
    const int64_t dst = (to[t / bt] * bt + t % bt) * token_width();
    std::copy_n(&k[src], token_width(), &k[dst]);
    std::copy_n(&v[src], token_width(), &v[dst]);
  }
  std::vector<float> k;
  std::vector<float> v;
  KvLayerView view;
};

TEST(CpuWriteKv, WritesRowsIntoTheirSlotsExactly) {
  const std::vector<Config> configs = Configs("WriteKv");
  Rng rng(7);
  for (const Config& config : configs) {
    SCOPED_TRACE(config.label);
    TestCache cache(rng, 6, 4, 2, 17);
    TestCache expected = cache;
    expected.view.k = expected.k.data();
    expected.view.v = expected.v.data();
    const int64_t width = cache.token_width();
    const int64_t m = 7;
    const int64_t ldk = width + 1;
    const int64_t ldv = width + 5;
    const std::vector<float> k = rng.Vector(m * ldk);
    const std::vector<float> v = rng.Vector(m * ldv);
    const std::vector<int32_t> slots = {0, 23, 5, 6, 12, 13, 9};
    reference::WriteKv(k.data(), ldk, v.data(), ldv, m, slots.data(), expected.view);
    ASSERT_TRUE(
        config.backend->WriteKv(k.data(), ldk, v.data(), ldv, m, slots.data(), cache.view).ok());
    EXPECT_TRUE(BitEqual(cache.k, expected.k));
    EXPECT_TRUE(BitEqual(cache.v, expected.v));
    // A slot outside the cache is rejected before anything is written.
    const std::vector<int32_t> bad = {1, 24};
    EXPECT_EQ(
        config.backend->WriteKv(k.data(), ldk, v.data(), ldv, 2, bad.data(), cache.view).code(),
        absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(BitEqual(cache.k, expected.k));
  }
}

// One sequence: its block table (distinct, shuffled, non-contiguous blocks) and length.
struct Sequence {
  std::vector<int32_t> table;
  int32_t length = 0;
};

// Hands out distinct blocks in a shuffled order.
class BlockAllocator {
 public:
  BlockAllocator(Rng& rng, int32_t num_blocks) : free_(num_blocks) {
    std::iota(free_.begin(), free_.end(), 0);
    std::shuffle(free_.begin(), free_.end(), rng.engine());
  }
  Sequence Allocate(int32_t length, int32_t block_tokens) {
    Sequence seq;
    seq.length = length;
    const int32_t blocks = (length + block_tokens - 1) / block_tokens;
    for (int32_t b = 0; b < blocks; ++b) {
      EXPECT_FALSE(free_.empty());
      seq.table.push_back(free_.back());
      free_.pop_back();
    }
    return seq;
  }

 private:
  std::vector<int32_t> free_;
};

// The rows of one Attention call: (sequence, position) pairs, laid out as AttentionRows.
struct Batch {
  void Add(const Sequence& seq, int32_t position, int64_t stride) {
    positions.push_back(position);
    std::vector<int32_t> row = seq.table;
    row.resize(stride, -1);  // unused entries: never read
    tables.insert(tables.end(), row.begin(), row.end());
    table_stride = stride;
  }
  AttentionRows rows() const {
    AttentionRows r;
    r.m = static_cast<int64_t>(positions.size());
    r.positions = positions.data();
    r.block_tables = tables.data();
    r.block_table_stride = table_stride;
    return r;
  }
  std::vector<int32_t> positions;
  std::vector<int32_t> tables;
  int64_t table_stride = 0;
};

struct AttentionShape {
  int num_heads;
  int num_kv_heads;
  int head_dim;
  int block_tokens;
};

TEST(CpuAttention, MatchesFloat64ReferenceAndIsBitIdenticalAcrossIsasAndThreads) {
  const std::vector<Config> configs = Configs("Attention");
  Rng rng(8);
  const AttentionShape shapes[] = {
      {4, 4, 16, 4},    // multi-head
      {8, 2, 64, 16},   // GQA, 4 query heads per kv head
      {6, 1, 17, 1},    // multi-query, odd head_dim, one token per block
      {8, 2, 100, 5},   // GQA, head_dim not a multiple of 16
      {2, 2, 128, 32},  // Llama head_dim
      {8, 2, 128, 16},  // GQA with head_dim 128: the value sum takes two register passes
      {3, 3, 256, 8},   // head_dim 256
  };
  for (const AttentionShape& shape : shapes) {
    SCOPED_TRACE(absl::StrCat("heads=", shape.num_heads, " kv_heads=", shape.num_kv_heads,
                              " head_dim=", shape.head_dim, " block_tokens=", shape.block_tokens));
    const int32_t num_blocks = 400 / shape.block_tokens + 8;
    TestCache cache(rng, num_blocks, shape.block_tokens, shape.num_kv_heads, shape.head_dim);
    BlockAllocator allocator(rng, num_blocks);
    const std::vector<Sequence> seqs = {
        allocator.Allocate(1, shape.block_tokens), allocator.Allocate(7, shape.block_tokens),
        allocator.Allocate(33, shape.block_tokens), allocator.Allocate(200, shape.block_tokens)};
    const int64_t stride = 200 / shape.block_tokens + 2;
    Batch batch;
    // Prefill-like rows (every position of the 7-token sequence), decode rows (the last
    // position of each), and a few in the middle.
    for (int32_t p = 0; p < 7; ++p) batch.Add(seqs[1], p, stride);
    for (const Sequence& seq : seqs) batch.Add(seq, seq.length - 1, stride);
    batch.Add(seqs[3], 100, stride);
    batch.Add(seqs[2], 16, stride);
    const AttentionRows rows = batch.rows();
    const int64_t width = static_cast<int64_t>(shape.num_heads) * shape.head_dim;
    const int64_t ldq = width + 7;
    const int64_t ldo = width + 1;
    const std::vector<float> q = rng.Vector(rows.m * ldq);
    const float scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    std::vector<double> ref(rows.m * width);
    reference::Attention(q.data(), ldq, shape.num_heads, rows, cache.view, scale, ref.data());
    float max_v = 0.0f;
    for (float v : cache.v) max_v = std::max(max_v, std::fabs(v));
    std::vector<float> golden;
    for (const Config& config : configs) {
      SCOPED_TRACE(config.label);
      std::vector<float> out(rows.m * ldo, 123.0f);
      ASSERT_TRUE(
          config.backend
              ->Attention(q.data(), ldq, shape.num_heads, rows, cache.view, scale, out.data(), ldo)
              .ok());
      for (int64_t i = 0; i < rows.m; ++i) {
        for (int64_t j = 0; j < width; ++j) {
          ASSERT_NEAR(out[i * ldo + j], ref[i * width + j], 2e-5 * max_v)
              << "row " << i << " element " << j;
        }
      }
      if (golden.empty()) {
        golden = out;
      } else {
        ASSERT_TRUE(BitEqual(out, golden));
      }
    }
  }
}

// Sequence A's rows give the same bits alone (one call per row, and all of A's rows in one call,
// its KV in one set of blocks) as mixed with other sequences' rows in one call with A's KV copied
// to a different, non-contiguous set of blocks and a different block-table stride.
TEST(CpuAttention, RowIsBitIdenticalAloneOrMixedAndAcrossBlockLayouts) {
  Rng rng(9);
  const AttentionShape shape{8, 2, 64, 4};
  const int32_t num_blocks = 80;
  TestCache cache(rng, num_blocks, shape.block_tokens, shape.num_kv_heads, shape.head_dim);
  BlockAllocator allocator(rng, num_blocks);
  const Sequence a1 = allocator.Allocate(40, shape.block_tokens);
  const Sequence a2 = allocator.Allocate(40, shape.block_tokens);  // same tokens, other blocks
  const Sequence b = allocator.Allocate(23, shape.block_tokens);
  const Sequence c = allocator.Allocate(61, shape.block_tokens);
  for (int64_t t = 0; t < a1.length; ++t) cache.CopyToken(a1.table, a2.table, t);
  const int64_t width = static_cast<int64_t>(shape.num_heads) * shape.head_dim;
  const std::vector<int32_t> a_positions = {0, 17, 39};
  const std::vector<float> a_q = rng.Vector(a_positions.size() * width);
  const float scale = 0.125f;

  for (const Config& config : Configs("Attention")) {
    SCOPED_TRACE(config.label);
    // All of A's rows in one call, layout 1.
    Batch alone;
    for (int32_t p : a_positions) alone.Add(a1, p, 10);
    std::vector<float> alone_out(a_positions.size() * width);
    ASSERT_TRUE(config.backend
                    ->Attention(a_q.data(), width, shape.num_heads, alone.rows(), cache.view, scale,
                                alone_out.data(), width)
                    .ok());
    // Each of A's rows by itself.
    for (size_t r = 0; r < a_positions.size(); ++r) {
      Batch single;
      single.Add(a1, a_positions[r], 10);
      std::vector<float> out(width);
      ASSERT_TRUE(config.backend
                      ->Attention(a_q.data() + r * width, width, shape.num_heads, single.rows(),
                                  cache.view, scale, out.data(), width)
                      .ok());
      ASSERT_TRUE(BitEqual(out.data(), alone_out.data() + r * width, width));
    }
    // Mixed with B and C, A in layout 2, another table stride.
    Batch mixed;
    std::vector<float> mixed_q;
    std::vector<int64_t> a_rows;  // where A's rows landed
    auto add = [&](const Sequence& seq, int32_t p, const float* q_row) {
      if (&seq == &a2) a_rows.push_back(static_cast<int64_t>(mixed.positions.size()));
      mixed.Add(seq, p, 16);
      if (q_row != nullptr) {
        mixed_q.insert(mixed_q.end(), q_row, q_row + width);
      } else {
        const std::vector<float> q = rng.Vector(width);
        mixed_q.insert(mixed_q.end(), q.begin(), q.end());
      }
    };
    add(b, 22, nullptr);
    add(a2, 17, a_q.data() + 1 * width);
    for (int32_t p = 50; p < 61; ++p) add(c, p, nullptr);
    add(a2, 39, a_q.data() + 2 * width);
    add(b, 3, nullptr);
    add(a2, 0, a_q.data());
    std::vector<float> mixed_out(mixed.positions.size() * width);
    ASSERT_TRUE(config.backend
                    ->Attention(mixed_q.data(), width, shape.num_heads, mixed.rows(), cache.view,
                                scale, mixed_out.data(), width)
                    .ok());
    ASSERT_EQ(a_rows.size(), 3u);
    EXPECT_TRUE(
        BitEqual(mixed_out.data() + a_rows[0] * width, alone_out.data() + 1 * width, width));
    EXPECT_TRUE(
        BitEqual(mixed_out.data() + a_rows[1] * width, alone_out.data() + 2 * width, width));
    EXPECT_TRUE(BitEqual(mixed_out.data() + a_rows[2] * width, alone_out.data(), width));
  }
}

// Query head h reads kv head h / (num_heads / num_kv_heads): with every V entry of kv head g
// equal to g + 1, head h's output is (h / group + 1) whatever the scores; and query heads of one
// group with the same q give the same bits.
TEST(CpuAttention, GqaMapsQueryHeadsToKvHeads) {
  Rng rng(10);
  const int num_heads = 8;
  const int num_kv_heads = 2;
  const int head_dim = 16;
  TestCache cache(rng, 4, 8, num_kv_heads, head_dim);
  for (int64_t slot = 0; slot < 32; ++slot) {
    for (int g = 0; g < num_kv_heads; ++g) {
      std::fill_n(&cache.v[(slot * num_kv_heads + g) * head_dim], head_dim,
                  static_cast<float>(g + 1));
    }
  }
  Sequence seq;
  seq.table = {2, 0, 3, 1};
  seq.length = 30;
  Batch batch;
  batch.Add(seq, 29, 4);
  const std::vector<float> q_head = rng.Vector(head_dim);
  std::vector<float> q;
  for (int h = 0; h < num_heads; ++h) q.insert(q.end(), q_head.begin(), q_head.end());
  for (const Config& config : Configs("Attention")) {
    SCOPED_TRACE(config.label);
    std::vector<float> out(num_heads * head_dim);
    ASSERT_TRUE(config.backend
                    ->Attention(q.data(), num_heads * head_dim, num_heads, batch.rows(), cache.view,
                                0.25f, out.data(), num_heads * head_dim)
                    .ok());
    const int group = num_heads / num_kv_heads;
    for (int h = 0; h < num_heads; ++h) {
      for (int d = 0; d < head_dim; ++d) {
        EXPECT_NEAR(out[h * head_dim + d], h / group + 1, 1e-5) << "head " << h;
      }
      EXPECT_TRUE(BitEqual(out.data() + h * head_dim, out.data() + (h / group) * group * head_dim,
                           head_dim));
    }
  }
}

TEST(CpuAttention, RejectsBadArguments) {
  Rng rng(11);
  CpuBackendOptions options;
  options.max_context = 16;
  options.threads = 1;
  absl::StatusOr<std::unique_ptr<CpuBackend>> backend = CpuBackend::Create(options);
  ASSERT_TRUE(backend.ok());
  TestCache cache(rng, 4, 8, 1, 8);
  std::vector<float> q(16), out(16);
  Batch batch;
  Sequence seq;
  seq.table = {0, 1, 2, 3};
  batch.Add(seq, 16, 4);  // position 16 >= max_context
  EXPECT_EQ(
      (*backend)->Attention(q.data(), 8, 1, batch.rows(), cache.view, 1.0f, out.data(), 8).code(),
      absl::StatusCode::kInvalidArgument);
  Batch bad_block;
  seq.table = {0, 4};  // block 4 is outside the cache
  bad_block.Add(seq, 9, 2);
  EXPECT_EQ((*backend)
                ->Attention(q.data(), 8, 1, bad_block.rows(), cache.view, 1.0f, out.data(), 8)
                .code(),
            absl::StatusCode::kInvalidArgument);
  Batch ok;
  seq.table = {0, 1};
  ok.Add(seq, 9, 2);
  TestCache two_kv_heads(rng, 4, 8, 2, 8);
  std::vector<float> q3(24), out3(24);
  EXPECT_EQ((*backend)
                ->Attention(q3.data(), 24, 3, ok.rows(), two_kv_heads.view, 1.0f, out3.data(), 24)
                .code(),
            absl::StatusCode::kInvalidArgument);  // 3 query heads over 2 kv heads
  EXPECT_TRUE(
      (*backend)->Attention(q.data(), 8, 1, ok.rows(), cache.view, 1.0f, out.data(), 8).ok());
}

// ---- SiluMul and Embedding -------------------------------------------------------------------

TEST(CpuSiluMul, MatchesFloat64ReferenceAndIsBitIdenticalAcrossIsasAndThreads) {
  const std::vector<Config> configs = Configs("SiluMul");
  Rng rng(12);
  for (int64_t f : {1, 15, 17, 257, 5000}) {
    for (int64_t m : {1, 3, 7, 133}) {
      SCOPED_TRACE(absl::StrCat("m=", m, " f=", f));
      const int64_t ldg = f + 1;
      const int64_t ldu = f + 2;
      const int64_t ldo = f + 3;
      const std::vector<float> gate = rng.Vector(m * ldg, 8.0f);
      const std::vector<float> up = rng.Vector(m * ldu, 2.0f);
      std::vector<double> ref(m * f);
      reference::SiluMul(gate.data(), ldg, up.data(), ldu, m, f, ref.data());
      std::vector<float> golden;
      for (const Config& config : configs) {
        SCOPED_TRACE(config.label);
        std::vector<float> out(m * ldo, 5.0f);
        ASSERT_TRUE(
            config.backend->SiluMul(gate.data(), ldg, up.data(), ldu, m, f, out.data(), ldo).ok());
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < f; ++j) {
            ASSERT_NEAR(out[i * ldo + j], ref[i * f + j], 1e-6 * std::fabs(ref[i * f + j]) + 1e-30)
                << "row " << i << " column " << j;
          }
        }
        if (golden.empty()) {
          golden = out;
        } else {
          ASSERT_TRUE(BitEqual(out, golden));
        }
      }
    }
  }
}

TEST(CpuEmbedding, WidensRowsExactlyOnEveryIsa) {
  const std::vector<Config> configs = Configs("Embedding");
  Rng rng(13);
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t d : {1, 17, 100}) {
      const TestWeight table(rng, dtype, 50, d);
      for (int64_t m : {1, 3, 7, 133}) {
        SCOPED_TRACE(absl::StrCat(DTypeName(dtype), " d=", d, " m=", m));
        std::vector<int32_t> ids(m);
        for (int32_t& id : ids) id = rng.Int(0, 49);
        std::vector<double> ref(m * d);
        reference::Embedding(ids.data(), m, table.view(), ref.data());
        const int64_t ldo = d + 4;
        for (const Config& config : configs) {
          SCOPED_TRACE(config.label);
          std::vector<float> out(m * ldo);
          ASSERT_TRUE(config.backend->Embedding(ids.data(), m, table.view(), out.data(), ldo).ok());
          for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < d; ++j) ASSERT_EQ(out[i * ldo + j], ref[i * d + j]);
          }
        }
        const int32_t bad_id = 50;
        std::vector<float> out(d);
        EXPECT_EQ(configs[0].backend->Embedding(&bad_id, 1, table.view(), out.data(), d).code(),
                  absl::StatusCode::kInvalidArgument);
      }
    }
  }
}

// ---- Coverage (keep last) --------------------------------------------------------------------

// Every ISA path CPUID offers must have run every op above. Runs last in file order; when run
// alone (a filter or shuffle) nothing has been recorded and it skips.
TEST(CpuKernelsCoverage, EveryOfferedIsaRanEveryOp) {
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
