// Turns CUDA runtime errors into absl::Status naming the call. Every CUDA call in the project
// goes through LS_CUDA_RETURN_IF_ERROR or CudaStatus.
#ifndef LORASERVE_KERNELS_CUDA_CHECK_H_
#define LORASERVE_KERNELS_CUDA_CHECK_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ls::cuda {

inline absl::Status CudaStatus(cudaError_t err, const char* call) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(call, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

}  // namespace ls::cuda

#define LS_CUDA_RETURN_IF_ERROR(call)                                             \
  do {                                                                            \
    const ::absl::Status ls_cuda_status_ = ::ls::cuda::CudaStatus((call), #call); \
    if (!ls_cuda_status_.ok()) return ls_cuda_status_;                            \
  } while (false)

#endif  // LORASERVE_KERNELS_CUDA_CHECK_H_
