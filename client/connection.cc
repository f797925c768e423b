#include "client/connection.h"

#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "client/local_files.h"

namespace loraserve::client {
namespace {

// PEM files are small; anything larger is the wrong file.
constexpr uint64_t kMaxPemBytes = 1 << 20;

absl::StatusOr<std::string> ReadPem(const std::string& path, absl::string_view flag) {
  auto pem = ReadSmallFile(path, kMaxPemBytes);
  if (!pem.ok()) {
    return absl::Status(pem.status().code(),
                        absl::StrCat("--", flag, ": ", pem.status().message()));
  }
  return pem;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& target,
                                                           const ConnectionConfig& config) {
  grpc::ChannelArguments args;
  // ListAdapters pages and model info can exceed gRPC's 4 MiB default in large deployments.
  args.SetMaxReceiveMessageSize(64 << 20);
  if (!config.tls) {
    return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions ssl;
  if (!config.tls_ca_file.empty()) {
    auto roots = ReadPem(config.tls_ca_file, "tls_ca_file");
    if (!roots.ok()) return roots.status();
    ssl.pem_root_certs = *std::move(roots);
  }
  if (config.tls_cert_file.empty() != config.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "mutual TLS needs both --tls_cert_file and --tls_key_file; only one was given");
  }
  if (!config.tls_cert_file.empty()) {
    auto chain = ReadPem(config.tls_cert_file, "tls_cert_file");
    if (!chain.ok()) return chain.status();
    auto key = ReadPem(config.tls_key_file, "tls_key_file");
    if (!key.ok()) return key.status();
    ssl.pem_cert_chain = *std::move(chain);
    ssl.pem_private_key = *std::move(key);
  }
  if (!config.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(config.tls_server_name);
  }
  return grpc::CreateCustomChannel(target, grpc::SslCredentials(ssl), args);
}

void PrepareContext(grpc::ClientContext* context, const ConnectionConfig& config, CallKind kind) {
  if (config.timeout != absl::InfiniteDuration() && config.timeout > absl::ZeroDuration()) {
    context->set_deadline(absl::ToChronoTime(absl::Now() + config.timeout));
  }
  const std::string* secret = nullptr;
  if (kind == CallKind::kInference) secret = &config.api_key;
  if (kind == CallKind::kAdmin) secret = &config.admin_token;
  if (secret != nullptr && !secret->empty()) {
    context->AddMetadata("authorization", absl::StrCat("Bearer ", *secret));
  }
}

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

int ExitCodeFor(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return kExitOk;
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return kExitUnavailable;
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
      return kExitAuth;
    default:
      return kExitRpcError;
  }
}

int ReportError(absl::string_view message, int exit_code) {
  // One line, so scripts and log collectors see the whole error.
  const std::string line = absl::StrReplaceAll(message, {{"\r\n", "; "}, {"\n", "; "}});
  std::fprintf(stderr, "loractl: %s\n", line.c_str());
  return exit_code;
}

int ReportRpcError(const grpc::Status& status) {
  return ReportError(absl::StrCat(CodeName(status.error_code()), ": ", status.error_message()),
                     ExitCodeFor(status.error_code()));
}

}  // namespace loraserve::client
