#include "server/grpc/auth.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <sys/stat.h>

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/json.h"
#include "common/logging.h"
#include "common/status.h"

namespace ls {
namespace {

constexpr size_t kMaxKeysFileBytes = size_t{16} << 20;
constexpr size_t kMaxNameBytes = 128;
constexpr size_t kMaxPatternBytes = 128;

grpc::Status Unauthenticated(absl::string_view message) {
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, std::string(message));
}

grpc::Status PermissionDenied(absl::string_view message) {
  return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, std::string(message));
}

bool ConstantTimeEqual(const Sha256Digest& a, const Sha256Digest& b) {
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

// Whitespace is not part of a secret (files usually end with a newline), nor are control
// characters, which metadata values cannot carry.
absl::Status ValidateSecret(absl::string_view secret, absl::string_view what) {
  if (secret.size() < kMinSecretBytes || secret.size() > kMaxSecretBytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is ", secret.size(),
                                                   " characters long; it must have ",
                                                   kMinSecretBytes, " to ", kMaxSecretBytes));
  }
  for (size_t i = 0; i < secret.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(secret[i]);
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has a character outside printable ASCII (or a space) at offset ", i,
                       "; metadata cannot carry it"));
    }
  }
  return absl::OkStatus();
}

// Secrets should be readable by the server's user alone; a looser mode is allowed (containers
// mount secrets in many ways) but said.
void WarnIfOthersCanRead(const std::string& path, absl::string_view flag) {
  struct stat st;
  if (stat(path.c_str(), &st) == 0 && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    LS_LOG(WARNING) << "--" << flag << "=" << path << " is accessible to other users (mode "
                    << absl::StrFormat("%04o", st.st_mode & 07777) << "); chmod 600 it";
  }
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, absl::string_view flag) {
  WarnIfOthersCanRead(path, flag);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": cannot open it"));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": read error"));
  }
  std::string out = std::move(text).str();
  if (out.size() > kMaxKeysFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": ", out.size(),
                                                   " bytes; at most ", kMaxKeysFileBytes));
  }
  return out;
}

bool IsPatternChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-' ||
         c == '*';
}

// The token of `Bearer <token>` (scheme case-insensitive, RFC 7235), or nullopt.
std::optional<absl::string_view> BearerToken(absl::string_view header) {
  constexpr absl::string_view kScheme = "bearer";
  if (header.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(header.substr(0, kScheme.size()), kScheme) ||
      header[kScheme.size()] != ' ') {
    return std::nullopt;
  }
  absl::string_view token = absl::StripAsciiWhitespace(header.substr(kScheme.size()));
  if (token.empty()) return std::nullopt;
  return token;
}

}  // namespace

Sha256Digest Sha256(absl::string_view data) {
  Sha256Digest digest;
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), digest.data());
  return digest;
}

