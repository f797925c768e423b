// Tests for common/json.h: the strict parser every file format goes through.
#include "common/json.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ls {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

void ExpectRejected(const std::string& text, const std::string& needle,
                    const JsonLimits& limits = {}) {
  SCOPED_TRACE(text.size() > 80 ? text.substr(0, 80) + "..." : text);
  const absl::StatusOr<Json> result = ParseJsonStrict(text, "test.json", limits);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(result.status().message()), StartsWith("test.json: invalid JSON: "));
  EXPECT_THAT(std::string(result.status().message()), HasSubstr(needle));
}

TEST(JsonTest, ParsesValidDocuments) {
  const absl::StatusOr<Json> result =
      ParseJsonStrict(R"({"a": [1, -2, 3.5, "x", null, true], "b": {"c": {}}})", "test.json");
  ASSERT_TRUE(result.ok()) << result.status();
  const Json& j = *result;
  EXPECT_EQ(j["a"].size(), 6u);
  EXPECT_TRUE(j["a"][0].is_number_unsigned());
  EXPECT_TRUE(j["a"][1].is_number_integer());
  EXPECT_FALSE(j["a"][1].is_number_unsigned());
  EXPECT_TRUE(j["a"][2].is_number_float());
  EXPECT_EQ(j["a"][3], "x");
  EXPECT_TRUE(j["b"]["c"].is_object());
  // Scalars and empty containers at the top level are JSON too.
  EXPECT_TRUE(ParseJsonStrict("3", "t").ok());
  EXPECT_TRUE(ParseJsonStrict("[]", "t").ok());
  EXPECT_TRUE(ParseJsonStrict("\"s\"", "t").ok());
}

TEST(JsonTest, DuplicateKeyAtTopLevel) {
  ExpectRejected(R"({"a": 1, "a": 1})", "duplicate key \"a\"");
  ExpectRejected(R"({"a": 1, "b": 2, "a": {}})", "duplicate key \"a\"");
}

TEST(JsonTest, DuplicateKeyNested) {
  ExpectRejected(R"({"x": {"k": 1, "k": 2}})", "duplicate key \"k\"");
  ExpectRejected(R"([{"ok": 1}, {"k": [], "k": []}])", "duplicate key \"k\"");
  // The same key in different objects is fine.
  EXPECT_TRUE(ParseJsonStrict(R"({"k": {"k": {"k": 1}}, "j": [{"k": 1}, {"k": 2}]})", "t").ok());
  // Escapes are decoded before comparing: "\u0061" is "a".
  ExpectRejected(R"({"a": 1, "\u0061": 2})", "duplicate key \"a\"");
}

TEST(JsonTest, DepthLimit) {
  const auto nested = [](int depth) {
    return std::string(static_cast<size_t>(depth), '[') +
           std::string(static_cast<size_t>(depth), ']');
  };
  EXPECT_TRUE(ParseJsonStrict(nested(64), "t").ok());
  ExpectRejected(nested(65), "nesting deeper than 64 levels");
  ExpectRejected(nested(100000), "nesting deeper than 64 levels");
  JsonLimits limits;
  limits.max_depth = 2;
  EXPECT_TRUE(ParseJsonStrict(R"({"a": [1]})", "t", limits).ok());
  ExpectRejected(R"({"a": {"b": []}})", "nesting deeper than 2 levels", limits);
}

TEST(JsonTest, InvalidUtf8) {
  ExpectRejected("{\"a\": \"\xff\"}", "UTF-8");
  ExpectRejected("{\"\xc0\xaf\": 1}", "UTF-8");          // overlong '/'
  ExpectRejected("{\"a\": \"\xed\xa0\x80\"}", "UTF-8");  // encoded surrogate
  ExpectRejected("{\"a\": \"\xe2\x82\"}", "UTF-8");      // truncated sequence
  ExpectRejected(R"({"a": "\ud800"})", "surrogate");     // lone surrogate escape
  EXPECT_TRUE(ParseJsonStrict("{\"\xce\xbb\": \"\xf0\x9f\x98\x80\"}", "t").ok());
}

TEST(JsonTest, BigIntegersAreNotUnsigned) {
  absl::StatusOr<Json> j = ParseJsonStrict(
      "[18446744073709551615, 18446744073709551616, -9223372036854775808, "
      "-9223372036854775809, 1e3]",
      "t");
  ASSERT_TRUE(j.ok()) << j.status();
  EXPECT_TRUE((*j)[0].is_number_unsigned());
  EXPECT_EQ((*j)[0].get<uint64_t>(), UINT64_MAX);
  EXPECT_TRUE((*j)[1].is_number_float());
  EXPECT_FALSE((*j)[1].is_number_unsigned());
  EXPECT_TRUE((*j)[2].is_number_integer());
  EXPECT_FALSE((*j)[2].is_number_unsigned());
  EXPECT_TRUE((*j)[3].is_number_float());
  EXPECT_TRUE((*j)[4].is_number_float());
  // Out of double range is an error, not an exception.
  ExpectRejected("[1e400]", "number overflow");
}

TEST(JsonTest, TrailingGarbage) {
  ExpectRejected("{} x", "parse error");
  ExpectRejected("{}{}", "parse error");
  ExpectRejected("[1]]", "parse error");
  EXPECT_TRUE(ParseJsonStrict("{} \n\t\r ", "t").ok());
}

// Regression: nlohmann's lexer treats a NUL byte as the end of input, so without a check
// everything after one is ignored and "{}\0{\"a\":1}" parses as {} (a polyglot header).
TEST(JsonTest, NulByteDoesNotEndInput) {
  ExpectRejected(std::string("{}\0", 3), "NUL");
  ExpectRejected(std::string("{}\0{\"a\":1}", 10), "NUL");
  ExpectRejected(std::string("[1]\0]", 5), "NUL");
}

TEST(JsonTest, MalformedInput) {
  ExpectRejected("", "parse error");
  ExpectRejected("{\"a\": }", "parse error");
  ExpectRejected("{'a': 1}", "parse error");
  ExpectRejected("[1, 2,]", "parse error");
  ExpectRejected("{\"a\": NaN}", "parse error");
  ExpectRejected("// comment\n{}", "parse error");
}

TEST(JsonTest, TypeNames) {
  EXPECT_EQ(JsonTypeName(Json::object()), "object");
  EXPECT_EQ(JsonTypeName(Json::array()), "array");
  EXPECT_EQ(JsonTypeName(Json("s")), "string");
  EXPECT_EQ(JsonTypeName(Json(true)), "boolean");
  EXPECT_EQ(JsonTypeName(Json(nullptr)), "null");
  EXPECT_EQ(JsonTypeName(Json(-1)), "integer");
  EXPECT_EQ(JsonTypeName(Json(1u)), "unsigned integer");
  EXPECT_EQ(JsonTypeName(Json(1.5)), "number");
}

}  // namespace
}  // namespace ls
