// Tests for model/safetensors.h: one test per rejection class (each checks the code, the file,
// the tensor and the rule in the message), acceptance of the format's corner cases, writer round
// trips through a real mapping, atomic writes, sharded checkpoints and ReadAsFloat32.
#include "model/safetensors.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ls {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::StartsWith;

// ---- Helpers -------------------------------------------------------------------------------

std::string Le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
  return s;
}

// A file with `header` as its JSON (unpadded) followed by `data`.
std::string MakeFile(const std::string& header, const std::string& data = "") {
  return Le64(header.size()) + header + data;
}

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> ParseString(const std::string& file,
                                                             const SafetensorsLimits& limits = {}) {
  return SafetensorsFile::Parse(Bytes(file), limits);
}

// Parses `file` and expects INVALID_ARGUMENT for "<buffer>" whose message holds every needle.
void ExpectRejected(const std::string& file, std::initializer_list<std::string> needles,
                    const SafetensorsLimits& limits = {}) {
  const absl::StatusOr<std::unique_ptr<SafetensorsFile>> result = ParseString(file, limits);
  ASSERT_FALSE(result.ok()) << "accepted a file that must be rejected";
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  const std::string message(result.status().message());
  EXPECT_THAT(message, StartsWith("<buffer>: "));
  for (const std::string& needle : needles) EXPECT_THAT(message, HasSubstr(needle));
}

std::string Entry(const std::string& dtype, const std::string& shape, uint64_t begin,
                  uint64_t end) {
  return "{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> out(n);
  for (uint8_t& b : out) b = static_cast<uint8_t>(rng());
  return out;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return names;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

// A fresh directory under the test temp dir, removed (with its files) at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "/safetensors_test.XXXXXX";
    char* made = ::mkdtemp(tmpl.data());
    EXPECT_NE(made, nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    for (const std::string& name : ListDir(path_)) ::unlink((path_ + "/" + name).c_str());
    ::rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

bool BitEqual(float a, float b) {
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

// ---- Rejections: the prefix and the header -----------------------------------------------

TEST(SafetensorsRejectTest, ShortFile) {
  ExpectRejected("", {"header too small", "found 0"});
  ExpectRejected("abcde", {"header too small", "expected at least 8 bytes", "found 5"});
}

TEST(SafetensorsRejectTest, HeaderTooLong) {
  ExpectRejected(Le64(100'000'001) + "{}",
                 {"header too large", "at most 100000000", "found 100000001"});
  ExpectRejected(Le64(UINT64_MAX), {"header too large"});
  SafetensorsLimits limits;
  limits.max_header_bytes = 16;
  const std::string file = MakeFile("{\"a\":" + Entry("U8", "[1]", 0, 1) + "}", "x");
  ExpectRejected(file, {"header too large", "at most 16"}, limits);
}

TEST(SafetensorsRejectTest, HeaderPastEof) {
  ExpectRejected(Le64(100) + "{}", {"header length past end of file", "8 + 100", "10-byte file"});
  // The largest allowed header length must not overflow 8 + N.
  SafetensorsLimits limits;
  limits.max_header_bytes = UINT64_MAX;
  ExpectRejected(Le64(UINT64_MAX) + "{}", {"header length past end of file"}, limits);
  ExpectRejected(Le64(UINT64_MAX - 7) + "{}", {"header length past end of file"}, limits);
}

TEST(SafetensorsRejectTest, HeaderNotUtf8) {
  ExpectRejected(MakeFile("{\"a\xff\":" + Entry("U8", "[0]", 0, 0) + "}"),
                 {"not valid UTF-8", "0xff", "header offset 3"});
  // Overlong '/', a UTF-16 surrogate, and a truncated sequence at the very end.
  ExpectRejected(MakeFile("{\"\xc0\xaf\":1}"), {"not valid UTF-8", "0xc0"});
  ExpectRejected(MakeFile("{\"\xed\xa0\x80\":1}"), {"not valid UTF-8", "0xed"});
  ExpectRejected(MakeFile("{}  \xe2\x82"), {"not valid UTF-8", "0xe2"});
}

TEST(SafetensorsRejectTest, HeaderNotJson) {
  ExpectRejected(MakeFile("{\"a\": }"), {"header: invalid JSON"});
  ExpectRejected(MakeFile("{\"a\":" + Entry("U8", "[0]", 0, 0)), {"header: invalid JSON"});
  ExpectRejected(MakeFile("{\"a\":[1e400]}"), {"header: invalid JSON"});
  // Garbage after the object is not JSON either.
  ExpectRejected(MakeFile("{} {}"), {"header: invalid JSON"});
}

// Regression: nlohmann's lexer treats NUL as the end of input, so "{}\0<junk>" once parsed as
// "{}": a polyglot header. ParseJsonStrict refuses any NUL.
TEST(SafetensorsRejectTest, NulByteInHeader) {
  ExpectRejected(MakeFile(std::string("{}\0{\"w\":1}", 10)),
                 {"header: invalid JSON", "NUL byte at byte 2"});
  ExpectRejected(
      MakeFile(std::string("{\"w\":", 5) + Entry("U8", "[1]", 0, 1) + std::string("}\0}", 3), "a"),
      {"NUL byte"});
}

TEST(SafetensorsRejectTest, HeaderNotStartingWithBrace) {
  ExpectRejected(MakeFile(" {}"), {"must start with '{'"});
  ExpectRejected(MakeFile("[]"), {"must start with '{'", "\"[]\""});
  ExpectRejected(MakeFile("        "), {"must start with '{'", "only spaces"});
  ExpectRejected(MakeFile(""), {"must start with '{'"});
}

TEST(SafetensorsRejectTest, PaddingOtherThanSpaces) {
  ExpectRejected(MakeFile("{}\n"), {"padded only with spaces", "0x0a", "header offset 2"});
  ExpectRejected(MakeFile("{}\t  "), {"padded only with spaces", "0x09"});
}

TEST(SafetensorsRejectTest, DuplicateKey) {
  ExpectRejected(
      MakeFile("{\"w\":" + Entry("U8", "[1]", 0, 1) + ",\"w\":" + Entry("U8", "[1]", 1, 2) + "}",
               "ab"),
      {"duplicate key", "\"w\""});
  ExpectRejected(MakeFile("{\"w\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],"
                          "\"data_offsets\":[0,1]}}",
                          "a"),
                 {"duplicate key", "\"dtype\""});
}

// ---- Rejections: entries -------------------------------------------------------------------

TEST(SafetensorsRejectTest, EntryNotObject) {
  ExpectRejected(MakeFile("{\"w\":5}"),
                 {"tensor \"w\"", "entry must be an object", "found unsigned integer 5"});
  ExpectRejected(MakeFile("{\"w\":[\"U8\",[1],[0,1]]}", "a"),
                 {"tensor \"w\"", "entry must be an object", "found array"});
}

TEST(SafetensorsRejectTest, UnknownEntryKey) {
  ExpectRejected(MakeFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],"
                          "\"offset\":0}}",
                          "a"),
                 {"tensor \"w\"", "unknown key \"offset\"", "exactly dtype, shape, data_offsets"});
}

TEST(SafetensorsRejectTest, MissingEntryKey) {
  ExpectRejected(MakeFile("{\"w\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", "a"),
                 {"tensor \"w\"", "missing key \"shape\""});
}

TEST(SafetensorsRejectTest, UnknownDtype) {
  ExpectRejected(MakeFile("{\"w\":" + Entry("F31", "[1]", 0, 4) + "}", "abcd"),
                 {"tensor \"w\"", "unknown dtype \"F31\"", "expected one of", "BF16"});
  // Tokens are case-sensitive.
  ExpectRejected(MakeFile("{\"w\":" + Entry("f32", "[1]", 0, 4) + "}", "abcd"),
                 {"tensor \"w\"", "unknown dtype \"f32\""});
  ExpectRejected(MakeFile("{\"w\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,1]}}", "a"),
                 {"tensor \"w\"", "dtype must be a string", "unsigned integer 7"});
}

TEST(SafetensorsRejectTest, NegativeOffsets) {
  ExpectRejected(
      MakeFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[-4,0]}}", "abcd"),
      {"tensor \"w\"", "data_offsets[0] must be an unsigned integer", "integer -4"});
  ExpectRejected(MakeFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,-0]}}"),
                 {"tensor \"w\"", "data_offsets[1]"});
}

