// Server configuration: every flag lands in one ServerOptions, validated once at start and
// logged, so what a running server does is decided by this struct alone.
#ifndef LORASERVE_SERVER_OPTIONS_H_
#define LORASERVE_SERVER_OPTIONS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/dtype.h"

namespace ls {

enum class BackendKind { kCpu, kCuda };

absl::string_view BackendName(BackendKind kind);

// A listening address "host:port" split up. IPv6 hosts are written in brackets ("[::]:50051").
struct HostPort {
  std::string host;
  int port = 0;  // 0 = pick a free port
};

// Parses "host:port" / "[v6]:port"; INVALID_ARGUMENT naming `flag` when malformed.
absl::StatusOr<HostPort> ParseHostPort(absl::string_view text, absl::string_view flag);
std::string FormatHostPort(const std::string& host, int port);

struct ServerOptions {
  std::string address = "0.0.0.0:50051";         // gRPC listener
  std::string metrics_address = "0.0.0.0:9464";  // Prometheus /metrics listener
  // Also export the vllm:* gauges the Gateway API Inference Extension reads (docs/metrics.md).
  bool metrics_vllm_compat = true;
  bool enable_reflection = true;
  std::string model_dir;  // Hugging Face model folder; empty = serve without a model
  BackendKind backend = BackendKind::kCpu;
  int64_t max_model_len = 0;             // 0 = the model's max_position_embeddings
  uint64_t kv_cache_bytes = 1ull << 30;  // the KV block pool
  int kv_block_tokens = 16;              // tokens per KV block
  int threads = 0;                       // compute threads; 0 = every core
  DType weights_dtype = DType::kBF16;    // kBF16 or kF32 in memory
  int64_t max_step_tokens = 2048;        // rows one forward step may hold
  absl::Duration drain_timeout = absl::Seconds(30);
  int64_t max_receive_message_bytes = 4 << 20;
  // Adapters (docs/adapters.md). An empty root serves the base model only.
  std::string adapter_root;
  int32_t max_lora_rank = 256;                     // per module; larger adapters are refused
  uint64_t adapter_pool_bytes = 1ull << 30;        // the resident pool
  uint64_t adapter_page_bytes = 256ull << 10;      // its page size
  uint64_t adapter_host_cache_bytes = 2ull << 30;  // loaded adapters kept in host memory
  absl::Duration adapter_wait_timeout = absl::Seconds(30);  // waiting for pool room, at most
  int max_loras_per_step = 32;                              // distinct adapters in one step
  int64_t max_queued_requests = 1024;                       // submitted, not yet running
  double default_max_queue_seconds = 0;  // a request's default max_queue_seconds; 0 = no limit
  // Adapter administration (docs/adapters.md, "Admin operations").
  uint64_t max_adapter_upload_bytes = 1ull << 30;  // both files of one upload, at most
  uint64_t adapter_root_max_bytes = 0;             // files under the root; 0 = unlimited
  bool load_on_demand = true;                      // a request may load a registered adapter
  std::vector<std::string> preload_adapters;       // ids loaded at start (start fails if not)
  // Listeners and security (docs/security.md).
  std::string admin_address;        // empty: Admin is served on `address`
  std::string health_address;       // empty: no separate plaintext health listener
  std::string tls_cert_file;        // PEM chain; with tls_key_file, TLS on address/admin
  std::string tls_key_file;         // PEM private key
  std::string tls_client_ca_file;   // PEM CAs; set: client certificates required (mTLS)
  std::string admin_token_file;     // empty: Admin is not authenticated
  std::string inference_keys_file;  // empty: inference is open
  absl::Duration keepalive_time = absl::Hours(2);        // server pings an idle connection
  absl::Duration keepalive_timeout = absl::Seconds(20);  // ... and drops it without an answer
  absl::Duration max_connection_age = absl::InfiniteDuration();        // then GOAWAY
  absl::Duration max_connection_age_grace = absl::InfiniteDuration();  // then closed

  // Checks every field; the message names the flag and the bad value.
  absl::Status Validate() const;
  // One "name=value" per field, for the start-up log.
  std::string ToString() const;

 private:
  absl::Status ValidateListenersAndSecurity() const;
  std::string ListenersAndSecurityToString() const;
};

// Builds ServerOptions from the process's absl flags (after absl::ParseCommandLine) and
// validates them.
absl::StatusOr<ServerOptions> ServerOptionsFromFlags();

}  // namespace ls

#endif  // LORASERVE_SERVER_OPTIONS_H_
