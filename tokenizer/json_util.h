// Small readers for tokenizer.json components: every error names the component and the field,
// and says what was expected and what was found. Internal to the tokenizer.
#ifndef LORASERVE_TOKENIZER_JSON_UTIL_H_
#define LORASERVE_TOKENIZER_JSON_UTIL_H_

#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/json.h"

namespace ls::tok {

inline absl::Status FieldError(absl::string_view what, absl::string_view key,
                               absl::string_view expected, const Json& found) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", what, " field \"", key,
                                                 "\" must be ", expected, ", found ",
                                                 JsonTypeName(found)));
}

// The "type" of a component object ("normalizer", "pre_tokenizer", ...).
inline absl::StatusOr<std::string> ComponentType(const Json& json, absl::string_view what) {
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json: ", what, " must be an object, found ", JsonTypeName(json)));
  }
  auto it = json.find("type");
  if (it == json.end()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", what, " has no \"type\""));
  }
  if (!it->is_string()) return FieldError(what, "type", "a string", *it);
  return it->get<std::string>();
}

// Rejects any key outside `known`: an option we do not read could change the output.
inline absl::Status CheckKeys(const Json& json, absl::string_view what,
                              std::initializer_list<absl::string_view> known) {
  for (auto it = json.begin(); it != json.end(); ++it) {
    bool ok = false;
    for (absl::string_view k : known) ok = ok || k == it.key();
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: ", what, " option \"", it.key(), "\" is not supported"));
    }
  }
  return absl::OkStatus();
}

inline absl::StatusOr<std::string> GetString(const Json& json, const char* key,
                                             absl::string_view what) {
  auto it = json.find(key);
  if (it == json.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json: ", what, " is missing field \"", key, "\""));
  }
  if (!it->is_string()) return FieldError(what, key, "a string", *it);
  return it->get<std::string>();
}

// A bool field; absent or null gives `default_value`.
inline absl::StatusOr<bool> GetBool(const Json& json, const char* key, absl::string_view what,
                                    bool default_value) {
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return default_value;
  if (!it->is_boolean()) return FieldError(what, key, "true or false", *it);
  return it->get<bool>();
}

// A string-or-null field; absent or null gives "" and *present = false.
inline absl::StatusOr<std::string> GetOptionalString(const Json& json, const char* key,
                                                     absl::string_view what, bool* present) {
  *present = false;
  auto it = json.find(key);
  if (it == json.end() || it->is_null()) return std::string();
  if (!it->is_string()) return FieldError(what, key, "a string or null", *it);
  *present = true;
  return it->get<std::string>();
}

}  // namespace ls::tok

#endif  // LORASERVE_TOKENIZER_JSON_UTIL_H_
