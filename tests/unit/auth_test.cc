// The admin token and tenant keys (server/grpc/auth.h): the keys-file parser, adapter patterns,
// and every decision of CheckAdmin / CheckInference / CheckInferenceCaller on the credentials a
// call can carry.
#include "server/grpc/auth.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace ls {
namespace {

constexpr char kAdminToken[] = "admin-token-0123456789abcdef";
constexpr char kKeyA[] = "key-a-0123456789abcdef";
constexpr char kKeyB[] = "key-b-0123456789abcdef";

TEST(AdapterPattern, ExactAndGlobs) {
  EXPECT_TRUE(AdapterPatternMatches("shared", "shared"));
  EXPECT_FALSE(AdapterPatternMatches("shared", "shared2"));
  EXPECT_FALSE(AdapterPatternMatches("shared", "share"));
  EXPECT_TRUE(AdapterPatternMatches("a-*", "a-1"));
  EXPECT_TRUE(AdapterPatternMatches("a-*", "a-"));
  EXPECT_FALSE(AdapterPatternMatches("a-*", "b-1"));
  EXPECT_FALSE(AdapterPatternMatches("a-*", "xa-1"));
  EXPECT_TRUE(AdapterPatternMatches("*-v2", "chat-v2"));
  EXPECT_FALSE(AdapterPatternMatches("*-v2", "chat-v2.1"));
  EXPECT_TRUE(AdapterPatternMatches("a*b*c", "a__b__c"));
  EXPECT_TRUE(AdapterPatternMatches("a*b*c", "abbbcbc"));
  EXPECT_FALSE(AdapterPatternMatches("a*b*c", "a__c__b"));
  EXPECT_TRUE(AdapterPatternMatches("*a*b", "xaxaxb"));
  EXPECT_TRUE(AdapterPatternMatches("**", "anything"));
  // The base model ("") is matched by "" alone; "" matches nothing else.
  EXPECT_TRUE(AdapterPatternMatches("", ""));
  EXPECT_FALSE(AdapterPatternMatches("*", ""));
  EXPECT_FALSE(AdapterPatternMatches("", "a"));
  EXPECT_TRUE(AdapterPatternMatches("*", "a"));
  // Hostile input stays fast (no exponential backtracking).
  EXPECT_FALSE(AdapterPatternMatches("*a*a*a*a*a*a*a*a*b", std::string(128, 'a')));
}

TEST(AdapterPattern, TenantKeyAllows) {
  TenantKey key;
  key.adapters = {"a-*", "shared"};
  EXPECT_TRUE(key.Allows("a-1"));
  EXPECT_TRUE(key.Allows("shared"));
  EXPECT_FALSE(key.Allows("b-1"));
  EXPECT_FALSE(key.Allows(""));
  key.adapters.push_back("");
  EXPECT_TRUE(key.Allows(""));
}

TEST(ParseInferenceKeys, ValidFile) {
  const std::string digest_b =
      absl::BytesToHexString(std::string(reinterpret_cast<const char*>(Sha256(kKeyB).data()), 32));
  auto keys =
      ParseInferenceKeys(absl::StrCat(R"({"keys": [
        {"name": "tenant-a", "key": ")",
                                      kKeyA, R"(", "adapters": ["a-*", "shared", ""]},
        {"name": "tenant-b", "key_sha256": ")",
                                      absl::AsciiStrToUpper(digest_b), R"(", "adapters": []}]})"),
                         "keys.json");
  ASSERT_TRUE(keys.ok()) << keys.status();
  ASSERT_EQ(keys->size(), 2u);
  EXPECT_EQ((*keys)[0].name, "tenant-a");
  EXPECT_EQ((*keys)[0].key_sha256, Sha256(kKeyA));
  EXPECT_EQ((*keys)[0].adapters, (std::vector<std::string>{"a-*", "shared", ""}));
  EXPECT_EQ((*keys)[1].name, "tenant-b");
  EXPECT_EQ((*keys)[1].key_sha256, Sha256(kKeyB));
  EXPECT_TRUE((*keys)[1].adapters.empty());
}

