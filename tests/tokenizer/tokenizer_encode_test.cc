// Encode half of ls::Tokenizer against Hugging Face `tokenizers` 0.22.2: every case of every
// fixture under tests/golden/tokenizers/ (all four parse_special x add_special_tokens modes,
// tokens, offsets, special_tokens_mask, normalizer and pre-tokenizer output), plus load errors,
// invalid input, very long words and concurrent use.
#include <dirent.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/json.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenizer/tokenizer.h"

namespace ls {
namespace {

using ::testing::HasSubstr;

std::string SourceDir() {
  const char* dir = std::getenv("LS_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

std::string FixtureRoot() { return SourceDir() + "/tests/golden/tokenizers"; }

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool FileExists(const std::string& path) { return std::ifstream(path).good(); }

// Every fixture directory: a subdirectory holding tokenizer.json and expected.json.
std::vector<std::string> FixtureNames() {
  std::vector<std::string> names;
  DIR* dir = opendir(FixtureRoot().c_str());
  if (dir == nullptr) return names;
  while (dirent* e = readdir(dir)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    const std::string path = FixtureRoot() + "/" + name;
    if (FileExists(path + "/tokenizer.json") && FileExists(path + "/expected.json")) {
      names.push_back(name);
    }
  }
  closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<int32_t> Ids(const Json& j) { return j.get<std::vector<int32_t>>(); }

std::vector<std::pair<uint32_t, uint32_t>> Offsets(const Json& j) {
  std::vector<std::pair<uint32_t, uint32_t>> out;
  for (const Json& o : j) out.emplace_back(o[0].get<uint32_t>(), o[1].get<uint32_t>());
  return out;
}

std::string Printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s.substr(0, 60)) {
    if (c < 0x20 || c == 0x7F) {
      out += absl::StrCat("\\x", absl::Hex(c, absl::kZeroPad2));
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  return s.size() > 60 ? out + "..." : out;
}

EncodeOptions Mode(bool parse_special, bool add_special_tokens) {
  EncodeOptions o;
  o.parse_special = parse_special;
  o.add_special_tokens = add_special_tokens;
  return o;
}

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST(GoldenFixtures, AllFiveAreFound) {
  const std::vector<std::string> names = FixtureNames();
  for (const char* expected : {"bytelevel_gpt2", "bytelevel_llama3", "qwen2_style",
                               "sentencepiece_bpe", "sentencepiece_bpe_metaspace"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), expected), names.end()) << expected;
  }
}

// EXPECT_EQ that also records the case as failed.
#define CASE_EQ(a, b)    \
  do {                   \
    if (!((a) == (b))) { \
      EXPECT_EQ(a, b);   \
      case_ok = false;   \
    }                    \
  } while (false)

TEST_P(GoldenTest, EveryCaseMatchesHuggingFace) {
  const std::string dir = FixtureRoot() + "/" + GetParam();
  auto tokenizer = Tokenizer::LoadFromDir(dir);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto expected = ParseJsonStrict(ReadFile(dir + "/expected.json"), "expected.json");
  ASSERT_TRUE(expected.ok()) << expected.status();
  const Json& cases = (*expected)["cases"];
  ASSERT_GT(cases.size(), 0u);

  // The same tokenizer with ignore_merges off, for the cases that record its ids.
  std::unique_ptr<Tokenizer> no_ignore;
  {
    Json j = Json::parse(ReadFile(dir + "/tokenizer.json"));
    if (j["model"].value("ignore_merges", false)) {
      j["model"]["ignore_merges"] = false;
      auto t = Tokenizer::FromJson(j.dump());
      ASSERT_TRUE(t.ok()) << t.status();
      no_ignore = std::move(t).value();
    }
  }

  size_t passed = 0;
  for (const Json& c : cases) {
    const std::string text = c["text"].get<std::string>();
    SCOPED_TRACE(absl::StrCat(GetParam(), " text \"", Printable(text), "\""));
    bool case_ok = true;
    const Tokenizer& t = **tokenizer;

    auto full = t.Encode(text, Mode(true, true));
    ASSERT_TRUE(full.ok()) << full.status();
    CASE_EQ(full->ids, Ids(c["ids"]));
    CASE_EQ(full->tokens, c["tokens"].get<std::vector<std::string>>());
    CASE_EQ(full->offsets, Offsets(c["offsets"]));
    CASE_EQ(full->special_tokens_mask, c["special_tokens_mask"].get<std::vector<uint8_t>>());

    auto ids = t.EncodeIds(text, Mode(true, true));
    ASSERT_TRUE(ids.ok()) << ids.status();
    CASE_EQ(*ids, Ids(c["ids"]));
    auto no_special = t.EncodeIds(text, Mode(true, false));
    ASSERT_TRUE(no_special.ok()) << no_special.status();
    CASE_EQ(*no_special, Ids(c["ids_no_special"]));

    auto split = t.Encode(text, Mode(false, true));
    ASSERT_TRUE(split.ok()) << split.status();
    CASE_EQ(split->ids, Ids(c["ids_split_special"]));
    // tokens/offsets_split_special are recorded only where they differ from tokens/offsets.
    CASE_EQ(split->tokens,
            c.value("tokens_split_special", c["tokens"]).get<std::vector<std::string>>());
    CASE_EQ(split->offsets, Offsets(c.value("offsets_split_special", c["offsets"])));
    auto split_no_special = t.EncodeIds(text, Mode(false, false));
    ASSERT_TRUE(split_no_special.ok()) << split_no_special.status();
    CASE_EQ(*split_no_special, Ids(c["ids_split_special_no_special"]));
    // The default options are "user text": special tokens not parsed, BOS added.
    auto defaults = t.EncodeIds(text);
    ASSERT_TRUE(defaults.ok());
    CASE_EQ(*defaults, Ids(c["ids_split_special"]));

    if (c.contains("normalized")) {
      auto normalized = t.Normalize(text);
      ASSERT_TRUE(normalized.ok()) << normalized.status();
      CASE_EQ(*normalized, c["normalized"].get<std::string>());
    }
    if (c.contains("pre_tokens")) {
      auto normalized = t.Normalize(text);
      ASSERT_TRUE(normalized.ok()) << normalized.status();
      auto pre = t.PreTokenize(*normalized);
      ASSERT_TRUE(pre.ok()) << pre.status();
      CASE_EQ(*pre, c["pre_tokens"].get<std::vector<std::string>>());
    }
    if (c.contains("ids_if_ignore_merges_false")) {
      ASSERT_NE(no_ignore, nullptr);
      auto alt = no_ignore->EncodeIds(text, Mode(true, true));
      ASSERT_TRUE(alt.ok()) << alt.status();
      CASE_EQ(*alt, Ids(c["ids_if_ignore_merges_false"]));
    }
    if (case_ok) ++passed;
  }
  std::printf("[ fixture  ] %s: %zu/%zu cases match\n", GetParam().c_str(), passed, cases.size());
  EXPECT_EQ(passed, cases.size());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenTest, ::testing::ValuesIn(FixtureNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// ---- Load errors ---------------------------------------------------------------------------

Json FixtureJson(const std::string& name) {
  return Json::parse(ReadFile(FixtureRoot() + "/" + name + "/tokenizer.json"));
}

void ExpectLoadError(const Json& json, const std::string& needle) {
  auto t = Tokenizer::FromJson(json.dump());
  ASSERT_FALSE(t.ok()) << "expected an error containing: " << needle;
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
  EXPECT_THAT(std::string(t.status().message()), HasSubstr(needle));
}

TEST(LoadErrors, UnknownNormalizer) {
  Json j = FixtureJson("qwen2_style");
  j["normalizer"] = {{"type", "BertNormalizer"}};
  ExpectLoadError(j, "tokenizer.json: normalizer type \"BertNormalizer\" is not supported");
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "Lowercase"}}}}};
  ExpectLoadError(j, "normalizer type \"Lowercase\" is not supported");
}

