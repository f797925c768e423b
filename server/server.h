// The running server: the gRPC listener (Inference, Admin, health, reflection), an optional
// separate Admin listener (--admin_address), an optional plaintext health listener
// (--health_address), the metrics listener, and the model state they serve. Created once by
// main(); Create() either returns a server that is warmed up, listening and ready, or an error
// saying what could not start. docs/security.md says what to expose where.
#ifndef LORASERVE_SERVER_SERVER_H_
#define LORASERVE_SERVER_SERVER_H_

#include <grpcpp/server.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/drain.h"
#include "server/metrics/metrics.h"
#include "server/options.h"
#include "server/server_state.h"

namespace ls {

class AdminService;
class Authorizer;
class InferenceService;

// Thread-safe: BeginDrain, Shutdown and ForceShutdown may be called from any thread (main's
// signal loop and its drain thread).
class LoraServer {
 public:
  static absl::StatusOr<std::unique_ptr<LoraServer>> Create(const ServerOptions& options);
  ~LoraServer();
  LoraServer(const LoraServer&) = delete;
  LoraServer& operator=(const LoraServer&) = delete;

  // "host:port" with the bound ports (an ephemeral port 0 is resolved).
  const std::string& grpc_address() const { return grpc_address_; }
  const std::string& metrics_address() const { return metrics_address_; }
  // Empty when the listener was not asked for.
  const std::string& admin_address() const { return admin_address_; }
  const std::string& health_address() const { return health_address_; }

  // Readiness goes NOT_SERVING and new RPCs get UNAVAILABLE; in-flight RPCs keep running.
  void BeginDrain();
  // Waits for in-flight RPCs until `deadline` (or ForceShutdown), then stops the gRPC server,
  // cancelling whatever still runs. Returns when the server has stopped.
  void Shutdown(absl::Time deadline);
  // Makes a running Shutdown stop waiting and cancel in-flight RPCs now.
  void ForceShutdown();

 private:
  explicit LoraServer(const ServerOptions& options);
  absl::Status Start();
  // One short base-model generation through the engine, so the first real request does not
  // pay first-touch costs (page faults in the weights and KV pool, thread start-up).
  absl::Status WarmUp();
  // The running gRPC servers in the order Shutdown stops them: main, admin, then health, so
  // probes see NOT_SERVING until the end.
  std::vector<grpc::Server*> Servers() const;
  void SetHealth(bool serving);

  const ServerOptions options_;
  Metrics metrics_;
  DrainGate gate_;
  std::unique_ptr<ServerState> state_;
  // Read by both services; declared before them so it outlives them.
  std::unique_ptr<Authorizer> auth_;
  std::unique_ptr<InferenceService> inference_;
  std::unique_ptr<AdminService> admin_;
  // Health-only (plaintext), Admin-only, and the main listener; null when not configured.
  std::unique_ptr<grpc::Server> health_server_;
  std::unique_ptr<grpc::Server> admin_server_;
  std::unique_ptr<grpc::Server> server_;
  std::string grpc_address_;
  std::string metrics_address_;
  std::string admin_address_;
  std::string health_address_;
  std::atomic<bool> force_{false};
};

}  // namespace ls

#endif  // LORASERVE_SERVER_SERVER_H_