TEST(SafetensorsRejectTest, FloatOffsets) {
  ExpectRejected(
      MakeFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0.0,4]}}", "abcd"),
      {"tensor \"w\"", "data_offsets[0] must be an unsigned integer", "number"});
  ExpectRejected(
      MakeFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4e0]}}", "abcd"),
      {"tensor \"w\"", "data_offsets[1] must be an unsigned integer", "number"});
  // 2^64 does not fit 64 bits: the JSON parser makes it a float, which is rejected.
  ExpectRejected(MakeFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[4],"
                          "\"data_offsets\":[0,18446744073709551616]}}",
                          "abcd"),
                 {"tensor \"w\"", "data_offsets[1] must be an unsigned integer", "number"});
}

TEST(SafetensorsRejectTest, NonIntegerOffsets) {
  ExpectRejected(
      MakeFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[\"0\",4]}}", "abcd"),
      {"tensor \"w\"", "data_offsets[0] must be an unsigned integer", "string \"0\""});
  ExpectRejected(MakeFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0]}}", "abcd"),
                 {"tensor \"w\"", "exactly 2", "array of 1"});
  ExpectRejected(
      MakeFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,2,4]}}", "abcd"),
      {"tensor \"w\"", "exactly 2", "array of 3"});
  ExpectRejected(MakeFile("{\"w\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":{}}}", "abcd"),
                 {"tensor \"w\"", "exactly 2", "object"});
}

TEST(SafetensorsRejectTest, OffsetsBeginAfterEnd) {
  ExpectRejected(MakeFile("{\"w\":" + Entry("U8", "[0]", 4, 0) + "}", "abcd"),
                 {"tensor \"w\"", "data_offsets [4, 0]", "expected begin <= end"});
}

TEST(SafetensorsRejectTest, BadShapeEntries) {
  ExpectRejected(MakeFile("{\"w\":" + Entry("U8", "[-1]", 0, 0) + "}"),
                 {"tensor \"w\"", "shape[0] must be an unsigned integer", "integer -1"});
  ExpectRejected(MakeFile("{\"w\":" + Entry("U8", "[2, 1.5]", 0, 3) + "}", "abc"),
                 {"tensor \"w\"", "shape[1] must be an unsigned integer", "number 1.5"});
  ExpectRejected(MakeFile("{\"w\":" + Entry("U8", "[\"2\"]", 0, 2) + "}", "ab"),
                 {"tensor \"w\"", "shape[0] must be an unsigned integer", "string"});
  ExpectRejected(MakeFile("{\"w\":" + Entry("U8", "[[2]]", 0, 2) + "}", "ab"),
                 {"tensor \"w\"", "shape[0] must be an unsigned integer", "array"});
  ExpectRejected(MakeFile("{\"w\":" + Entry("U8", "2", 0, 2) + "}", "ab"),
                 {"tensor \"w\"", "shape must be an array"});
  // Fits uint64 but not the int64 of Shape.
  ExpectRejected(MakeFile("{\"w\":" + Entry("U8", "[9223372036854775808]", 0, 0) + "}"),
                 {"tensor \"w\"", "shape[0] too large", "9223372036854775807"});
}

TEST(SafetensorsRejectTest, OverflowingShape) {
  // The element count overflows int64.
  ExpectRejected(MakeFile("{\"w\":" + Entry("U8", "[4294967296, 4294967296]", 0, 0) + "}"),
                 {"tensor \"w\"", "overflows", "element count"});
  // The count fits, the bit count (2^62 * 32) does not.
  ExpectRejected(MakeFile("{\"w\":" + Entry("F32", "[4611686018427387904]", 0, 0) + "}"),
                 {"tensor \"w\"", "overflows", "bit count"});
  // A zero after an overflowing prefix is still rejected, as in the reference.
  ExpectRejected(MakeFile("{\"w\":" + Entry("U8", "[4294967296, 4294967296, 0]", 0, 0) + "}"),
                 {"tensor \"w\"", "overflows"});
}

TEST(SafetensorsRejectTest, SubByteDtypeFractionalBytes) {
  ExpectRejected(MakeFile("{\"w\":" + Entry("F4", "[3]", 0, 1) + "}", "a"),
                 {"tensor \"w\"", "misaligned slice", "12 bits"});
  ExpectRejected(MakeFile("{\"w\":" + Entry("F6_E2M3", "[1]", 0, 1) + "}", "a"),
                 {"tensor \"w\"", "misaligned slice", "6 bits"});
}

TEST(SafetensorsRejectTest, SizeShapeMismatch) {
  ExpectRejected(MakeFile("{\"w\":" + Entry("F32", "[2, 2]", 0, 12) + "}", std::string(12, 'x')),
                 {"tensor \"w\"", "size/shape mismatch", "needs 16 bytes", "span 12"});
  ExpectRejected(MakeFile("{\"w\":" + Entry("BF16", "[]", 0, 4) + "}", std::string(4, 'x')),
                 {"tensor \"w\"", "size/shape mismatch", "needs 2 bytes", "span 4"});
}

TEST(SafetensorsRejectTest, RankTooLarge) {
  ExpectRejected(MakeFile("{\"w\":" + Entry("U8", "[1,1,1,1,1,1,1,1,1]", 0, 1) + "}", "a"),
                 {"tensor \"w\"", "rank too large", "at most 8", "found 9"});
}

