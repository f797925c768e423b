#include "server/options.h"

#include <cmath>
#include <filesystem>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/marshalling.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

ABSL_FLAG(std::string, address, "0.0.0.0:50051",
          "gRPC listen address, host:port ([v6]:port for IPv6); port 0 picks a free port");
ABSL_FLAG(std::string, metrics_address, "0.0.0.0:9464",
          "Prometheus /metrics listen address, host:port; port 0 picks a free port");
ABSL_FLAG(bool, metrics_vllm_compat, true,
          "Also export vllm:num_requests_waiting, vllm:num_requests_running, "
          "vllm:kv_cache_usage_perc and vllm:lora_requests_info (the names the Kubernetes Gateway "
          "API Inference Extension reads for adapter-affinity routing)");
ABSL_FLAG(bool, enable_reflection, true, "Serve gRPC server reflection (grpcurl and friends)");
ABSL_FLAG(std::string, model, "", "Hugging Face model folder (config.json, *.safetensors)");
ABSL_FLAG(std::string, backend, "cpu", "Compute backend: cpu or cuda");
ABSL_FLAG(int64_t, max_model_len, 0,
          "Longest sequence (prompt + generated tokens); 0 = the model's max_position_embeddings");
ABSL_FLAG(uint64_t, kv_cache_bytes, 1ull << 30, "Bytes of the paged KV cache pool");
ABSL_FLAG(int, kv_block_tokens, 16, "Tokens per KV cache block");
ABSL_FLAG(int, threads, 0, "Compute threads of the CPU backend; 0 = every core");
ABSL_FLAG(std::string, weights_dtype, "bf16",
          "In-memory dtype of the weight matrices: bf16 or fp32");
ABSL_FLAG(int64_t, max_step_tokens, 2048, "Most token rows one forward step runs");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "On SIGTERM/SIGINT, how long in-flight RPCs may run before they are cancelled");
ABSL_FLAG(int64_t, max_receive_message_bytes, 4 << 20,
          "Largest gRPC message the server accepts, in bytes (uploads stream in chunks)");
ABSL_FLAG(std::string, adapter_root, "",
          "Folder of PEFT adapters, one subfolder per adapter id (empty: base model only)");
ABSL_FLAG(int32_t, max_lora_rank, 256, "Largest LoRA rank accepted for any module");
ABSL_FLAG(uint64_t, adapter_pool_bytes, 1ull << 30,
          "Bytes of the pool that holds resident adapters (in compute memory)");
ABSL_FLAG(uint64_t, adapter_page_bytes, 256ull << 10,
          "Page size of the adapter pool (a multiple of 256)");
ABSL_FLAG(uint64_t, adapter_host_cache_bytes, 2ull << 30,
          "Bytes of loaded adapters kept in host memory beyond the pool");
ABSL_FLAG(absl::Duration, adapter_wait_timeout, absl::Seconds(30),
          "How long a request waits for room in the adapter pool before RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_loras_per_step, 32, "Most distinct adapters in one forward step");
ABSL_FLAG(int64_t, max_queued_requests, 1024,
          "Most generation requests waiting for their first step; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(double, default_max_queue_seconds, 0,
          "Longest a request waits for its first step when it sets no max_queue_seconds, in "
          "seconds; then RESOURCE_EXHAUSTED. 0 = no limit");
ABSL_FLAG(uint64_t, max_adapter_upload_bytes, 1ull << 30,
          "Largest UploadAdapter (both files together), in bytes; larger uploads get "
          "RESOURCE_EXHAUSTED before any data is read");
ABSL_FLAG(uint64_t, adapter_root_max_bytes, 0,
          "Quota of the files under --adapter_root, in bytes; an upload that would exceed it gets "
          "RESOURCE_EXHAUSTED (0: unlimited)");
ABSL_FLAG(bool, load_on_demand, true,
          "A request for an enabled adapter under --adapter_root loads it; false: only adapters "
          "loaded by LoadAdapter, an upload with load, or --preload_adapters are served");
ABSL_FLAG(std::vector<std::string>, preload_adapters, {},
          "Comma-separated adapter ids loaded (and enabled) at start; start fails naming an id "
          "that does not load");

ABSL_FLAG(std::string, admin_address, "",
          "Separate listen address for the Admin service, host:port; when set, Admin is not "
          "served on --address (empty: Admin shares --address)");
ABSL_FLAG(std::string, health_address, "",
          "Plaintext listener serving only grpc.health.v1.Health (Kubernetes probes), host:port; "
          "empty: none");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM certificate chain; with --tls_key_file, --address and --admin_address use TLS");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)");
