#include "server/grpc/admin_service.h"

#include "server/grpc/reactors.h"
#include "server/grpc/rpc_status.h"

namespace ls {
namespace {

namespace v1 = ::loraserve::v1;

constexpr absl::string_view kAdapterNeeds =
    "the adapter registry (PEFT loader, --adapter_root storage, pins and tiers)";

}  // namespace

grpc::ServerUnaryReactor* AdminService::NotBuilt(grpc::CallbackServerContext* context,
                                                 absl::string_view rpc) {
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) return FinishUnary(context, DrainingStatus());
  return FinishUnary(context, NotBuiltStatus(rpc, kAdapterNeeds));
}

grpc::ServerUnaryReactor* AdminService::LoadAdapter(grpc::CallbackServerContext* context,
                                                    const v1::LoadAdapterRequest*,
                                                    v1::LoadAdapterResponse*) {
  return NotBuilt(context, "LoadAdapter");
}

grpc::ServerReadReactor<v1::UploadAdapterRequest>* AdminService::UploadAdapter(
    grpc::CallbackServerContext*, v1::UploadAdapterResponse*) {
  DrainGate::Ticket ticket = gate_->Enter();
  if (!ticket) return new FinishedReadReactor<v1::UploadAdapterRequest>(DrainingStatus());
  return new FinishedReadReactor<v1::UploadAdapterRequest>(
      NotBuiltStatus("UploadAdapter", kAdapterNeeds));
}

grpc::ServerUnaryReactor* AdminService::UnloadAdapter(grpc::CallbackServerContext* context,
                                                      const v1::UnloadAdapterRequest*,
                                                      v1::UnloadAdapterResponse*) {
  return NotBuilt(context, "UnloadAdapter");
}

grpc::ServerUnaryReactor* AdminService::DeleteAdapter(grpc::CallbackServerContext* context,
                                                      const v1::DeleteAdapterRequest*,
                                                      v1::DeleteAdapterResponse*) {
  return NotBuilt(context, "DeleteAdapter");
}

grpc::ServerUnaryReactor* AdminService::ListAdapters(grpc::CallbackServerContext* context,
                                                     const v1::ListAdaptersRequest*,
                                                     v1::ListAdaptersResponse*) {
  return NotBuilt(context, "ListAdapters");
}

grpc::ServerUnaryReactor* AdminService::GetAdapter(grpc::CallbackServerContext* context,
                                                   const v1::GetAdapterRequest*,
                                                   v1::GetAdapterResponse*) {
  return NotBuilt(context, "GetAdapter");
}

grpc::ServerUnaryReactor* AdminService::PinAdapter(grpc::CallbackServerContext* context,
                                                   const v1::PinAdapterRequest*,
                                                   v1::PinAdapterResponse*) {
  return NotBuilt(context, "PinAdapter");
}

grpc::ServerUnaryReactor* AdminService::UnpinAdapter(grpc::CallbackServerContext* context,
                                                     const v1::UnpinAdapterRequest*,
                                                     v1::UnpinAdapterResponse*) {
  return NotBuilt(context, "UnpinAdapter");
}

}  // namespace ls