TEST(SafetensorsRejectTest, BadNames) {
  ExpectRejected(MakeFile("{\"\":" + Entry("U8", "[1]", 0, 1) + "}", "a"), {"empty tensor name"});
  SafetensorsLimits limits;
  limits.max_name_bytes = 4;
  ExpectRejected(MakeFile("{\"abcde\":" + Entry("U8", "[1]", 0, 1) + "}", "a"),
                 {"tensor \"abcde\"", "name too long", "at most 4", "found 5"}, limits);
}

TEST(SafetensorsRejectTest, TooManyTensors) {
  SafetensorsLimits limits;
  limits.max_tensors = 1;
  ExpectRejected(MakeFile("{\"__metadata__\":{},\"a\":" + Entry("U8", "[1]", 0, 1) +
                              ",\"b\":" + Entry("U8", "[1]", 1, 2) + "}",
                          "ab"),
                 {"too many tensors", "at most 1", "found 2"}, limits);
}

TEST(SafetensorsRejectTest, DeepNesting) {
  const std::string deep = std::string(40, '[') + std::string(40, ']');
  ExpectRejected(MakeFile("{\"__metadata__\":{\"k\":" + deep + "}}"),
                 {"header: invalid JSON", "nesting deeper"});
}

// ---- Rejections: layout --------------------------------------------------------------------

TEST(SafetensorsRejectTest, Overlap) {
  ExpectRejected(
      MakeFile("{\"a\":" + Entry("F32", "[2]", 0, 8) + ",\"b\":" + Entry("F32", "[2]", 4, 12) + "}",
               std::string(12, 'x')),
      {"tensor \"b\"", "overlap", "begin at 8", "the end of tensor \"a\"", "found 4"});
  // Many tensors over the same bytes: the allocation DoS of the threat list.
  ExpectRejected(
      MakeFile("{\"a\":" + Entry("F32", "[2]", 0, 8) + ",\"b\":" + Entry("F32", "[2]", 0, 8) + "}",
               std::string(8, 'x')),
      {"tensor \"b\"", "overlap", "tensor \"a\""});
  // A zero-size tensor inside another one overlaps too.
  ExpectRejected(
      MakeFile("{\"a\":" + Entry("F32", "[2]", 0, 8) + ",\"e\":" + Entry("F32", "[0]", 4, 4) + "}",
               std::string(8, 'x')),
      {"tensor \"e\"", "overlap"});
}

TEST(SafetensorsRejectTest, Hole) {
  ExpectRejected(
      MakeFile("{\"a\":" + Entry("F32", "[1]", 0, 4) + ",\"b\":" + Entry("F32", "[1]", 8, 12) + "}",
               std::string(12, 'x')),
      {"tensor \"b\"", "hole", "begin at 4", "the end of tensor \"a\"", "found 8"});
  ExpectRejected(MakeFile("{\"a\":" + Entry("F32", "[1]", 4, 8) + "}", std::string(8, 'x')),
                 {"tensor \"a\"", "hole", "begin at 0", "start of the data section"});
}

TEST(SafetensorsRejectTest, TrailingBytes) {
  ExpectRejected(MakeFile("{\"a\":" + Entry("F32", "[1]", 0, 4) + "}", std::string(6, 'x')),
                 {"tensor \"a\"", "trailing bytes", "expected a 4-byte data section", "found 6"});
  ExpectRejected(MakeFile("{}", "x"), {"trailing bytes", "expected a 0-byte data section"});
}

TEST(SafetensorsRejectTest, DataPastEof) {
  ExpectRejected(MakeFile("{\"a\":" + Entry("F32", "[2]", 0, 8) + "}", std::string(4, 'x')),
                 {"tensor \"a\"", "data past end of file", "4-byte data section"});
  ExpectRejected(
      MakeFile("{\"a\":" + Entry("F32", "[1]", 0, 4) + ",\"b\":" + Entry("F32", "[1]", 4, 8) + "}",
               std::string(6, 'x')),
      {"tensor \"b\"", "data past end of file"});
}

TEST(SafetensorsRejectTest, NonStringMetadata) {
  ExpectRejected(MakeFile("{\"__metadata__\":{\"format\":1}}"),
                 {"__metadata__", "\"format\"", "must be a string", "unsigned integer 1"});
  ExpectRejected(MakeFile("{\"__metadata__\":{\"format\":{\"a\":\"b\"}}}"),
                 {"__metadata__", "\"format\"", "must be a string", "object"});
  ExpectRejected(MakeFile("{\"__metadata__\":[\"pt\"]}"),
                 {"__metadata__ must be an object", "array"});
  ExpectRejected(MakeFile("{\"__metadata__\":null}"), {"__metadata__ must be an object", "null"});
}

TEST(SafetensorsRejectTest, HostileNameIsEscapedAndCut) {
  const std::string file = MakeFile("{\"a\\nb\\u001b[31m\":" + Entry("XX", "[1]", 0, 1) + "}", "a");
  const absl::StatusOr<std::unique_ptr<SafetensorsFile>> result = ParseString(file);
  ASSERT_FALSE(result.ok());
  const std::string message(result.status().message());
  EXPECT_THAT(message, HasSubstr("tensor \"a\\nb\\033[31m\""));
  EXPECT_THAT(message, Not(HasSubstr("\n")));

  const std::string long_name(5000, 'n');
  const std::string file2 = MakeFile("{\"" + long_name + "\":" + Entry("U8", "[1]", 0, 1) + "}");
  const absl::StatusOr<std::unique_ptr<SafetensorsFile>> result2 = ParseString(file2);
  ASSERT_FALSE(result2.ok());
  EXPECT_THAT(std::string(result2.status().message()), HasSubstr("name too long"));
  EXPECT_LT(result2.status().message().size(), 400u);
}

// ---- Acceptance ----------------------------------------------------------------------------

TEST(SafetensorsParseTest, EmptyFile) {
  const std::string file = MakeFile("{}");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> result = ParseString(file);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ((*result)->size(), 0u);
  EXPECT_THAT((*result)->metadata(), IsEmpty());
  EXPECT_EQ((*result)->what(), "<buffer>");
}

