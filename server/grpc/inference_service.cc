#include "server/grpc/inference_service.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/mutex.h"
#include "common/status.h"
#include "server/build_info.h"
#include "server/grpc/proto_types.h"
#include "server/grpc/reactors.h"
#include "server/grpc/rpc_status.h"
#include "server/grpc/status_mapping.h"

namespace ls {
namespace {

namespace v1 = ::loraserve::v1;

// GenerateRequest limits (see inference.proto).
constexpr size_t kMaxPromptTextBytes = size_t{1} << 20;
constexpr size_t kMaxRequestIdChars = 128;
constexpr int kMaxStopStrings = 16;
constexpr size_t kMaxStopStringBytes = 256;
// max_new_tokens when a request leaves it unset (reported as SchedulerInfo's default).
constexpr uint32_t kDefaultMaxNewTokens = 256;

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

// The pool and host cache as the registry counts them now. The per-state adapter counts need
// a listing of the root and are left to ListAdapters.
void FillAdapterPoolInfo(const AdapterRegistry& registry, const ServerOptions& options,
                         v1::AdapterPoolInfo* out) {
  const AdapterRegistryStats s = registry.Stats();
  out->set_pool_total_bytes(s.pool_capacity_bytes);
  out->set_pool_used_bytes(s.pool_used_pages_bytes);
  out->set_page_bytes(s.pool_page_bytes);
  if (s.pool_page_bytes > 0) {
    out->set_total_pages(static_cast<uint32_t>(s.pool_capacity_bytes / s.pool_page_bytes));
    out->set_used_pages(static_cast<uint32_t>(s.pool_used_pages_bytes / s.pool_page_bytes));
  }
  out->set_dtype(ToProtoDType(registry.options().dtype));
  out->set_max_lora_rank(static_cast<uint32_t>(options.max_lora_rank));
  out->set_max_loras_per_step(static_cast<uint32_t>(options.max_loras_per_step));
  out->set_host_cache_total_bytes(s.host_cache_capacity_bytes);
  out->set_host_cache_used_bytes(s.host_bytes);
  out->set_num_adapters_pinned(static_cast<uint32_t>(s.pinned_ids));
  out->set_num_adapter_references(static_cast<uint32_t>(s.refs));
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

namespace {

uint64_t RandomU64() {
  thread_local std::mt19937_64 rng([] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }());
  return rng();
}

// The proto's uint32 token ids as the engine's int32, saturating so an out-of-range id stays
// out of range (model/sampler.h).
int32_t ToTokenId(uint32_t id) {
  return static_cast<int32_t>(std::min<uint32_t>(id, std::numeric_limits<int32_t>::max()));
}

absl::Status ValidateRequestId(absl::string_view id) {
  if (id.size() > kMaxRequestIdChars) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id has ", id.size(), " characters; at most ", kMaxRequestIdChars));
  }
  for (char c : id) {
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == ':' || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("request_id \"", id, "\" has a character outside [A-Za-z0-9._:-]"));
    }
  }
  return absl::OkStatus();
}

// A validated request, ready to Submit.
struct PreparedGenerate {
  EngineRequest engine;
  std::string request_id;
  std::string adapter_id;
  std::vector<int32_t> prompt_ids;
  std::vector<std::string> stop_strings;
  bool return_token_ids = false;
  bool return_prompt_token_ids = false;
  bool include_stop_string = false;  // stopping.include_stop_string_in_output
  // Pieces and bytes of logprob entries; null without a tokenizer (entries then carry ids only).
  const Detokenizer* detokenizer = nullptr;
  absl::Time arrival;
  Metrics* metrics = nullptr;  // null: nothing is recorded
};

// The text a request's output ends with: the matched stop string when the request asked to
// keep it (the streamed text stops right before the match), else nothing.
absl::string_view KeptStopString(const EngineResult& result, bool include,
                                 const std::vector<std::string>& stop_strings) {
  if (!include || result.reason != EngineFinishReason::kStop || result.stop_string_index < 0 ||
      static_cast<size_t>(result.stop_string_index) >= stop_strings.size()) {
    return {};
  }
  return stop_strings[static_cast<size_t>(result.stop_string_index)];
}

// One generated position's logprobs as the API reports them.
void FillPositionLogprobs(const SampleResult& sample, const Detokenizer* detokenizer,
                          v1::PositionLogprobs* out) {
  const auto fill = [detokenizer](int32_t id, float logprob, v1::TokenLogprob* t) {
    t->set_token_id(static_cast<uint32_t>(id));
    t->set_logprob(logprob);
    if (detokenizer != nullptr) {
      t->set_piece(detokenizer->TokenPiece(id));
      t->set_decoded(detokenizer->TokenBytes(id));
    }
  };
  fill(sample.token_id, sample.logprob, out->mutable_token());
  out->set_rank(static_cast<uint32_t>(sample.rank));
  for (const TokenLogprob& alt : sample.top_logprobs()) {
    fill(alt.token_id, alt.logprob, out->add_top());
  }
}

