// loraserve.v1.Admin over the gRPC callback API: adapter lifecycle (load, upload, unload,
// delete, list, get, pin, unpin) over the adapter registry (server/adapters/registry.h) and the
// upload writer (server/adapters/upload.h). docs/adapters.md ("Admin operations") is the
// operator's view.
//
// Every call is authorized first (Authorizer::CheckAdmin), then refused with UNAVAILABLE while
// draining if it changes adapters (List and Get still answer), and written to one audit log
// line: `audit who=... rpc=... id=... result=CODE ...`. Calls that may block on disk or on a
// load (everything but List and Get, and an upload's header and commit) run on the service's
// own worker threads, never on gRPC's callback threads; calls that change one id run one at a
// time per id, in arrival order, and a call whose deadline passes (or that is cancelled) while it
// waits for its turn ends with DEADLINE_EXCEEDED (CANCELLED) having changed nothing.
#ifndef LORASERVE_SERVER_GRPC_ADMIN_SERVICE_H_
#define LORASERVE_SERVER_GRPC_ADMIN_SERVICE_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "common/mutex.h"
#include "loraserve/v1/admin.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "server/drain.h"
#include "server/metrics/metrics.h"
#include "server/server_state.h"

namespace ls {

class Authorizer;

// Thread-safe. `state`, `gate`, `auth` (may be null: no authorization) and `metrics` must
// outlive the service; the service must be destroyed after the gRPC server has stopped.
class AdminService final : public loraserve::v1::Admin::CallbackService {
 public:
  AdminService(ServerState* state, DrainGate* gate, const Authorizer* auth, Metrics& metrics);
  ~AdminService() override;

  grpc::ServerUnaryReactor* LoadAdapter(grpc::CallbackServerContext* context,
                                        const loraserve::v1::LoadAdapterRequest* request,
                                        loraserve::v1::LoadAdapterResponse* response) override;
  grpc::ServerReadReactor<loraserve::v1::UploadAdapterRequest>* UploadAdapter(
      grpc::CallbackServerContext* context,
      loraserve::v1::UploadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* UnloadAdapter(grpc::CallbackServerContext* context,
                                          const loraserve::v1::UnloadAdapterRequest* request,
                                          loraserve::v1::UnloadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* DeleteAdapter(grpc::CallbackServerContext* context,
                                          const loraserve::v1::DeleteAdapterRequest* request,
                                          loraserve::v1::DeleteAdapterResponse* response) override;
  grpc::ServerUnaryReactor* ListAdapters(grpc::CallbackServerContext* context,
                                         const loraserve::v1::ListAdaptersRequest* request,
                                         loraserve::v1::ListAdaptersResponse* response) override;
  grpc::ServerUnaryReactor* GetAdapter(grpc::CallbackServerContext* context,
                                       const loraserve::v1::GetAdapterRequest* request,
                                       loraserve::v1::GetAdapterResponse* response) override;
  grpc::ServerUnaryReactor* PinAdapter(grpc::CallbackServerContext* context,
                                       const loraserve::v1::PinAdapterRequest* request,
                                       loraserve::v1::PinAdapterResponse* response) override;
  grpc::ServerUnaryReactor* UnpinAdapter(grpc::CallbackServerContext* context,
                                         const loraserve::v1::UnpinAdapterRequest* request,
                                         loraserve::v1::UnpinAdapterResponse* response) override;

 private:
  class Workers;
  class UploadReactor;
  class IdQueue;
  class IdTurn;

  // Authorizes, checks the drain gate (`mutation`) and the registry, then runs `work` on a
  // worker thread and finishes the call with its status; audit-logs the outcome. `detail`
  // (optional) receives extra audit fields from `work`.
  grpc::ServerUnaryReactor* Run(grpc::CallbackServerContext* context, absl::string_view rpc,
                                const std::string& id, bool mutation,
                                std::function<grpc::Status(std::string* detail)> work);
  void Audit(const std::string& who, absl::string_view rpc, const std::string& id,
             const grpc::Status& status, const std::string& detail) const;
  // The per-id queue serializing calls that change `id`.
  IdQueue* IdLock(const std::string& id);
  AdapterRegistry* registry() const;
  grpc::Status NoRegistryStatus() const;
  void CountUpload(absl::string_view result);

  ServerState* const state_;
  DrainGate* const gate_;
  const Authorizer* const auth_;
  prometheus::Counter* upload_bytes_ = nullptr;
  prometheus::Family<prometheus::Counter>* uploads_ = nullptr;

  Mutex locks_mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<IdQueue>> locks_ ABSL_GUARDED_BY(locks_mu_);
  std::unique_ptr<Workers> workers_;  // mutations (may wait on loads, disks)
  std::unique_ptr<Workers> readers_;  // List and Get: never queued behind a stuck load
};

}  // namespace ls

#endif  // LORASERVE_SERVER_GRPC_ADMIN_SERVICE_H_
