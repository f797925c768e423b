// What the server knows about itself and holds for its model, built once at start. The model
// objects (config, weights, backend, KV cache, forward pass) are created here and owned here;
// after Create() the services only read the immutable facts, and only the engine thread will
// touch the mutable ones (KV cache, model workspace).
#ifndef LORASERVE_SERVER_SERVER_STATE_H_
#define LORASERVE_SERVER_SERVER_STATE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/devices.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/llama_model.h"
#include "model/weights.h"
#include "server/adapters/registry.h"
#include "server/engine/engine.h"
#include "server/options.h"
#include "tokenizer/tokenizer.h"

namespace ls {

// The loaded base model and everything that computes with it.
struct LoadedModel {
  std::string name;  // the folder's base name
  std::string path;  // absolute
  ModelConfig config;
  std::unique_ptr<ModelWeights> weights;
  std::unique_ptr<CpuBackend> backend;
  std::unique_ptr<KvCache> kv_cache;
  std::unique_ptr<LlamaModel> model;
  // From the folder's tokenizer.json; null when it has none (text in and out is then refused).
  std::unique_ptr<Tokenizer> tokenizer;
  // With --adapter_root: the adapters over this model (docs/adapters.md). Declared after the
  // model objects it reads, so it is destroyed first.
  std::unique_ptr<AdapterRegistry> adapters;
  // Runs generation over everything above; declared last so it is stopped and destroyed (its
  // thread joined, its requests' adapter refs dropped) before anything it uses.
  std::unique_ptr<Engine> engine;
  double load_seconds = 0;
};

// Immutable after Create() (but for the model's mutable parts, see the file comment); the
// accessors are safe from any thread.
class ServerState {
 public:
  // Checks the backend (`cuda`: a usable device must exist) and loads the model when
  // options.model_dir is set. Errors name the flag and what failed.
  static absl::StatusOr<std::unique_ptr<ServerState>> Create(const ServerOptions& options);

  const ServerOptions& options() const { return options_; }
  absl::Time start_time() const { return start_time_; }
  const LoadedModel* model() const { return model_.get(); }
  const std::vector<CudaDeviceInfo>& cuda_devices() const { return cuda_devices_; }
  // The generation engine; null without a model. Submit and Stats are thread-safe.
  Engine* engine() const { return model_ != nullptr ? model_->engine.get() : nullptr; }

  // Stops the engine (see Engine::Stop): requests in flight may run until `drain_deadline`,
  // the rest are cancelled. Idempotent; a no-op without a model.
  void StopEngine(absl::Time drain_deadline);

 private:
  explicit ServerState(const ServerOptions& options)
      : options_(options), start_time_(absl::Now()) {}

  const ServerOptions options_;
  const absl::Time start_time_;
  std::unique_ptr<LoadedModel> model_;
  std::vector<CudaDeviceInfo> cuda_devices_;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_SERVER_STATE_H_
