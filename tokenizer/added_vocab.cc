#include "tokenizer/added_vocab.h"

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "tokenizer/json_util.h"
#include "tokenizer/utf8.h"

namespace ls::tok {
namespace {

// Rust regex `\w$` on text[..end]: the character before `end` is a word character.
bool EndsWithWord(absl::string_view text, size_t end) {
  if (end == 0) return false;
  size_t i = PrevCharStart(text, end);
  return IsWordChar(DecodeUtf8(text, &i));
}

// Rust regex `^\w` on text[begin..].
bool StartsWithWord(absl::string_view text, size_t begin) {
  if (begin >= text.size()) return false;
  return IsWordChar(DecodeUtf8(text, &begin));
}

struct TokenKey {
  AddedToken token;
  template <typename H>
  friend H AbslHashValue(H h, const TokenKey& k) {
    return H::combine(std::move(h), k.token.content, k.token.single_word, k.token.lstrip,
                      k.token.rstrip, k.token.normalized, k.token.special);
  }
  bool operator==(const TokenKey& o) const { return token == o.token; }
};

}  // namespace

void AddedVocabulary::Trie::Insert(absl::string_view pattern, int32_t id) {
  int32_t node = 0;
  for (char c : pattern) {
    const uint64_t key = static_cast<uint64_t>(node) << 8 | static_cast<uint8_t>(c);
    auto it = children_.find(key);
    if (it == children_.end()) {
      const int32_t child = static_cast<int32_t>(terminal_.size());
      terminal_.push_back(-1);
      it = children_.emplace(key, child).first;
    }
    node = it->second;
  }
  // With duplicate patterns the first one inserted wins, like the first pattern of an
  // Aho-Corasick automaton.
  if (terminal_[node] < 0) terminal_[node] = id;
  first_byte_[static_cast<uint8_t>(pattern[0])] = true;
}

size_t AddedVocabulary::Trie::LongestAt(absl::string_view text, size_t pos, int32_t* id) const {
  int32_t node = 0;
  size_t best = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    auto it = children_.find(static_cast<uint64_t>(node) << 8 | static_cast<uint8_t>(text[i]));
    if (it == children_.end()) break;
    node = it->second;
    if (terminal_[node] >= 0) {
      best = i + 1 - pos;
      *id = terminal_[node];
    }
  }
  return best;
}

