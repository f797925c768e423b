#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>
#include <climits>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/mutex.h"
#include "common/status.h"
#include "google/protobuf/descriptor.h"
#include "server/grpc/admin_service.h"
#include "server/grpc/auth.h"
#include "server/grpc/inference_service.h"
#include "server/grpc/metrics_interceptor.h"

namespace ls {
namespace {

// Health service names: "" is the whole server; every name flips to NOT_SERVING when a drain
// starts, on every listener, so readiness probes fail and load balancers stop routing.
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

absl::StatusOr<std::string> ReadPemFile(const std::string& path, absl::string_view flag) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  if (in) text << in.rdbuf();
  if (!in || in.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": cannot read it"));
  }
  return std::move(text).str();
}

// Parses the certificate chain, key and client CAs with OpenSSL up front, so a wrong file is
// named at start instead of surfacing as an opaque handshake failure on the first connection.
absl::Status CheckTlsFiles(const ServerOptions& o, const std::string& cert, const std::string& key,
                           const std::string& ca) {
  auto bio_of = [](const std::string& pem) {
    return std::unique_ptr<BIO, decltype(&BIO_free)>(
        BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), &BIO_free);
  };
  auto cert_bio = bio_of(cert);
  std::unique_ptr<X509, decltype(&X509_free)> x509(
      PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr), &X509_free);
  if (x509 == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls_cert_file=", o.tls_cert_file, ": no PEM certificate (BEGIN CERTIFICATE) in it"));
  }
  auto key_bio = bio_of(key);
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> pkey(
      PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr), &EVP_PKEY_free);
  if (pkey == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_key_file=", o.tls_key_file,
                     ": no unencrypted PEM private key in it (encrypted keys are not supported)"));
  }
  if (X509_check_private_key(x509.get(), pkey.get()) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_key_file=", o.tls_key_file,
                                                   ": the key does not match the certificate in "
                                                   "--tls_cert_file=",
                                                   o.tls_cert_file));
  }
  if (!o.tls_client_ca_file.empty()) {
    auto ca_bio = bio_of(ca);
    std::unique_ptr<X509, decltype(&X509_free)> ca_cert(
        PEM_read_bio_X509(ca_bio.get(), nullptr, nullptr, nullptr), &X509_free);
    if (ca_cert == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("--tls_client_ca_file=", o.tls_client_ca_file,
                                                     ": no PEM certificate in it"));
    }
  }
  return absl::OkStatus();
}

// Credentials of the main and admin listeners: TLS (mutual with a client CA) or plaintext.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ListenerCredentials(
    const ServerOptions& o) {
  if (o.tls_cert_file.empty()) return grpc::InsecureServerCredentials();
  LS_ASSIGN_OR_RETURN(std::string cert, ReadPemFile(o.tls_cert_file, "tls_cert_file"));
  LS_ASSIGN_OR_RETURN(std::string key, ReadPemFile(o.tls_key_file, "tls_key_file"));
  std::string ca;
  if (!o.tls_client_ca_file.empty()) {
    LS_ASSIGN_OR_RETURN(ca, ReadPemFile(o.tls_client_ca_file, "tls_client_ca_file"));
  }
  LS_RETURN_IF_ERROR(CheckTlsFiles(o, cert, key, ca));
  grpc::SslServerCredentialsOptions ssl(
      ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                 : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_root_certs = ca;
  ssl.pem_key_cert_pairs.push_back({key, cert});
  return grpc::SslServerCredentials(ssl);
}

int DurationMs(absl::Duration d) {
  return static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(d), INT_MAX));
}

// Settings every listener shares: no port sharing, message size, keepalive and connection age.
void ConfigureBuilder(const ServerOptions& o, grpc::ServerBuilder* builder) {
  // gRPC sets SO_REUSEPORT by default, which would let a second server "bind" a busy port.
  builder->AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder->SetMaxReceiveMessageSize(static_cast<int>(o.max_receive_message_bytes));
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, DurationMs(o.keepalive_time));
  builder->AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, DurationMs(o.keepalive_timeout));
  // Infinite durations are gRPC's defaults (no limit): left unset.
  if (o.max_connection_age != absl::InfiniteDuration()) {
    builder->AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, DurationMs(o.max_connection_age));
  }
  if (o.max_connection_age_grace != absl::InfiniteDuration()) {
    builder->AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                                DurationMs(o.max_connection_age_grace));
  }
}