ABSL_FLAG(std::string, admin_token_file, "",
          "File holding the admin bearer token (trimmed); empty: Admin RPCs are not "
          "authenticated");
ABSL_FLAG(std::string, inference_keys_file, "",
          "JSON file of tenant API keys and the adapter id patterns each may use "
          "(docs/security.md); empty: inference is open");
ABSL_FLAG(absl::Duration, keepalive_time, absl::Hours(2),
          "How long a connection may be idle before the server pings it");
ABSL_FLAG(absl::Duration, keepalive_timeout, absl::Seconds(20),
          "How long the server waits for a keepalive ping's answer before closing the connection");
ABSL_FLAG(absl::Duration, max_connection_age, absl::InfiniteDuration(),
          "Age at which the server asks a client to reconnect (GOAWAY), spreading load over "
          "replicas; inf: never");
ABSL_FLAG(absl::Duration, max_connection_age_grace, absl::InfiniteDuration(),
          "After --max_connection_age, how long calls may finish before the connection is "
          "closed; inf: no limit");

namespace ls {

absl::string_view BackendName(BackendKind kind) {
  switch (kind) {
    case BackendKind::kCpu:
      return "cpu";
    case BackendKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

absl::StatusOr<HostPort> ParseHostPort(absl::string_view text, absl::string_view flag) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", text, ": ", why,
                     " (expected host:port, e.g. 0.0.0.0:50051 or [::]:50051)"));
  };
  const size_t colon = text.rfind(':');
  if (colon == absl::string_view::npos) return bad("no port");
  absl::string_view host = text.substr(0, colon);
  const absl::string_view port_text = text.substr(colon + 1);
  if (!host.empty() && host.front() == '[') {
    if (host.size() < 3 || host.back() != ']') return bad("unbalanced brackets");
    host = host.substr(1, host.size() - 2);
  } else if (host.find(':') != absl::string_view::npos) {
    return bad("IPv6 hosts must be in brackets");
  }
  if (host.empty()) return bad("empty host");
  int port = 0;
  if (port_text.empty() || !absl::SimpleAtoi(port_text, &port) || port < 0 || port > 65535 ||
      port_text.find_first_not_of("0123456789") != absl::string_view::npos) {
    return bad("port must be an integer in [0, 65535]");
  }
  return HostPort{std::string(host), port};
}

std::string FormatHostPort(const std::string& host, int port) {
  if (host.find(':') != std::string::npos) return absl::StrCat("[", host, "]:", port);
  return absl::StrCat(host, ":", port);
}