absl::Status Unimplemented(absl::string_view field) {
  return absl::UnimplementedError(absl::StrCat(field, " is not implemented in loraserve ", kVersion,
                                               "; leave it at its default"));
}

// Everything Generate checks before Submit. `request_id` is set first (for x-request-id).
absl::Status PrepareGenerate(const ServerState& state, const v1::GenerateRequest& request,
                             absl::Time deadline, std::shared_ptr<std::atomic<bool>> cancelled,
                             PreparedGenerate* out) {
  const LoadedModel* m = state.model();
  if (m == nullptr || m->engine == nullptr) {
    return absl::FailedPreconditionError(
        "no model is loaded (start loraserve with --model); generation is unavailable");
  }
  const int32_t vocab = m->config.vocab_size;
  const int64_t max_model_len = m->config.max_model_len;

  // Prompt.
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      if (m->tokenizer == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat("prompt.text needs a tokenizer, but the model folder ", m->path,
                         " has no tokenizer.json; send prompt.token_ids instead"));
      }
      if (request.text().size() > kMaxPromptTextBytes) {
        return absl::InvalidArgumentError(absl::StrCat("prompt.text is ", request.text().size(),
                                                       " bytes; at most ", kMaxPromptTextBytes));
      }
      EncodeOptions options;
      if (request.has_tokenize_options()) {
        const v1::TokenizeOptions& o = request.tokenize_options();
        if (o.has_add_special_tokens()) options.add_special_tokens = o.add_special_tokens();
        if (o.has_parse_special()) options.parse_special = o.parse_special();
      }
      auto ids = m->tokenizer->EncodeIds(request.text(), options);
      if (!ids.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("prompt.text: ", ids.status().message()));
      }
      out->prompt_ids = std::move(*ids);
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = request.token_ids().ids();
      out->prompt_ids.reserve(static_cast<size_t>(ids.size()));
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] >= static_cast<uint32_t>(vocab)) {
          return absl::InvalidArgumentError(absl::StrCat("prompt.token_ids.ids[", i, "] = ", ids[i],
                                                         " is outside the vocabulary [0, ", vocab,
                                                         ")"));
        }
        out->prompt_ids.push_back(ToTokenId(ids[i]));
      }
      break;
    }
    default:
      return absl::InvalidArgumentError("prompt is unset: set prompt.text or prompt.token_ids");
  }
  const int64_t prompt_len = static_cast<int64_t>(out->prompt_ids.size());
  if (prompt_len == 0) {
    return absl::InvalidArgumentError("the prompt is empty (0 tokens after tokenization)");
  }
  if (prompt_len >= max_model_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the prompt has ", prompt_len, " tokens; at most max_model_len - 1 = ", max_model_len - 1));
  }

  // Fields this version does not implement: refused, never ignored.
  if (!request.adapter_version().empty()) {
    if (request.adapter_id().empty()) {
      return absl::InvalidArgumentError("adapter_version is set but adapter_id is empty");
    }
    return Unimplemented("adapter_version");
  }
  if (request.priority() < -100 || request.priority() > 100) {
    return absl::InvalidArgumentError(
        absl::StrCat("priority must be in [-100, 100], found ", request.priority()));
  }
  out->engine.priority = request.priority();
  double max_queue_seconds = state.options().default_max_queue_seconds;  // 0: no limit
  if (request.has_max_queue_seconds()) {
    const double asked = request.max_queue_seconds();
    if (!(asked > 0) || !std::isfinite(asked)) {
      return absl::InvalidArgumentError(
          absl::StrCat("max_queue_seconds must be finite and > 0, found ", asked));
    }
    max_queue_seconds = max_queue_seconds > 0 ? std::min(max_queue_seconds, asked) : asked;
  }
  if (max_queue_seconds > 0) {
    out->engine.queue_deadline = out->arrival + absl::Seconds(max_queue_seconds);
  }
  const v1::OutputOptions& output = request.output();
  if (output.prompt_logprobs()) return Unimplemented("output.prompt_logprobs");
  const v1::StoppingCriteria& stopping = request.stopping();
  out->include_stop_string = stopping.include_stop_string_in_output();

  // Sampling and stopping.
  SamplingParams& p = out->engine.sampling;
  const v1::SamplingParams& sp = request.sampling();
  if (sp.has_temperature()) p.temperature = sp.temperature();
  p.top_k = sp.top_k();
  if (sp.has_top_p()) p.top_p = sp.top_p();
  p.min_p = sp.min_p();
  if (sp.has_repetition_penalty()) p.repetition_penalty = sp.repetition_penalty();
  p.presence_penalty = sp.presence_penalty();
  p.frequency_penalty = sp.frequency_penalty();
  p.seed = sp.has_seed() ? sp.seed() : RandomU64();
  // Range checked with the other sampling parameters (ValidateSamplingParams).
  p.logprobs = output.logprobs() || output.top_logprobs() > 0;
  p.top_logprobs = output.top_logprobs();
  if (m->tokenizer != nullptr) out->detokenizer = &m->tokenizer->detokenizer();
  if (static_cast<size_t>(sp.logit_bias_size()) > kMaxLogitBiasEntries) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.logit_bias has ", sp.logit_bias_size(),
                                                   " entries; at most ", kMaxLogitBiasEntries));
  }
  for (const v1::TokenBias& b : sp.logit_bias()) {
    p.logit_bias.push_back(TokenBias{ToTokenId(b.token_id()), b.bias()});
  }
  const int64_t room = max_model_len - prompt_len;
  if (stopping.has_max_new_tokens()) {
    if (stopping.max_new_tokens() == 0) {
      return absl::InvalidArgumentError("stopping.max_new_tokens must be >= 1, found 0");
    }
    if (static_cast<int64_t>(stopping.max_new_tokens()) > room) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt tokens + stopping.max_new_tokens = ", prompt_len, " + ",
                       stopping.max_new_tokens(), " exceeds max_model_len ", max_model_len));
    }
    p.max_new_tokens = stopping.max_new_tokens();
  } else {
    p.max_new_tokens = static_cast<uint32_t>(std::min<int64_t>(kDefaultMaxNewTokens, room));
  }
  p.min_new_tokens = stopping.min_new_tokens();
  if (static_cast<size_t>(stopping.stop_token_ids_size()) > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(absl::StrCat("stopping.stop_token_ids has ",
                                                   stopping.stop_token_ids_size(), " ids; at most ",
                                                   kMaxStopTokenIds));
  }
  for (uint32_t id : stopping.stop_token_ids()) p.stop_token_ids.push_back(ToTokenId(id));
  p.ignore_eos = stopping.ignore_eos();
  p.eos_token_ids = m->config.eos_token_ids;
  if (stopping.stop_strings_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat("stopping.stop_strings has ",
                                                   stopping.stop_strings_size(),
                                                   " strings; at most ", kMaxStopStrings));
  }
  for (int i = 0; i < stopping.stop_strings_size(); ++i) {
    const std::string& stop = stopping.stop_strings(i);
    if (stop.empty() || stop.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stopping.stop_strings[", i, "] has ",
                                                     stop.size(), " bytes; must be 1 to ",
                                                     kMaxStopStringBytes));
    }
    if (m->tokenizer == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("stopping.stop_strings need a tokenizer, but the model folder ", m->path,
                       " has no tokenizer.json"));
    }
  }
  out->stop_strings.assign(stopping.stop_strings().begin(), stopping.stop_strings().end());
  LS_RETURN_IF_ERROR(ValidateSamplingParams(p, vocab));

  out->engine.prompt_token_ids = out->prompt_ids;
  out->engine.stop_strings = out->stop_strings;
  out->engine.skip_special_tokens =
      output.has_skip_special_tokens() ? output.skip_special_tokens() : true;
  out->engine.deadline = deadline;
  out->engine.cancelled = std::move(cancelled);
  out->return_token_ids = output.return_token_ids();
  out->return_prompt_token_ids = output.return_prompt_token_ids();

  // Adapter: never a silent fall-back to the base model.
  out->adapter_id = request.adapter_id();
  if (!out->adapter_id.empty()) {
    if (m->adapters == nullptr) {
      return absl::NotFoundError(absl::StrCat("adapter_id \"", out->adapter_id,
                                              "\": no such adapter (the server has no "
                                              "--adapter_root and serves the base model only)"));
    }
    // Where the adapter is before this request asks for it (Acquire may start its load): a
    // cache hit or miss, counted once the reference is taken.
    absl::StatusOr<AdapterInfo> before = absl::UnknownError("not looked up");
    if (out->metrics != nullptr) before = m->adapters->Get(out->adapter_id);
    auto ref = m->adapters->Acquire(out->adapter_id);
    if (!ref.ok()) {
      return absl::Status(ref.status().code(), absl::StrCat("adapter_id \"", out->adapter_id,
                                                            "\": ", ref.status().message()));
    }
    if (before.ok()) out->metrics->RecordAdapterLookup(before->in_pool, before->in_host);
    out->engine.adapter = std::move(*ref);
  }
  return absl::OkStatus();
}