TEST(LoadErrors, UnknownPreTokenizer) {
  Json j = FixtureJson("bytelevel_gpt2");
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  ExpectLoadError(j, "tokenizer.json: pre_tokenizer type \"Whitespace\" is not supported");
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}}}};
  ExpectLoadError(j, "pre_tokenizer type \"Digits\" is not supported");
}

TEST(LoadErrors, UnknownOptionsAndValues) {
  Json j = FixtureJson("bytelevel_llama3");
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Sideways";
  ExpectLoadError(j, "Split behavior \"Sideways\" is not supported");
  j = FixtureJson("bytelevel_llama3");
  j["pre_tokenizer"]["pretokenizers"][0]["lookahead"] = true;
  ExpectLoadError(j, "pre_tokenizer Split option \"lookahead\" is not supported");
  j = FixtureJson("bytelevel_llama3");
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "(unclosed"}};
  ExpectLoadError(j, "does not compile");
  j = FixtureJson("sentencepiece_bpe_metaspace");
  j["pre_tokenizer"]["prepend_scheme"] = "sometimes";
  ExpectLoadError(j, "Metaspace prepend_scheme \"sometimes\" is not supported");
  // ByteLevel maps bytes inside the model, so nothing may follow it.
  j = FixtureJson("bytelevel_llama3");
  std::swap(j["pre_tokenizer"]["pretokenizers"][0], j["pre_tokenizer"]["pretokenizers"][1]);
  ExpectLoadError(j, "pre_tokenizer Split after ByteLevel is not supported");
}

