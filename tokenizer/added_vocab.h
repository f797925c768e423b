// The "added_tokens" of tokenizer.json, matched the way Hugging Face `tokenizers`'
// AddedVocabulary does it: ids assigned as HF assigns them on load (a content already in the
// model vocabulary keeps the model id; the others count up from the model size, whatever the
// "id" field says), two leftmost-longest matchers (tokens with normalized=false run on the raw
// text, normalized=true ones on each normalized piece), and lstrip / rstrip / single_word.
#ifndef LORASERVE_TOKENIZER_ADDED_VOCAB_H_
#define LORASERVE_TOKENIZER_ADDED_VOCAB_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/json.h"
#include "tokenizer/bpe.h"
#include "tokenizer/normalizer.h"

namespace ls::tok {

struct AddedToken {
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  bool special = false;
  bool operator==(const AddedToken& o) const {
    return content == o.content && single_word == o.single_word && lstrip == o.lstrip &&
           rstrip == o.rstrip && normalized == o.normalized && special == o.special;
  }
};

// One added token found in a text: [start, end) bytes (whitespace absorbed by lstrip/rstrip
// included) and its id.
struct AddedMatch {
  uint32_t start;
  uint32_t end;
  int32_t id;
};

// Immutable after Create; thread-safe.
class AddedVocabulary {
 public:
  // `normalizer` may be null. It normalizes the content of normalized=true tokens.
  static absl::StatusOr<std::unique_ptr<AddedVocabulary>> Create(const Json& added_tokens,
                                                                 const BpeModel& model,
                                                                 const Normalizer* normalizer);

  bool empty() const { return id_to_token_.empty(); }
  bool has_normalized_tokens() const { return !normalized_trie_.empty(); }

  // Matches in `text` (a whole input for the raw set, one normalized piece for the normalized
  // set). With `skip_special`, special tokens are matched but then dropped (HF
  // encode_special_tokens): a special match still hides overlapping non-special ones.
  void FindMatches(absl::string_view text, bool normalized_set, bool skip_special,
                   std::vector<AddedMatch>* out) const;

  // id -> token for added ids (content), and content -> id.
  const absl::flat_hash_map<int32_t, AddedToken>& by_id() const { return id_to_token_; }
  std::optional<int32_t> TokenToId(absl::string_view content) const;
  bool IsSpecialContent(absl::string_view content) const { return special_set_.contains(content); }

 private:
  // A byte trie for leftmost-longest matching.
  class Trie {
   public:
    void Insert(absl::string_view pattern, int32_t id);
    bool empty() const { return terminal_.size() <= 1; }
    // Longest pattern starting at text[pos]: its length (0: none) and id.
    size_t LongestAt(absl::string_view text, size_t pos, int32_t* id) const;
    bool MayStart(uint8_t b) const { return first_byte_[b]; }

   private:
    absl::flat_hash_map<uint64_t, int32_t> children_;  // (node << 8 | byte) -> node
    std::vector<int32_t> terminal_{-1};                // node -> id, -1 if none
    bool first_byte_[256] = {};
  };

  AddedVocabulary() = default;

  absl::flat_hash_map<int32_t, AddedToken> id_to_token_;
  absl::flat_hash_map<std::string, int32_t> content_to_id_;
  absl::flat_hash_set<std::string> special_set_;  // contents of special tokens
  Trie raw_trie_;
  Trie normalized_trie_;
};

}  // namespace ls::tok

#endif  // LORASERVE_TOKENIZER_ADDED_VOCAB_H_