bool AdapterPatternMatches(absl::string_view pattern, absl::string_view adapter_id) {
  if (pattern.empty() || adapter_id.empty()) return pattern.empty() && adapter_id.empty();
  // Iterative glob with one backtrack point: linear in practice, no recursion on hostile input.
  size_t p = 0, s = 0;
  size_t star = absl::string_view::npos, resume = 0;
  while (s < adapter_id.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      resume = s;
    } else if (p < pattern.size() && pattern[p] == adapter_id[s]) {
      ++p;
      ++s;
    } else if (star != absl::string_view::npos) {
      p = star + 1;
      s = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

bool TenantKey::Allows(absl::string_view adapter_id) const {
  for (const std::string& pattern : adapters) {
    if (AdapterPatternMatches(pattern, adapter_id)) return true;
  }
  return false;
}

absl::StatusOr<std::vector<TenantKey>> ParseInferenceKeys(absl::string_view json,
                                                          absl::string_view what) {
  auto bad = [&](absl::string_view where, absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", where, ": ", why));
  };
  LS_ASSIGN_OR_RETURN(Json root, ParseJsonStrict(json, what));
  if (!root.is_object()) return bad("top level", "expected an object {\"keys\": [...]}");
  for (const auto& [field, value] : root.items()) {
    if (field != "keys") return bad("top level", absl::StrCat("unknown field \"", field, "\""));
  }
  if (!root.contains("keys") || !root["keys"].is_array()) {
    return bad("top level", "expected \"keys\": an array of {name, key, adapters}");
  }
  std::vector<TenantKey> keys;
  absl::flat_hash_set<std::string> names;
  absl::flat_hash_set<std::string> digests;
  const Json& entries = root["keys"];
  for (size_t i = 0; i < entries.size(); ++i) {
    const std::string where = absl::StrCat("keys[", i, "]");
    const Json& entry = entries[i];
    if (!entry.is_object()) {
      return bad(where, absl::StrCat("expected an object, found ", JsonTypeName(entry)));
    }
    for (const auto& [field, value] : entry.items()) {
      if (field != "name" && field != "key" && field != "key_sha256" && field != "adapters") {
        return bad(where, absl::StrCat("unknown field \"", field,
                                       "\" (expected name, key or key_sha256, adapters)"));
      }
    }
    TenantKey key;
    if (!entry.contains("name") || !entry["name"].is_string()) {
      return bad(where, "\"name\" must be a string");
    }
    key.name = entry["name"].get<std::string>();
    if (key.name.empty() || key.name.size() > kMaxNameBytes) {
      return bad(where, absl::StrCat("\"name\" must have 1 to ", kMaxNameBytes, " characters"));
    }
    for (char c : key.name) {
      if (!IsPatternChar(c) || c == '*') {
        return bad(where, absl::StrCat("\"name\" \"", key.name,
                                       "\" may only use A-Z a-z 0-9 . _ - (it appears in logs)"));
      }
    }
    if (!names.insert(key.name).second) {
      return bad(where, absl::StrCat("the name \"", key.name, "\" is used twice"));
    }
    const std::string named = absl::StrCat(where, " (\"", key.name, "\")");
    const bool has_key = entry.contains("key");
    const bool has_digest = entry.contains("key_sha256");
    if (has_key == has_digest) {
      return bad(named, "give exactly one of \"key\" and \"key_sha256\"");
    }
    if (has_key) {
      if (!entry["key"].is_string()) return bad(named, "\"key\" must be a string");
      const std::string secret = entry["key"].get<std::string>();
      LS_RETURN_IF_ERROR(ValidateSecret(secret, absl::StrCat(what, ": ", named, ": \"key\"")));
      key.key_sha256 = Sha256(secret);
    } else {
      std::string hex =
          entry["key_sha256"].is_string() ? entry["key_sha256"].get<std::string>() : std::string();
      hex = absl::AsciiStrToLower(hex);
      if (hex.size() != 64 || hex.find_first_not_of("0123456789abcdef") != std::string::npos) {
        return bad(named, "\"key_sha256\" must be 64 hex digits (sha256sum of the key)");
      }
      const std::string bytes = absl::HexStringToBytes(hex);
      std::copy(bytes.begin(), bytes.end(), key.key_sha256.begin());
    }
    if (!digests.insert(std::string(key.key_sha256.begin(), key.key_sha256.end())).second) {
      return bad(named, "this key is also another entry's key; each tenant needs its own");
    }
    if (!entry.contains("adapters") || !entry["adapters"].is_array()) {
      return bad(named, "\"adapters\" must be an array of adapter id patterns");
    }
    const Json& patterns = entry["adapters"];
    for (size_t j = 0; j < patterns.size(); ++j) {
      const std::string pwhere = absl::StrCat(named, ": adapters[", j, "]");
      if (!patterns[j].is_string()) {
        return bad(pwhere, absl::StrCat("expected a string, found ", JsonTypeName(patterns[j])));
      }
      std::string pattern = patterns[j].get<std::string>();
      if (pattern.size() > kMaxPatternBytes) {
        return bad(pwhere, absl::StrCat("longer than ", kMaxPatternBytes, " characters"));
      }
      for (char c : pattern) {
        if (!IsPatternChar(c)) {
          return bad(pwhere, absl::StrCat("\"", absl::CHexEscape(pattern),
                                          "\": patterns use adapter id characters "
                                          "(A-Z a-z 0-9 . _ -) and '*' only"));
        }
      }
      key.adapters.push_back(std::move(pattern));
    }
    keys.push_back(std::move(key));
  }
  return keys;
}

CallerCredentials CallerCredentials::FromContext(const grpc::ServerContextBase& context) {
  CallerCredentials out;
  const auto& metadata = context.client_metadata();
  auto one = [&](const char* name, std::optional<std::string>* value) {
    const auto range = metadata.equal_range(name);
    size_t count = 0;
    for (auto it = range.first; it != range.second; ++it) {
      if (++count == 1) *value = std::string(it->second.data(), it->second.size());
    }
    if (count > 1) {
      value->reset();
      out.duplicated = true;
    }
  };
  one("authorization", &out.authorization);
  one("x-api-key", &out.api_key);
  return out;
}

struct Authorizer::Impl {
  std::optional<Sha256Digest> admin_token;     // unset: admin is open
  std::optional<std::vector<TenantKey>> keys;  // unset: inference is open

  const TenantKey* FindKey(const Sha256Digest& digest) const {
    if (!keys.has_value()) return nullptr;
    // Every entry is compared, matching or not, so timing says nothing about which one matched.
    const TenantKey* found = nullptr;
    for (const TenantKey& key : *keys) {
      if (ConstantTimeEqual(key.key_sha256, digest)) found = &key;
    }
    return found;
  }
  bool IsAdminToken(const Sha256Digest& digest) const {
    return admin_token.has_value() && ConstantTimeEqual(*admin_token, digest);
  }
};

Authorizer::Authorizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Authorizer::~Authorizer() = default;

absl::StatusOr<std::unique_ptr<Authorizer>> Authorizer::Create(const AuthOptions& options) {
  auto impl = std::make_unique<Impl>();
  if (!options.admin_token_file.empty()) {
    LS_ASSIGN_OR_RETURN(std::string text,
                        ReadSmallFile(options.admin_token_file, "admin_token_file"));
    const absl::string_view token = absl::StripAsciiWhitespace(text);
    const absl::Status valid = ValidateSecret(
        token, absl::StrCat("--admin_token_file=", options.admin_token_file, ": the token"));
    if (valid.ok()) impl->admin_token = Sha256(token);
    // Only the digest is kept; the file's text is wiped.
    OPENSSL_cleanse(text.data(), text.size());
    LS_RETURN_IF_ERROR(valid);
  }
  if (!options.inference_keys_file.empty()) {
    LS_ASSIGN_OR_RETURN(std::string text,
                        ReadSmallFile(options.inference_keys_file, "inference_keys_file"));
    auto keys = ParseInferenceKeys(
        text, absl::StrCat("--inference_keys_file=", options.inference_keys_file));
    // Only digests are kept; the file's text is wiped (the JSON parser's copies are only freed).
    OPENSSL_cleanse(text.data(), text.size());
    if (!keys.ok()) return keys.status();
    for (const TenantKey& key : *keys) {
      if (impl->IsAdminToken(key.key_sha256)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--inference_keys_file=", options.inference_keys_file, ": the key of \"", key.name,
            "\" equals the admin token; an admin token must not double as a tenant key"));
      }
    }
    impl->keys = std::move(*keys);
  }
  return std::unique_ptr<Authorizer>(new Authorizer(std::move(impl)));
}

