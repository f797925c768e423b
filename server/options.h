// Server configuration: every flag lands in one ServerOptions, validated once at start and
// logged, so what a running server does is decided by this struct alone.
#ifndef LORASERVE_SERVER_OPTIONS_H_
#define LORASERVE_SERVER_OPTIONS_H_

#include <cstdint>
#include <string>

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

  // Checks every field; the message names the flag and the bad value.
  absl::Status Validate() const;
  // One "name=value" per field, for the start-up log.
  std::string ToString() const;
};

// Builds ServerOptions from the process's absl flags (after absl::ParseCommandLine) and
// validates them.
absl::StatusOr<ServerOptions> ServerOptionsFromFlags();

}  // namespace ls

#endif  // LORASERVE_SERVER_OPTIONS_H_