TEST(SafetensorsParseTest, ScalarsEmptyTensorsAndPadding) {
  // A scalar, then three zero-size tensors sharing offset 4, then a vector; spaces pad the header.
  const std::string header =
      "{\"s\":" + Entry("F32", "[]", 0, 4) + ",\"z1\":" + Entry("F16", "[0]", 4, 4) +
      ",\"z2\":" + Entry("I64", "[3, 0, 2]", 4, 4) + ",\"z0\":" + Entry("F4", "[0]", 4, 4) +
      ",\"v\":" + Entry("U8", "[2]", 4, 6) + "}     ";
  const float scalar = 2.5f;
  std::string data(reinterpret_cast<const char*>(&scalar), 4);
  data += "\x07\x09";
  const std::string file = MakeFile(header, data);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> result = ParseString(file);
  ASSERT_TRUE(result.ok()) << result.status();
  const SafetensorsFile& st = **result;
  EXPECT_EQ(st.header_bytes(), header.size());
  ASSERT_EQ(st.size(), 5u);
  std::vector<std::string> order;
  for (const SafetensorsEntry& e : st.entries()) order.push_back(e.name);
  // File order: by offset, ties by name.
  EXPECT_THAT(order, ElementsAre("s", "z0", "z1", "z2", "v"));

  const SafetensorsEntry* s = st.Find("s");
  ASSERT_NE(s, nullptr);
  EXPECT_TRUE(s->shape.empty());
  EXPECT_EQ(s->numel(), 1);
  EXPECT_EQ(s->nbytes(), 4u);
  absl::StatusOr<std::vector<float>> s_values = st.ReadAsFloat32(*s);
  ASSERT_TRUE(s_values.ok()) << s_values.status();
  EXPECT_THAT(*s_values, ElementsAre(2.5f));

  const SafetensorsEntry* z2 = st.Find("z2");
  ASSERT_NE(z2, nullptr);
  EXPECT_EQ(z2->dtype, DType::kI64);
  EXPECT_THAT(z2->shape, ElementsAre(3, 0, 2));
  EXPECT_EQ(z2->numel(), 0);
  EXPECT_EQ(z2->nbytes(), 0u);

  const SafetensorsEntry* v = st.Find("v");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->begin, 4u);
  EXPECT_EQ(v->data, st.data().data() + 4);
  EXPECT_EQ(v->data[1], 9);
}

TEST(SafetensorsParseTest, SubByteDtypesWithWholeBytes) {
  const std::string file = MakeFile(
      "{\"f4\":" + Entry("F4", "[2, 3]", 0, 3) + ",\"f6\":" + Entry("F6_E3M2", "[4]", 3, 6) + "}",
      "abcdef");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> result = ParseString(file);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ((*result)->Find("f4")->nbytes(), 3u);
  EXPECT_EQ((*result)->Find("f6")->nbytes(), 3u);
}

TEST(SafetensorsParseTest, MetadataAndLookup) {
  const std::string file =
      MakeFile("{\"__metadata__\":{\"format\":\"pt\",\"note\":\"\\u00e9\"},\"w\":" +
                   Entry("U8", "[1]", 0, 1) + "}",
               "a");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> result = ParseString(file);
  ASSERT_TRUE(result.ok()) << result.status();
  const SafetensorsFile& st = **result;
  EXPECT_EQ(st.metadata().at("format"), "pt");
  EXPECT_EQ(st.metadata().at("note"), "\xc3\xa9");
  EXPECT_EQ(st.size(), 1u);
  EXPECT_EQ(st.Find("__metadata__"), nullptr);
  EXPECT_EQ(st.Find("missing"), nullptr);
  const absl::StatusOr<const SafetensorsEntry*> missing = st.Get("missing");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("\"missing\""));
  const absl::StatusOr<const SafetensorsEntry*> w = st.Get("w");
  ASSERT_TRUE(w.ok());
  EXPECT_EQ((*w)->name, "w");
}

TEST(SafetensorsParseTest, OpenMissingFileIsNotFound) {
  const absl::StatusOr<std::unique_ptr<SafetensorsFile>> result =
      SafetensorsFile::Open("/nonexistent/dir/model.safetensors");
  EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsParseTest, OpenNamesThePathInErrors) {
  TempDir dir;
  const std::string path = dir.File("bad.safetensors");
  WriteFile(path, MakeFile("{\"w\":" + Entry("U8", "[2]", 0, 2) + "}", "a"));
  const absl::StatusOr<std::unique_ptr<SafetensorsFile>> result = SafetensorsFile::Open(path);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(result.status().message()),
              StartsWith(path + ": tensor \"w\": data past end"));
}

// A file whose data section starts 1 byte past an 8-byte boundary, placed in an 8-aligned buffer
// so that alignment is deterministic.
TEST(SafetensorsParseTest, MisalignedTensorsAreCopiedNotViewed) {
  std::vector<uint16_t> f16 = {FloatToFp16(1.5f), FloatToFp16(-2.0f), FloatToFp16(65504.0f)};
  std::vector<uint16_t> bf16 = {FloatToBf16(3.0f), FloatToBf16(-0.5f)};
  std::vector<float> f32 = {1.25f, -7.0f};
  std::string data;
  data.append(reinterpret_cast<const char*>(f32.data()), 8);
  data.append(reinterpret_cast<const char*>(f16.data()), 6);
  data.append(reinterpret_cast<const char*>(bf16.data()), 4);
  std::string header =
      "{\"a\":" + Entry("F32", "[2]", 0, 8) + ",\"b\":" + Entry("F16", "[3]", 8, 14) +
      ",\"c\":" + Entry("BF16", "[2]", 14, 18) + ",\"d\":" + Entry("U8", "[0]", 18, 18) + "}";
  while ((8 + header.size()) % 8 != 1) header += ' ';
  const std::string file = MakeFile(header, data);
  std::vector<uint64_t> storage(file.size() / 8 + 1);
  std::memcpy(storage.data(), file.data(), file.size());
  const absl::Span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(storage.data()),
                                        file.size());

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> result = SafetensorsFile::Parse(bytes);
  ASSERT_TRUE(result.ok()) << result.status();
  const SafetensorsFile& st = **result;
  const SafetensorsEntry& a = *st.Find("a");
  EXPECT_FALSE(SafetensorsFile::IsAligned(a));
  const absl::StatusOr<TensorView> view = st.View(a);
  EXPECT_EQ(view.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(view.status().message()), HasSubstr("tensor \"a\""));
  EXPECT_THAT(std::string(view.status().message()), HasSubstr("not aligned"));
  EXPECT_THAT(std::string(view.status().message()), HasSubstr("CopyTo"));
  float copied[2];
  SafetensorsFile::CopyTo(a, copied);
  EXPECT_EQ(copied[0], 1.25f);
  EXPECT_EQ(copied[1], -7.0f);

  absl::StatusOr<std::vector<float>> fa = st.ReadAsFloat32(a);
  ASSERT_TRUE(fa.ok());
  EXPECT_THAT(*fa, ElementsAre(1.25f, -7.0f));
  absl::StatusOr<std::vector<float>> fb = st.ReadAsFloat32(*st.Find("b"));
  ASSERT_TRUE(fb.ok());
  EXPECT_THAT(*fb, ElementsAre(1.5f, -2.0f, 65504.0f));
  absl::StatusOr<std::vector<float>> fc = st.ReadAsFloat32(*st.Find("c"));
  ASSERT_TRUE(fc.ok());
  EXPECT_THAT(*fc, ElementsAre(3.0f, -0.5f));

  // Bytes are always aligned; so is the empty U8 tensor at the end of the buffer.
  const absl::StatusOr<TensorView> d = st.View(*st.Find("d"));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->numel(), 0);
}

