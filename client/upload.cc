// adapters upload ID DIR: sends a PEFT adapter folder with Admin.UploadAdapter.
//
// The folder is hashed first (the header declares each file's size and SHA-256 and the adapter
// version), then streamed in chunks of at most 1 MiB. The server answers with the version it
// stored; loractl checks that it equals the version of the local files, so a success means the
// server serves exactly these bytes. Because the header carries the version, uploading an
// adapter the server already holds ends after the header (report.unchanged).
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/commands.h"
#include "client/connection.h"
#include "client/local_files.h"
#include "client/output.h"
#include "loraserve/v1/admin.grpc.pb.h"

namespace loraserve::client {
namespace {

// UploadChunk.data holds at most 1 MiB.
constexpr size_t kChunkBytes = 1 << 20;

// A one-line progress bar on stderr, redrawn at most ten times a second.
class ProgressBar {
 public:
  ProgressBar(const char* label, bool enabled) : label_(label), enabled_(enabled) {}
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;
  ~ProgressBar() { Finish(); }

  void Update(uint64_t done, uint64_t total) {
    if (!enabled_) return;
    const absl::Time now = absl::Now();
    if (drawn_ && done < total && now - last_draw_ < absl::Milliseconds(100)) return;
    last_draw_ = now;
    drawn_ = true;
    constexpr int kWidth = 30;
    const double fraction = total == 0 ? 1.0 : static_cast<double>(done) / total;
    const int filled = static_cast<int>(fraction * kWidth);
    const double seconds = absl::ToDoubleSeconds(now - start_);
    const std::string rate =
        seconds > 0.05 ? absl::StrCat(FormatBytes(static_cast<uint64_t>(done / seconds)), "/s")
                       : "";
    std::fprintf(stderr, "\r%-9s [%s%s] %3d%%  %s / %s  %s\033[K", label_,
                 std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
                 static_cast<int>(fraction * 100), FormatBytes(done).c_str(),
                 FormatBytes(total).c_str(), rate.c_str());
    std::fflush(stderr);
  }

  // Ends the bar's line (once).
  void Finish() {
    if (drawn_) std::fputc('\n', stderr);
    drawn_ = false;
    enabled_ = false;
  }

 private:
  const char* label_;
  bool enabled_;
  bool drawn_ = false;
  absl::Time start_ = absl::Now();
  absl::Time last_draw_;
};

bool ShowProgress(ProgressMode mode) {
  switch (mode) {
    case ProgressMode::kAlways:
      return true;
    case ProgressMode::kNever:
      return false;
    case ProgressMode::kAuto:
      break;
  }
  return isatty(STDERR_FILENO) == 1;
}

loraserve::v1::UploadAdapterRequest Header(const std::string& id, const PeftFolder& folder,
                                           const AdminConfig& admin) {
  loraserve::v1::UploadAdapterRequest message;
  auto* header = message.mutable_header();
  header->set_adapter_id(id);
  auto* config = header->add_files();
  config->set_file(loraserve::v1::ADAPTER_FILE_CONFIG);
  config->set_size_bytes(folder.config.size());
  config->set_sha256(folder.config_sha256);
  auto* weights = header->add_files();
  weights->set_file(loraserve::v1::ADAPTER_FILE_WEIGHTS);
  weights->set_size_bytes(folder.weights_bytes);
  weights->set_sha256(folder.weights_sha256);
  header->set_replace_existing(admin.replace);
  header->set_load(admin.load);
  header->set_version(folder.version);
  header->set_validate_only(admin.validate_only);
  return message;
}

// Writes `bytes` of `file` as chunks; false when the stream broke (the server ended the call:
// Finish() says why) or the local read failed (`*read_error` set).
bool SendChunks(grpc::ClientWriter<loraserve::v1::UploadAdapterRequest>& writer,
                loraserve::v1::AdapterFile file, std::FILE* source, uint64_t size, ProgressBar& bar,
                uint64_t* sent_total, uint64_t total, std::string* read_error) {
  std::vector<char> buffer(kChunkBytes);
  loraserve::v1::UploadAdapterRequest message;
  uint64_t offset = 0;
  while (offset < size) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(kChunkBytes, size - offset));
    const size_t n = std::fread(buffer.data(), 1, want, source);
    if (n != want) {
      *read_error = absl::StrCat("the file ended or failed at byte ", offset + n, " of ", size,
                                 " (it changed after it was hashed)");
      return false;
    }
    auto* chunk = message.mutable_chunk();
    chunk->set_file(file);
    chunk->set_offset(offset);
    chunk->set_data(buffer.data(), n);
    if (!writer.Write(message)) return false;
    offset += n;
    *sent_total += n;
    bar.Update(*sent_total, total);
  }
  return true;
}

}  // namespace