// The request's outcome as the client's status: OK for a normal end; a cancel the client did
// not ask for is the server's (Stop after the drain deadline): UNAVAILABLE.
grpc::Status ResultStatus(const EngineResult& result, bool client_cancelled) {
  switch (result.reason) {
    case EngineFinishReason::kLength:
    case EngineFinishReason::kEos:
    case EngineFinishReason::kStop:
      return grpc::Status::OK;
    case EngineFinishReason::kCancelled:
      if (client_cancelled) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the server is shutting down and cancelled the request; retry on "
                          "another replica");
    case EngineFinishReason::kDeadline:
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the deadline passed");
    case EngineFinishReason::kError:
      break;
  }
  if (result.status.ok()) return grpc::Status(grpc::StatusCode::INTERNAL, "generation failed");
  return ToGrpcStatus(result.status);
}

// Accumulates what the final message carries: counts, the last token, timings.
struct FinalTracker {
  absl::Time arrival;
  absl::Time first_token = absl::InfinitePast();
  absl::Time last_token_time = absl::InfinitePast();
  int32_t last_token = -1;
  Metrics* metrics = nullptr;
  absl::Time deadline = absl::InfiniteFuture();

  void OnIds(absl::Span<const int32_t> ids) {
    if (ids.empty()) return;
    const absl::Time now = absl::Now();
    if (first_token == absl::InfinitePast()) {
      first_token = now;
    } else if (metrics != nullptr) {
      metrics->ObserveInterTokenLatency(absl::ToDoubleSeconds(now - last_token_time));
    }
    last_token_time = now;
    last_token = ids.back();
  }

