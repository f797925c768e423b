// What the server knows about itself and its model, built once at start and read (never
// written) by the services afterwards.
#ifndef LORASERVE_SERVER_SERVER_STATE_H_
#define LORASERVE_SERVER_SERVER_STATE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "kernels/devices.h"
#include "server/options.h"

namespace ls {

// Facts about the base model's checkpoint, from its safetensors headers.
struct CheckpointSummary {
  std::string name;  // the folder's base name
  std::string path;
  size_t num_shards = 0;
  size_t num_tensors = 0;
  uint64_t num_parameters = 0;
  uint64_t weights_bytes = 0;
  DType weights_dtype = DType::kF32;  // the dtype holding the most parameters
};

// Immutable after Create(); safe to read from any thread.
class ServerState {
 public:
  // Checks the backend (`cuda`: a usable device must exist) and opens and validates the model
  // checkpoint when options.model_dir is set. Errors say which flag and what failed.
  static absl::StatusOr<std::unique_ptr<ServerState>> Create(const ServerOptions& options);

  const ServerOptions& options() const { return options_; }
  absl::Time start_time() const { return start_time_; }
  const std::optional<CheckpointSummary>& checkpoint() const { return checkpoint_; }
  const std::vector<CudaDeviceInfo>& cuda_devices() const { return cuda_devices_; }

 private:
  explicit ServerState(const ServerOptions& options)
      : options_(options), start_time_(absl::Now()) {}

  const ServerOptions options_;
  const absl::Time start_time_;
  std::optional<CheckpointSummary> checkpoint_;
  std::vector<CudaDeviceInfo> cuda_devices_;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_SERVER_STATE_H_