TEST(ParseInferenceKeys, Errors) {
  const std::string key = absl::StrCat("\"", kKeyA, "\"");
  const struct {
    std::string json;
    std::string needle;
  } cases[] = {
      {"[]", "expected an object"},
      {"{}", "\"keys\": an array"},
      {R"({"keys": [], "extra": 1})", "unknown field \"extra\""},
      {R"({"keys": [1]})", "keys[0]: expected an object"},
      {absl::StrCat(R"({"keys": [{"key": )", key, R"(, "adapters": []}]})"),
       "\"name\" must be a string"},
      {absl::StrCat(R"({"keys": [{"name": "", "key": )", key, R"(, "adapters": []}]})"),
       "\"name\" must have 1 to"},
      {absl::StrCat(R"({"keys": [{"name": "a b", "key": )", key, R"(, "adapters": []}]})"),
       "may only use"},
      {R"({"keys": [{"name": "a", "adapters": []}]})", "exactly one of \"key\""},
      {absl::StrCat(R"({"keys": [{"name": "a", "key": )", key,
                    R"(, "key_sha256": "00", "adapters": []}]})"),
       "exactly one of \"key\""},
      {R"({"keys": [{"name": "a", "key": "short", "adapters": []}]})", "5 characters long"},
      {R"({"keys": [{"name": "a", "key": "has a space 0123456789", "adapters": []}]})",
       "outside printable ASCII"},
      {R"({"keys": [{"name": "a", "key_sha256": "abc", "adapters": []}]})", "64 hex digits"},
      {absl::StrCat(R"({"keys": [{"name": "a", "key": )", key, R"(}]})"),
       "\"adapters\" must be an array"},
      {absl::StrCat(R"({"keys": [{"name": "a", "key": )", key, R"(, "adapters": [3]}]})"),
       "adapters[0]: expected a string"},
      {absl::StrCat(R"({"keys": [{"name": "a", "key": )", key, R"(, "adapters": ["a/../b"]}]})"),
       "patterns use adapter id characters"},
      {absl::StrCat(R"({"keys": [{"name": "a", "key": )", key, R"(, "adapters": ["[ab]"]}]})"),
       "patterns use adapter id characters"},
      {absl::StrCat(R"({"keys": [{"name": "a", "key": )", key, R"(, "adapters": []},
                                 {"name": "a", "key": "another-key-0123456789", "adapters": []}]})"),
       "the name \"a\" is used twice"},
      {absl::StrCat(R"({"keys": [{"name": "a", "key": )", key, R"(, "adapters": []},
                                 {"name": "b", "key": )",
                    key, R"(, "adapters": []}]})"),
       "also another entry's key"},
      {absl::StrCat(R"({"keys": [{"name": "a", "key": )", key,
                    R"(, "adapters": [], "role": "x"}]})"),
       "unknown field \"role\""},
      {R"({"keys": [{"name": "a", "name": "b"}]})", "duplicate"},
  };
  for (const auto& c : cases) {
    auto keys = ParseInferenceKeys(c.json, "keys.json");
    ASSERT_FALSE(keys.ok()) << c.json;
    EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument) << c.json;
    const std::string message(keys.status().message());
    EXPECT_NE(message.find(c.needle), std::string::npos) << message;
    EXPECT_EQ(message.rfind("keys.json", 0), 0u) << message;
    // No message ever repeats a key.
    EXPECT_EQ(message.find(kKeyA), std::string::npos) << message;
    EXPECT_EQ(message.find("0123456789"), std::string::npos) << message;
  }
}

