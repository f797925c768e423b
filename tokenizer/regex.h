// The regular expressions of tokenizer.json (Split pre-tokenizer, Replace normalizer, the
// GPT-2 pattern of ByteLevel), run through PCRE2 in UTF + UCP mode so that \p{L}, \s, \w and
// (?i:...) have their Unicode meaning, as in Oniguruma, which Hugging Face `tokenizers` uses.
// Patterns are JIT-compiled when PCRE2 has a JIT; match and depth limits keep a pathological
// pattern from hanging a request (it fails with RESOURCE_EXHAUSTED instead).
#ifndef LORASERVE_TOKENIZER_REGEX_H_
#define LORASERVE_TOKENIZER_REGEX_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/json.h"

namespace ls::tok {

// A [start, end) byte range of a match.
using MatchRange = std::pair<uint32_t, uint32_t>;

// Immutable after Compile; FindAll may be called from any number of threads (match data and
// the JIT stack are per thread).
class Regex {
 public:
  // `what` names the pattern's place in error messages ("pre_tokenizer Split pattern").
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(absl::string_view pattern,
                                                        absl::string_view what);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends every match in `subject` (valid UTF-8) to `matches`, with the iteration rules of the
  // `onig` crate's find_iter: the search resumes at the end of the previous match, and an empty
  // match right where the previous match ended is skipped by advancing one character.
  absl::Status FindAll(absl::string_view subject, std::vector<MatchRange>* matches) const;

  const std::string& pattern() const { return pattern_; }

 private:
  Regex() = default;
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
};

// A Split / Replace "pattern": {"String": literal} or {"Regex": pattern}. Thread-safe.
class Pattern {
 public:
  // `what` names the owner in error messages ("pre_tokenizer Split").
  static absl::StatusOr<Pattern> FromJson(const Json& json, absl::string_view what);

  // Appends the non-overlapping matches in `subject`, leftmost first.
  absl::Status FindAll(absl::string_view subject, std::vector<MatchRange>* matches) const;

  // The literal, or null for a regex.
  const std::string* literal() const { return regex_ == nullptr ? &literal_ : nullptr; }

 private:
  std::string literal_;
  std::shared_ptr<const Regex> regex_;  // shared: Pattern is copyable
};

}  // namespace ls::tok

#endif  // LORASERVE_TOKENIZER_REGEX_H_