grpc::Status Authorizer::CheckAdmin(const grpc::ServerContextBase& context,
                                    std::string* who) const {
  return CheckAdmin(CallerCredentials::FromContext(context), who);
}

grpc::Status Authorizer::CheckAdmin(const CallerCredentials& credentials, std::string* who) const {
  std::string ignored;
  if (who == nullptr) who = &ignored;
  *who = "anonymous";
  if (!impl_->admin_token.has_value()) return grpc::Status::OK;
  if (credentials.duplicated) {
    return Unauthenticated(
        "admin RPCs need exactly one `authorization: Bearer <admin token>`; "
        "the header was sent more than once");
  }
  if (!credentials.authorization.has_value()) {
    return Unauthenticated(
        "admin RPCs need `authorization: Bearer <admin token>` metadata; none was sent");
  }
  const std::optional<absl::string_view> token = BearerToken(*credentials.authorization);
  if (!token.has_value()) {
    return Unauthenticated(
        "admin RPCs need `authorization: Bearer <admin token>`; the authorization value sent "
        "does not have the form `Bearer <token>`");
  }
  const Sha256Digest digest = Sha256(*token);
  if (impl_->IsAdminToken(digest)) {
    *who = "admin";
    return grpc::Status::OK;
  }
  if (const TenantKey* key = impl_->FindKey(digest); key != nullptr) {
    *who = absl::StrCat("tenant:", key->name);
    return PermissionDenied(absl::StrCat("the bearer token is the inference API key \"", key->name,
                                         "\", which may not call Admin RPCs; use the admin token"));
  }
  *who = "unknown";
  return Unauthenticated("the bearer token is not the admin token");
}