  // Records the ended request in the metrics.
  void Record(const EngineResult& result, const grpc::Status& status) const {
    if (metrics == nullptr) return;
    GenerationRecord r;
    r.grpc_code = static_cast<int>(status.error_code());
    r.finished_reason = EngineFinishReasonName(result.reason);
    const absl::Time now = absl::Now();
    // gRPC cancels a call whose deadline passed before the engine's own check can see it: the
    // client gets DEADLINE_EXCEEDED, and so does the metric. The client's cancel at its own
    // deadline can arrive a little before the server's (which counts from the call's arrival).
    if (status.error_code() == grpc::StatusCode::CANCELLED &&
        now >= deadline - absl::Milliseconds(100)) {
      r.grpc_code = static_cast<int>(grpc::StatusCode::DEADLINE_EXCEEDED);
      r.finished_reason = EngineFinishReasonName(EngineFinishReason::kDeadline);
    }
    r.e2e_seconds = absl::ToDoubleSeconds(now - arrival);
    if (first_token != absl::InfinitePast()) {
      r.ttft_seconds = absl::ToDoubleSeconds(first_token - arrival);
    }
    if (result.queue_time != absl::InfiniteDuration()) {
      r.queue_seconds = absl::ToDoubleSeconds(result.queue_time);
    }
    r.prompt_tokens = result.usage.prompt_tokens;
    r.generation_tokens = result.usage.completion_tokens;
    metrics->RecordGeneration(r);
  }

  // Fills finish_reason, stop_match, usage and timings of a GenerateResponse or GenerateChunk.
  template <typename Message>
  void Fill(const EngineResult& result, const std::vector<std::string>& stop_strings,
            Message* out) const {
    switch (result.reason) {
      case EngineFinishReason::kLength:
        out->set_finish_reason(v1::FINISH_REASON_LENGTH);
        break;
      case EngineFinishReason::kEos:
        out->set_finish_reason(v1::FINISH_REASON_EOS);
        if (last_token >= 0) out->set_matched_stop_token_id(static_cast<uint32_t>(last_token));
        break;
      default:
        if (result.stop_string_index >= 0 &&
            static_cast<size_t>(result.stop_string_index) < stop_strings.size()) {
          out->set_finish_reason(v1::FINISH_REASON_STOP_STRING);
          out->set_matched_stop_string(stop_strings[static_cast<size_t>(result.stop_string_index)]);
        } else {
          out->set_finish_reason(v1::FINISH_REASON_STOP_TOKEN);
          if (last_token >= 0) out->set_matched_stop_token_id(static_cast<uint32_t>(last_token));
        }
        break;
    }
    out->mutable_usage()->set_prompt_tokens(static_cast<uint32_t>(result.usage.prompt_tokens));
    out->mutable_usage()->set_completion_tokens(
        static_cast<uint32_t>(result.usage.completion_tokens));
    const absl::Time end = absl::Now();
    const double total = absl::ToDoubleSeconds(end - arrival);
    const double ttft =
        first_token == absl::InfinitePast() ? total : absl::ToDoubleSeconds(first_token - arrival);
    v1::Timings* t = out->mutable_timings();
    t->set_time_to_first_token_seconds(ttft);
    t->set_total_seconds(total);
    if (result.usage.completion_tokens >= 2 && total > ttft) {
      t->set_decode_tokens_per_second((result.usage.completion_tokens - 1) / (total - ttft));
    }
  }
};