absl::StatusOr<std::unique_ptr<AddedVocabulary>> AddedVocabulary::Create(
    const Json& added_tokens, const BpeModel& model, const Normalizer* normalizer) {
  std::unique_ptr<AddedVocabulary> vocab(new AddedVocabulary());
  if (added_tokens.is_null()) return vocab;
  if (!added_tokens.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer.json: added_tokens must be an array, found ", JsonTypeName(added_tokens)));
  }
  std::vector<AddedToken> tokens;
  for (size_t i = 0; i < added_tokens.size(); ++i) {
    const Json& j = added_tokens[i];
    const std::string what = absl::StrCat("added_tokens[", i, "]");
    if (!j.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: ", what, " must be an object, found ", JsonTypeName(j)));
    }
    LS_RETURN_IF_ERROR(CheckKeys(
        j, what, {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"}));
    AddedToken t;
    LS_ASSIGN_OR_RETURN(t.content, GetString(j, "content", what));
    LS_ASSIGN_OR_RETURN(t.single_word, GetBool(j, "single_word", what, false));
    LS_ASSIGN_OR_RETURN(t.lstrip, GetBool(j, "lstrip", what, false));
    LS_ASSIGN_OR_RETURN(t.rstrip, GetBool(j, "rstrip", what, false));
    LS_ASSIGN_OR_RETURN(t.normalized, GetBool(j, "normalized", what, true));
    LS_ASSIGN_OR_RETURN(t.special, GetBool(j, "special", what, false));
    tokens.push_back(std::move(t));
  }

  // HF AddedVocabulary::add_tokens, on the whole list in file order.
  std::vector<AddedToken> special_tokens;  // in order
  std::vector<AddedToken> plain_tokens;    // non-special, in order
  for (const AddedToken& t : tokens) {
    if (t.special && !t.content.empty() && vocab->special_set_.insert(t.content).second) {
      special_tokens.push_back(t);
    }
  }
  absl::flat_hash_set<TokenKey> seen;
  const int64_t model_size = static_cast<int64_t>(model.vocab_size());
  int64_t max_added = -1;
  for (const AddedToken& t : tokens) {
    if (t.content.empty() || seen.contains(TokenKey{t})) continue;
    int64_t id;
    auto existing = vocab->content_to_id_.find(t.content);
    if (existing != vocab->content_to_id_.end()) {
      id = existing->second;
    } else if (auto model_id = model.TokenToId(t.content)) {
      id = *model_id;
    } else if (max_added < 0) {
      id = model_size;
    } else {
      id = (max_added >= model_size || model_size == 0) ? max_added + 1 : model_size;
    }
    if (id > INT32_MAX - 1) {
      return absl::InvalidArgumentError("tokenizer.json: added_tokens ids overflow 2^31");
    }
    vocab->content_to_id_[t.content] = static_cast<int32_t>(id);
    auto prev = vocab->id_to_token_.find(static_cast<int32_t>(id));
    if (prev != vocab->id_to_token_.end()) seen.erase(TokenKey{prev->second});
    vocab->id_to_token_[static_cast<int32_t>(id)] = t;
    seen.insert(TokenKey{t});
    max_added = std::max(max_added, id);
    if (!vocab->special_set_.contains(t.content)) plain_tokens.push_back(t);
  }

  // The two matchers: special tokens first, then the others, split on `normalized`.
  AlignedString content, tmp;
  auto add_to_trie = [&](const AddedToken& t) -> absl::Status {
    const int32_t id = *vocab->TokenToId(t.content);
    if (!t.normalized) {
      vocab->raw_trie_.Insert(t.content, id);
      return absl::OkStatus();
    }
    content.clear();
    content.AppendBytes(t.content, Span{0, 0});
    if (normalizer != nullptr) LS_RETURN_IF_ERROR(normalizer->Normalize(&content, &tmp));
    if (!content.text.empty()) vocab->normalized_trie_.Insert(content.text, id);
    return absl::OkStatus();
  };
  for (const AddedToken& t : special_tokens) LS_RETURN_IF_ERROR(add_to_trie(t));
  for (const AddedToken& t : plain_tokens) LS_RETURN_IF_ERROR(add_to_trie(t));
  return vocab;
}

std::optional<int32_t> AddedVocabulary::TokenToId(absl::string_view content) const {
  auto it = content_to_id_.find(content);
  if (it == content_to_id_.end()) return std::nullopt;
  return it->second;
}

void AddedVocabulary::FindMatches(absl::string_view text, bool normalized_set, bool skip_special,
                                  std::vector<AddedMatch>* out) const {
  const Trie& trie = normalized_set ? normalized_trie_ : raw_trie_;
  if (trie.empty()) return;
  size_t start_offset = 0;  // end of the previous accepted match (HF start_offset)
  size_t pos = 0;           // where the automaton resumes: end of the previous raw match
  while (pos < text.size()) {
    if (!trie.MayStart(static_cast<uint8_t>(text[pos]))) {
      ++pos;
      continue;
    }
    int32_t id = -1;
    const size_t len = trie.LongestAt(text, pos, &id);
    if (len == 0) {
      ++pos;
      continue;
    }
    size_t start = pos;
    size_t stop = pos + len;
    pos = stop;
    const AddedToken& token = id_to_token_.at(id);
    if (skip_special && special_set_.contains(token.content)) continue;
    if (token.single_word) {
      const bool start_space = start == 0 || !EndsWithWord(text, start);
      const bool stop_space = stop == text.size() || !StartsWithWord(text, stop);
      if (!start_space || !stop_space) continue;
    }
    if (token.lstrip) {
      size_t new_start = start;
      while (new_start > 0) {
        size_t prev = PrevCharStart(text, new_start);
        size_t k = prev;
        if (!IsWhiteSpace(DecodeUtf8(text, &k))) break;
        new_start = prev;
      }
      start = std::max(new_start, start_offset);
    }
    if (token.rstrip) {
      while (stop < text.size()) {
        size_t k = stop;
        if (!IsWhiteSpace(DecodeUtf8(text, &k))) break;
        stop = k;
      }
    }
    // HF would emit overlapping splits if an rstrip ran into the next match; keep them apart.
    start = std::max(start, start_offset);
    if (start >= stop) continue;
    out->push_back({static_cast<uint32_t>(start), static_cast<uint32_t>(stop), id});
    start_offset = stop;
  }
}

}  // namespace ls::tok