TEST(LoadErrors, UnknownModel) {
  Json j = FixtureJson("bytelevel_gpt2");
  j["model"]["type"] = "WordPiece";
  ExpectLoadError(j, "tokenizer.json: model type \"WordPiece\" is not supported");
  j["model"]["type"] = "Unigram";
  ExpectLoadError(j, "model type \"Unigram\" is not supported");
}

TEST(LoadErrors, UnknownPostProcessor) {
  Json j = FixtureJson("bytelevel_gpt2");
  j["post_processor"] = {{"type", "BertProcessing"}, {"sep", {"</s>", 2}}, {"cls", {"<s>", 0}}};
  ExpectLoadError(j, "tokenizer.json: post_processor type \"BertProcessing\" is not supported");
  j["post_processor"] = {{"type", "RobertaProcessing"}};
  ExpectLoadError(j, "post_processor type \"RobertaProcessing\" is not supported");
  j = FixtureJson("sentencepiece_bpe");
  j["post_processor"]["single"][0]["SpecialToken"]["id"] = "<bos>";
  ExpectLoadError(j, "uses special token \"<bos>\" missing from special_tokens");
}

TEST(LoadErrors, DropoutIsRejected) {
  Json j = FixtureJson("sentencepiece_bpe");
  j["model"]["dropout"] = 0.1;
  ExpectLoadError(j, "model BPE dropout 0.1 is not supported");
  // 0 means no dropout to HF as well.
  j["model"]["dropout"] = 0.0;
  EXPECT_TRUE(Tokenizer::FromJson(j.dump()).ok());
}

TEST(LoadErrors, BadMerges) {
  Json j = FixtureJson("bytelevel_gpt2");
  j["model"]["merges"].push_back("a b c");
  ExpectLoadError(j, "\"a b c\" must be two tokens separated by one space");
  j = FixtureJson("bytelevel_llama3");
  j["model"]["merges"].push_back({"zz", "q"});
  ExpectLoadError(j, "token \"zz\" is not in the vocabulary");
  j = FixtureJson("bytelevel_llama3");
  j["model"]["merges"].push_back(7);
  ExpectLoadError(j, "merges[744] must be a \"a b\" string or a [\"a\", \"b\"] pair");
  j = FixtureJson("bytelevel_llama3");
  j["model"]["merges"] = "a b";
  ExpectLoadError(j, "model BPE needs a \"merges\" array");
}