TEST(SafetensorsParseTest, ReadAsFloat32RejectsOtherDtypes) {
  const std::string file = MakeFile("{\"ids\":" + Entry("I32", "[1]", 0, 4) + "}", "abcd");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> result = ParseString(file);
  ASSERT_TRUE(result.ok());
  const absl::StatusOr<std::vector<float>> floats =
      (*result)->ReadAsFloat32(*(*result)->Find("ids"));
  EXPECT_EQ(floats.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(floats.status().message()), HasSubstr("<buffer>: tensor \"ids\""));
  EXPECT_THAT(std::string(floats.status().message()),
              HasSubstr("expected dtype F32, F16 or BF16, found I32"));

  const std::string file2 = MakeFile("{\"w\":" + Entry("F32", "[2]", 0, 8) + "}", "abcdefgh");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> result2 = ParseString(file2);
  ASSERT_TRUE(result2.ok());
  std::vector<float> too_small(1);
  const absl::Status st =
      (*result2)->ReadAsFloat32(*(*result2)->Find("w"), absl::MakeSpan(too_small));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("expected a destination of 2 floats, found 1"));
}

// ---- ReadAsFloat32 on random data vs common/dtype.h ----------------------------------------

TEST(SafetensorsReadAsFloat32Test, RandomDataMatchesDtypeConversions) {
  constexpr size_t kN = 4099;
  std::mt19937 rng(1234);
  std::vector<uint16_t> bf16(kN), f16(kN);
  std::vector<float> f32(kN);
  std::uniform_real_distribution<float> dist(-1000.0f, 1000.0f);
  for (size_t i = 0; i < kN; ++i) {
    // Every 16-bit pattern is fair game (subnormals, inf, NaN) except 0, so that a reader that
    // returned zeros could not pass.
    do bf16[i] = static_cast<uint16_t>(rng());
    while (bf16[i] == 0);
    do f16[i] = static_cast<uint16_t>(rng());
    while (f16[i] == 0);
    do f32[i] = dist(rng);
    while (f32[i] == 0.0f);
  }
  const auto span = [](const auto& v) {
    return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()),
                                     v.size() * sizeof(v[0]));
  };
  absl::StatusOr<std::string> file = SerializeSafetensors({
      {"bf16", DType::kBF16, {kN}, span(bf16)},
      {"f16", DType::kF16, {kN}, span(f16)},
      {"f32", DType::kF32, {kN}, span(f32)},
  });
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> st = ParseString(*file);
  ASSERT_TRUE(st.ok()) << st.status();

  absl::StatusOr<std::vector<float>> got_bf16 = (*st)->ReadAsFloat32(*(*st)->Find("bf16"));
  absl::StatusOr<std::vector<float>> got_f16 = (*st)->ReadAsFloat32(*(*st)->Find("f16"));
  absl::StatusOr<std::vector<float>> got_f32 = (*st)->ReadAsFloat32(*(*st)->Find("f32"));
  ASSERT_TRUE(got_bf16.ok() && got_f16.ok() && got_f32.ok());
  std::vector<float> want_bf16(kN), want_f16(kN);
  Bf16ToFloat(bf16.data(), want_bf16.data(), kN);
  Fp16ToFloat(f16.data(), want_f16.data(), kN);
  size_t nonzero = 0;
  for (size_t i = 0; i < kN; ++i) {
    ASSERT_TRUE(BitEqual((*got_bf16)[i], want_bf16[i])) << i;
    ASSERT_TRUE(BitEqual((*got_f16)[i], want_f16[i])) << i;
    ASSERT_TRUE(BitEqual((*got_f32)[i], f32[i])) << i;
    nonzero += (*got_bf16)[i] != 0.0f;
  }
  EXPECT_GT(nonzero, kN / 2);
}

// ---- Writer round trips --------------------------------------------------------------------

struct OwnedTensor {
  std::string name;
  DType dtype;
  Shape shape;
  std::vector<uint8_t> bytes;
};

std::vector<SafetensorsTensorRef> Refs(const std::vector<OwnedTensor>& tensors) {
  std::vector<SafetensorsTensorRef> refs;
  for (const OwnedTensor& t : tensors) {
    refs.push_back({t.name, t.dtype, t.shape, absl::MakeConstSpan(t.bytes)});
  }
  return refs;
}

OwnedTensor RandomTensor(std::string name, DType dtype, Shape shape, uint32_t seed) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const size_t nbytes = static_cast<size_t>(numel) * static_cast<size_t>(DTypeBits(dtype)) / 8;
  return {std::move(name), dtype, std::move(shape), RandomBytes(nbytes, seed)};
}

// Writes `tensors`, maps the file back and checks every tensor's dtype, shape, bytes and pointer
// alignment.
void RoundTrip(const std::vector<OwnedTensor>& tensors,
               const std::map<std::string, std::string>& metadata = {}) {
  TempDir dir;
  const std::string path = dir.File("model.safetensors");
  const absl::Status written = WriteSafetensors(path, Refs(tensors), metadata);
  ASSERT_TRUE(written.ok()) << written;
  EXPECT_THAT(ListDir(dir.path()), ElementsAre("model.safetensors"));

  absl::StatusOr<std::string> serialized = SerializeSafetensors(Refs(tensors), metadata);
  ASSERT_TRUE(serialized.ok()) << serialized.status();
  EXPECT_EQ(ReadFile(path), *serialized) << "WriteSafetensors and SerializeSafetensors differ";

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> opened = SafetensorsFile::Open(path);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const SafetensorsFile& st = **opened;
  EXPECT_EQ(st.what(), path);
  EXPECT_EQ(st.header_bytes() % 8, 0u) << "header not padded to a multiple of 8";
  EXPECT_EQ(st.metadata(), metadata);
  ASSERT_EQ(st.size(), tensors.size());
  for (const OwnedTensor& t : tensors) {
    SCOPED_TRACE(t.name);
    const SafetensorsEntry* e = st.Find(t.name);
    ASSERT_NE(e, nullptr);
    EXPECT_EQ(e->dtype, t.dtype);
    EXPECT_EQ(e->shape, t.shape);
    ASSERT_EQ(e->nbytes(), t.bytes.size());
    EXPECT_TRUE(t.bytes.empty() || std::memcmp(e->data, t.bytes.data(), t.bytes.size()) == 0);
    const size_t align = static_cast<size_t>(std::max(1, DTypeBits(t.dtype) / 8));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(e->data) % align, 0u);
    EXPECT_TRUE(SafetensorsFile::IsAligned(*e));
    absl::StatusOr<TensorView> view = st.View(*e);
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_EQ(view->data(), e->data);
    EXPECT_EQ(view->dtype(), t.dtype);
    EXPECT_EQ(view->shape(), t.shape);
    EXPECT_EQ(view->nbytes(), t.bytes.size());
    std::vector<uint8_t> copy(t.bytes.size());
    SafetensorsFile::CopyTo(*e, copy.data());
    EXPECT_EQ(copy, t.bytes);
  }
}

