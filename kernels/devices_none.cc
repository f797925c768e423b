// Device discovery for builds without the CUDA backend.
#include "absl/status/status.h"
#include "kernels/devices.h"

namespace ls {

bool CudaBackendBuilt() { return false; }

absl::StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices() {
  return absl::FailedPreconditionError(
      "this loraserve was built without the CUDA backend (nvcc was not found at configure time; "
      "rebuild with -DLS_CUDA=ON on a machine with the CUDA toolkit)");
}

}  // namespace ls