// ---- Generate ----

class GenerateUnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  GenerateUnaryReactor(DrainGate::Ticket ticket, std::shared_ptr<std::atomic<bool>> cancelled)
      : ticket_(std::move(ticket)), cancelled_(std::move(cancelled)) {}
  void OnCancel() override { cancelled_->store(true); }
  void OnDone() override { delete this; }

 private:
  DrainGate::Ticket ticket_;  // released when gRPC is done with the call
  std::shared_ptr<std::atomic<bool>> cancelled_;
};

// Collects the output and finishes the call. The reactor lives until Finish (OnDone follows
// it), and OnFinish touches nothing after calling Finish.
class UnarySink final : public RequestSink {
 public:
  UnarySink(GenerateUnaryReactor* reactor, v1::GenerateResponse* response,
            PreparedGenerate& prepared)
      : reactor_(reactor),
        response_(response),
        cancelled_(prepared.engine.cancelled),
        return_token_ids_(prepared.return_token_ids),
        logprobs_(prepared.engine.sampling.logprobs),
        include_stop_string_(prepared.include_stop_string),
        detokenizer_(prepared.detokenizer),
        stop_strings_(prepared.stop_strings) {
    tracker_.arrival = prepared.arrival;
    tracker_.metrics = prepared.metrics;
    tracker_.deadline = prepared.engine.deadline;
  }

  void OnTokens(absl::Span<const int32_t> ids, absl::string_view text,
                const SampleResult* sample) override {
    tracker_.OnIds(ids);
    response_->mutable_text()->append(text.data(), text.size());
    if (return_token_ids_) {
      for (int32_t id : ids) response_->add_token_ids(static_cast<uint32_t>(id));
    }
    if (logprobs_ && sample != nullptr) {
      FillPositionLogprobs(*sample, detokenizer_, response_->add_logprobs());
    }
  }

  void OnFinish(const EngineResult& result) override {
    const grpc::Status status = ResultStatus(result, cancelled_->load());
    tracker_.Record(result, status);
    if (status.ok()) {
      const absl::string_view kept = KeptStopString(result, include_stop_string_, stop_strings_);
      response_->mutable_text()->append(kept.data(), kept.size());
      response_->mutable_adapter()->set_id(result.adapter_id);
      response_->mutable_adapter()->set_version(result.adapter_version);
      tracker_.Fill(result, stop_strings_, response_);
    }
    reactor_->Finish(status);  // last use of the reactor and the response
  }

 private:
  GenerateUnaryReactor* const reactor_;
  v1::GenerateResponse* const response_;
  const std::shared_ptr<std::atomic<bool>> cancelled_;
  const bool return_token_ids_;
  const bool logprobs_;
  const bool include_stop_string_;
  const Detokenizer* const detokenizer_;
  const std::vector<std::string> stop_strings_;
  FinalTracker tracker_;
};

// ---- GenerateStream ----

class GenerateStreamReactor;

// The sink's way to the reactor: null once the reactor is gone (OnDone). OnDone takes `mu`
// before deleting the reactor, so a sink holding `mu` always sees a live reactor or null.
struct StreamLink {
  std::mutex mu;
  GenerateStreamReactor* reactor = nullptr;
};

// One write in flight: chunks queue under mu_ and the next is written from OnWriteDone.
// gRPC calls (StartWrite, Finish) are made outside mu_.
class GenerateStreamReactor final : public grpc::ServerWriteReactor<v1::GenerateChunk> {
 public:
  GenerateStreamReactor(DrainGate::Ticket ticket, std::shared_ptr<std::atomic<bool>> cancelled)
      : ticket_(std::move(ticket)),
        cancelled_(std::move(cancelled)),
        link_(std::make_shared<StreamLink>()) {
    link_->reactor = this;
  }

  const std::shared_ptr<StreamLink>& link() const { return link_; }
  const std::shared_ptr<std::atomic<bool>>& cancelled() const { return cancelled_; }

