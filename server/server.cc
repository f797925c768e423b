#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status.h"
#include "google/protobuf/descriptor.h"
#include "server/grpc/admin_service.h"
#include "server/grpc/inference_service.h"
#include "server/grpc/metrics_interceptor.h"

namespace ls {
namespace {

// Health service names: "" is the whole server (liveness); the named services flip to
// NOT_SERVING when a drain starts (readiness).
constexpr const char* kInferenceServiceName = "loraserve.v1.Inference";
constexpr const char* kAdminServiceName = "loraserve.v1.Admin";

std::vector<std::string> ServedMethods() {
  std::vector<std::string> methods = {"/grpc.health.v1.Health/Check",
                                      "/grpc.health.v1.Health/Watch",
                                      "/grpc.reflection.v1alpha.ServerReflection/"
                                      "ServerReflectionInfo"};
  for (const char* name : {kInferenceServiceName, kAdminServiceName}) {
    const auto* service =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(name);
    if (service == nullptr) continue;
    for (int i = 0; i < service->method_count(); ++i) {
      methods.push_back(absl::StrCat("/", name, "/", service->method(i)->name()));
    }
  }
  return methods;
}

}  // namespace

LoraServer::LoraServer(const ServerOptions& options) : options_(options) {}

LoraServer::~LoraServer() {
  // Cancel what the engine still runs first, so every generation RPC gets its status and the
  // gRPC server's Wait() below does not wait on the engine.
  if (state_ != nullptr) state_->StopEngine(absl::InfinitePast());
  if (server_ != nullptr) {
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
  }
}

absl::StatusOr<std::unique_ptr<LoraServer>> LoraServer::Create(const ServerOptions& options) {
  LS_RETURN_IF_ERROR(options.Validate());
  std::unique_ptr<LoraServer> server(new LoraServer(options));
  LS_RETURN_IF_ERROR(server->Start());
  return server;
}

absl::Status LoraServer::Start() {
  LS_ASSIGN_OR_RETURN(state_, ServerState::Create(options_));
  inference_ = std::make_unique<InferenceService>(state_.get(), &gate_);
  admin_ = std::make_unique<AdminService>(&gate_);
  metrics_.SetKnownMethods(ServedMethods());

  LS_ASSIGN_OR_RETURN(HostPort grpc_hp, ParseHostPort(options_.address, "address"));
  grpc::EnableDefaultHealthCheckService(true);
  if (options_.enable_reflection) grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort(options_.address, grpc::InsecureServerCredentials(), &bound_port);
  // gRPC sets SO_REUSEPORT by default, which would let a second server "bind" a busy port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options_.max_receive_message_bytes));
  builder.RegisterService(inference_.get());
  builder.RegisterService(admin_.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
  creators.push_back(std::make_unique<MetricsInterceptorFactory>(&metrics_));
  builder.experimental().SetInterceptorCreators(std::move(creators));
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || bound_port == 0) {
    server_.reset();
    return absl::UnavailableError(
        absl::StrCat("--address=", options_.address,
                     ": cannot listen there (address in use, or not an address of this host)"));
  }
  grpc_address_ = FormatHostPort(grpc_hp.host, bound_port);

  LS_ASSIGN_OR_RETURN(HostPort metrics_hp,
                      ParseHostPort(options_.metrics_address, "metrics_address"));
  auto metrics_port = metrics_.Serve(options_.metrics_address);
  if (!metrics_port.ok()) {
    return absl::UnavailableError(absl::StrCat("--metrics_address=", options_.metrics_address, ": ",
                                               metrics_port.status().message()));
  }
  metrics_address_ = FormatHostPort(metrics_hp.host, *metrics_port);

  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(kInferenceServiceName, true);
  health->SetServingStatus(kAdminServiceName, true);
  LS_LOG(INFO) << "serving gRPC on " << grpc_address_ << ", metrics on " << metrics_address_;
  return absl::OkStatus();
}

void LoraServer::BeginDrain() {
  gate_.StartDrain();
  if (server_ != nullptr) {
    grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
    health->SetServingStatus(kInferenceServiceName, false);
    health->SetServingStatus(kAdminServiceName, false);
  }
}

void LoraServer::Shutdown(absl::Time deadline) {
  BeginDrain();
  // Poll so that ForceShutdown can cut the wait short.
  while (!force_.load() && absl::Now() < deadline) {
    if (gate_.WaitIdle(std::min(deadline, absl::Now() + absl::Milliseconds(100)))) break;
  }
  const int64_t in_flight = gate_.in_flight();
  if (in_flight > 0) LS_LOG(WARNING) << "cancelling " << in_flight << " in-flight RPC(s)";
  // Generation RPCs still running past the drain deadline are cancelled by the engine (they end
  // with UNAVAILABLE); the engine thread is joined before the model can be destroyed.
  if (state_ != nullptr) state_->StopEngine(absl::InfinitePast());
  if (server_ != nullptr) {
    server_->Shutdown(force_.load() ? absl::ToChronoTime(absl::Now())
                                    : absl::ToChronoTime(std::max(deadline, absl::Now())));
    server_->Wait();
    server_.reset();
  }
}

void LoraServer::ForceShutdown() { force_.store(true); }

}  // namespace ls
