// loractl: the command-line client for loraserve.
//
//   loractl [--address=HOST:PORT] [--timeout=10s] COMMAND [ARGS]
//
// Commands:
//   health [SERVICE]   grpc.health.v1 Check ("" = whole server); exit 0 only when SERVING
//   model-info         Inference.GetModelInfo, printed as JSON
//
// Exit codes: 0 success, 1 the server answered with an error (or NOT_SERVING), 2 usage errors.
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"

ABSL_FLAG(std::string, address, "127.0.0.1:50051", "loraserve gRPC address, host:port");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(10), "Deadline for each RPC");

namespace {

constexpr int kExitOk = 0;
constexpr int kExitRpcError = 1;
constexpr int kExitUsage = 2;

const char* CodeName(grpc::StatusCode code) {
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : "UNKNOWN";
}

int ReportError(const grpc::Status& status) {
  std::fprintf(stderr, "loractl: %s: %s\n", CodeName(status.error_code()),
               status.error_message().c_str());
  return kExitRpcError;
}

void SetDeadline(grpc::ClientContext* context) {
  context->set_deadline(absl::ToChronoTime(absl::Now() + absl::GetFlag(FLAGS_timeout)));
}

int Health(const std::shared_ptr<grpc::Channel>& channel, const std::vector<char*>& args) {
  if (args.size() > 1) {
    std::fprintf(stderr, "loractl: health takes at most one argument (a service name)\n");
    return kExitUsage;
  }
  grpc::health::v1::HealthCheckRequest request;
  if (!args.empty()) request.set_service(args[0]);
  grpc::health::v1::HealthCheckResponse response;
  grpc::ClientContext context;
  SetDeadline(&context);
  auto stub = grpc::health::v1::Health::NewStub(channel);
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return ReportError(status);
  std::printf("%s\n",
              grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status()).c_str());
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? kExitOk
                                                                             : kExitRpcError;
}

int PrintJson(const google::protobuf::Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  const auto status = google::protobuf::util::MessageToJsonString(message, &json, options);
  if (!status.ok()) {
    std::fprintf(stderr, "loractl: cannot print the answer as JSON: %s\n",
                 status.ToString().c_str());
    return kExitRpcError;
  }
  std::fputs(json.c_str(), stdout);
  if (json.empty() || json.back() != '\n') std::fputc('\n', stdout);
  return kExitOk;
}

int ModelInfo(const std::shared_ptr<grpc::Channel>& channel, const std::vector<char*>& args) {
  if (!args.empty()) {
    std::fprintf(stderr, "loractl: model-info takes no arguments\n");
    return kExitUsage;
  }
  auto stub = loraserve::v1::Inference::NewStub(channel);
  loraserve::v1::GetModelInfoResponse response;
  grpc::ClientContext context;
  SetDeadline(&context);
  const grpc::Status status = stub->GetModelInfo(&context, {}, &response);
  if (!status.ok()) return ReportError(status);
  return PrintJson(response);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "loractl [--address=HOST:PORT] [--timeout=10s] COMMAND [ARGS]\n"
      "Commands:\n"
      "  health [SERVICE]   health check; prints SERVING/NOT_SERVING, exit 0 only if SERVING\n"
      "  model-info         the server's build, backend and model, as JSON");
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() < 2) {
    std::fprintf(stderr, "%s\n", absl::ProgramUsageMessage().data());
    return kExitUsage;
  }
  const std::string command = rest[1];
  const std::vector<char*> args(rest.begin() + 2, rest.end());
  auto channel =
      grpc::CreateChannel(absl::GetFlag(FLAGS_address), grpc::InsecureChannelCredentials());
  if (command == "health") return Health(channel, args);
  if (command == "model-info") return ModelInfo(channel, args);
  std::fprintf(stderr, "loractl: unknown command \"%s\"\n%s\n", command.c_str(),
               absl::ProgramUsageMessage().data());
  return kExitUsage;
}
