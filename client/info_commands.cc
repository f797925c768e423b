// health and model-info.
#include <cstdio>

#include "client/commands.h"
#include "client/connection.h"
#include "client/output.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"

namespace loraserve::client {

int RunHealth(const Config& config, const Args& args) {
  if (args.size() > 1) {
    return ReportError("health takes at most one argument (a service name)", kExitUsage);
  }
  auto channel = MakeChannel(config.connection.server, config.connection);
  if (!channel.ok()) return ReportError(channel.status().message(), kExitLocal);
  grpc::health::v1::HealthCheckRequest request;
  if (!args.empty()) request.set_service(args[0]);
  grpc::health::v1::HealthCheckResponse response;
  grpc::ClientContext context;
  PrepareContext(&context, config.connection, CallKind::kPlain);
  const grpc::Status status =
      grpc::health::v1::Health::NewStub(*channel)->Check(&context, request, &response);
  if (!status.ok()) return ReportRpcError(status);
  const int code = response.status() == grpc::health::v1::HealthCheckResponse::SERVING
                       ? kExitOk
                       : kExitNotServing;
  if (config.json) {
    const int printed = PrintJson(response);
    return printed != kExitOk ? printed : code;
  }
  std::printf("%s\n",
              grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()).c_str());
  return code;
}

int RunModelInfo(const Config& config, const Args& args) {
  if (!args.empty()) return ReportError("model-info takes no arguments", kExitUsage);
  auto channel = MakeChannel(config.connection.server, config.connection);
  if (!channel.ok()) return ReportError(channel.status().message(), kExitLocal);
  loraserve::v1::GetModelInfoResponse response;
  grpc::ClientContext context;
  PrepareContext(&context, config.connection, CallKind::kInference);
  const grpc::Status status =
      loraserve::v1::Inference::NewStub(*channel)->GetModelInfo(&context, {}, &response);
  if (!status.ok()) return ReportRpcError(status);
  // The answer is a deep description (server, model, tokenizer, backend, pools, scheduler);
  // indented JSON is its readable form too, so --json changes nothing here.
  return PrintJson(response);
}

}  // namespace loraserve::client
