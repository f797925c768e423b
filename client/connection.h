// Channels, per-call contexts and error reporting shared by every loractl command.
#ifndef LORASERVE_CLIENT_CONNECTION_H_
#define LORASERVE_CLIENT_CONNECTION_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "client/cli.h"

namespace loraserve::client {

// Which credential a call carries.
enum class CallKind {
  kInference,  // the API key, when one is given
  kAdmin,      // the admin token, when one is given
  kPlain,      // none (health)
};

// A channel to `target` with the TLS settings of `config` (insecure unless config.tls). Fails
// when a TLS file cannot be read.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& target,
                                                           const ConnectionConfig& config);

// Sets the deadline (config.timeout) and the `authorization` metadata for `kind` on `context`.
void PrepareContext(grpc::ClientContext* context, const ConnectionConfig& config, CallKind kind);

// The canonical name of a gRPC status code, e.g. "NOT_FOUND".
const char* CodeName(grpc::StatusCode code);

// Prints `loractl: <CODE>: <message>` (one line: newlines in the message become "; ") on
// stderr and returns the exit code for the status (see cli.h).
int ReportRpcError(const grpc::Status& status);

// Prints `loractl: <message>` on stderr (one line) and returns `exit_code`.
int ReportError(absl::string_view message, int exit_code);

// The exit code for a status that is not OK.
int ExitCodeFor(grpc::StatusCode code);

}  // namespace loraserve::client

#endif  // LORASERVE_CLIENT_CONNECTION_H_