absl::Status ListenError(absl::string_view flag, absl::string_view address) {
  return absl::UnavailableError(
      absl::StrCat("--", flag, "=", address,
                   ": cannot listen there (address in use, or not an address of this host)"));
}

// Collects the warm-up request's end on the engine thread for the waiting start-up thread.
class WarmUpSink : public RequestSink {
 public:
  void OnTokens(absl::Span<const int32_t>, absl::string_view, const SampleResult*) override {}
  void OnFinish(const EngineResult& result) override {
    MutexLock lock(&mu_);
    status_ = result.status;
    tokens_ = result.usage.completion_tokens;
    done_ = true;
    cv_.SignalAll();
  }
  // False when `deadline` passed first.
  bool Wait(absl::Time deadline, absl::Status* status, int* tokens) {
    MutexLock lock(&mu_);
    while (!done_) {
      if (!cv_.WaitWithDeadline(&mu_, deadline) && absl::Now() >= deadline) return false;
    }
    *status = status_;
    *tokens = tokens_;
    return true;
  }

 private:
  Mutex mu_;
  CondVar cv_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  int tokens_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

LoraServer::LoraServer(const ServerOptions& options) : options_(options) {}

LoraServer::~LoraServer() {
  // Scrapes read the engine and the registry: stop that before they can go away.
  metrics_.DetachServing();
  // Cancel what the engine still runs first, so every generation RPC gets its status and the
  // gRPC servers' Wait() below does not wait on the engine.
  if (state_ != nullptr) state_->StopEngine(absl::InfinitePast());
  for (grpc::Server* server : Servers()) {
    server->Shutdown(std::chrono::system_clock::now());
    server->Wait();
  }
}

absl::StatusOr<std::unique_ptr<LoraServer>> LoraServer::Create(const ServerOptions& options) {
  LS_RETURN_IF_ERROR(options.Validate());
  std::unique_ptr<LoraServer> server(new LoraServer(options));
  LS_RETURN_IF_ERROR(server->Start());
  return server;
}

std::vector<grpc::Server*> LoraServer::Servers() const {
  std::vector<grpc::Server*> servers;
  for (const auto* s : {&server_, &admin_server_, &health_server_}) {
    if (*s != nullptr) servers.push_back(s->get());
  }
  return servers;
}

absl::Status LoraServer::WarmUp() {
  Engine* engine = state_->engine();
  if (engine == nullptr) return absl::OkStatus();  // no model, nothing to warm
  const ModelConfig& config = state_->model()->config;
  const absl::Time start = absl::Now();
  EngineRequest request;
  // A few copies of BOS (or token 0): any valid ids will do, the output is thrown away.
  const int64_t prompt_len = std::min<int64_t>(8, config.max_model_len - 2);
  if (prompt_len < 1) return absl::OkStatus();
  request.prompt_token_ids.assign(static_cast<size_t>(prompt_len), config.bos_token_id.value_or(0));
  request.sampling.temperature = 0.0f;
  request.sampling.max_new_tokens = 2;
  request.sampling.ignore_eos = true;
  request.sampling.eos_token_ids = config.eos_token_ids;
  auto sink = std::make_shared<WarmUpSink>();
  LS_RETURN_IF_ERROR(engine->Submit(std::move(request), sink));
  absl::Status status;
  int tokens = 0;
  if (!sink->Wait(start + absl::Minutes(5), &status, &tokens)) {
    return absl::DeadlineExceededError(
        "warm-up: the engine did not finish a 2-token generation "
        "within 5 minutes");
  }
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat("warm-up generation failed: ", status.message()));
  }
  LS_LOG(INFO) << "warm-up: " << prompt_len << " prompt + " << tokens << " generated tokens in "
               << absl::FormatDuration(absl::Now() - start);
  return absl::OkStatus();
}

