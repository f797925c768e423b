// loractl's configuration (built from its flags in loractl.cc) and its exit codes.
//
// Commands receive a `Config` instead of reading flags, so each command file states what it
// uses and nothing depends on flag globals.
#ifndef LORASERVE_CLIENT_CLI_H_
#define LORASERVE_CLIENT_CLI_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"

namespace loraserve::client {

// Exit codes, documented in docs/client.md and `loractl --help`. Scripts branch on them, so they
// never change meaning.
inline constexpr int kExitOk = 0;
// The server answered with an error status (the code is on stderr), other than those below.
inline constexpr int kExitRpcError = 1;
// Bad command line: unknown command, missing or extra arguments, a malformed flag value.
inline constexpr int kExitUsage = 2;
// `health`: the server (or service) answered, but is not SERVING.
inline constexpr int kExitNotServing = 3;
// A local failure: a file could not be read, an adapter folder is incomplete, or the server
// stored a different version than the local files have.
inline constexpr int kExitLocal = 4;
// The server could not be reached or did not answer in time (UNAVAILABLE, DEADLINE_EXCEEDED):
// the only failures where retrying the same command may help.
inline constexpr int kExitUnavailable = 5;
// Missing or wrong credentials (UNAUTHENTICATED, PERMISSION_DENIED).
inline constexpr int kExitAuth = 6;

// How to reach the server and authenticate.
struct ConnectionConfig {
  std::string server;        // Inference, health and model-info, host:port
  std::string admin_server;  // Admin service, host:port (equal to `server` unless given)
  std::string api_key;       // inference key, sent as `authorization: Bearer <key>`; may be empty
  std::string admin_token;   // admin token, sent as `authorization: Bearer <token>`; may be empty
  bool tls = false;
  std::string tls_ca_file;      // PEM roots; empty: the system's roots
  std::string tls_cert_file;    // PEM client certificate chain (mutual TLS)
  std::string tls_key_file;     // PEM client private key (mutual TLS)
  std::string tls_server_name;  // overrides the name checked against the server certificate
  absl::Duration timeout = absl::Seconds(60);  // per RPC; InfiniteDuration: no deadline
};

// `generate` options. Unset optionals leave the request field unset (the server's default).
struct GenerateConfig {
  std::string adapter;
  std::string adapter_version;
  std::string request_id;
  std::string token_ids;  // comma-separated prompt ids instead of a text prompt
  std::optional<uint32_t> max_tokens;
  std::optional<double> temperature;
  std::optional<double> top_p;
  uint32_t top_k = 0;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool ignore_eos = false;
};

// When upload shows its progress bar on stderr.
enum class ProgressMode { kAuto, kAlways, kNever };

// `adapters ...` options.
struct AdminConfig {
  bool replace = false;        // upload: replace_existing
  bool load = true;            // upload: enable after storing
  bool validate_only = false;  // upload: check everything, store nothing
  bool force = false;          // delete: also an enabled adapter; unload: also a pinned one
  std::string prefix;          // list: id prefix
  std::string states;          // list: comma-separated states (ready, disabled, ...)
  ProgressMode progress = ProgressMode::kAuto;
};

struct Config {
  ConnectionConfig connection;
  bool json = false;  // machine-readable output: the response as protobuf JSON
  GenerateConfig generate;
  AdminConfig admin;
};

}  // namespace loraserve::client

#endif  // LORASERVE_CLIENT_CLI_H_