TEST(SafetensorsWriterTest, RoundTripFloatDtypes) {
  RoundTrip({
      RandomTensor("f16", DType::kF16, {3, 5}, 1),
      RandomTensor("bf16", DType::kBF16, {7}, 2),
      RandomTensor("f32", DType::kF32, {2, 3, 1}, 3),
      RandomTensor("f64", DType::kF64, {3}, 4),
      RandomTensor("c64", DType::kC64, {5}, 5),
      RandomTensor("f8_e5m2", DType::kF8E5M2, {9}, 6),
      RandomTensor("f8_e4m3", DType::kF8E4M3, {3, 3}, 7),
      RandomTensor("f8_e8m0", DType::kF8E8M0, {1}, 8),
      RandomTensor("f8_e4m3fnuz", DType::kF8E4M3Fnuz, {5}, 9),
      RandomTensor("f8_e5m2fnuz", DType::kF8E5M2Fnuz, {11}, 10),
      RandomTensor("f6_e2m3", DType::kF6E2M3, {4}, 11),
      RandomTensor("f6_e3m2", DType::kF6E3M2, {2, 4}, 12),
      RandomTensor("f4", DType::kF4, {3, 2}, 13),
  });
}

// Loading converts each tensor and then releases its pages; the bytes must read back intact
// afterwards (a file mapping refaults from the file), and a Parse() buffer must be left alone.
TEST(SafetensorsReleasePagesTest, BytesReadBackUnchanged) {
  TempDir dir;
  const std::string path = dir.File("model.safetensors");
  const std::vector<OwnedTensor> tensors = {RandomTensor("big", DType::kF32, {64, 1024}, 21),
                                            RandomTensor("small", DType::kBF16, {5}, 22)};
  ASSERT_TRUE(WriteSafetensors(path, Refs(tensors)).ok());
  auto mapped = SafetensorsFile::Open(path);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  absl::StatusOr<std::string> bytes = SerializeSafetensors(Refs(tensors));
  ASSERT_TRUE(bytes.ok());
  auto parsed = SafetensorsFile::Parse(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size()));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  for (const SafetensorsFile* file : {mapped->get(), parsed->get()}) {
    for (const OwnedTensor& t : tensors) {
      const SafetensorsEntry* e = file->Find(t.name);
      ASSERT_NE(e, nullptr);
      file->ReleasePages(*e);
      EXPECT_EQ(std::memcmp(e->data, t.bytes.data(), t.bytes.size()), 0) << t.name;
    }
  }
}

TEST(SafetensorsWriterTest, RoundTripIntDtypes) {
  RoundTrip({
      RandomTensor("bool", DType::kBool, {5}, 21),
      RandomTensor("u8", DType::kU8, {3}, 22),
      RandomTensor("i8", DType::kI8, {7}, 23),
      RandomTensor("u16", DType::kU16, {3}, 24),
      RandomTensor("i16", DType::kI16, {1, 3}, 25),
      RandomTensor("u32", DType::kU32, {5}, 26),
      RandomTensor("i32", DType::kI32, {3}, 27),
      RandomTensor("u64", DType::kU64, {3}, 28),
      RandomTensor("i64", DType::kI64, {2, 2}, 29),
  });
}

TEST(SafetensorsWriterTest, RoundTripScalarsAndEmptyTensors) {
  RoundTrip({
      RandomTensor("scalar_f32", DType::kF32, {}, 31),
      RandomTensor("scalar_u8", DType::kU8, {}, 32),
      RandomTensor("empty", DType::kF64, {0}, 33),
      RandomTensor("empty_3d", DType::kBF16, {4, 0, 2}, 34),
      RandomTensor("odd_bytes", DType::kU8, {3}, 35),
  });
}

TEST(SafetensorsWriterTest, RoundTripMetadata) {
  RoundTrip({RandomTensor("w", DType::kF16, {4}, 41)},
            {{"format", "pt"}, {"unicode", "\xce\xbb=\xe2\x82\xac"}, {"empty", ""}});
  RoundTrip({}, {{"format", "pt"}});
  RoundTrip({});
}