absl::Status ServerOptions::Validate() const {
  LS_ASSIGN_OR_RETURN(HostPort grpc, ParseHostPort(address, "address"));
  LS_ASSIGN_OR_RETURN(HostPort metrics, ParseHostPort(metrics_address, "metrics_address"));
  if (grpc.port != 0 && grpc.port == metrics.port && grpc.host == metrics.host) {
    return absl::InvalidArgumentError(
        absl::StrCat("--address and --metrics_address are both ", address));
  }
  if (!model_dir.empty()) {
    std::error_code ec;
    if (!std::filesystem::is_directory(model_dir, ec)) {
      return absl::InvalidArgumentError(absl::StrCat("--model=", model_dir, ": not a directory"));
    }
  }
  if (max_model_len < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_model_len=", max_model_len, ": must be >= 0"));
  }
  if (kv_block_tokens < 1 || kv_block_tokens > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv_block_tokens=", kv_block_tokens, ": must be in [1, 1024]"));
  }
  if (threads < 0 || threads > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--threads=", threads, ": must be in [0, 1024]"));
  }
  if (weights_dtype != DType::kBF16 && weights_dtype != DType::kF32) {
    return absl::InvalidArgumentError("--weights_dtype: must be bf16 or fp32");
  }
  if (max_step_tokens < 1 || max_step_tokens > (int64_t{1} << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_step_tokens=", max_step_tokens, ": must be in [1, 2^20]"));
  }
  if (drain_timeout < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--drain_timeout=", absl::FormatDuration(drain_timeout), ": must be >= 0"));
  }
  if (max_receive_message_bytes < 1024 || max_receive_message_bytes > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_receive_message_bytes=", max_receive_message_bytes, ": must be in [1024, 2^30]"));
  }
  if (!adapter_root.empty()) {
    std::error_code ec;
    if (!std::filesystem::is_directory(adapter_root, ec)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--adapter_root=", adapter_root, ": not a directory"));
    }
    if (model_dir.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--adapter_root=", adapter_root, ": adapters need a base model (--model)"));
    }
  }
  if (max_lora_rank < 1 || max_lora_rank > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_lora_rank=", max_lora_rank, ": must be in [1, 4096]"));
  }
  if (adapter_page_bytes < 256 || adapter_page_bytes % 256 != 0 ||
      adapter_page_bytes > (uint64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("--adapter_page_bytes=", adapter_page_bytes,
                                                   ": must be a multiple of 256 up to 2^30"));
  }
  if (adapter_pool_bytes < adapter_page_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("--adapter_pool_bytes=", adapter_pool_bytes,
                                                   ": must hold at least one page (",
                                                   adapter_page_bytes, " bytes)"));
  }
  if (adapter_wait_timeout < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--adapter_wait_timeout=", absl::FormatDuration(adapter_wait_timeout), ": must be >= 0"));
  }
  if (max_loras_per_step < 1 || max_loras_per_step > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_loras_per_step=", max_loras_per_step, ": must be in [1, 4096]"));
  }
  if (max_queued_requests < 1 || max_queued_requests > (int64_t{1} << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_queued_requests=", max_queued_requests, ": must be in [1, 2^20]"));
  }
  if (!(default_max_queue_seconds >= 0) || !std::isfinite(default_max_queue_seconds)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--default_max_queue_seconds=", default_max_queue_seconds,
                     ": must be finite and >= 0 (0 = no limit)"));
  }
  if (max_adapter_upload_bytes < 16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_adapter_upload_bytes=", max_adapter_upload_bytes, ": must be at least 16"));
  }
  if (!preload_adapters.empty() && adapter_root.empty()) {
    return absl::InvalidArgumentError(
        "--preload_adapters needs --adapter_root (the adapters are loaded from there)");
  }
  LS_RETURN_IF_ERROR(ValidateListenersAndSecurity());
  return absl::OkStatus();
}

