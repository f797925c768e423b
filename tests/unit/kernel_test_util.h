// Helpers shared by the CPU kernel conformance tests: a never-zero random source, test weight
// matrices in F32 or BF16, and bitwise comparison of float arrays.
#ifndef LORASERVE_TESTS_UNIT_KERNEL_TEST_UTIL_H_
#define LORASERVE_TESTS_UNIT_KERNEL_TEST_UTIL_H_

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"

namespace ls::kernel_test {

// Uniform in [-scale, scale] with |value| >= scale / 64: never zero.
class Rng {
 public:
  explicit Rng(uint32_t seed) : engine_(seed) {}
  float NonZero(float scale = 1.0f) {
    std::uniform_real_distribution<float> magnitude(scale / 64.0f, scale);
    return coin_(engine_) ? magnitude(engine_) : -magnitude(engine_);
  }
  std::vector<float> Vector(size_t n, float scale = 1.0f) {
    std::vector<float> v(n);
    for (float& f : v) f = NonZero(scale);
    return v;
  }
  int Int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(engine_); }
  bool Chance(double p) { return std::bernoulli_distribution(p)(engine_); }
  std::mt19937& engine() { return engine_; }

 private:
  std::mt19937 engine_;
  std::bernoulli_distribution coin_{0.5};
};

// A weight matrix in F32 or BF16 (BF16 values are the float32 ones rounded to bf16; f32 then
// holds the rounded values, so both views agree).
struct TestWeight {
  TestWeight(Rng& rng, DType dtype, int64_t rows, int64_t cols, float scale = 1.0f)
      : dtype(dtype), rows(rows), cols(cols) {
    f32 = rng.Vector(static_cast<size_t>(rows * cols), scale);
    if (dtype == DType::kBF16) {
      bf16.resize(f32.size());
      FloatToBf16(f32.data(), bf16.data(), f32.size());
      Bf16ToFloat(bf16.data(), f32.data(), f32.size());
    }
  }
  WeightView view() const {
    WeightView w;
    w.data = dtype == DType::kBF16 ? static_cast<const void*>(bf16.data())
                                   : static_cast<const void*>(f32.data());
    w.dtype = dtype;
    w.rows = rows;
    w.cols = cols;
    return w;
  }
  DType dtype;
  int64_t rows;
  int64_t cols;
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
};

// Bitwise equality of two float arrays, naming the first difference.
inline ::testing::AssertionResult BitEqual(const float* a, const float* b, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t x, y;
    std::memcpy(&x, a + i, sizeof(x));
    std::memcpy(&y, b + i, sizeof(y));
    if (x != y) {
      return ::testing::AssertionFailure()
             << absl::StrCat("element ", i, " of ", n, ": ", a[i], " (0x", absl::Hex(x), ") vs ",
                             b[i], " (0x", absl::Hex(y), ")");
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace ls::kernel_test

#endif  // LORASERVE_TESTS_UNIT_KERNEL_TEST_UTIL_H_