int RunUpload(const Config& config, const Args& args) {
  if (args.size() != 2) {
    return ReportError(
        absl::StrCat("adapters upload takes two arguments, the adapter id and the folder with "
                     "adapter_config.json and adapter_model.safetensors; got ",
                     args.size()),
        kExitUsage);
  }
  const std::string& id = args[0];
  const std::string& dir = args[1];
  const bool show = ShowProgress(config.admin.progress);

  PeftFolder folder;
  {
    ProgressBar hashing("hashing", show);
    auto read =
        ReadPeftFolder(dir, [&](uint64_t done, uint64_t total) { hashing.Update(done, total); });
    hashing.Finish();
    if (!read.ok()) return ReportError(read.status().message(), kExitLocal);
    folder = *std::move(read);
  }

  auto channel = MakeChannel(config.connection.admin_server, config.connection);
  if (!channel.ok()) return ReportError(channel.status().message(), kExitLocal);
  auto stub = loraserve::v1::Admin::NewStub(*channel);
  grpc::ClientContext context;
  PrepareContext(&context, config.connection, CallKind::kAdmin);
  loraserve::v1::UploadAdapterResponse response;
  auto writer = stub->UploadAdapter(&context, &response);

  std::unique_ptr<std::FILE, int (*)(std::FILE*)> weights(
      std::fopen(folder.weights_path.c_str(), "rb"), &std::fclose);
  if (weights == nullptr) {
    context.TryCancel();
    writer->Finish();
    return ReportError(absl::StrCat("cannot reopen ", folder.weights_path), kExitLocal);
  }
  const uint64_t total = folder.config.size() + folder.weights_bytes;
  uint64_t sent = 0;
  std::string read_error;
  {
    ProgressBar bar("uploading", show);
    bar.Update(0, total);
    bool ok = writer->Write(Header(id, folder, config.admin));
    if (ok) {
      loraserve::v1::UploadAdapterRequest message;
      auto* chunk = message.mutable_chunk();
      chunk->set_file(loraserve::v1::ADAPTER_FILE_CONFIG);
      chunk->set_offset(0);
      chunk->set_data(folder.config);
      ok = writer->Write(message);
      if (ok) {
        sent += folder.config.size();
        bar.Update(sent, total);
      }
    }
    if (ok) {
      ok = SendChunks(*writer, loraserve::v1::ADAPTER_FILE_WEIGHTS, weights.get(),
                      folder.weights_bytes, bar, &sent, total, &read_error);
    }
    if (!read_error.empty()) {
      // Leave the server nothing to commit: cancelling discards the partial upload.
      context.TryCancel();
    } else if (ok) {
      writer->WritesDone();
    }
  }
  const grpc::Status status = writer->Finish();
  if (!read_error.empty()) {
    return ReportError(absl::StrCat(folder.weights_path, ": ", read_error), kExitLocal);
  }
  if (!status.ok()) return ReportRpcError(status);

  const std::string& stored = response.report().version().empty() ? response.adapter().version()
                                                                  : response.report().version();
  if (stored != folder.version) {
    return ReportError(absl::StrCat("the server reports version \"", stored, "\" for ", id,
                                    " but the local files have version ", folder.version),
                       kExitLocal);
  }
  if (config.json) return PrintJson(response);
  const auto& report = response.report();
  if (config.admin.validate_only) {
    std::printf("%s: valid, version %s (%u modules; nothing stored)\n", id.c_str(),
                folder.version.c_str(), report.num_matched_modules());
  } else if (report.unchanged()) {
    std::printf(
        "%s: unchanged, the server already has version %s (%s)\n", id.c_str(),
        folder.version.c_str(),
        EnumSuffix(loraserve::v1::AdapterState_Name(response.adapter().state()), "ADAPTER_STATE_")
            .c_str());
  } else {
    std::printf(
        "%s: uploaded version %s (%s sent; %s)\n", id.c_str(), folder.version.c_str(),
        FormatBytes(response.received_bytes()).c_str(),
        EnumSuffix(loraserve::v1::AdapterState_Name(response.adapter().state()), "ADAPTER_STATE_")
            .c_str());
  }
  for (const std::string& warning : report.warnings()) {
    std::fprintf(stderr, "warning: %s\n", warning.c_str());
  }
  return kExitOk;
}

}  // namespace loraserve::client
