#include "server/grpc/inference_service.h"

#include <unistd.h>

#include <string>

#include "absl/time/clock.h"
#include "server/build_info.h"
#include "server/grpc/reactors.h"
#include "server/grpc/rpc_status.h"

namespace ls {
namespace {

namespace v1 = ::loraserve::v1;

constexpr absl::string_view kGenerationNeeds =
    "the model engine (forward pass, KV cache, scheduler) and the tokenizer";

v1::DType ToProtoDType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return v1::DTYPE_F32;
    case DType::kF16:
      return v1::DTYPE_F16;
    case DType::kBF16:
      return v1::DTYPE_BF16;
    case DType::kF64:
      return v1::DTYPE_F64;
    default:
      return v1::DTYPE_UNSPECIFIED;
  }
}

void FillServerInfo(const ServerState& state, v1::ServerInfo* out) {
  out->set_version(kVersion);
  out->set_git_commit(kGitCommit);
  out->set_build_type(kBuildType);
  out->set_cuda_enabled(kCudaBuilt);
  const int64_t start_us = absl::ToUnixMicros(state.start_time());
  out->mutable_start_time()->set_seconds(start_us / 1000000);
  out->mutable_start_time()->set_nanos(static_cast<int32_t>(start_us % 1000000) * 1000);
  out->set_uptime_seconds(absl::ToDoubleSeconds(absl::Now() - state.start_time()));
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) == 0) out->set_hostname(host);
  out->set_max_receive_message_bytes(
      static_cast<uint64_t>(state.options().max_receive_message_bytes));
}

void FillBackendInfo(const ServerState& state, v1::BackendInfo* out) {
  if (state.options().backend == BackendKind::kCuda && !state.cuda_devices().empty()) {
    const CudaDeviceInfo& d = state.cuda_devices().front();
    out->set_kind(v1::BACKEND_KIND_CUDA);
    out->set_device_name(d.name);
    out->set_device_index(static_cast<uint32_t>(d.index));
    out->set_compute_capability(absl::StrCat(d.compute_major, ".", d.compute_minor));
    out->set_device_memory_bytes(d.total_memory_bytes);
    out->set_description(absl::StrCat("CUDA device ", d.index, ": ", d.name));
  } else {
    out->set_kind(v1::BACKEND_KIND_CPU);
    out->set_device_name("cpu");
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    out->set_description(absl::StrCat("CPU, ", cores, " online cores"));
  }
}

}  // namespace

grpc::ServerUnaryReactor* InferenceService::Generate(grpc::CallbackServerContext* context,
                                                     const v1::GenerateRequest*,
                                                     v1::GenerateResponse*) {
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) return FinishUnary(context, DrainingStatus());
  return FinishUnary(context, NotBuiltStatus("Generate", kGenerationNeeds));
}

grpc::ServerWriteReactor<v1::GenerateChunk>* InferenceService::GenerateStream(
    grpc::CallbackServerContext*, const v1::GenerateRequest*) {
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) return new FinishedWriteReactor<v1::GenerateChunk>(DrainingStatus());
  return new FinishedWriteReactor<v1::GenerateChunk>(
      NotBuiltStatus("GenerateStream", kGenerationNeeds));
}

grpc::ServerUnaryReactor* InferenceService::Tokenize(grpc::CallbackServerContext* context,
                                                     const v1::TokenizeRequest*,
                                                     v1::TokenizeResponse*) {
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) return FinishUnary(context, DrainingStatus());
  return FinishUnary(context, NotBuiltStatus("Tokenize", "the tokenizer (tokenizer.json)"));
}

grpc::ServerUnaryReactor* InferenceService::Detokenize(grpc::CallbackServerContext* context,
                                                       const v1::DetokenizeRequest*,
                                                       v1::DetokenizeResponse*) {
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) return FinishUnary(context, DrainingStatus());
  return FinishUnary(context, NotBuiltStatus("Detokenize", "the tokenizer (tokenizer.json)"));
}

grpc::ServerUnaryReactor* InferenceService::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const v1::GetModelInfoRequest*,
                                                         v1::GetModelInfoResponse* response) {
  // Answers in every state, draining included, so operators can watch a drain.
  FillServerInfo(*state_, response->mutable_server());
  response->mutable_server()->set_state(gate_->draining() ? v1::SERVER_STATE_DRAINING
                                                          : v1::SERVER_STATE_SERVING);
  FillBackendInfo(*state_, response->mutable_backend());
  // The checkpoint is opened and validated at start; the engine that computes with it (and
  // fills config, tokenizer and KV cache facts) is not part of this version.
  if (const auto& ckpt = state_->checkpoint(); ckpt.has_value()) {
    response->set_model_loaded(true);
    v1::ModelInfo* model = response->mutable_model();
    model->set_name(ckpt->name);
    model->set_path(ckpt->path);
    model->set_num_parameters(ckpt->num_parameters);
    model->set_weights_bytes(ckpt->weights_bytes);
    model->set_weights_dtype(ToProtoDType(ckpt->weights_dtype));
  }
  response->mutable_adapter_pool();
  response->mutable_scheduler();
  return FinishUnary(context, grpc::Status::OK);
}

}  // namespace ls