  // Queues a chunk; a delta (`mergeable`) joins a delta still waiting to be written.
  void Enqueue(v1::GenerateChunk chunk, bool mergeable) {
    {
      MutexLock lock(&mu_);
      if (broken_) return;
      if (mergeable && back_mergeable_ && !queue_.empty()) {
        v1::GenerateChunk& back = queue_.back();
        back.mutable_text()->append(chunk.text());
        back.mutable_token_ids()->MergeFrom(chunk.token_ids());
        back.mutable_logprobs()->MergeFrom(chunk.logprobs());
      } else {
        queue_.push_back(std::move(chunk));
        back_mergeable_ = mergeable;
      }
    }
    Pump();
  }

  // Ends the stream with `status` once every queued chunk (and `final_chunk`) is written.
  void Complete(grpc::Status status, std::optional<v1::GenerateChunk> final_chunk) {
    {
      MutexLock lock(&mu_);
      if (final_chunk.has_value() && !broken_) {
        queue_.push_back(std::move(*final_chunk));
        back_mergeable_ = false;
      }
      finish_pending_ = true;
      status_ = std::move(status);
    }
    Pump();
  }

  // Writing may start (after a successful Submit; the header chunk is queued first).
  void Accept() {
    {
      MutexLock lock(&mu_);
      accepted_ = true;
    }
    Pump();
  }

  // Refused before acceptance: no chunk, just the status.
  void Refuse(grpc::Status status) {
    {
      MutexLock lock(&mu_);
      queue_.clear();
      accepted_ = true;
    }
    Complete(std::move(status), std::nullopt);
  }

  void OnWriteDone(bool ok) override {
    {
      MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        broken_ = true;
        queue_.clear();
      }
    }
    Pump();
  }

  void OnCancel() override { cancelled_->store(true); }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(link_->mu);
      link_->reactor = nullptr;
    }
    delete this;
  }

 private:
  void Pump() {
    enum class Action { kNone, kWrite, kFinish } action = Action::kNone;
    grpc::Status status;
    {
      MutexLock lock(&mu_);
      if (!accepted_ || writing_ || finished_) return;
      if (!queue_.empty()) {
        current_ = std::move(queue_.front());
        queue_.pop_front();
        writing_ = true;
        action = Action::kWrite;
      } else if (finish_pending_) {
        finished_ = true;
        status = status_;
        if (broken_ && status.ok()) {
          status = grpc::Status(grpc::StatusCode::CANCELLED, "the stream was broken");
        }
        action = Action::kFinish;
      }
    }
    // current_ is touched again only after OnWriteDone (writing_ guards it).
    if (action == Action::kWrite) StartWrite(&current_);
    if (action == Action::kFinish) Finish(std::move(status));
  }

  DrainGate::Ticket ticket_;
  const std::shared_ptr<std::atomic<bool>> cancelled_;
  const std::shared_ptr<StreamLink> link_;
  Mutex mu_;
  std::deque<v1::GenerateChunk> queue_ ABSL_GUARDED_BY(mu_);
  bool back_mergeable_ ABSL_GUARDED_BY(mu_) = false;
  bool accepted_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  v1::GenerateChunk current_;
};

class StreamSink final : public RequestSink {
 public:
  StreamSink(GenerateStreamReactor* reactor, PreparedGenerate& prepared)
      : link_(reactor->link()),
        cancelled_(reactor->cancelled()),
        request_id_(prepared.request_id),
        return_token_ids_(prepared.return_token_ids),
        logprobs_(prepared.engine.sampling.logprobs),
        include_stop_string_(prepared.include_stop_string),
        detokenizer_(prepared.detokenizer),
        stop_strings_(prepared.stop_strings) {
    tracker_.arrival = prepared.arrival;
    tracker_.metrics = prepared.metrics;
    tracker_.deadline = prepared.engine.deadline;
  }

  void OnTokens(absl::Span<const int32_t> ids, absl::string_view text,
                const SampleResult* sample) override {
    tracker_.OnIds(ids);
    const bool send_ids = return_token_ids_ && !ids.empty();
    const bool send_logprobs = logprobs_ && sample != nullptr;
    if (text.empty() && !send_ids && !send_logprobs) return;  // nothing the client asked for
    v1::GenerateChunk chunk;
    chunk.set_request_id(request_id_);
    chunk.set_text(std::string(text));
    if (send_ids) {
      for (int32_t id : ids) chunk.add_token_ids(static_cast<uint32_t>(id));
    }
    if (send_logprobs) FillPositionLogprobs(*sample, detokenizer_, chunk.add_logprobs());
    std::lock_guard<std::mutex> lock(link_->mu);
    if (link_->reactor != nullptr) link_->reactor->Enqueue(std::move(chunk), true);
  }

