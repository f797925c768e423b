#include "server/grpc/inference_service.h"

#include <unistd.h>

#include <string>

#include "absl/time/clock.h"
#include "server/build_info.h"
#include "server/grpc/reactors.h"
#include "server/grpc/rpc_status.h"
#include "server/grpc/status_mapping.h"

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

void FillModelInfo(const LoadedModel& m, v1::ModelInfo* out) {
  const ModelConfig& c = m.config;
  out->set_name(m.name);
  out->set_path(m.path);
  out->set_architecture(c.architecture);
  out->set_model_type(std::string(ModelTypeName(c.model_type)));
  out->set_vocab_size(static_cast<uint32_t>(c.vocab_size));
  out->set_hidden_size(static_cast<uint32_t>(c.hidden_size));
  out->set_intermediate_size(static_cast<uint32_t>(c.intermediate_size));
  out->set_num_hidden_layers(static_cast<uint32_t>(c.num_hidden_layers));
  out->set_num_attention_heads(static_cast<uint32_t>(c.num_attention_heads));
  out->set_num_key_value_heads(static_cast<uint32_t>(c.num_key_value_heads));
  out->set_head_dim(static_cast<uint32_t>(c.head_dim));
  out->set_max_position_embeddings(static_cast<uint32_t>(c.max_position_embeddings));
  out->set_max_model_len(static_cast<uint32_t>(c.max_model_len));
  out->set_rope_theta(c.rope_theta);
  if (c.rope_scaling.type != RopeScalingType::kNone) {
    out->set_rope_scaling_type(std::string(RopeScalingTypeName(c.rope_scaling.type)));
  }
  out->set_rms_norm_eps(c.rms_norm_eps);
  out->set_tie_word_embeddings(c.tie_word_embeddings);
  out->set_weights_dtype(ToProtoDType(m.weights->dtype()));
  out->set_compute_dtype(v1::DTYPE_F32);
  out->set_num_parameters(static_cast<uint64_t>(m.weights->num_parameters()));
  out->set_weights_bytes(m.weights->arena_bytes());
}

// The ids the model's config defines, and the tokenizer's own facts when it has one.
void FillTokenizerInfo(const LoadedModel& m, v1::TokenizerInfo* out) {
  const ModelConfig& c = m.config;
  out->set_vocab_size(static_cast<uint32_t>(c.vocab_size));
  if (c.bos_token_id.has_value()) out->set_bos_token_id(static_cast<uint32_t>(*c.bos_token_id));
  for (int32_t id : c.eos_token_ids) out->add_eos_token_ids(static_cast<uint32_t>(id));
  if (c.pad_token_id.has_value()) out->set_pad_token_id(static_cast<uint32_t>(*c.pad_token_id));
  if (m.tokenizer == nullptr) return;
  const Tokenizer& t = *m.tokenizer;
  out->set_vocab_size(static_cast<uint32_t>(t.vocab_size()));
  if (t.bos_token_id().has_value()) {
    out->set_bos_token_id(static_cast<uint32_t>(*t.bos_token_id()));
  }
  out->set_model_type("BPE");  // the only model type the tokenizer loads
  // Whether add_special_tokens prepends BOS: what the post-processor does to empty text.
  auto empty = t.EncodeIds("", EncodeOptions{});
  out->set_add_bos_token(empty.ok() && !empty->empty() && t.bos_token_id().has_value() &&
                         empty->front() == *t.bos_token_id());
  for (int32_t id = 0; id < t.vocab_size(); ++id) {
    if (!t.detokenizer().IsSpecial(id)) continue;
    v1::SpecialToken* special = out->add_special_tokens();
    special->set_id(static_cast<uint32_t>(id));
    const int32_t one[] = {id};
    special->set_content(t.Decode(one, /*skip_special_tokens=*/false));
  }
}

void FillKvCacheInfo(const KvCache& kv, v1::KvCacheInfo* out) {
  const uint64_t block_bytes = kv.total_bytes() / static_cast<uint64_t>(kv.num_blocks());
  const int32_t used = kv.used_blocks();
  out->set_block_tokens(static_cast<uint32_t>(kv.block_tokens()));
  out->set_total_blocks(static_cast<uint32_t>(kv.num_blocks()));
  out->set_used_blocks(static_cast<uint32_t>(used));
  out->set_block_bytes(block_bytes);
  out->set_total_bytes(kv.total_bytes());
  out->set_used_bytes(block_bytes * static_cast<uint64_t>(used));
  out->set_dtype(v1::DTYPE_F32);
  out->set_usage_ratio(static_cast<double>(used) / kv.num_blocks());
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
    if (const LoadedModel* m = state.model(); m != nullptr) {
      out->set_num_threads(static_cast<uint32_t>(m->backend->threads()));
      out->set_description(absl::StrCat(m->backend->name(), ", ", m->backend->threads(),
                                        " threads of ", cores, " online cores"));
    } else {
      out->set_description(absl::StrCat("CPU, ", cores, " online cores"));
    }
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

// The model's tokenizer, or FAILED_PRECONDITION saying why there is none.
absl::StatusOr<const Tokenizer*> InferenceService::TokenizerFor(absl::string_view rpc) const {
  const LoadedModel* m = state_->model();
  if (m == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(rpc, ": no model is loaded (start loraserve with --model)"));
  }
  if (m->tokenizer == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(rpc, ": the model folder ", m->path, " has no tokenizer.json"));
  }
  return m->tokenizer.get();
}

