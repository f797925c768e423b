// Printing answers: protobuf JSON for --json, and small formatting helpers for the
// human-readable output.
#ifndef LORASERVE_CLIENT_OUTPUT_H_
#define LORASERVE_CLIENT_OUTPUT_H_

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"
#include "google/protobuf/timestamp.pb.h"

namespace loraserve::client {

// Prints `message` as indented protobuf JSON (proto field names, enums by name) on stdout.
// Returns an exit code.
int PrintJson(const google::protobuf::Message& message);

// Prints `message` as one line of protobuf JSON (for streams: one chunk per line) and flushes.
int PrintJsonLine(const google::protobuf::Message& message);

// "1.5 MiB", "512 B".
std::string FormatBytes(uint64_t bytes);

// "2026-11-29 21:51:10 UTC", or "-" when unset.
std::string FormatTime(const google::protobuf::Timestamp& time);

// An enum value name without its prefix: ("ADAPTER_STATE_READY", "ADAPTER_STATE_") -> "READY".
std::string EnumSuffix(absl::string_view name, absl::string_view prefix);

// The first 12 hex digits of a version (as git shortens commits), or "-" when empty.
std::string ShortVersion(absl::string_view version);

}  // namespace loraserve::client

#endif  // LORASERVE_CLIENT_OUTPUT_H_