  void OnFinish(const EngineResult& result) override {
    grpc::Status status = ResultStatus(result, cancelled_->load());
    tracker_.Record(result, status);
    std::optional<v1::GenerateChunk> final_chunk;
    if (status.ok()) {
      final_chunk.emplace();
      final_chunk->set_request_id(request_id_);
      final_chunk->set_text(
          std::string(KeptStopString(result, include_stop_string_, stop_strings_)));
      // The version that served the request (the header may predate its load).
      final_chunk->mutable_adapter()->set_id(result.adapter_id);
      final_chunk->mutable_adapter()->set_version(result.adapter_version);
      tracker_.Fill(result, stop_strings_, &*final_chunk);
    }
    std::lock_guard<std::mutex> lock(link_->mu);
    if (link_->reactor != nullptr) {
      link_->reactor->Complete(std::move(status), std::move(final_chunk));
    }
  }

 private:
  const std::shared_ptr<StreamLink> link_;
  const std::shared_ptr<std::atomic<bool>> cancelled_;
  const std::string request_id_;
  const bool return_token_ids_;
  const bool logprobs_;
  const bool include_stop_string_;
  const Detokenizer* const detokenizer_;
  const std::vector<std::string> stop_strings_;
  FinalTracker tracker_;
};

// Request id (validated or generated) and the x-request-id header.
absl::Status SetRequestId(grpc::CallbackServerContext* context, const v1::GenerateRequest& request,
                          PreparedGenerate* prepared) {
  LS_RETURN_IF_ERROR(ValidateRequestId(request.request_id()));
  prepared->request_id = request.request_id().empty() ? absl::StrFormat("req-%016x", RandomU64())
                                                      : request.request_id();
  context->AddInitialMetadata("x-request-id", prepared->request_id);
  return absl::OkStatus();
}

absl::Time DeadlineOf(const grpc::CallbackServerContext* context) {
  const auto deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

// A generation request refused before reaching the engine.
void RecordRejected(Metrics* metrics, const grpc::Status& status, absl::Time arrival) {
  if (metrics == nullptr) return;
  GenerationRecord r;
  r.grpc_code = static_cast<int>(status.error_code());
  r.finished_reason = "rejected";
  r.e2e_seconds = absl::ToDoubleSeconds(absl::Now() - arrival);
  metrics->RecordGeneration(r);
}

// Everything Generate and GenerateStream check before Submit: the request id, the caller's
// key (before the adapter is looked up, so a refusal never tells whether it exists), then the
// request itself.
absl::Status AdmitGenerate(const ServerState& state, const Authorizer& auth,
                           grpc::CallbackServerContext* context, const v1::GenerateRequest& request,
                           std::shared_ptr<std::atomic<bool>> cancelled,
                           PreparedGenerate* prepared) {
  LS_RETURN_IF_ERROR(SetRequestId(context, request, prepared));
  LS_RETURN_IF_ERROR(FromGrpcStatus(auth.CheckInference(*context, request.adapter_id(), nullptr)));
  return PrepareGenerate(state, request, DeadlineOf(context), std::move(cancelled), prepared);
}

}  // namespace

grpc::ServerUnaryReactor* InferenceService::Generate(grpc::CallbackServerContext* context,
                                                     const v1::GenerateRequest* request,
                                                     v1::GenerateResponse* response) {
  const absl::Time arrival = absl::Now();
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) {
    RecordRejected(metrics_, DrainingStatus(), arrival);
    return FinishUnary(context, DrainingStatus());
  }
  auto cancelled = std::make_shared<std::atomic<bool>>(false);
  auto* reactor = new GenerateUnaryReactor(std::move(ticket), cancelled);
  PreparedGenerate prepared;
  prepared.arrival = arrival;
  prepared.metrics = metrics_;
  absl::Status status = AdmitGenerate(*state_, *auth_, context, *request, cancelled, &prepared);
  if (!status.ok()) {
    RecordRejected(metrics_, ToGrpcStatus(status), arrival);
    reactor->Finish(ToGrpcStatus(status));
    return reactor;
  }
  response->set_request_id(prepared.request_id);
  response->set_seed(prepared.engine.sampling.seed);
  for (int32_t id :
       prepared.return_prompt_token_ids ? prepared.prompt_ids : std::vector<int32_t>()) {
    response->add_prompt_token_ids(static_cast<uint32_t>(id));
  }
  auto sink = std::make_shared<UnarySink>(reactor, response, prepared);
  status = state_->engine()->Submit(std::move(prepared.engine), std::move(sink));
  // On error the sink was never called and is dropped: the reply is ours to send.
  if (!status.ok()) {
    RecordRejected(metrics_, ToGrpcStatus(status), arrival);
    reactor->Finish(ToGrpcStatus(status));
  }
  return reactor;
}