absl::Status LoraServer::Start() {
  LS_ASSIGN_OR_RETURN(state_, ServerState::Create(options_));
  ServingMetricsOptions serving_metrics;
  serving_metrics.vllm_compat = options_.metrics_vllm_compat;
  serving_metrics.max_loras = options_.max_loras_per_step;
  metrics_.AttachServing(state_->engine(),
                         state_->model() != nullptr ? state_->model()->adapters.get() : nullptr,
                         serving_metrics);
  LS_ASSIGN_OR_RETURN(auth_, Authorizer::Create(AuthOptions{options_.admin_token_file,
                                                            options_.inference_keys_file}));
  LS_RETURN_IF_ERROR(WarmUp());
  inference_ = std::make_unique<InferenceService>(state_.get(), &gate_, auth_.get());
  inference_->SetMetrics(&metrics_);
  admin_ = std::make_unique<AdminService>(state_.get(), &gate_, auth_.get(), metrics_);
  metrics_.SetKnownMethods(ServedMethods());
  LS_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                      ListenerCredentials(options_));
  grpc::EnableDefaultHealthCheckService(true);

  // The health listener is built before the reflection plugin is registered (a process-wide
  // setting that every later builder picks up), so it serves grpc.health.v1.Health alone.
  if (!options_.health_address.empty()) {
    LS_ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(options_.health_address, "health_address"));
    grpc::ServerBuilder builder;
    int port = 0;
    // Plaintext on purpose: kubelet's gRPC probes cannot do TLS.
    builder.AddListeningPort(options_.health_address, grpc::InsecureServerCredentials(), &port);
    ConfigureBuilder(options_, &builder);
    health_server_ = builder.BuildAndStart();
    if (health_server_ == nullptr || port == 0) {
      health_server_.reset();
      return ListenError("health_address", options_.health_address);
    }
    health_address_ = FormatHostPort(hp.host, port);
    // gRPC's default is SERVING for "": not true until the ready line.
    SetHealth(false);
  }
  if (options_.enable_reflection) grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  auto interceptors = [this] {
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
    creators.push_back(std::make_unique<MetricsInterceptorFactory>(&metrics_));
    return creators;
  };
  if (!options_.admin_address.empty()) {
    LS_ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(options_.admin_address, "admin_address"));
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(options_.admin_address, credentials, &port);
    ConfigureBuilder(options_, &builder);
    builder.RegisterService(admin_.get());
    builder.experimental().SetInterceptorCreators(interceptors());
    admin_server_ = builder.BuildAndStart();
    if (admin_server_ == nullptr || port == 0) {
      admin_server_.reset();
      return ListenError("admin_address", options_.admin_address);
    }
    admin_address_ = FormatHostPort(hp.host, port);
  }

  LS_ASSIGN_OR_RETURN(HostPort grpc_hp, ParseHostPort(options_.address, "address"));
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort(options_.address, credentials, &bound_port);
  ConfigureBuilder(options_, &builder);
  builder.RegisterService(inference_.get());
  // With its own listener, Admin is not reachable on the main address at all.
  if (admin_server_ == nullptr) builder.RegisterService(admin_.get());
  builder.experimental().SetInterceptorCreators(interceptors());
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || bound_port == 0) {
    server_.reset();
    return ListenError("address", options_.address);
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

  SetHealth(true);
  LS_LOG(INFO) << "serving gRPC on " << grpc_address_
               << (options_.tls_cert_file.empty()        ? " (plaintext)"
                   : options_.tls_client_ca_file.empty() ? " (TLS)"
                                                         : " (mutual TLS)")
               << (admin_address_.empty() ? "" : ", Admin on " + admin_address_)
               << (health_address_.empty() ? "" : ", health on " + health_address_)
               << ", metrics on " << metrics_address_;
  LS_LOG(INFO) << "admin RPCs: "
               << (auth_->admin_open() ? "open (no --admin_token_file)" : "need the admin token")
               << "; inference: "
               << (auth_->inference_open()
                       ? std::string("open (no --inference_keys_file)")
                       : absl::StrCat("needs one of ", auth_->num_inference_keys(), " API keys"));
  if (auth_->admin_open() && admin_address_.empty()) {
    LS_LOG(WARNING) << "Admin RPCs are unauthenticated and served on --address; set "
                       "--admin_token_file or a private --admin_address";
  }
  return absl::OkStatus();
}

void LoraServer::SetHealth(bool serving) {
  for (grpc::Server* server : Servers()) {
    grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
    if (health == nullptr) continue;
    for (const char* name : {"", kInferenceServiceName, kAdminServiceName}) {
      health->SetServingStatus(name, serving);
    }
  }
}

void LoraServer::BeginDrain() {
  gate_.StartDrain();
  SetHealth(false);
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
  for (grpc::Server* server : Servers()) {
    server->Shutdown(force_.load() ? absl::ToChronoTime(absl::Now())
                                   : absl::ToChronoTime(std::max(deadline, absl::Now())));
    server->Wait();
  }
  server_.reset();
  admin_server_.reset();
  health_server_.reset();
}

void LoraServer::ForceShutdown() { force_.store(true); }

}  // namespace ls