// Files in a per-test temporary directory.
class AuthorizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/auth_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    for (const std::string& f : files_) std::remove(f.c_str());
    rmdir(dir_.c_str());
  }
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    files_.push_back(path);
    return path;
  }
  std::unique_ptr<Authorizer> Make() {
    AuthOptions o;
    o.admin_token_file = Write("token", absl::StrCat("  ", kAdminToken, "\n"));
    o.inference_keys_file = Write("keys.json", absl::StrCat(R"({"keys": [
        {"name": "tenant-a", "key": ")",
                                                            kKeyA, R"(", "adapters": ["a-*", ""]},
        {"name": "tenant-b", "key": ")",
                                                            kKeyB, R"(", "adapters": ["b-*"]}]})"));
    auto auth = Authorizer::Create(o);
    EXPECT_TRUE(auth.ok()) << auth.status();
    return auth.ok() ? std::move(*auth) : nullptr;
  }
  static CallerCredentials Bearer(const std::string& token) {
    CallerCredentials c;
    c.authorization = "Bearer " + token;
    return c;
  }

  std::string dir_;
  std::vector<std::string> files_;
};

TEST_F(AuthorizerTest, OpenWithoutFiles) {
  auto auth = Authorizer::Create(AuthOptions{});
  ASSERT_TRUE(auth.ok());
  EXPECT_TRUE((*auth)->admin_open());
  EXPECT_TRUE((*auth)->inference_open());
  std::string who;
  EXPECT_TRUE((*auth)->CheckAdmin(CallerCredentials{}, &who).ok());
  EXPECT_EQ(who, "anonymous");
  EXPECT_TRUE((*auth)->CheckInference(CallerCredentials{}, "any", &who).ok());
  EXPECT_TRUE((*auth)->CheckInferenceCaller(Bearer("whatever-at-all-0000"), &who).ok());
}