absl::Status ServerOptions::ValidateListenersAndSecurity() const {
  // Every listener needs its own port (port 0 always gets a fresh one).
  std::vector<std::pair<std::string, HostPort>> listeners;
  LS_ASSIGN_OR_RETURN(HostPort grpc, ParseHostPort(address, "address"));
  listeners.emplace_back("address", grpc);
  LS_ASSIGN_OR_RETURN(HostPort metrics, ParseHostPort(metrics_address, "metrics_address"));
  listeners.emplace_back("metrics_address", metrics);
  if (!admin_address.empty()) {
    LS_ASSIGN_OR_RETURN(HostPort admin, ParseHostPort(admin_address, "admin_address"));
    listeners.emplace_back("admin_address", admin);
  }
  if (!health_address.empty()) {
    LS_ASSIGN_OR_RETURN(HostPort health, ParseHostPort(health_address, "health_address"));
    listeners.emplace_back("health_address", health);
  }
  for (size_t i = 0; i < listeners.size(); ++i) {
    for (size_t j = i + 1; j < listeners.size(); ++j) {
      const HostPort& a = listeners[i].second;
      const HostPort& b = listeners[j].second;
      if (a.port != 0 && a.port == b.port && a.host == b.host) {
        return absl::InvalidArgumentError(absl::StrCat("--", listeners[i].first, " and --",
                                                       listeners[j].first, " are both ",
                                                       FormatHostPort(a.host, a.port)));
      }
    }
  }
  if (tls_cert_file.empty() != tls_key_file.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_cert_file=", tls_cert_file,
                                                   " and --tls_key_file=", tls_key_file,
                                                   ": TLS needs both (or neither)"));
  }
  if (!tls_client_ca_file.empty() && tls_cert_file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_client_ca_file=", tls_client_ca_file,
                     ": client certificates need TLS; set --tls_cert_file and --tls_key_file"));
  }
  for (const auto& [flag, path] :
       {std::pair<const char*, const std::string*>{"tls_cert_file", &tls_cert_file},
        {"tls_key_file", &tls_key_file},
        {"tls_client_ca_file", &tls_client_ca_file},
        {"admin_token_file", &admin_token_file},
        {"inference_keys_file", &inference_keys_file}}) {
    std::error_code ec;
    if (!path->empty() && !std::filesystem::is_regular_file(*path, ec)) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", *path, ": not a file"));
    }
  }
  for (const auto& [flag, value] :
       {std::pair<const char*, absl::Duration>{"keepalive_time", keepalive_time},
        {"keepalive_timeout", keepalive_timeout},
        {"max_connection_age", max_connection_age},
        {"max_connection_age_grace", max_connection_age_grace}}) {
    if (value < absl::Milliseconds(1)) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", absl::FormatDuration(value),
                                                     ": must be at least 1ms (inf: off)"));
    }
  }
  return absl::OkStatus();
}

std::string ServerOptions::ListenersAndSecurityToString() const {
  auto or_none = [](const std::string& v) { return v.empty() ? std::string("(none)") : v; };
  // File names only: the files hold secrets, their paths do not.
  return absl::StrCat(
      " admin_address=", or_none(admin_address), " health_address=", or_none(health_address),
      " tls_cert_file=", or_none(tls_cert_file), " tls_key_file=", or_none(tls_key_file),
      " tls_client_ca_file=", or_none(tls_client_ca_file),
      " admin_token_file=", or_none(admin_token_file),
      " inference_keys_file=", or_none(inference_keys_file),
      " keepalive_time=", absl::FormatDuration(keepalive_time),
      " keepalive_timeout=", absl::FormatDuration(keepalive_timeout),
      " max_connection_age=", absl::FormatDuration(max_connection_age),
      " max_connection_age_grace=", absl::FormatDuration(max_connection_age_grace));
}

std::string ServerOptions::ToString() const {
  std::string out = absl::StrFormat(
      "address=%s metrics_address=%s enable_reflection=%s model=%s backend=%s "
      "max_model_len=%d kv_cache_bytes=%d kv_block_tokens=%d threads=%d weights_dtype=%s "
      "max_step_tokens=%d drain_timeout=%s max_receive_message_bytes=%d adapter_root=%s "
      "max_lora_rank=%d adapter_pool_bytes=%d adapter_page_bytes=%d "
      "adapter_host_cache_bytes=%d adapter_wait_timeout=%s max_loras_per_step=%d "
      "max_queued_requests=%d",
      address, metrics_address, enable_reflection ? "true" : "false",
      model_dir.empty() ? "(none)" : model_dir, BackendName(backend), max_model_len, kv_cache_bytes,
      kv_block_tokens, threads, weights_dtype == DType::kBF16 ? "bf16" : "fp32", max_step_tokens,
      absl::FormatDuration(drain_timeout), max_receive_message_bytes,
      adapter_root.empty() ? "(none)" : adapter_root, max_lora_rank, adapter_pool_bytes,
      adapter_page_bytes, adapter_host_cache_bytes, absl::FormatDuration(adapter_wait_timeout),
      max_loras_per_step, max_queued_requests);
  absl::StrAppend(&out, " default_max_queue_seconds=", default_max_queue_seconds);
  absl::StrAppend(&out, " metrics_vllm_compat=", metrics_vllm_compat ? "true" : "false");
  absl::StrAppend(&out, " max_adapter_upload_bytes=", max_adapter_upload_bytes,
                  " adapter_root_max_bytes=", adapter_root_max_bytes,
                  " load_on_demand=", load_on_demand ? "true" : "false", " preload_adapters=",
                  preload_adapters.empty() ? "(none)" : absl::StrJoin(preload_adapters, ","));
  return out + ListenersAndSecurityToString();
}

