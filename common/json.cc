#include "common/json.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ls {
namespace {

// A SAX consumer that builds the DOM itself so it can see each key as it arrives and refuse a
// repeated one, and count depth before anything is allocated.
class StrictDomBuilder {
 public:
  StrictDomBuilder(Json& root, int max_depth) : root_(root), max_depth_(max_depth) {}

  bool null() { return Put(Json(nullptr)); }
  bool boolean(bool v) { return Put(Json(v)); }
  bool number_integer(Json::number_integer_t v) { return Put(Json(v)); }
  bool number_unsigned(Json::number_unsigned_t v) { return Put(Json(v)); }
  bool number_float(Json::number_float_t v, const std::string&) { return Put(Json(v)); }
  bool string(std::string& v) { return Put(Json(std::move(v))); }
  bool binary(Json::binary_t&) { return Fail("binary values are not JSON"); }

  bool start_object(std::size_t) { return Open(Json::object()); }
  bool key(std::string& k) {
    Json& obj = *stack_.back();
    if (obj.contains(k)) return Fail(absl::StrCat("duplicate key \"", k, "\""));
    pending_key_ = &obj[k];
    return true;
  }
  bool end_object() { return Close(); }
  bool start_array(std::size_t) { return Open(Json::array()); }
  bool end_array() { return Close(); }

  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) {
    // nlohmann's messages start with "[json.exception.parse_error.101] parse error at line..."
    std::string msg = e.what();
    const size_t cut = msg.find("] ");
    if (cut != std::string::npos) msg = msg.substr(cut + 2);
    error_ = absl::StrCat(msg, " (byte ", position, ")");
    return false;
  }

  const std::string& error() const { return error_; }

 private:
  bool Put(Json value) {
    if (stack_.empty()) {
      root_ = std::move(value);
      return true;
    }
    Json& top = *stack_.back();
    if (top.is_array()) {
      top.push_back(std::move(value));
    } else {
      *pending_key_ = std::move(value);
    }
    return true;
  }

  bool Open(Json container) {
    if (static_cast<int>(stack_.size()) >= max_depth_) {
      return Fail(absl::StrCat("nesting deeper than ", max_depth_, " levels"));
    }
    Json* slot;
    if (stack_.empty()) {
      root_ = std::move(container);
      slot = &root_;
    } else if (stack_.back()->is_array()) {
      stack_.back()->push_back(std::move(container));
      slot = &stack_.back()->back();
    } else {
      *pending_key_ = std::move(container);
      slot = pending_key_;
    }
    stack_.push_back(slot);
    return true;
  }

  bool Close() {
    stack_.pop_back();
    return true;
  }

  bool Fail(std::string msg) {
    error_ = std::move(msg);
    return false;
  }

  Json& root_;
  int max_depth_;
  // Pointers into root_: stable because a container is only appended to while it is on top, and
  // a value's address inside nlohmann's object/array storage moves only when its own parent
  // grows, which happens only after the child has been closed.
  std::vector<Json*> stack_;
  Json* pending_key_ = nullptr;
  std::string error_;
};

}  // namespace

absl::StatusOr<Json> ParseJsonStrict(absl::string_view text, absl::string_view what,
                                     const JsonLimits& limits) {
  // nlohmann's lexer takes a NUL byte for the end of input, so "{}\0<anything>" would parse as
  // "{}" and hide the rest. Raw NUL is never valid JSON (inside strings it is written \u0000).
  if (const size_t nul = text.find('\0'); nul != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": invalid JSON: NUL byte at byte ", nul));
  }
  Json root;
  StrictDomBuilder builder(root, limits.max_depth);
  const bool ok = Json::sax_parse(text.begin(), text.end(), &builder,
                                  nlohmann::detail::input_format_t::json, /*strict=*/true);
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": invalid JSON: ",
                     builder.error().empty() ? std::string("parse failed") : builder.error()));
  }
  return root;
}

absl::string_view JsonTypeName(const Json& value) {
  switch (value.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::object:
      return "object";
    case Json::value_t::array:
      return "array";
    case Json::value_t::string:
      return "string";
    case Json::value_t::boolean:
      return "boolean";
    case Json::value_t::number_integer:
      return "integer";
    case Json::value_t::number_unsigned:
      return "unsigned integer";
    case Json::value_t::number_float:
      return "number";
    case Json::value_t::binary:
      return "binary";
    case Json::value_t::discarded:
      return "discarded";
  }
  return "unknown";
}

}  // namespace ls
