// The BPE model of tokenizer.json, as Hugging Face `tokenizers` runs it on one pre-token:
// characters (or, for byte-level tokenizers, bytes) -> vocabulary ids, with byte fallback
// (`<0xNN>`) and unknown-token fusing; then merges, lowest rank first and leftmost among equal
// ranks, with a binary heap over a linked list of symbols (O(n log n), so a 100k-character
// SentencePiece "word" is fast). `ignore_merges` looks the whole pre-token up first.
//
// Byte-level input: when the pre-tokenizer chain ends with ByteLevel, a pre-token is raw bytes
// and each byte stands for the character ByteToUnicode(byte). The model then looks bytes up in
// tables built at load time and looks whole words up in a byte-keyed copy of the vocabulary, so
// the text is never converted to the byte alphabet. Offsets are byte offsets of the input it was
// given in either mode.
//
// Results for pre-tokens shorter than 256 bytes are cached (HF does the same) in a sharded,
// bounded cache; Tokenize is thread-safe.
#ifndef LORASERVE_TOKENIZER_BPE_H_
#define LORASERVE_TOKENIZER_BPE_H_

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/json.h"
#include "common/mutex.h"

namespace ls::tok {

// One output token of the model: an id and its [start, end) bytes within the pre-token.
struct BpeToken {
  int32_t id;
  uint32_t start;
  uint32_t end;
};

class BpeModel {
 public:
  // `json` is the "model" member. `byte_level_input`: see the file comment. Errors name the
  // field: unsupported type, dropout other than null/0, merges that are malformed or name tokens
  // outside the vocabulary, duplicate ids.
  static absl::StatusOr<std::unique_ptr<BpeModel>> Create(const Json& json, bool byte_level_input);
  ~BpeModel();

  // Appends the tokens of one non-empty pre-token. Fails only when the input needs the
  // unk_token and that token is not in the vocabulary (HF fails the same way).
  absl::Status Tokenize(absl::string_view word, std::vector<BpeToken>* out) const;

  std::optional<int32_t> TokenToId(absl::string_view token) const;
  // The token string of `id`; empty when the vocabulary has no such id.
  const std::string& IdToToken(int32_t id) const {
    static const std::string* const kEmpty = new std::string();
    return id >= 0 && static_cast<size_t>(id) < id_to_token_.size() ? id_to_token_[id] : *kEmpty;
  }
  bool HasId(int32_t id) const {
    return id >= 0 && static_cast<size_t>(id) < present_.size() && present_[id];
  }
  // Number of entries (HF get_vocab_size), not max id + 1.
  size_t vocab_size() const { return vocab_.size(); }
  // Indexed by id (max id + 1 entries); holes are "" / false.
  const std::vector<std::string>& id_to_token() const { return id_to_token_; }
  const std::vector<bool>& present() const { return present_; }

 private:
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    uint32_t len;
  };
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  using CachedTokens = absl::InlinedVector<std::pair<int32_t, uint32_t>, 6>;  // id, byte length
  struct CacheShard {
    Mutex mu;
    absl::flat_hash_map<std::string, CachedTokens> map ABSL_GUARDED_BY(mu);
  };
  static constexpr size_t kCacheShards = 64;
  static constexpr size_t kCacheEntriesPerShard = 4096;
  static constexpr size_t kMaxCachedWordBytes = 256;

  BpeModel() = default;
  absl::Status LoadVocab(const Json& vocab);
  absl::Status LoadMerges(const Json& merges);
  void BuildByteTables();

  // Characters (bytes) -> initial symbols, with byte fallback and unk handling.
  absl::Status InitialSymbols(absl::string_view word, std::vector<Symbol>* symbols) const;
  void MergeAll(std::vector<Symbol>* symbols) const;
  std::optional<int32_t> LookupUnit(absl::string_view unit) const;
  const Merge* FindMerge(int32_t left, int32_t right) const {
    auto it = merges_.find(PairKey(left, right));
    return it == merges_.end() ? nullptr : &it->second;
  }
  static uint64_t PairKey(int32_t left, int32_t right) {
    return static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32 | static_cast<uint32_t>(right);
  }

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> present_;
  absl::flat_hash_map<uint64_t, Merge> merges_;

  bool byte_level_input_ = false;
  // Byte-level: the vocabulary keyed by raw bytes (tokens made only of byte-alphabet chars).
  absl::flat_hash_map<std::string, int32_t> byte_vocab_;
  // Byte-level: id of the unit for byte b, by [is_first][is_last] (prefix/suffix variants);
  // -1 when absent.
  std::array<std::array<std::array<int32_t, 256>, 2>, 2> byte_unit_id_{};
  // Character input, no prefix/suffix: id of each ASCII character, -1 when absent.
  std::array<int32_t, 128> ascii_id_{};

  std::string unk_token_;
  bool has_unk_ = false;
  std::optional<int32_t> unk_id_;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::array<int32_t, 256> byte_fallback_id_{};  // id of "<0xNN>", -1 when absent

  mutable std::array<CacheShard, kCacheShards> cache_;
};

}  // namespace ls::tok

#endif  // LORASERVE_TOKENIZER_BPE_H_