absl::StatusOr<ServerOptions> ServerOptionsFromFlags() {
  ServerOptions o;
  o.address = absl::GetFlag(FLAGS_address);
  o.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  o.enable_reflection = absl::GetFlag(FLAGS_enable_reflection);
  o.metrics_vllm_compat = absl::GetFlag(FLAGS_metrics_vllm_compat);
  o.model_dir = absl::GetFlag(FLAGS_model);
  const std::string backend = absl::GetFlag(FLAGS_backend);
  if (backend == "cpu") {
    o.backend = BackendKind::kCpu;
  } else if (backend == "cuda") {
    o.backend = BackendKind::kCuda;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend=", backend, ": expected cpu or cuda"));
  }
  o.max_model_len = absl::GetFlag(FLAGS_max_model_len);
  o.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_bytes);
  o.kv_block_tokens = absl::GetFlag(FLAGS_kv_block_tokens);
  o.threads = absl::GetFlag(FLAGS_threads);
  const std::string weights_dtype = absl::GetFlag(FLAGS_weights_dtype);
  if (weights_dtype == "bf16") {
    o.weights_dtype = DType::kBF16;
  } else if (weights_dtype == "fp32") {
    o.weights_dtype = DType::kF32;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--weights_dtype=", weights_dtype, ": expected bf16 or fp32"));
  }
  o.max_step_tokens = absl::GetFlag(FLAGS_max_step_tokens);
  o.drain_timeout = absl::GetFlag(FLAGS_drain_timeout);
  o.max_receive_message_bytes = absl::GetFlag(FLAGS_max_receive_message_bytes);
  o.adapter_root = absl::GetFlag(FLAGS_adapter_root);
  o.max_lora_rank = absl::GetFlag(FLAGS_max_lora_rank);
  o.adapter_pool_bytes = absl::GetFlag(FLAGS_adapter_pool_bytes);
  o.adapter_page_bytes = absl::GetFlag(FLAGS_adapter_page_bytes);
  o.adapter_host_cache_bytes = absl::GetFlag(FLAGS_adapter_host_cache_bytes);
  o.adapter_wait_timeout = absl::GetFlag(FLAGS_adapter_wait_timeout);
  o.max_loras_per_step = absl::GetFlag(FLAGS_max_loras_per_step);
  o.max_queued_requests = absl::GetFlag(FLAGS_max_queued_requests);
  o.default_max_queue_seconds = absl::GetFlag(FLAGS_default_max_queue_seconds);
  o.max_adapter_upload_bytes = absl::GetFlag(FLAGS_max_adapter_upload_bytes);
  o.adapter_root_max_bytes = absl::GetFlag(FLAGS_adapter_root_max_bytes);
  o.load_on_demand = absl::GetFlag(FLAGS_load_on_demand);
  for (const std::string& id : absl::GetFlag(FLAGS_preload_adapters)) {
    if (!id.empty()) o.preload_adapters.push_back(id);
  }
  o.admin_address = absl::GetFlag(FLAGS_admin_address);
  o.health_address = absl::GetFlag(FLAGS_health_address);
  o.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  o.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  o.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  o.admin_token_file = absl::GetFlag(FLAGS_admin_token_file);
  o.inference_keys_file = absl::GetFlag(FLAGS_inference_keys_file);
  o.keepalive_time = absl::GetFlag(FLAGS_keepalive_time);
  o.keepalive_timeout = absl::GetFlag(FLAGS_keepalive_timeout);
  o.max_connection_age = absl::GetFlag(FLAGS_max_connection_age);
  o.max_connection_age_grace = absl::GetFlag(FLAGS_max_connection_age_grace);
  LS_RETURN_IF_ERROR(o.Validate());
  return o;
}

}  // namespace ls
