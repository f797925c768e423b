// loractl: the command-line client for loraserve. This file holds the flags, the usage text
// and the dispatch; the commands live in *_command(s).cc and upload.cc, and docs/client.md is
// the manual.
#include <grpc/support/log.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "client/cli.h"
#include "client/commands.h"
#include "client/connection.h"
#include "client/local_files.h"

// Connection.
ABSL_FLAG(std::string, server, "127.0.0.1:50051",
          "loraserve gRPC address, host:port (Inference, health, model-info)");
ABSL_FLAG(std::string, address, "", "Older name of --server; used when set");
ABSL_FLAG(std::string, admin_server, "",
          "Admin service address, host:port (default: --server; set it when the server has "
          "--admin_address)");
ABSL_FLAG(std::string, api_key, "",
          "Inference API key, sent as 'authorization: Bearer KEY' (servers with "
          "--inference_keys_file)");
ABSL_FLAG(std::string, admin_token, "",
          "Admin token, sent as 'authorization: Bearer TOKEN' on adapter commands (visible in "
          "the process list: prefer --admin_token_file)");
ABSL_FLAG(std::string, admin_token_file, "",
          "File holding the admin token (surrounding whitespace is ignored)");
ABSL_FLAG(bool, tls, false, "Connect with TLS (implied by the --tls_* file flags)");
ABSL_FLAG(std::string, tls_ca_file, "",
          "PEM roots to verify the server's certificate (default: the system's roots)");
ABSL_FLAG(std::string, tls_cert_file, "", "PEM client certificate chain, for mutual TLS");
ABSL_FLAG(std::string, tls_key_file, "", "PEM client private key, for mutual TLS");
ABSL_FLAG(std::string, tls_server_name, "",
          "Name to check the server's certificate against (default: the host in the address)");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(60),
          "Deadline of each call (a whole upload or generation is one call); 0 means none");
ABSL_FLAG(bool, json, false,
          "Machine-readable output: the answer as protobuf JSON (generate: one chunk per line)");

// generate.
ABSL_FLAG(std::string, adapter, "", "generate: the adapter id (empty: the base model)");
ABSL_FLAG(std::string, adapter_version, "",
          "generate: fail (FAILED_PRECONDITION) unless the adapter has this version");
ABSL_FLAG(std::string, request_id, "", "generate: the request id (default: the server's)");
ABSL_FLAG(std::string, token_ids, "",
          "generate: the prompt as comma-separated token ids instead of text");
ABSL_FLAG(std::optional<uint32_t>, max_tokens, 64,
          "generate: most new tokens (empty: the server's default)");
ABSL_FLAG(std::optional<double>, temperature, 0.0,
          "generate: sampling temperature, 0 = greedy (empty: the server's default, 1)");
ABSL_FLAG(std::optional<double>, top_p, std::nullopt, "generate: nucleus sampling, in (0, 1]");
ABSL_FLAG(uint32_t, top_k, 0, "generate: keep the k most likely tokens (0: all)");
ABSL_FLAG(std::optional<uint64_t>, seed, std::nullopt,
          "generate: seed of the request's random stream (default: the server draws one)");
ABSL_FLAG(std::string, stop, "",
          "generate: a stop string; repeat the flag for several (--stop=a --stop=b)");
ABSL_FLAG(bool, ignore_eos, false, "generate: keep generating after an EOS token");

// adapters.
ABSL_FLAG(bool, replace, false, "adapters upload: replace an existing adapter with this id");
ABSL_FLAG(bool, load, true,
          "adapters upload: enable the adapter once stored (--load=false stores a new id "
          "disabled)");
ABSL_FLAG(bool, validate_only, false,
          "adapters upload: check sizes, digests and the adapter itself; store nothing");
ABSL_FLAG(bool, force, false,
          "adapters delete: also delete an enabled adapter; adapters unload: also unload a "
          "pinned one");
ABSL_FLAG(std::string, prefix, "", "adapters list: only ids starting with this");
ABSL_FLAG(std::string, states, "",
          "adapters list: only these states, comma-separated (available, loading, ready, "
          "disabled, failed)");