TEST_F(AuthorizerTest, Admin) {
  auto auth = Make();
  ASSERT_NE(auth, nullptr);
  EXPECT_FALSE(auth->admin_open());
  std::string who;
  EXPECT_TRUE(auth->CheckAdmin(Bearer(kAdminToken), &who).ok());
  EXPECT_EQ(who, "admin");
  CallerCredentials lower;
  lower.authorization = absl::StrCat("bearer   ", kAdminToken, " ");
  EXPECT_TRUE(auth->CheckAdmin(lower, &who).ok());

  auto code = [&](const CallerCredentials& c) { return auth->CheckAdmin(c, &who).error_code(); };
  EXPECT_EQ(code(CallerCredentials{}), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(code(Bearer("wrong-token-0123456789")), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(who, "unknown");
  // A prefix or an extension of the token is wrong too.
  EXPECT_EQ(code(Bearer(std::string(kAdminToken).substr(0, 20))),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(code(Bearer(absl::StrCat(kAdminToken, "x"))), grpc::StatusCode::UNAUTHENTICATED);
  CallerCredentials raw;
  raw.authorization = kAdminToken;  // no scheme
  EXPECT_EQ(code(raw), grpc::StatusCode::UNAUTHENTICATED);
  CallerCredentials basic;
  basic.authorization = absl::StrCat("Basic ", kAdminToken);
  EXPECT_EQ(code(basic), grpc::StatusCode::UNAUTHENTICATED);
  CallerCredentials empty;
  empty.authorization = "Bearer ";
  EXPECT_EQ(code(empty), grpc::StatusCode::UNAUTHENTICATED);
  CallerCredentials twice = Bearer(kAdminToken);
  twice.duplicated = true;
  EXPECT_EQ(code(twice), grpc::StatusCode::UNAUTHENTICATED);
  // The admin token in x-api-key is not how admin calls authenticate.
  CallerCredentials api;
  api.api_key = kAdminToken;
  EXPECT_EQ(code(api), grpc::StatusCode::UNAUTHENTICATED);
  // A tenant key is known but has no admin rights.
  const grpc::Status tenant = auth->CheckAdmin(Bearer(kKeyA), &who);
  EXPECT_EQ(tenant.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(who, "tenant:tenant-a");
  EXPECT_EQ(tenant.error_message().find(kKeyA), std::string::npos);
}

TEST_F(AuthorizerTest, Inference) {
  auto auth = Make();
  ASSERT_NE(auth, nullptr);
  EXPECT_FALSE(auth->inference_open());
  EXPECT_EQ(auth->num_inference_keys(), 2u);
  std::string who;
  auto code = [&](const CallerCredentials& c, const std::string& adapter) {
    return auth->CheckInference(c, adapter, &who).error_code();
  };
  EXPECT_EQ(code(Bearer(kKeyA), "a-1"), grpc::StatusCode::OK);
  EXPECT_EQ(who, "tenant:tenant-a");
  EXPECT_EQ(code(Bearer(kKeyA), ""), grpc::StatusCode::OK);
  EXPECT_EQ(code(Bearer(kKeyA), "b-1"), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(code(Bearer(kKeyB), "b-1"), grpc::StatusCode::OK);
  EXPECT_EQ(code(Bearer(kKeyB), "a-1"), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(code(Bearer(kKeyB), ""), grpc::StatusCode::PERMISSION_DENIED);
  // x-api-key works and wins over an unrelated authorization header.
  CallerCredentials api;
  api.api_key = kKeyB;
  EXPECT_EQ(code(api, "b-7"), grpc::StatusCode::OK);
  api.authorization = "Basic dXNlcjpwYXNz";
  EXPECT_EQ(code(api, "b-7"), grpc::StatusCode::OK);
  EXPECT_EQ(code(CallerCredentials{}, "a-1"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(code(Bearer("unknown-key-0123456789"), "a-1"), grpc::StatusCode::UNAUTHENTICATED);
  CallerCredentials basic;
  basic.authorization = absl::StrCat("Basic ", kKeyA);
  EXPECT_EQ(code(basic, "a-1"), grpc::StatusCode::UNAUTHENTICATED);
  // The admin token is not an inference key.
  EXPECT_EQ(code(Bearer(kAdminToken), ""), grpc::StatusCode::PERMISSION_DENIED);
  // Adapter-free RPCs: any known key, or the admin token.
  EXPECT_TRUE(auth->CheckInferenceCaller(Bearer(kKeyB), &who).ok());
  EXPECT_TRUE(auth->CheckInferenceCaller(Bearer(kAdminToken), &who).ok());
  EXPECT_EQ(auth->CheckInferenceCaller(CallerCredentials{}, &who).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(auth->CheckInferenceCaller(Bearer("unknown-key-0123456789"), &who).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  // The refusal names the tenant and the adapter, never the key.
  const grpc::Status denied = auth->CheckInference(Bearer(kKeyA), "b-1", &who);
  EXPECT_NE(denied.error_message().find("tenant-a"), std::string::npos);
  EXPECT_NE(denied.error_message().find("b-1"), std::string::npos);
  EXPECT_EQ(denied.error_message().find(kKeyA), std::string::npos);
}

TEST_F(AuthorizerTest, CreateErrors) {
  auto error = [&](const AuthOptions& o) {
    auto auth = Authorizer::Create(o);
    return auth.ok() ? std::string("ok") : std::string(auth.status().message());
  };
  AuthOptions missing;
  missing.admin_token_file = dir_ + "/absent";
  EXPECT_NE(error(missing).find("--admin_token_file=" + dir_ + "/absent: cannot open"),
            std::string::npos);
  AuthOptions short_token;
  short_token.admin_token_file = Write("short", "abc\n");
  EXPECT_NE(error(short_token).find("3 characters long"), std::string::npos);
  AuthOptions same;
  same.admin_token_file = Write("token", kAdminToken);
  same.inference_keys_file = Write(
      "keys.json",
      absl::StrCat(R"({"keys": [{"name": "x", "key": ")", kAdminToken, R"(", "adapters": []}]})"));
  const std::string message = error(same);
  EXPECT_NE(message.find("equals the admin token"), std::string::npos) << message;
  EXPECT_EQ(message.find(kAdminToken), std::string::npos);
  AuthOptions bad_json;
  bad_json.inference_keys_file = Write("bad.json", "{\"keys\": [");
  EXPECT_NE(error(bad_json).find("--inference_keys_file=" + dir_ + "/bad.json"), std::string::npos);
}

}  // namespace
}  // namespace ls
