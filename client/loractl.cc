// loractl: the command-line client for loraserve.
//
//   loractl [--address=HOST:PORT] [--timeout=10s] COMMAND [ARGS]
//
// Commands:
//   health [SERVICE]   grpc.health.v1 Check ("" = whole server); exit 0 only when SERVING
//   model-info         Inference.GetModelInfo, printed as JSON
//   generate PROMPT    Inference.GenerateStream: the text is printed as it arrives, then the
//                      finish reason and usage on stderr
//
// Exit codes: 0 success, 1 the server answered with an error (or NOT_SERVING), 2 usage errors.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"

ABSL_FLAG(std::string, address, "127.0.0.1:50051", "loraserve gRPC address, host:port");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(10), "Deadline for each RPC");
ABSL_FLAG(std::string, adapter, "", "generate: the adapter id (empty: the base model)");
ABSL_FLAG(int, max_tokens, 64, "generate: most new tokens");
ABSL_FLAG(double, temperature, 0.0, "generate: sampling temperature (0: greedy)");
ABSL_FLAG(std::string, token_ids, "",
          "generate: the prompt as comma-separated token ids instead of text");

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

const char* FinishReasonName(loraserve::v1::FinishReason reason) {
  return loraserve::v1::FinishReason_Name(reason).c_str();
}

int Generate(const std::shared_ptr<grpc::Channel>& channel, const std::vector<char*>& args) {
  const std::string ids_flag = absl::GetFlag(FLAGS_token_ids);
  if (args.size() != (ids_flag.empty() ? 1u : 0u)) {
    std::fprintf(stderr, "loractl: generate takes one argument, the prompt (or --token_ids)\n");
    return kExitUsage;
  }
  loraserve::v1::GenerateRequest request;
  request.set_adapter_id(absl::GetFlag(FLAGS_adapter));
  if (ids_flag.empty()) {
    request.set_text(args[0]);
  } else {
    for (absl::string_view part : absl::StrSplit(ids_flag, ',')) {
      uint32_t id = 0;
      if (!absl::SimpleAtoi(part, &id)) {
        std::fprintf(stderr, "loractl: --token_ids: \"%s\" is not a token id\n",
                     std::string(part).c_str());
        return kExitUsage;
      }
      request.mutable_token_ids()->add_ids(id);
    }
  }
  request.mutable_sampling()->set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  request.mutable_stopping()->set_max_new_tokens(
      static_cast<uint32_t>(std::max(1, absl::GetFlag(FLAGS_max_tokens))));
  request.mutable_output()->set_return_token_ids(!ids_flag.empty());
  auto stub = loraserve::v1::Inference::NewStub(channel);
  grpc::ClientContext context;
  SetDeadline(&context);
  auto reader = stub->GenerateStream(&context, request);
  loraserve::v1::GenerateChunk chunk;
  std::string ids_out;
  loraserve::v1::GenerateChunk last;
  loraserve::v1::AdapterRef adapter;
  while (reader->Read(&chunk)) {
    std::fputs(chunk.text().c_str(), stdout);
    for (uint32_t id : chunk.token_ids()) absl::StrAppend(&ids_out, ids_out.empty() ? "" : ",", id);
    std::fflush(stdout);
    // The header names the adapter; the final chunk also has the version that served.
    if (chunk.has_adapter() && !chunk.adapter().id().empty()) adapter = chunk.adapter();
    if (chunk.finish_reason() != loraserve::v1::FINISH_REASON_UNSPECIFIED) last = chunk;
  }
  const grpc::Status status = reader->Finish();
  std::fputc('\n', stdout);
  if (!status.ok()) return ReportError(status);
  if (!ids_out.empty()) std::printf("token_ids: %s\n", ids_out.c_str());
  std::fprintf(stderr, "[%s; adapter %s%s; %u prompt + %u completion tokens]\n",
               FinishReasonName(last.finish_reason()),
               adapter.id().empty() ? "(base)" : adapter.id().c_str(),
               adapter.version().empty() ? "" : (" " + adapter.version().substr(0, 12)).c_str(),
               last.usage().prompt_tokens(), last.usage().completion_tokens());
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "loractl [--address=HOST:PORT] [--timeout=10s] COMMAND [ARGS]\n"
      "Commands:\n"
      "  health [SERVICE]   health check; prints SERVING/NOT_SERVING, exit 0 only if SERVING\n"
      "  model-info         the server's build, backend and model, as JSON\n"
      "  generate PROMPT    stream a completion (--adapter, --max_tokens, --temperature,\n"
      "                     --token_ids=1,2,3 instead of a text prompt)");
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
  if (command == "generate") return Generate(channel, args);
  std::fprintf(stderr, "loractl: unknown command \"%s\"\n%s\n", command.c_str(),
               absl::ProgramUsageMessage().data());
  return kExitUsage;
}
