// Test helpers for the decode half: find the golden tokenizer fixtures and build a DecodeVocab
// straight from a tokenizer.json (model vocabulary + added tokens), without the encode half.
#ifndef LORASERVE_TESTS_TOKENIZER_DECODE_TEST_UTIL_H_
#define LORASERVE_TESTS_TOKENIZER_DECODE_TEST_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/json.h"
#include "common/status.h"
#include "tokenizer/detokenizer.h"

namespace ls::testing {

// The repository root: $LS_SOURCE_DIR (set by ctest), else the path baked in at build time.
inline std::string SourceDir() {
  const char* env = std::getenv("LS_SOURCE_DIR");
  if (env != nullptr && *env != '\0') return env;
#ifdef LS_TEST_SOURCE_DIR
  return LS_TEST_SOURCE_DIR;
#else
  return ".";
#endif
}

// Every tests/golden/tokenizers/<name>/ holding a tokenizer.json and an expected.json, sorted.
inline std::vector<std::string> GoldenTokenizerDirs() {
  namespace fs = std::filesystem;
  std::vector<std::string> dirs;
  const fs::path root = fs::path(SourceDir()) / "tests" / "golden" / "tokenizers";
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator(root, ec)) {
    if (entry.is_directory() && fs::exists(entry.path() / "tokenizer.json") &&
        fs::exists(entry.path() / "expected.json")) {
      dirs.push_back(entry.path().string());
    }
  }
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

inline absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

inline absl::StatusOr<Json> ReadJson(const std::string& path) {
  LS_ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  // expected.json files hold long strings (1500 x "a") but nest shallowly.
  return ParseJsonStrict(text, path);
}

// model.vocab (an object token -> id, or Unigram's [[token, score], ...]) plus added_tokens,
// which take precedence for their ids, as HF's AddedVocabulary does.
inline absl::StatusOr<DecodeVocab> DecodeVocabFromTokenizerJson(const Json& tokenizer) {
  std::vector<std::pair<int64_t, std::string>> entries;
  const Json& vocab = tokenizer.at("model").at("vocab");
  if (vocab.is_object()) {
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      entries.emplace_back(it.value().get<int64_t>(), it.key());
    }
  } else if (vocab.is_array()) {
    for (size_t i = 0; i < vocab.size(); ++i) {
      entries.emplace_back(static_cast<int64_t>(i), vocab[i].at(0).get<std::string>());
    }
  } else {
    return absl::InvalidArgumentError("model.vocab is neither an object nor an array");
  }
  const size_t num_model = entries.size();
  if (tokenizer.contains("added_tokens")) {
    for (const Json& added : tokenizer.at("added_tokens")) {
      entries.emplace_back(added.at("id").get<int64_t>(), added.at("content").get<std::string>());
    }
  }
  int64_t max_id = -1;
  for (const auto& [id, token] : entries) {
    if (id < 0 || id > (int64_t{1} << 30)) {
      return absl::InvalidArgumentError(absl::StrCat("id ", id, " out of range"));
    }
    max_id = std::max(max_id, id);
  }
  DecodeVocab out;
  const size_t n = static_cast<size_t>(max_id + 1);
  out.id_to_token.assign(n, "");
  out.present.assign(n, false);
  out.special.assign(n, false);
  for (size_t i = 0; i < entries.size(); ++i) {
    const size_t id = static_cast<size_t>(entries[i].first);
    out.id_to_token[id] = entries[i].second;
    out.present[id] = true;
    if (i >= num_model) {
      out.special[id] = tokenizer.at("added_tokens")[i - num_model].value("special", false);
    }
  }
  return out;
}

inline absl::StatusOr<std::unique_ptr<Detokenizer>> DetokenizerFromDir(const std::string& dir) {
  LS_ASSIGN_OR_RETURN(const Json tokenizer, ReadJson(dir + "/tokenizer.json"));
  LS_ASSIGN_OR_RETURN(DecodeVocab vocab, DecodeVocabFromTokenizerJson(tokenizer));
  const Json decoder = tokenizer.contains("decoder") ? tokenizer.at("decoder") : Json();
  return Detokenizer::Create(std::move(vocab), decoder);
}

inline std::string BaseName(const std::string& dir) {
  return std::filesystem::path(dir).filename().string();
}

}  // namespace ls::testing

#endif  // LORASERVE_TESTS_TOKENIZER_DECODE_TEST_UTIL_H_