TEST(SafetensorsWriterTest, LayoutIsDescendingAlignmentThenName) {
  const std::vector<OwnedTensor> tensors = {
      RandomTensor("a_u8", DType::kU8, {3}, 1),   RandomTensor("b_f16", DType::kF16, {1}, 2),
      RandomTensor("c_f64", DType::kF64, {1}, 3), RandomTensor("a_f32", DType::kF32, {1}, 4),
      RandomTensor("b_f32", DType::kF32, {1}, 5), RandomTensor("z_i64", DType::kI64, {1}, 6),
  };
  absl::StatusOr<std::string> file = SerializeSafetensors(Refs(tensors));
  ASSERT_TRUE(file.ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> st = ParseString(*file);
  ASSERT_TRUE(st.ok()) << st.status();
  std::vector<std::string> order;
  for (const SafetensorsEntry& e : (*st)->entries()) order.push_back(e.name);
  EXPECT_THAT(order, ElementsAre("c_f64", "z_i64", "a_f32", "b_f32", "b_f16", "a_u8"));
  EXPECT_EQ((8 + (*st)->header_bytes()) % 8, 0u);
  for (const SafetensorsEntry& e : (*st)->entries()) {
    EXPECT_EQ(e.begin % static_cast<uint64_t>(std::max(1, DTypeBits(e.dtype) / 8)), 0u) << e.name;
  }
}

TEST(SafetensorsWriterTest, RejectsBadInput) {
  const std::vector<uint8_t> four(4), two(2);
  const auto expect_invalid = [](const std::vector<SafetensorsTensorRef>& refs,
                                 std::initializer_list<std::string> needles,
                                 const std::map<std::string, std::string>& metadata = {}) {
    const absl::StatusOr<std::string> out = SerializeSafetensors(refs, metadata);
    ASSERT_FALSE(out.ok());
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
    for (const std::string& needle : needles) {
      EXPECT_THAT(std::string(out.status().message()), HasSubstr(needle));
    }
  };
  const absl::Span<const uint8_t> f4 = absl::MakeConstSpan(four);
  const absl::Span<const uint8_t> f2 = absl::MakeConstSpan(two);
  expect_invalid({{"w", DType::kF32, {1}, f4}, {"w", DType::kF32, {1}, f4}},
                 {"tensor \"w\"", "duplicate tensor name"});
  expect_invalid({{"w", DType::kF32, {2}, f4}},
                 {"tensor \"w\"", "size/shape mismatch", "needs 8 bytes", "found 4"});
  expect_invalid({{"w", DType::kF16, {-2}, f4}}, {"tensor \"w\"", "must not be negative"});
  expect_invalid({{"", DType::kU8, {4}, f4}}, {"empty tensor name"});
  expect_invalid({{"__metadata__", DType::kU8, {4}, f4}}, {"reserved"});
  expect_invalid({{"w\xff", DType::kU8, {4}, f4}}, {"not valid UTF-8"});
  expect_invalid({{"w", DType::kF4, {3}, f2}}, {"tensor \"w\"", "misaligned slice"});
  expect_invalid({{"w", DType::kU8, {1 << 20, 1 << 20, 1 << 20, 1 << 20}, f4}},
                 {"tensor \"w\"", "overflows"});
  expect_invalid({{"w", DType::kU8, {1, 1, 1, 1, 1, 1, 1, 1, 4}, f4}},
                 {"tensor \"w\"", "rank too large"});
  expect_invalid({}, {"__metadata__", "\"k\"", "not valid UTF-8"}, {{"k", "\xc3"}});
}

// ---- Atomic writes -------------------------------------------------------------------------

TEST(SafetensorsWriterTest, AtomicWriteLeavesNoTempFile) {
  TempDir dir;
  const std::string path = dir.File("adapter.safetensors");
  const OwnedTensor first = RandomTensor("w", DType::kF32, {4}, 51);
  ASSERT_TRUE(WriteSafetensors(path, Refs({first})).ok());
  EXPECT_THAT(ListDir(dir.path()), ElementsAre("adapter.safetensors"));

  // Overwriting replaces the file whole.
  const OwnedTensor second = RandomTensor("v", DType::kU8, {3}, 52);
  ASSERT_TRUE(WriteSafetensors(path, Refs({second})).ok());
  EXPECT_THAT(ListDir(dir.path()), ElementsAre("adapter.safetensors"));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> st = SafetensorsFile::Open(path);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ((*st)->Find("w"), nullptr);
  EXPECT_NE((*st)->Find("v"), nullptr);

  // Invalid input fails before anything is created, and the old file stays.
  const OwnedTensor bad{"x", DType::kF32, {3}, std::vector<uint8_t>(5)};
  const absl::Status rejected = WriteSafetensors(path, Refs({bad}));
  EXPECT_EQ(rejected.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(rejected.message()), StartsWith(path + ": tensor \"x\""));
  EXPECT_THAT(ListDir(dir.path()), ElementsAre("adapter.safetensors"));
  EXPECT_EQ(ReadFile(path), *SerializeSafetensors(Refs({second})));

  // An unwritable destination fails without leftovers.
  const absl::Status no_dir = WriteSafetensors(dir.File("missing/x.safetensors"), Refs({first}));
  EXPECT_EQ(no_dir.code(), absl::StatusCode::kNotFound) << no_dir;
  const absl::Status over_dir = WriteSafetensors(dir.path() + "/", Refs({first}));
  EXPECT_EQ(over_dir.code(), absl::StatusCode::kInvalidArgument) << over_dir;
  EXPECT_THAT(ListDir(dir.path()), ElementsAre("adapter.safetensors"));
}

TEST(SafetensorsWriterTest, RenameOntoDirectoryFailsWithoutLeftovers) {
  TempDir dir;
  const std::string path = dir.File("taken");
  ASSERT_EQ(::mkdir(path.c_str(), 0755), 0);
  const OwnedTensor t = RandomTensor("w", DType::kF32, {4}, 53);
  const absl::Status status = WriteSafetensors(path, Refs({t}));
  EXPECT_FALSE(status.ok());
  EXPECT_THAT(std::string(status.message()), HasSubstr("rename"));
  EXPECT_THAT(ListDir(dir.path()), ElementsAre("taken"));
  ::rmdir(path.c_str());
}

// ---- The fuzz seed corpus ------------------------------------------------------------------

// tests/fuzz/make_corpus.py names each seed for what the reader must do with it.
TEST(SafetensorsCorpusTest, SeedsParseAsNamed) {
  const char* source_dir = std::getenv("LS_SOURCE_DIR");
  if (source_dir == nullptr) GTEST_SKIP() << "LS_SOURCE_DIR not set (run through ctest)";
  const std::string dir = std::string(source_dir) + "/tests/fuzz/corpus/safetensors";
  const std::vector<std::string> names = ListDir(dir);
  ASSERT_GE(names.size(), 40u) << dir;
  for (const std::string& name : names) {
    SCOPED_TRACE(name);
    const std::string bytes = ReadFile(dir + "/" + name);
    EXPECT_LT(bytes.size(), 4096u);
    const absl::StatusOr<std::unique_ptr<SafetensorsFile>> parsed = ParseString(bytes);
    if (name.rfind("valid_", 0) == 0) {
      EXPECT_TRUE(parsed.ok()) << parsed.status();
    } else {
      ASSERT_EQ(name.rfind("bad_", 0), 0u);
      EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    }
  }
}

// ---- Checkpoints ---------------------------------------------------------------------------

std::string Index(const std::string& weight_map, const std::string& extra = "") {
  return "{\"metadata\":{\"total_size\":36}" + extra + ",\"weight_map\":{" + weight_map + "}}";
}

// Two shards: a (F32[4]) and b (F16[2]) in the first, c (BF16[3]) in the second.
class SafetensorsCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    a_ = RandomTensor("model.a", DType::kF32, {4}, 61);
    b_ = RandomTensor("model.b", DType::kF16, {2}, 62);
    c_ = RandomTensor("model.c", DType::kBF16, {3}, 63);
    ASSERT_TRUE(WriteSafetensors(dir_.File(kShard1), Refs({a_, b_})).ok());
    ASSERT_TRUE(WriteSafetensors(dir_.File(kShard2), Refs({c_})).ok());
  }

  void WriteIndex(const std::string& json) {
    WriteFile(dir_.File("model.safetensors.index.json"), json);
  }

  std::string GoodMap() const {
    return std::string("\"model.a\":\"") + kShard1 + "\",\"model.b\":\"" + kShard1 +
           "\",\"model.c\":\"" + kShard2 + "\"";
  }

  void ExpectInvalid(std::initializer_list<std::string> needles) {
    const absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
        SafetensorsCheckpoint::Open(dir_.path());
    ASSERT_FALSE(ckpt.ok());
    EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument) << ckpt.status();
    EXPECT_THAT(std::string(ckpt.status().message()),
                StartsWith(dir_.File("model.safetensors.index.json") + ": "));
    for (const std::string& needle : needles) {
      EXPECT_THAT(std::string(ckpt.status().message()), HasSubstr(needle));
    }
  }

  static constexpr const char* kShard1 = "model-00001-of-00002.safetensors";
  static constexpr const char* kShard2 = "model-00002-of-00002.safetensors";
  TempDir dir_;
  OwnedTensor a_, b_, c_;
};