grpc::ServerUnaryReactor* InferenceService::Tokenize(grpc::CallbackServerContext* context,
                                                     const v1::TokenizeRequest* request,
                                                     v1::TokenizeResponse* response) {
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) return FinishUnary(context, DrainingStatus());
  auto tokenizer = TokenizerFor("Tokenize");
  if (!tokenizer.ok()) return FinishUnary(context, ToGrpcStatus(tokenizer.status()));
  if (request->text().size() > kMaxTokenizeTextBytes) {
    return FinishUnary(context, ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat(
                                    "Tokenize: text is ", request->text().size(),
                                    " bytes; at most ", kMaxTokenizeTextBytes))));
  }
  EncodeOptions options;
  if (request->has_options()) {
    const v1::TokenizeOptions& o = request->options();
    if (o.has_add_special_tokens()) options.add_special_tokens = o.add_special_tokens();
    if (o.has_parse_special()) options.parse_special = o.parse_special();
  }
  auto encoding = (*tokenizer)->Encode(request->text(), options);
  if (!encoding.ok()) {
    return FinishUnary(context, ToGrpcStatus(absl::InvalidArgumentError(
                                    absl::StrCat("Tokenize: ", encoding.status().message()))));
  }
  for (int32_t id : encoding->ids) response->add_token_ids(static_cast<uint32_t>(id));
  response->set_token_count(static_cast<uint32_t>(encoding->ids.size()));
  if (request->return_pieces()) {
    for (const std::string& piece : encoding->tokens) response->add_pieces(piece);
  }
  if (request->return_offsets()) {
    for (const auto& [start, end] : encoding->offsets) {
      v1::ByteSpan* span = response->add_offsets();
      span->set_start(start);
      span->set_end(end);
    }
  }
  return FinishUnary(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::Detokenize(grpc::CallbackServerContext* context,
                                                       const v1::DetokenizeRequest* request,
                                                       v1::DetokenizeResponse* response) {
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) return FinishUnary(context, DrainingStatus());
  auto tokenizer = TokenizerFor("Detokenize");
  if (!tokenizer.ok()) return FinishUnary(context, ToGrpcStatus(tokenizer.status()));
  if (request->token_ids_size() > kMaxDetokenizeIds) {
    return FinishUnary(context, ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat(
                                    "Detokenize: ", request->token_ids_size(),
                                    " token ids; at most ", kMaxDetokenizeIds))));
  }
  // Ids of the model's vocabulary; those past the tokenizer's (padding rows) decode to nothing.
  const uint32_t vocab = static_cast<uint32_t>(state_->model()->config.vocab_size);
  std::vector<int32_t> ids;
  ids.reserve(static_cast<size_t>(request->token_ids_size()));
  for (int i = 0; i < request->token_ids_size(); ++i) {
    const uint32_t id = request->token_ids(i);
    if (id >= vocab) {
      return FinishUnary(context, ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat(
                                      "Detokenize: token_ids[", i, "] = ", id,
                                      " is outside the vocabulary [0, ", vocab, ")"))));
    }
    ids.push_back(static_cast<int32_t>(id));
  }
  const bool skip_special =
      request->has_skip_special_tokens() ? request->skip_special_tokens() : true;
  response->set_text((*tokenizer)->Decode(ids, skip_special));
  return FinishUnary(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const v1::GetModelInfoRequest*,
                                                         v1::GetModelInfoResponse* response) {
  // Answers in every state, draining included, so operators can watch a drain.
  FillServerInfo(*state_, response->mutable_server());
  response->mutable_server()->set_state(gate_->draining() ? v1::SERVER_STATE_DRAINING
                                                          : v1::SERVER_STATE_SERVING);
  FillBackendInfo(*state_, response->mutable_backend());
  if (const LoadedModel* m = state_->model(); m != nullptr) {
    response->set_model_loaded(true);
    FillModelInfo(*m, response->mutable_model());
    FillTokenizerInfo(*m, response->mutable_tokenizer());
    FillKvCacheInfo(*m->kv_cache, response->mutable_kv_cache());
  }
  response->mutable_adapter_pool();
  response->mutable_scheduler()->set_max_step_tokens(
      static_cast<uint32_t>(state_->options().max_step_tokens));
  return FinishUnary(context, grpc::Status::OK);
}

}  // namespace ls
