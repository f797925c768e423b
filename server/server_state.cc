#include "server/server_state.h"

#include <chrono>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status.h"
#include "model/safetensors.h"
#include "server/adapters/upload.h"

namespace ls {
namespace {

// Prefixes a load error with the flag it came from, keeping its code.
absl::Status WithFlag(const absl::Status& status, absl::string_view flag) {
  return absl::Status(status.code(), absl::StrCat(flag, ": ", status.message()));
}

absl::StatusOr<std::unique_ptr<LoadedModel>> LoadModel(const ServerOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string flag = absl::StrCat("--model=", options.model_dir);
  auto m = std::make_unique<LoadedModel>();
  m->path = std::filesystem::absolute(options.model_dir).lexically_normal().string();
  while (m->path.size() > 1 && m->path.back() == '/') m->path.pop_back();
  m->name = std::filesystem::path(m->path).filename().string();

  ConfigOptions config_options;
  config_options.max_model_len = options.max_model_len;
  auto config = LoadModelConfig(options.model_dir, config_options);
  if (!config.ok()) return WithFlag(config.status(), flag);
  m->config = std::move(*config);
  std::error_code ec;
  if (std::filesystem::exists(std::filesystem::path(options.model_dir) / "tokenizer.json", ec)) {
    auto tokenizer = Tokenizer::LoadFromDir(options.model_dir);
    if (!tokenizer.ok()) return WithFlag(tokenizer.status(), flag);
    // Every id the tokenizer can produce must have an embedding row (models often pad their
    // vocabulary beyond the tokenizer's, never the other way round).
    if ((*tokenizer)->vocab_size() > m->config.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, ": tokenizer.json has ", (*tokenizer)->vocab_size(),
                       " tokens but the model's vocab_size is ", m->config.vocab_size));
    }
    m->tokenizer = std::move(*tokenizer);
  } else {
    LS_LOG(WARNING) << flag << " has no tokenizer.json: Tokenize, Detokenize and text prompts "
                    << "are refused (token-id prompts still work)";
  }
  auto checkpoint = SafetensorsCheckpoint::Open(options.model_dir);
  if (!checkpoint.ok()) return WithFlag(checkpoint.status(), flag);
  auto weights = LoadModelWeights(**checkpoint, m->config, options.weights_dtype);
  if (!weights.ok()) return WithFlag(weights.status(), flag);
  m->weights = std::move(*weights);

  CpuBackendOptions backend_options;
  backend_options.threads = options.threads;
  backend_options.max_context = m->config.max_model_len;
  auto backend = CpuBackend::Create(backend_options);
  if (!backend.ok()) return WithFlag(backend.status(), "--threads");
  m->backend = std::move(*backend);

  KvCacheOptions kv;
  kv.num_layers = m->config.num_hidden_layers;
  kv.num_kv_heads = m->config.num_key_value_heads;
  kv.head_dim = m->config.head_dim;
  kv.block_tokens = options.kv_block_tokens;
  kv.cache_bytes = options.kv_cache_bytes;
  LS_ASSIGN_OR_RETURN(m->kv_cache, KvCache::Create(kv));
  const bool adapters = !options.adapter_root.empty();
  LS_ASSIGN_OR_RETURN(
      m->model, LlamaModel::Create(&m->config, m->weights.get(), m->backend.get(),
                                   options.max_step_tokens, adapters ? options.max_lora_rank : 0));
  if (adapters) {
    auto store = AdapterStore::Open(options.adapter_root);
    if (!store.ok()) return WithFlag(store.status(), "--adapter_root");
    AdapterRegistryOptions ro;
    ro.pool_bytes = options.adapter_pool_bytes;
    ro.page_bytes = options.adapter_page_bytes;
    ro.host_cache_bytes = options.adapter_host_cache_bytes;
    ro.wait_timeout = options.adapter_wait_timeout;
    ro.max_lora_rank = options.max_lora_rank;
    ro.dtype = options.weights_dtype;
    ro.load_on_demand = options.load_on_demand;
    auto registry = AdapterRegistry::Create(std::move(*store), m->config, m->weights.get(), ro);
    if (!registry.ok()) return WithFlag(registry.status(), "--adapter_root");
    m->adapters = std::move(*registry);
    // Staging directories of uploads (and deletes) a previous process left unfinished.
    for (const std::string& name : RemoveLeftovers(m->adapters->store().root())) {
      LS_LOG(INFO) << "removed leftover " << name << " from --adapter_root";
    }
    // Every adapter in the root is registered (tier disk), disabled ones as disabled.
    for (const absl::Status& skipped : m->adapters->RegisterAll()) {
      LS_LOG(WARNING) << "--adapter_root: " << skipped.message() << " (skipped)";
    }
    for (const std::string& id : options.preload_adapters) {
      auto loaded = m->adapters->Load(id);
      if (!loaded.ok()) {
        return absl::Status(loaded.status().code(),
                            absl::StrCat("--preload_adapters: adapter \"", id,
                                         "\" does not load: ", loaded.status().message()));
      }
      LS_LOG(INFO) << "preloaded adapter \"" << id << "\" version " << loaded->version;
    }
  }
  EngineOptions eo;
  eo.max_step_tokens = static_cast<int32_t>(options.max_step_tokens);
  eo.max_loras_per_step = options.max_loras_per_step;
  eo.max_model_len = m->config.max_model_len;
  eo.max_queued_requests = static_cast<int32_t>(options.max_queued_requests);
  auto engine = Engine::Create(eo, m->model.get(), m->kv_cache.get(), m->config, m->adapters.get(),
                               m->tokenizer != nullptr ? &m->tokenizer->detokenizer() : nullptr);
  if (!engine.ok()) return WithFlag(engine.status(), "--max_step_tokens");
  m->engine = std::move(*engine);
  LS_RETURN_IF_ERROR(m->engine->Start());
  m->load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return m;
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
    if (!options.model_dir.empty()) {
      return absl::UnimplementedError(
          "--backend=cuda: the CUDA backend cannot run a model in this version yet; use "
          "--backend=cpu");
    }
  }
  if (!options.model_dir.empty()) {
    LS_ASSIGN_OR_RETURN(state->model_, LoadModel(options));
    const LoadedModel& m = *state->model_;
    LS_LOG(INFO) << "model " << m.path << ": " << m.config.Summary();
    LS_LOG(INFO) << "weights: " << m.weights->num_parameters() << " parameters, "
                 << m.weights->arena_bytes() << " bytes as " << DTypeName(m.weights->dtype())
                 << "; backend " << m.backend->name() << " with " << m.backend->threads()
                 << " threads; KV cache " << m.kv_cache->num_blocks() << " blocks of "
                 << m.kv_cache->block_tokens() << " tokens (" << m.kv_cache->total_bytes()
                 << " bytes); loaded in " << m.load_seconds << " s";
    if (m.adapters != nullptr) {
      auto ids = m.adapters->List();
      LS_LOG(INFO) << "adapters under " << options.adapter_root << ": "
                   << (ids.ok() ? ids->size() : 0) << " on disk; pool "
                   << options.adapter_pool_bytes << " bytes in pages of "
                   << options.adapter_page_bytes << ", max rank " << options.max_lora_rank;
    }
  }
  return state;
}

void ServerState::StopEngine(absl::Time drain_deadline) {
  if (model_ != nullptr && model_->engine != nullptr) model_->engine->Stop(drain_deadline);
}

}  // namespace ls
