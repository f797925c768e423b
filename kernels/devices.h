// What accelerators this process can use. The server logs it at start and reports it in
// GetModelInfo; `--backend=cuda` refuses to start when no device is usable.
#ifndef LORASERVE_KERNELS_DEVICES_H_
#define LORASERVE_KERNELS_DEVICES_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ls {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  uint64_t total_memory_bytes = 0;
  int multiprocessors = 0;
};

// True when this binary was built with the CUDA backend.
bool CudaBackendBuilt();

// The CUDA devices visible to this process. FAILED_PRECONDITION when the binary was built
// without CUDA or when the driver reports no usable device (the message says which, with the
// driver's error string). Thread-safe.
absl::StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices();

}  // namespace ls

#endif  // LORASERVE_KERNELS_DEVICES_H_