TEST(LoadErrors, MalformedJson) {
  auto t = Tokenizer::FromJson("{\"model\": ");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("tokenizer.json"));
  ExpectLoadError(Json::array(), "tokenizer.json: must be an object");
  Json j = FixtureJson("bytelevel_gpt2");
  j.erase("model");
  ExpectLoadError(j, "\"model\" is missing");
  j = FixtureJson("bytelevel_gpt2");
  j["model"]["vocab"]["Ġthe"] = "x";
  ExpectLoadError(j, "model vocab entry \"Ġthe\" must map to an id");
  j = FixtureJson("bytelevel_gpt2");
  j["model"]["vocab"]["zzz"] = 2000000000;
  ExpectLoadError(j, "model vocab id 2000000000 is too large");
  // Sparse ids index dense tables: far beyond the entry count is refused, not allocated.
  j = FixtureJson("bytelevel_gpt2");
  j["model"]["vocab"]["zzz"] = 1 << 21;
  ExpectLoadError(j, "model vocab id 2097152 is too large");
}

TEST(LoadErrors, LoadFromDirNamesTheDirectory) {
  auto t = Tokenizer::LoadFromDir(FixtureRoot() + "/does_not_exist");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("does_not_exist/tokenizer.json"));
}

// ---- Input validation and limits -----------------------------------------------------------

std::unique_ptr<Tokenizer> Load(const std::string& name) {
  auto t = Tokenizer::LoadFromDir(FixtureRoot() + "/" + name);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(t).value() : nullptr;
}

TEST(EncodeInput, InvalidUtf8IsInvalidArgument) {
  auto t = Load("qwen2_style");
  ASSERT_NE(t, nullptr);
  for (const std::string& bad :
       {std::string("\x80"), std::string("ab\xC3"), std::string("\xC0\xAF"),
        std::string("\xED\xA0\x80"), std::string("\xF4\x90\x80\x80"), std::string("x\xFFy"),
        std::string("\xE6\x97")}) {
    auto e = t->Encode(bad);
    ASSERT_FALSE(e.ok()) << Printable(bad);
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(e.status().message()), HasSubstr("not valid UTF-8"));
    EXPECT_FALSE(t->EncodeIds(bad).ok());
  }
  // Valid edge cases: NUL, U+10FFFF.
  EXPECT_TRUE(t->Encode(std::string("a\0b", 3)).ok());
  EXPECT_TRUE(t->Encode("\xF4\x8F\xBF\xBF").ok());
}

TEST(EncodeInput, OversizedInputIsInvalidArgument) {
  auto t = Load("bytelevel_gpt2");
  ASSERT_NE(t, nullptr);
  const std::string huge((size_t{64} << 20) + 1, 'a');
  auto e = t->EncodeIds(huge);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(e.status().message()), HasSubstr("longer than the limit"));
}

void ExpectCoversWord(const Encoding& e, size_t size) {
  ASSERT_FALSE(e.ids.empty());
  uint32_t pos = 0;
  for (const auto& [start, end] : e.offsets) {
    if (start == 0 && end == 0) continue;  // BOS
    EXPECT_GE(start, pos);
    EXPECT_GT(end, start);
    pos = end;
  }
  EXPECT_EQ(pos, size);
}

TEST(EncodeInput, HundredThousandCharacterWordFinishes) {
  const std::string word(100000, 'a');
  for (const char* name :
       {"sentencepiece_bpe", "sentencepiece_bpe_metaspace", "bytelevel_gpt2", "qwen2_style"}) {
    SCOPED_TRACE(name);
    auto t = Load(name);
    ASSERT_NE(t, nullptr);
    auto e = t->Encode(word);
    ASSERT_TRUE(e.ok()) << e.status();
    ExpectCoversWord(*e, word.size());
  }
  // A long word of varied letters (no cache help, many distinct merges).
  std::string mixed;
  uint32_t x = 12345;
  while (mixed.size() < 100000) {
    x = x * 1103515245 + 12345;
    mixed.push_back(static_cast<char>('a' + (x >> 16) % 26));
  }
  auto t = Load("sentencepiece_bpe");
  ASSERT_NE(t, nullptr);
  auto e = t->Encode(mixed);
  ASSERT_TRUE(e.ok()) << e.status();
  ExpectCoversWord(*e, mixed.size());
  // Long whitespace runs go through the lookahead pattern \s+(?!\S).
  auto llama = Load("bytelevel_llama3");
  ASSERT_NE(llama, nullptr);
  auto spaces = llama->Encode(std::string(100000, ' ') + "x" + std::string(50000, '\n'));
  ASSERT_TRUE(spaces.ok()) << spaces.status();
}

