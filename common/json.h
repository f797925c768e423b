// Strict JSON parsing for every file format we read (safetensors headers, config.json,
// tokenizer.json, adapter_config.json). nlohmann::json on its own keeps the last of duplicate
// keys and nests without limit; this parser rejects duplicate keys and deep nesting, and validates
// UTF-8. Integers that do not fit 64 bits become floats, so callers that need an unsigned
// integer must check is_number_unsigned() rather than cast.
#ifndef LORASERVE_COMMON_JSON_H_
#define LORASERVE_COMMON_JSON_H_

#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace ls {

using Json = nlohmann::json;

struct JsonLimits {
  int max_depth = 64;
};

// Parses `text` as one JSON value. On failure returns INVALID_ARGUMENT whose message starts with
// `what` (e.g. "model/config.json") and says what is wrong and where.
absl::StatusOr<Json> ParseJsonStrict(absl::string_view text, absl::string_view what,
                                     const JsonLimits& limits = {});

// "object", "array", "string", "unsigned integer", ... for error messages.
absl::string_view JsonTypeName(const Json& value);

}  // namespace ls

#endif  // LORASERVE_COMMON_JSON_H_
