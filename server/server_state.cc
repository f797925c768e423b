#include "server/server_state.h"

#include <filesystem>
#include <map>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status.h"
#include "model/safetensors.h"

namespace ls {
namespace {

absl::StatusOr<CheckpointSummary> Summarize(const std::string& dir) {
  auto checkpoint = SafetensorsCheckpoint::Open(dir);
  if (!checkpoint.ok()) {
    return absl::Status(checkpoint.status().code(),
                        absl::StrCat("--model=", dir, ": ", checkpoint.status().message()));
  }
  CheckpointSummary s;
  s.path = std::filesystem::absolute(dir).lexically_normal().string();
  s.name = std::filesystem::path(s.path).filename().string();
  if (s.name.empty()) s.name = std::filesystem::path(s.path).parent_path().filename().string();
  s.num_shards = (*checkpoint)->shards().size();
  std::map<DType, uint64_t> params_by_dtype;
  for (const auto& shard : (*checkpoint)->shards()) {
    for (const SafetensorsEntry& e : shard->entries()) {
      ++s.num_tensors;
      const uint64_t n = static_cast<uint64_t>(e.numel());
      s.num_parameters += n;
      s.weights_bytes += e.nbytes();
      params_by_dtype[e.dtype] += n;
    }
  }
  uint64_t best = 0;
  for (const auto& [dtype, n] : params_by_dtype) {
    if (n > best) {
      best = n;
      s.weights_dtype = dtype;
    }
  }
  return s;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ServerState>> ServerState::Create(const ServerOptions& options) {
  std::unique_ptr<ServerState> state(new ServerState(options));
  if (options.backend == BackendKind::kCuda) {
    auto devices = ListCudaDevices();
    if (!devices.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("--backend=cuda: ", devices.status().message()));
    }
    state->cuda_devices_ = std::move(*devices);
    for (const CudaDeviceInfo& d : state->cuda_devices_) {
      LS_LOG(INFO) << "cuda device " << d.index << ": " << d.name << " (sm_" << d.compute_major
                   << d.compute_minor << ", " << d.total_memory_bytes / (1 << 20) << " MiB)";
    }
  }
  if (!options.model_dir.empty()) {
    LS_ASSIGN_OR_RETURN(CheckpointSummary summary, Summarize(options.model_dir));
    LS_LOG(INFO) << "model " << summary.path << ": " << summary.num_tensors << " tensors in "
                 << summary.num_shards << " file(s), " << summary.num_parameters << " parameters, "
                 << summary.weights_bytes << " bytes, mostly " << DTypeName(summary.weights_dtype);
    state->checkpoint_ = std::move(summary);
  }
  return state;
}

}  // namespace ls