grpc::ServerWriteReactor<v1::GenerateChunk>* InferenceService::GenerateStream(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  const absl::Time arrival = absl::Now();
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) {
    RecordRejected(metrics_, DrainingStatus(), arrival);
    return new FinishedWriteReactor<v1::GenerateChunk>(DrainingStatus());
  }
  auto cancelled = std::make_shared<std::atomic<bool>>(false);
  auto* reactor = new GenerateStreamReactor(std::move(ticket), cancelled);
  PreparedGenerate prepared;
  prepared.arrival = arrival;
  prepared.metrics = metrics_;
  absl::Status status = AdmitGenerate(*state_, *auth_, context, *request, cancelled, &prepared);
  if (!status.ok()) {
    RecordRejected(metrics_, ToGrpcStatus(status), arrival);
    reactor->Refuse(ToGrpcStatus(status));
    return reactor;
  }
  // The header is queued before Submit, so it precedes every token; writing starts on Accept.
  v1::GenerateChunk header;
  header.set_request_id(prepared.request_id);
  header.mutable_adapter()->set_id(prepared.adapter_id);
  std::string version = prepared.engine.adapter.version();
  if (version.empty() && !prepared.adapter_id.empty()) {
    // Not resident yet: the version new references get (the one this ref holds).
    auto info = state_->model()->adapters->Get(prepared.adapter_id);
    if (info.ok()) version = info->version;
  }
  header.mutable_adapter()->set_version(version);
  header.set_seed(prepared.engine.sampling.seed);
  header.mutable_usage()->set_prompt_tokens(static_cast<uint32_t>(prepared.prompt_ids.size()));
  header.mutable_usage()->set_completion_tokens(0);
  if (prepared.return_prompt_token_ids) {
    for (int32_t id : prepared.prompt_ids) header.add_prompt_token_ids(static_cast<uint32_t>(id));
  }
  reactor->Enqueue(std::move(header), false);
  auto sink = std::make_shared<StreamSink>(reactor, prepared);
  status = state_->engine()->Submit(std::move(prepared.engine), std::move(sink));
  if (!status.ok()) {
    RecordRejected(metrics_, ToGrpcStatus(status), arrival);
    reactor->Refuse(ToGrpcStatus(status));
  } else {
    reactor->Accept();
  }
  return reactor;
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
  if (grpc::Status allowed = auth_->CheckInferenceCaller(*context, nullptr); !allowed.ok()) {
    return FinishUnary(context, allowed);
  }
  auto tokenizer = TokenizerFor("Tokenize");
  if (!tokenizer.ok()) return FinishUnary(context, ToGrpcStatus(tokenizer.status()));
  if (request->text().size() > kMaxTokenizeTextBytes) {
    return FinishUnary(context, ToGrpcStatus(absl::InvalidArgumentError(
                                    absl::StrCat("Tokenize: text is ", request->text().size(),
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
  if (grpc::Status allowed = auth_->CheckInferenceCaller(*context, nullptr); !allowed.ok()) {
    return FinishUnary(context, allowed);
  }
  auto tokenizer = TokenizerFor("Detokenize");
  if (!tokenizer.ok()) return FinishUnary(context, ToGrpcStatus(tokenizer.status()));
  if (request->token_ids_size() > kMaxDetokenizeIds) {
    return FinishUnary(context, ToGrpcStatus(absl::InvalidArgumentError(
                                    absl::StrCat("Detokenize: ", request->token_ids_size(),
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
  if (grpc::Status allowed = auth_->CheckInferenceCaller(*context, nullptr); !allowed.ok()) {
    return FinishUnary(context, allowed);
  }
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
  v1::AdapterPoolInfo* pool = response->mutable_adapter_pool();
  if (const LoadedModel* m = state_->model(); m != nullptr && m->adapters != nullptr) {
    FillAdapterPoolInfo(*m->adapters, state_->options(), pool);
  }
  v1::SchedulerInfo* scheduler = response->mutable_scheduler();
  scheduler->set_max_step_tokens(static_cast<uint32_t>(state_->options().max_step_tokens));
  scheduler->set_max_queued_requests(static_cast<uint32_t>(state_->options().max_queued_requests));
  scheduler->set_default_max_new_tokens(kDefaultMaxNewTokens);
  scheduler->set_default_max_queue_seconds(state_->options().default_max_queue_seconds);
  if (const Engine* engine = state_->engine(); engine != nullptr) {
    const EngineStats stats = engine->Stats();
    scheduler->set_num_running_requests(static_cast<uint32_t>(stats.num_running));
    // Not running: never admitted, preempted, or waiting for an adapter (as the metrics count).
    scheduler->set_num_waiting_requests(static_cast<uint32_t>(stats.num_waiting));
  }
  return FinishUnary(context, grpc::Status::OK);
}

}  // namespace ls
