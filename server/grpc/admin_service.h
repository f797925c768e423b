// loraserve.v1.Admin over the gRPC callback API: adapter lifecycle (load, upload, unload,
// delete, list, get, pin, unpin).
#ifndef LORASERVE_SERVER_GRPC_ADMIN_SERVICE_H_
#define LORASERVE_SERVER_GRPC_ADMIN_SERVICE_H_

#include "loraserve/v1/admin.grpc.pb.h"
#include "server/drain.h"

namespace ls {

// Thread-safe; `gate` must outlive the service.
class AdminService final : public loraserve::v1::Admin::CallbackService {
 public:
  explicit AdminService(DrainGate* gate) : gate_(gate) {}

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
  // The answer for every RPC here until the adapter registry lands.
  grpc::ServerUnaryReactor* NotBuilt(grpc::CallbackServerContext* context, absl::string_view rpc);

  DrainGate* gate_;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_GRPC_ADMIN_SERVICE_H_