ABSL_FLAG(std::string, progress, "auto",
          "adapters upload: progress bar on stderr: auto (when stderr is a terminal), always, "
          "never");

namespace {

using loraserve::client::Config;
using loraserve::client::kExitLocal;
using loraserve::client::kExitUsage;
using loraserve::client::ProgressMode;
using loraserve::client::ReportError;

constexpr const char* kUsage =
    "loractl [FLAGS] COMMAND [ARGS]\n"
    "\n"
    "Commands:\n"
    "  health [SERVICE]        grpc.health.v1 Check (\"\" = the whole server); prints SERVING\n"
    "  model-info              the server, model, backend, pools and load, as JSON\n"
    "  generate PROMPT         stream a completion to stdout as it is generated (--adapter,\n"
    "                          --max_tokens, --temperature, --top_p, --top_k, --seed, --stop,\n"
    "                          --token_ids=1,2,3 instead of PROMPT); summary on stderr\n"
    "  adapters list           adapters under the server's root (--prefix, --states)\n"
    "  adapters get ID         one adapter in detail\n"
    "  adapters load ID        load (or re-enable, or reload) an adapter in the root\n"
    "  adapters upload ID DIR  upload a PEFT folder (adapter_config.json,\n"
    "                          adapter_model.safetensors) and check the stored version\n"
    "                          (--replace, --load, --validate_only)\n"
    "  adapters unload ID      disable; new requests get NOT_FOUND (--force: also when pinned)\n"
    "  adapters delete ID      remove its files (--force: also when enabled)\n"
    "  adapters pin ID         keep it resident; unpin ID releases it\n"
    "\n"
    "Connection: --server, --admin_server, --api_key, --admin_token(_file), --tls,\n"
    "--tls_ca_file, --tls_cert_file, --tls_key_file, --tls_server_name, --timeout. --json prints\n"
    "protobuf JSON. Errors print one line, 'loractl: CODE: message', on stderr.\n"
    "\n"
    "Exit codes: 0 success; 1 the server answered with an error; 2 usage error; 3 health is\n"
    "not SERVING; 4 local error (files, version mismatch); 5 server unreachable or too slow\n"
    "(UNAVAILABLE, DEADLINE_EXCEEDED); 6 credentials refused (UNAUTHENTICATED,\n"
    "PERMISSION_DENIED). See docs/client.md.";

// Every value of --stop in argv order. Abseil keeps only the last value of a repeated flag, so
// the stop strings are collected here, with the same syntax Abseil accepts ("--stop=X",
// "-stop=X", "--stop X"); parsing stops at "--" as Abseil's does.
std::vector<std::string> RepeatedStopFlags(int argc, char** argv) {
  std::vector<std::string> values;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (!absl::ConsumePrefix(&arg, "--")) {
      if (!absl::ConsumePrefix(&arg, "-")) continue;
    }
    if (arg == "stop" && i + 1 < argc) {
      values.emplace_back(argv[++i]);
    } else if (absl::ConsumePrefix(&arg, "stop=")) {
      values.emplace_back(arg);
    }
  }
  return values;
}

