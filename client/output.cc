#include "client/output.h"

#include <cstdio>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "client/cli.h"
#include "google/protobuf/util/json_util.h"

namespace loraserve::client {
namespace {

int Print(const google::protobuf::Message& message, bool indent) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = indent;
  options.preserve_proto_field_names = true;
  const auto status = google::protobuf::util::MessageToJsonString(message, &json, options);
  if (!status.ok()) {
    std::fprintf(stderr, "loractl: cannot print the answer as JSON: %s\n",
                 status.ToString().c_str());
    return kExitLocal;
  }
  // Single-line JSON must stay on one line for JSON Lines readers.
  if (!indent) {
    while (!json.empty() && json.back() == '\n') json.pop_back();
  }
  std::fputs(json.c_str(), stdout);
  if (json.empty() || json.back() != '\n') std::fputc('\n', stdout);
  std::fflush(stdout);
  return kExitOk;
}

}  // namespace

int PrintJson(const google::protobuf::Message& message) { return Print(message, true); }

int PrintJsonLine(const google::protobuf::Message& message) { return Print(message, false); }

std::string FormatBytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB"};
  if (bytes < 1024) return absl::StrFormat("%u B", bytes);
  double value = static_cast<double>(bytes) / 1024;
  int unit = 0;
  while (value >= 1024 && unit < 3) {
    value /= 1024;
    ++unit;
  }
  return absl::StrFormat("%.1f %s", value, kUnits[unit]);
}

std::string FormatTime(const google::protobuf::Timestamp& time) {
  if (time.seconds() == 0 && time.nanos() == 0) return "-";
  return absl::FormatTime("%Y-%m-%d %H:%M:%S UTC", absl::FromUnixSeconds(time.seconds()),
                          absl::UTCTimeZone());
}

std::string EnumSuffix(absl::string_view name, absl::string_view prefix) {
  if (name.empty()) return "UNKNOWN";
  if (absl::StartsWith(name, prefix)) name.remove_prefix(prefix.size());
  return std::string(name);
}

std::string ShortVersion(absl::string_view version) {
  if (version.empty()) return "-";
  return std::string(version.substr(0, 12));
}

}  // namespace loraserve::client
