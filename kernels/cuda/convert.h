// Element-type conversion kernels (float32 <-> bfloat16) on the device. Weights arrive as bf16,
// fp16 or fp32 and the backend stores them in one compute dtype; these kernels convert in
// device memory so the host never touches the converted copy.
//
// Launchers are thin: raw device pointers, a count and a stream in; a Status out. They never
// allocate or synchronize.
#ifndef LORASERVE_KERNELS_CUDA_CONVERT_H_
#define LORASERVE_KERNELS_CUDA_CONVERT_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace ls::cuda {

// dst[i] = bf16(src[i]), round to nearest even, NaN kept (quiet): bit-identical to
// ls::FloatToBf16 on the host. `src` and `dst` must not overlap.
absl::Status LaunchFloatToBf16(const float* src, uint16_t* dst, size_t n, cudaStream_t stream);

// dst[i] = float(src[i]); exact.
absl::Status LaunchBf16ToFloat(const uint16_t* src, float* dst, size_t n, cudaStream_t stream);

}  // namespace ls::cuda

#endif  // LORASERVE_KERNELS_CUDA_CONVERT_H_