// ---- Configs -------------------------------------------------------------------------------

TEST(Configs, BosEosFromConfigFiles) {
  const std::string json = ReadFile(FixtureRoot() + "/sentencepiece_bpe/tokenizer.json");
  auto plain = Tokenizer::FromJson(json);
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE((*plain)->bos_token_id().has_value());
  EXPECT_TRUE((*plain)->eos_token_ids().empty());

  const std::string config = ReadFile(FixtureRoot() + "/sentencepiece_bpe/tokenizer_config.json");
  auto with_config = Tokenizer::FromJson(json, config);
  ASSERT_TRUE(with_config.ok()) << with_config.status();
  EXPECT_EQ((*with_config)->bos_token_id(), 1);
  EXPECT_EQ((*with_config)->eos_token_ids(), std::vector<int32_t>({2}));

  // generation_config.json wins for EOS; an int or a list.
  auto with_gen = Tokenizer::FromJson(json, config, R"({"eos_token_id": [2, 0]})");
  ASSERT_TRUE(with_gen.ok()) << with_gen.status();
  EXPECT_EQ((*with_gen)->eos_token_ids(), std::vector<int32_t>({2, 0}));
  auto with_int = Tokenizer::FromJson(json, "", R"({"eos_token_id": 2, "bos_token_id": 1})");
  ASSERT_TRUE(with_int.ok());
  EXPECT_EQ((*with_int)->eos_token_ids(), std::vector<int32_t>({2}));
  EXPECT_EQ((*with_int)->bos_token_id(), 1);

  // The object form of tokenizer_config tokens.
  auto object = Tokenizer::FromJson(
      json, R"({"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": null})");
  ASSERT_TRUE(object.ok()) << object.status();
  EXPECT_EQ((*object)->bos_token_id(), 1);

  auto unknown = Tokenizer::FromJson(json, R"({"eos_token": "<|nope|>"})");
  ASSERT_FALSE(unknown.ok());
  EXPECT_THAT(std::string(unknown.status().message()),
              HasSubstr("tokenizer_config.json: eos_token \"<|nope|>\" is not in the vocabulary"));
  auto bad = Tokenizer::FromJson(json, "", R"({"eos_token_id": "two"})");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("generation_config.json"));

  auto dir = Tokenizer::LoadFromDir(FixtureRoot() + "/bytelevel_llama3");
  ASSERT_TRUE(dir.ok());
  EXPECT_EQ((*dir)->bos_token_id(), 1003);
  EXPECT_EQ((*dir)->eos_token_ids(), std::vector<int32_t>({1004}));
  EXPECT_EQ((*dir)->TokenToId("<|eot_id|>"), 1008);
  EXPECT_EQ((*dir)->vocab_size(), 1009);
  EXPECT_TRUE((*dir)->detokenizer().IsSpecial(1008));
  EXPECT_FALSE((*dir)->detokenizer().IsSpecial(5));
}

// ---- Added-token options (expected values from tokenizers 0.22.2) --------------------------

Json AddedToken(int id, const std::string& content, bool special, bool lstrip, bool rstrip,
                bool single_word, bool normalized) {
  return {{"id", id},          {"content", content}, {"single_word", single_word},
          {"lstrip", lstrip},  {"rstrip", rstrip},   {"normalized", normalized},
          {"special", special}};
}

