// Who may call what: the admin bearer token (--admin_token_file) for the Admin service, and
// tenant API keys (--inference_keys_file) that name the adapter ids each key may use. Both
// files are read once at start. Without a token file the Admin service is open (serve it on a
// private --admin_address); without a keys file inference is open. docs/security.md is the
// operator's guide.
//
// Secrets are kept only as SHA-256 digests and compared in constant time; no message, log line
// or `who` string ever contains one.
#ifndef LORASERVE_SERVER_GRPC_AUTH_H_
#define LORASERVE_SERVER_GRPC_AUTH_H_

#include <grpcpp/server_context.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ls {

struct AuthOptions {
  std::string admin_token_file;     // empty: admin calls are not authenticated
  std::string inference_keys_file;  // empty: inference is open to everyone
};

using Sha256Digest = std::array<uint8_t, 32>;
Sha256Digest Sha256(absl::string_view data);

// Secrets (tokens, keys) are 16 to 4096 printable ASCII characters without spaces, so that they
// travel unchanged in a gRPC metadata value.
inline constexpr size_t kMinSecretBytes = 16;
inline constexpr size_t kMaxSecretBytes = 4096;

// One entry of the inference keys file.
struct TenantKey {
  std::string name;                   // for logs and error messages; never secret
  Sha256Digest key_sha256{};          // of the key as sent
  std::vector<std::string> adapters;  // patterns; "" = the base model

  // True when some pattern matches `adapter_id` ("" = the base model, matched only by "").
  bool Allows(absl::string_view adapter_id) const;
};

// An adapter pattern: an exact id, or an id with '*' standing for any run of characters
// (fnmatch(3) without brackets or '?', which adapter ids never need). "" matches only the base
// model and no pattern matches it otherwise, so "*" is every adapter but not the base model.
bool AdapterPatternMatches(absl::string_view pattern, absl::string_view adapter_id);

// Parses the keys file (format in docs/security.md):
//   {"keys": [{"name": "tenant-a", "key": "...", "adapters": ["a-*", "shared", ""]},
//             {"name": "tenant-b", "key_sha256": "<64 hex digits>", "adapters": ["b-*"]}]}
// INVALID_ARGUMENT starting with `what` for malformed JSON, unknown fields, bad or duplicate
// names, keys or patterns. Messages never quote a key.
absl::StatusOr<std::vector<TenantKey>> ParseInferenceKeys(absl::string_view json,
                                                          absl::string_view what);

// The credentials a call carries in its metadata.
struct CallerCredentials {
  std::optional<std::string> authorization;  // the `authorization` value, if exactly one was sent
  std::optional<std::string> api_key;        // the `x-api-key` value, if exactly one was sent
  bool duplicated = false;                   // one of the two was sent more than once

  static CallerCredentials FromContext(const grpc::ServerContextBase& context);
};

// Immutable after Create(); thread-safe.
class Authorizer {
 public:
  // Reads and validates both files; INVALID_ARGUMENT naming the flag and the file otherwise.
  static absl::StatusOr<std::unique_ptr<Authorizer>> Create(const AuthOptions& options);

  // Admin RPCs. OK, UNAUTHENTICATED (no or malformed `authorization: Bearer` header, wrong
  // token) or PERMISSION_DENIED (a valid inference key, which has no admin rights). `who`
  // (may be null) receives a name for the audit log that never contains a secret.
  grpc::Status CheckAdmin(const grpc::ServerContextBase& context, std::string* who) const;
  grpc::Status CheckAdmin(const CallerCredentials& credentials, std::string* who) const;

  // Inference RPCs that use `adapter_id` ("" = the base model). OK, UNAUTHENTICATED (keys are
  // required and none or an unknown one was given) or PERMISSION_DENIED (the key may not use
  // this adapter, or the caller sent the admin token, which is not an inference key). Checked
  // before the adapter is looked up, so a refusal never tells whether the adapter exists.
  grpc::Status CheckInference(const grpc::ServerContextBase& context, absl::string_view adapter_id,
                              std::string* who) const;
  grpc::Status CheckInference(const CallerCredentials& credentials, absl::string_view adapter_id,
                              std::string* who) const;

  // Inference RPCs that use no adapter (Tokenize, Detokenize, GetModelInfo): any valid
  // inference key, or the admin token. OK or UNAUTHENTICATED.
  grpc::Status CheckInferenceCaller(const grpc::ServerContextBase& context, std::string* who) const;
  grpc::Status CheckInferenceCaller(const CallerCredentials& credentials, std::string* who) const;

  bool admin_open() const;
  bool inference_open() const;
  size_t num_inference_keys() const;

 private:
  struct Impl;
  explicit Authorizer(std::unique_ptr<Impl> impl);

 public:
  ~Authorizer();

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_GRPC_AUTH_H_