// Builds the configuration; returns an exit code on a bad flag combination, else nullopt.
std::optional<int> BuildConfig(int argc, char** argv, Config* config) {
  auto& c = config->connection;
  c.server = absl::GetFlag(FLAGS_server);
  if (!absl::GetFlag(FLAGS_address).empty()) c.server = absl::GetFlag(FLAGS_address);
  c.admin_server = absl::GetFlag(FLAGS_admin_server);
  if (c.admin_server.empty()) c.admin_server = c.server;
  c.api_key = absl::GetFlag(FLAGS_api_key);
  c.admin_token = absl::GetFlag(FLAGS_admin_token);
  const std::string token_file = absl::GetFlag(FLAGS_admin_token_file);
  if (!token_file.empty()) {
    if (!c.admin_token.empty()) {
      return ReportError("give --admin_token or --admin_token_file, not both", kExitUsage);
    }
    auto token = loraserve::client::ReadSmallFile(token_file, 64 << 10);
    if (!token.ok()) {
      return ReportError(absl::StrCat("--admin_token_file: ", token.status().message()),
                         kExitLocal);
    }
    c.admin_token = std::string(absl::StripAsciiWhitespace(*token));
    if (c.admin_token.empty()) {
      return ReportError(absl::StrCat("--admin_token_file: ", token_file, " is empty"), kExitLocal);
    }
  }
  c.tls_ca_file = absl::GetFlag(FLAGS_tls_ca_file);
  c.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  c.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  c.tls_server_name = absl::GetFlag(FLAGS_tls_server_name);
  c.tls = absl::GetFlag(FLAGS_tls) || !c.tls_ca_file.empty() || !c.tls_cert_file.empty() ||
          !c.tls_key_file.empty() || !c.tls_server_name.empty();
  if (c.tls_cert_file.empty() != c.tls_key_file.empty()) {
    return ReportError(
        "mutual TLS needs both --tls_cert_file and --tls_key_file; only one was given", kExitUsage);
  }
  c.timeout = absl::GetFlag(FLAGS_timeout);
  if (c.timeout < absl::ZeroDuration()) {
    return ReportError("--timeout must not be negative", kExitUsage);
  }
  config->json = absl::GetFlag(FLAGS_json);

  auto& g = config->generate;
  g.adapter = absl::GetFlag(FLAGS_adapter);
  g.adapter_version = absl::GetFlag(FLAGS_adapter_version);
  g.request_id = absl::GetFlag(FLAGS_request_id);
  g.token_ids = absl::GetFlag(FLAGS_token_ids);
  g.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  g.temperature = absl::GetFlag(FLAGS_temperature);
  g.top_p = absl::GetFlag(FLAGS_top_p);
  g.top_k = absl::GetFlag(FLAGS_top_k);
  g.seed = absl::GetFlag(FLAGS_seed);
  g.stop = RepeatedStopFlags(argc, argv);
  g.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);

  auto& a = config->admin;
  a.replace = absl::GetFlag(FLAGS_replace);
  a.load = absl::GetFlag(FLAGS_load);
  a.validate_only = absl::GetFlag(FLAGS_validate_only);
  a.force = absl::GetFlag(FLAGS_force);
  a.prefix = absl::GetFlag(FLAGS_prefix);
  a.states = absl::GetFlag(FLAGS_states);
  const std::string progress = absl::GetFlag(FLAGS_progress);
  if (progress == "auto") {
    a.progress = ProgressMode::kAuto;
  } else if (progress == "always") {
    a.progress = ProgressMode::kAlways;
  } else if (progress == "never") {
    a.progress = ProgressMode::kNever;
  } else {
    return ReportError(
        absl::StrCat("--progress: expected auto, always or never; got \"", progress, "\""),
        kExitUsage);
  }
  return std::nullopt;
}

void DiscardGrpcLog(gpr_log_func_args* /*args*/) {}

}  // namespace

int main(int argc, char** argv) {
  // gRPC's own log lines (e.g. a failed TLS handshake) would break the one-line error contract;
  // the status message already says what failed. GRPC_VERBOSITY=debug brings them back.
  if (std::getenv("GRPC_VERBOSITY") == nullptr) gpr_set_log_function(DiscardGrpcLog);
  absl::SetProgramUsageMessage(kUsage);
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() < 2) {
    std::fprintf(stderr, "%s\n", kUsage);
    return kExitUsage;
  }
  Config config;
  if (const auto code = BuildConfig(argc, argv, &config)) return *code;
  const std::string command = rest[1];
  const loraserve::client::Args args(rest.begin() + 2, rest.end());
  if (command == "health") return loraserve::client::RunHealth(config, args);
  if (command == "model-info") return loraserve::client::RunModelInfo(config, args);
  if (command == "generate") return loraserve::client::RunGenerate(config, args);
  if (command == "adapters") return loraserve::client::RunAdapters(config, args);
  std::fprintf(stderr, "loractl: unknown command \"%s\"\n%s\n", command.c_str(), kUsage);
  return kExitUsage;
}