TEST(AddedTokens, IdsFollowHuggingFaceAssignment) {
  // HF ignores the "id" field: contents already in the model keep the model id, the others
  // count up from the model size in file order.
  Json j = FixtureJson("qwen2_style");
  j["added_tokens"][3]["id"] = 5000;
  j["added_tokens"][4]["id"] = 4000;
  j["added_tokens"].push_back(AddedToken(7, "in", true, false, false, false, false));
  auto t = Tokenizer::FromJson(j.dump());
  ASSERT_TRUE(t.ok()) << t.status();
  auto ids = (*t)->EncodeIds("<think>x</think>", Mode(true, false));
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, std::vector<int32_t>({1003, 87, 1004}));
  EXPECT_EQ((*t)->TokenToId("in"), 256);
}

TEST(AddedTokens, SingleWordRstripAndNormalized) {
  Json j = FixtureJson("sentencepiece_bpe");
  j["added_tokens"].push_back(AddedToken(1256, "wor", false, false, false, true, false));
  j["added_tokens"].push_back(AddedToken(1257, "<R>", true, false, true, false, false));
  j["added_tokens"].push_back(AddedToken(1258, "xyz", false, false, false, false, true));
  auto t = Tokenizer::FromJson(j.dump());
  ASSERT_TRUE(t.ok()) << t.status();
  auto e = (*t)->Encode("wor world <R>  a xyz", Mode(true, false));
  ASSERT_TRUE(e.ok()) << e.status();
  // Values printed by tokenizers 0.22.2 for the same JSON.
  EXPECT_EQ(e->ids, std::vector<int32_t>({1256, 367, 642, 367, 1257, 380, 1258}));
  EXPECT_EQ(e->tokens,
            std::vector<std::string>({"wor", "▁", "▁world", "▁", "<R>  ", "▁a", "▁xyz"}));
  EXPECT_EQ(e->offsets, (std::vector<std::pair<uint32_t, uint32_t>>(
                            {{0, 3}, {3, 4}, {3, 9}, {9, 10}, {10, 15}, {15, 16}, {16, 20}})));
}

// ---- Concurrency ---------------------------------------------------------------------------

TEST(Concurrency, FourThreadsAgreeWithOne) {
  std::vector<std::unique_ptr<Tokenizer>> tokenizers;
  std::vector<std::vector<std::string>> texts;
  for (const std::string& name : FixtureNames()) {
    tokenizers.push_back(Load(name));
    ASSERT_NE(tokenizers.back(), nullptr);
    auto expected = ParseJsonStrict(ReadFile(FixtureRoot() + "/" + name + "/expected.json"), "e");
    ASSERT_TRUE(expected.ok());
    texts.emplace_back();
    for (const Json& c : (*expected)["cases"]) texts.back().push_back(c["text"].get<std::string>());
  }
  // Reference results, single-threaded.
  std::vector<std::vector<Encoding>> reference(tokenizers.size());
  for (size_t k = 0; k < tokenizers.size(); ++k) {
    for (const std::string& text : texts[k]) {
      auto e = tokenizers[k]->Encode(text, Mode(true, true));
      ASSERT_TRUE(e.ok());
      reference[k].push_back(*std::move(e));
    }
  }
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int thread = 0; thread < 4; ++thread) {
    threads.emplace_back([&, thread] {
      for (int round = 0; round < 3; ++round) {
        for (size_t k = 0; k < tokenizers.size(); ++k) {
          // Each thread walks the texts in a different order so caches fill concurrently.
          const size_t n = texts[k].size();
          for (size_t i = 0; i < n; ++i) {
            const size_t idx = (i * (2 * thread + 1) + round) % n;
            auto e = tokenizers[k]->Encode(texts[k][idx], Mode(true, true));
            if (!e.ok() || e->ids != reference[k][idx].ids ||
                e->offsets != reference[k][idx].offsets || e->tokens != reference[k][idx].tokens) {
              mismatches.fetch_add(1);
            }
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

}  // namespace
}  // namespace ls
