// generate: Inference.GenerateStream, printed as it arrives.
//
// Text goes to stdout chunk by chunk, flushed after each, so a terminal (or a pipe) sees tokens
// as the server produces them; the summary (finish reason, adapter version, usage, timings)
// goes to stderr so stdout holds only the completion. With --json every chunk is one line of
// protobuf JSON (JSON Lines) instead.
#include <cstdio>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "client/commands.h"
#include "client/connection.h"
#include "client/output.h"
#include "loraserve/v1/inference.grpc.pb.h"

namespace loraserve::client {
namespace {

// Builds the request from the prompt argument and the generate flags; a usage error is
// printed and returned as its exit code.
int BuildRequest(const GenerateConfig& flags, const Args& args,
                 loraserve::v1::GenerateRequest* request) {
  if (args.size() != (flags.token_ids.empty() ? 1u : 0u)) {
    return ReportError(
        flags.token_ids.empty()
            ? absl::StrCat("generate takes one argument, the prompt (or --token_ids); got ",
                           args.size())
            : "generate takes no prompt argument with --token_ids",
        kExitUsage);
  }
  request->set_adapter_id(flags.adapter);
  request->set_adapter_version(flags.adapter_version);
  request->set_request_id(flags.request_id);
  if (flags.token_ids.empty()) {
    request->set_text(args[0]);
  } else {
    for (absl::string_view part : absl::StrSplit(flags.token_ids, ',')) {
      uint32_t id = 0;
      if (!absl::SimpleAtoi(part, &id)) {
        return ReportError(absl::StrCat("--token_ids: \"", part, "\" is not a token id"),
                           kExitUsage);
      }
      request->mutable_token_ids()->add_ids(id);
    }
  }
  auto* sampling = request->mutable_sampling();
  if (flags.temperature) sampling->set_temperature(static_cast<float>(*flags.temperature));
  if (flags.top_p) sampling->set_top_p(static_cast<float>(*flags.top_p));
  sampling->set_top_k(flags.top_k);
  if (flags.seed) sampling->set_seed(*flags.seed);
  auto* stopping = request->mutable_stopping();
  if (flags.max_tokens) stopping->set_max_new_tokens(*flags.max_tokens);
  for (const std::string& stop : flags.stop) stopping->add_stop_strings(stop);
  stopping->set_ignore_eos(flags.ignore_eos);
  request->mutable_output()->set_return_token_ids(!flags.token_ids.empty());
  return kExitOk;
}

std::string Summary(const loraserve::v1::AdapterRef& adapter,
                    const loraserve::v1::GenerateChunk& final_chunk) {
  std::string timing;
  const auto& t = final_chunk.timings();
  if (t.time_to_first_token_seconds() > 0) {
    timing = absl::StrFormat("; %.1f ms to first token", t.time_to_first_token_seconds() * 1e3);
    if (t.decode_tokens_per_second() > 0) {
      absl::StrAppendFormat(&timing, ", %.1f tokens/s", t.decode_tokens_per_second());
    }
  }
  std::string stop;
  if (final_chunk.has_matched_stop_string()) {
    stop = absl::StrCat(" \"", final_chunk.matched_stop_string(), "\"");
  } else if (final_chunk.has_matched_stop_token_id()) {
    stop = absl::StrCat(" ", final_chunk.matched_stop_token_id());
  }
  return absl::StrCat(
      "[", loraserve::v1::FinishReason_Name(final_chunk.finish_reason()), stop, "; adapter ",
      adapter.id().empty() ? "(base)" : adapter.id(),
      adapter.version().empty() ? "" : absl::StrCat(" ", ShortVersion(adapter.version())), timing,
      "; ", final_chunk.usage().prompt_tokens(), " prompt + ",
      final_chunk.usage().completion_tokens(), " completion tokens]");
}

}  // namespace

int RunGenerate(const Config& config, const Args& args) {
  loraserve::v1::GenerateRequest request;
  if (const int code = BuildRequest(config.generate, args, &request); code != kExitOk) {
    return code;
  }
  auto channel = MakeChannel(config.connection.server, config.connection);
  if (!channel.ok()) return ReportError(channel.status().message(), kExitLocal);
  auto stub = loraserve::v1::Inference::NewStub(*channel);
  grpc::ClientContext context;
  PrepareContext(&context, config.connection, CallKind::kInference);
  auto reader = stub->GenerateStream(&context, request);

  loraserve::v1::GenerateChunk chunk;
  loraserve::v1::GenerateChunk final_chunk;
  loraserve::v1::AdapterRef adapter;
  std::string ids_out;
  bool wrote_text = false;
  while (reader->Read(&chunk)) {
    if (config.json) {
      PrintJsonLine(chunk);
    } else if (!chunk.text().empty()) {
      std::fwrite(chunk.text().data(), 1, chunk.text().size(), stdout);
      std::fflush(stdout);  // stream to the terminal or pipe as tokens arrive
      wrote_text = true;
    }
    for (uint32_t id : chunk.token_ids()) absl::StrAppend(&ids_out, ids_out.empty() ? "" : ",", id);
    // The header chunk names the adapter and the version that serves this request.
    if (chunk.has_adapter() && !chunk.adapter().id().empty()) adapter = chunk.adapter();
    if (chunk.finish_reason() != loraserve::v1::FINISH_REASON_UNSPECIFIED) final_chunk = chunk;
  }
  const grpc::Status status = reader->Finish();
  // End the partial or complete line of text before anything else is printed.
  if (!config.json && (wrote_text || status.ok())) std::fputc('\n', stdout);
  std::fflush(stdout);
  if (!status.ok()) return ReportRpcError(status);
  if (config.json) return kExitOk;
  if (!ids_out.empty()) std::printf("token_ids: %s\n", ids_out.c_str());
  std::fflush(stdout);
  std::fprintf(stderr, "%s\n", Summary(adapter, final_chunk).c_str());
  return kExitOk;
}

}  // namespace loraserve::client
