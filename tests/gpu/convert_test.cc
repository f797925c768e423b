// The device conversion kernels against the host reference in common/dtype.h: bit-identical on
// random values and on every special class (zeros, subnormals, ties, infinities, NaN).
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "kernels/cuda/convert.h"

namespace ls::cuda {
namespace {

// Owns one device allocation for the duration of a test.
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { EXPECT_EQ(cudaMalloc(&ptr, bytes), cudaSuccess); }
  ~DeviceBuffer() { cudaFree(ptr); }
};

std::vector<float> TestValues() {
  std::vector<float> v;
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> uni(-8.f, 8.f);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 100000; ++i) v.push_back(uni(rng));
  for (int i = 0; i < 100000; ++i) {
    const uint32_t b = bits(rng);
    float f;
    std::memcpy(&f, &b, sizeof(f));
    v.push_back(f);  // every class, NaN payloads included
  }
  const float specials[] = {0.f,
                            -0.f,
                            1.f,
                            -1.f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::max(),
                            1.00390625f /* tie */,
                            1.01171875f /* tie, odd */};
  v.insert(v.end(), std::begin(specials), std::end(specials));
  return v;
}

TEST(CudaConvert, FloatToBf16MatchesHostBitForBit) {
  const std::vector<float> host = TestValues();
  const size_t n = host.size();
  DeviceBuffer src(n * sizeof(float)), dst(n * sizeof(uint16_t));
  ASSERT_EQ(cudaMemcpy(src.ptr, host.data(), n * sizeof(float), cudaMemcpyHostToDevice),
            cudaSuccess);
  ASSERT_TRUE(LaunchFloatToBf16(static_cast<const float*>(src.ptr), static_cast<uint16_t*>(dst.ptr),
                                n, nullptr)
                  .ok());
  std::vector<uint16_t> got(n);
  ASSERT_EQ(cudaMemcpy(got.data(), dst.ptr, n * sizeof(uint16_t), cudaMemcpyDeviceToHost),
            cudaSuccess);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(got[i], FloatToBf16(host[i])) << "element " << i << " value " << host[i];
  }
}

TEST(CudaConvert, Bf16ToFloatIsExactForEveryPattern) {
  std::vector<uint16_t> host(65536);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<uint16_t>(i);
  const size_t n = host.size();
  DeviceBuffer src(n * sizeof(uint16_t)), dst(n * sizeof(float));
  ASSERT_EQ(cudaMemcpy(src.ptr, host.data(), n * sizeof(uint16_t), cudaMemcpyHostToDevice),
            cudaSuccess);
  ASSERT_TRUE(LaunchBf16ToFloat(static_cast<const uint16_t*>(src.ptr), static_cast<float*>(dst.ptr),
                                n, nullptr)
                  .ok());
  std::vector<float> got(n);
  ASSERT_EQ(cudaMemcpy(got.data(), dst.ptr, n * sizeof(float), cudaMemcpyDeviceToHost),
            cudaSuccess);
  for (size_t i = 0; i < n; ++i) {
    const float want = Bf16ToFloat(host[i]);
    ASSERT_EQ(std::memcmp(&got[i], &want, sizeof(float)), 0) << "pattern " << i;
  }
}

}  // namespace
}  // namespace ls::cuda