TEST_F(SafetensorsCheckpointTest, ShardedRoundTrip) {
  WriteIndex(Index(GoodMap()));
  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
      SafetensorsCheckpoint::Open(dir_.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const SafetensorsCheckpoint& c = **ckpt;
  EXPECT_TRUE(c.sharded());
  ASSERT_EQ(c.shards().size(), 2u);
  EXPECT_EQ(c.shards()[0]->what(), dir_.File(kShard1));
  EXPECT_EQ(c.index_metadata().at("total_size"), 36);
  EXPECT_EQ(c.size(), 3u);
  // Shard by shard, file order within each (F32 before F16).
  EXPECT_THAT(c.names(), ElementsAre("model.a", "model.b", "model.c"));
  for (const OwnedTensor* t : {&a_, &b_, &c_}) {
    SCOPED_TRACE(t->name);
    const SafetensorsTensor* found = c.Find(t->name);
    ASSERT_NE(found, nullptr);
    EXPECT_EQ(found->entry->name, t->name);
    EXPECT_EQ(found->entry->shape, t->shape);
    ASSERT_EQ(found->entry->nbytes(), t->bytes.size());
    EXPECT_EQ(std::memcmp(found->entry->data, t->bytes.data(), t->bytes.size()), 0);
    EXPECT_TRUE(found->file->ReadAsFloat32(*found->entry).ok());
  }
  EXPECT_EQ(c.Find("model.c")->file, c.shards()[1].get());
  EXPECT_EQ(c.Find("nope"), nullptr);
  EXPECT_EQ(c.Get("nope").status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(c.Get("model.b").ok());
}

TEST_F(SafetensorsCheckpointTest, SingleFileWinsOverIndex) {
  WriteIndex("not even json");
  ASSERT_TRUE(WriteSafetensors(dir_.File("model.safetensors"), Refs({a_, c_})).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
      SafetensorsCheckpoint::Open(dir_.path() + "/");
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_FALSE((*ckpt)->sharded());
  EXPECT_EQ((*ckpt)->shards().size(), 1u);
  EXPECT_TRUE((*ckpt)->index_metadata().empty());
  EXPECT_THAT((*ckpt)->names(), ElementsAre("model.a", "model.c"));
}

TEST_F(SafetensorsCheckpointTest, NoCheckpointIsNotFound) {
  const absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
      SafetensorsCheckpoint::Open(dir_.path());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(ckpt.status().message()), HasSubstr("model.safetensors.index.json"));
}

TEST_F(SafetensorsCheckpointTest, BadShardName) {
  for (const std::string bad : {"../model-00001-of-00002.safetensors", "sub/x.safetensors",
                                "/etc/passwd", ".hidden.safetensors", "", "a..b", ".."}) {
    SCOPED_TRACE(bad);
    WriteIndex(Index("\"model.a\":\"" + bad + "\""));
    ExpectInvalid({"tensor \"model.a\"", "bad shard name", "expected a bare file name"});
  }
}

TEST_F(SafetensorsCheckpointTest, ShardMissingTensor) {
  WriteIndex(Index(GoodMap() + ",\"model.d\":\"" + kShard2 + "\""));
  ExpectInvalid({"tensor \"model.d\"", "missing from its shard", kShard2});
}

TEST_F(SafetensorsCheckpointTest, TensorMappedToTheWrongShard) {
  WriteIndex(Index(std::string("\"model.a\":\"") + kShard1 + "\",\"model.b\":\"" + kShard1 +
                   "\",\"model.c\":\"" + kShard1 + "\",\"model.x\":\"" + kShard2 + "\""));
  ExpectInvalid({"tensor \"model.c\"", "missing from its shard", kShard2});
}

TEST_F(SafetensorsCheckpointTest, TensorInTwoShards) {
  ASSERT_TRUE(WriteSafetensors(dir_.File(kShard2), Refs({a_, c_})).ok());
  WriteIndex(Index(GoodMap()));
  ExpectInvalid({"tensor \"model.a\"", "tensor in two shards", kShard1, kShard2});
}

TEST_F(SafetensorsCheckpointTest, TensorAbsentFromWeightMap) {
  WriteIndex(Index(std::string("\"model.a\":\"") + kShard1 + "\",\"model.c\":\"" + kShard2 + "\""));
  ExpectInvalid({"tensor \"model.b\"", "absent from weight_map", kShard1});
}

TEST_F(SafetensorsCheckpointTest, MissingShardFileIsNotFound) {
  WriteIndex(Index(GoodMap() + ",\"model.z\":\"model-00003-of-00003.safetensors\""));
  const absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
      SafetensorsCheckpoint::Open(dir_.path());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound) << ckpt.status();
  EXPECT_THAT(std::string(ckpt.status().message()), HasSubstr("model-00003-of-00003.safetensors"));
  EXPECT_THAT(std::string(ckpt.status().message()), HasSubstr("\"model.z\""));
}

TEST_F(SafetensorsCheckpointTest, StrictIndex) {
  WriteIndex(Index(GoodMap() + ",\"model.a\":\"" + kShard1 + "\""));
  ExpectInvalid({"duplicate key", "\"model.a\""});
  WriteIndex(Index(GoodMap(), ",\"extra\":1"));
  ExpectInvalid({"unknown key \"extra\""});
  WriteIndex(Index("\"model.a\":1"));
  ExpectInvalid({"tensor \"model.a\"", "weight_map value must be a shard file name"});
  WriteIndex("{\"metadata\":{}}");
  ExpectInvalid({"weight_map must be an object", "nothing"});
  WriteIndex("{\"metadata\":[],\"weight_map\":{}}");
  ExpectInvalid({"metadata must be an object"});
  WriteIndex("[]");
  ExpectInvalid({"expected a JSON object", "array"});
  WriteIndex(Index(GoodMap()) + std::string("\0junk", 5));
  ExpectInvalid({"invalid JSON", "NUL byte"});
}

TEST_F(SafetensorsCheckpointTest, InvalidShardIsReportedWithItsPath) {
  WriteFile(dir_.File(kShard2), MakeFile("{}", "junk"));
  WriteIndex(Index(GoodMap()));
  const absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
      SafetensorsCheckpoint::Open(dir_.path());
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ckpt.status().message()),
              StartsWith(dir_.File(kShard2) + ": trailing bytes"));
}

}  // namespace
}  // namespace ls