grpc::Status Authorizer::CheckInference(const grpc::ServerContextBase& context,
                                        absl::string_view adapter_id, std::string* who) const {
  return CheckInference(CallerCredentials::FromContext(context), adapter_id, who);
}

grpc::Status Authorizer::CheckInference(const CallerCredentials& credentials,
                                        absl::string_view adapter_id, std::string* who) const {
  std::string ignored;
  if (who == nullptr) who = &ignored;
  *who = "anonymous";
  if (!impl_->keys.has_value()) return grpc::Status::OK;
  // x-api-key first: a client may send it beside an unrelated `authorization` header.
  std::optional<absl::string_view> secret;
  if (credentials.api_key.has_value()) {
    secret = absl::StripAsciiWhitespace(*credentials.api_key);
  } else if (credentials.authorization.has_value()) {
    secret = BearerToken(*credentials.authorization);
    if (!secret.has_value()) {
      return Unauthenticated(
          "inference needs an API key as `authorization: Bearer <key>` or `x-api-key: <key>`; "
          "the authorization value sent does not have the form `Bearer <key>`");
    }
  }
  if (!secret.has_value()) {
    return Unauthenticated(
        credentials.duplicated
            ? "inference needs exactly one API key; `authorization` or `x-api-key` was sent "
              "more than once"
            : "inference needs an API key as `authorization: Bearer <key>` or "
              "`x-api-key: <key>`; none was sent");
  }
  const Sha256Digest digest = Sha256(*secret);
  const TenantKey* key = impl_->FindKey(digest);
  if (key == nullptr) {
    if (impl_->IsAdminToken(digest)) {
      *who = "admin";
      return PermissionDenied(
          "the admin token is not an inference API key; send a tenant key from the keys file");
    }
    *who = "unknown";
    return Unauthenticated("the API key is not one of this server's inference keys");
  }
  *who = absl::StrCat("tenant:", key->name);
  if (adapter_id.empty() && !key->Allows(adapter_id)) {
    return PermissionDenied(absl::StrCat("API key \"", key->name,
                                         "\" may not use the base model (adapter_id \"\"); its "
                                         "key entry does not list \"\""));
  }
  if (!key->Allows(adapter_id)) {
    // The id is the caller's own input, quoted short and escaped.
    return PermissionDenied(absl::StrCat("API key \"", key->name, "\" may not use adapter_id \"",
                                         absl::CHexEscape(adapter_id.substr(0, kMaxPatternBytes)),
                                         "\""));
  }
  return grpc::Status::OK;
}

grpc::Status Authorizer::CheckInferenceCaller(const grpc::ServerContextBase& context,
                                              std::string* who) const {
  return CheckInferenceCaller(CallerCredentials::FromContext(context), who);
}

grpc::Status Authorizer::CheckInferenceCaller(const CallerCredentials& credentials,
                                              std::string* who) const {
  std::string ignored;
  if (who == nullptr) who = &ignored;
  grpc::Status status = CheckInference(credentials, "", who);
  // Any known key passes (the base-model check does not apply); so does the admin token.
  if (status.error_code() == grpc::StatusCode::PERMISSION_DENIED) return grpc::Status::OK;
  return status;
}

bool Authorizer::admin_open() const { return !impl_->admin_token.has_value(); }
bool Authorizer::inference_open() const { return !impl_->keys.has_value(); }
size_t Authorizer::num_inference_keys() const {
  return impl_->keys.has_value() ? impl_->keys->size() : 0;
}

}  // namespace ls
