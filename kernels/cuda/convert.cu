// float32 <-> bfloat16 conversion.
//
// One thread per element in a grid-stride loop; the rounding is written out in integer
// arithmetic (not __float2bfloat16) so that it is, by construction, the same function as the
// host's ls::FloatToBf16, which the GPU test checks bit for bit.
#include <algorithm>

#include "kernels/cuda/check.h"
#include "kernels/cuda/convert.h"

namespace ls::cuda {
namespace {

__device__ __forceinline__ uint16_t FloatToBf16Bits(float f) {
  const uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

__global__ void FloatToBf16Kernel(const float* __restrict__ src, uint16_t* __restrict__ dst,
                                  size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    dst[i] = FloatToBf16Bits(src[i]);
  }
}

__global__ void Bf16ToFloatKernel(const uint16_t* __restrict__ src, float* __restrict__ dst,
                                  size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    dst[i] = __uint_as_float(static_cast<uint32_t>(src[i]) << 16);
  }
}

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU; the grid-stride loop covers the rest.
constexpr size_t kMaxBlocks = 4096;

unsigned int Blocks(size_t n) {
  return static_cast<unsigned int>(std::min(kMaxBlocks, (n + kThreads - 1) / kThreads));
}

}  // namespace

absl::Status LaunchFloatToBf16(const float* src, uint16_t* dst, size_t n, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  FloatToBf16Kernel<<<Blocks(n), kThreads, 0, stream>>>(src, dst, n);
  return CudaStatus(cudaGetLastError(), "FloatToBf16Kernel launch");
}

absl::Status LaunchBf16ToFloat(const uint16_t* src, float* dst, size_t n, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  Bf16ToFloatKernel<<<Blocks(n), kThreads, 0, stream>>>(src, dst, n);
  return CudaStatus(cudaGetLastError(), "Bf16ToFloatKernel launch");
}

}  // namespace ls::cuda
