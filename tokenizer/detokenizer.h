// Decoding token ids back to text, as Hugging Face `tokenizers` does it: ids -> token strings
// (special tokens dropped on request) -> the tokenizer.json "decoder" chain -> one string.
// Streaming detokenization and stop strings build on this (stream_decoder.h, stop_strings.h).
#ifndef LORASERVE_TOKENIZER_DETOKENIZER_H_
#define LORASERVE_TOKENIZER_DETOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/json.h"

namespace ls {

// The id -> token view decoding needs: the model vocabulary and the added tokens in one table.
struct DecodeVocab {
  std::vector<std::string> id_to_token;  // indexed by id; ids with no token hold ""
  std::vector<bool> present;             // false for ids that have no token (holes)
  std::vector<bool> special;             // added token with "special": true
};

// One decoder of the tokenizer.json "decoder" chain (ByteLevel, Replace, ByteFallback, Fuse,
// Strip, Metaspace, Sequence). Internal to the implementation; exposed for tests.
class DecoderStep;

class Detokenizer {
 public:
  // `decoder_json` is the "decoder" member of tokenizer.json (null: tokens joined by " ", as HF).
  // An unknown decoder type or option is an error naming it (INVALID_ARGUMENT); decoders HF has
  // but we do not implement (WordPiece, BPEDecoder, CTC, Replace with a Regex pattern) are
  // UNIMPLEMENTED. `vocab.present` and `vocab.special` must have the size of
  // `vocab.id_to_token`, and every present token must be valid UTF-8.
  static absl::StatusOr<std::unique_ptr<Detokenizer>> Create(DecodeVocab vocab,
                                                             const Json& decoder_json);
  ~Detokenizer();

  // Equal to HF `Tokenizer.decode(ids, skip_special_tokens)`. Ids outside the vocabulary are
  // skipped, as HF does (callers validate ids before they get here). Always valid UTF-8.
  // Thread-safe.
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const;

  // The bytes token `id` adds to a text it follows (so a SentencePiece "▁the" gives " the",
  // which Decode({id}) would strip as the first token), without the UTF-8 repair: a byte-level
  // or byte-fallback token that is part of a character gives its raw bytes. Empty for an id
  // with no token. For logprobs; thread-safe.
  std::string TokenBytes(int32_t id) const;
  // The token string as written in tokenizer.json ("Ġthe", "▁the", "<0x0A>"); empty for an id
  // with no token.
  const std::string& TokenPiece(int32_t id) const;

  int32_t vocab_size() const { return static_cast<int32_t>(vocab_.id_to_token.size()); }
  // True for a special added token, and (as HF compares token strings, not ids) for any other id
  // whose token string equals the content of one.
  bool IsSpecial(int32_t id) const;
  // True when `id` has a token (in range and not a hole). Decode() drops the others.
  bool HasToken(int32_t id) const {
    return id >= 0 && id < vocab_size() && vocab_.present[static_cast<size_t>(id)];
  }
  // True when Decode(..., skip_special_tokens) ignores `id` altogether: no token, or a special
  // token while skipping. Such ids change nothing in any decode (StreamDecoder relies on it).
  bool IsDropped(int32_t id, bool skip_special_tokens) const {
    return !HasToken(id) || (skip_special_tokens && IsSpecial(id));
  }

 private:
  Detokenizer();
  DecodeVocab vocab_;
  std::vector<bool> skip_;  // IsSpecial() per id: special by flag or by token string
  std::vector<std::unique_ptr<DecoderStep>> steps_;  // empty with a null decoder
  bool has_decoder_ = false;
  int32_t anchor_id_ = -1;  // a plain token TokenBytes decodes after; -1 if none
};

// UTF-8 helpers of the decode side.
namespace detok {

inline constexpr absl::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// Well-formed UTF-8 (no surrogates, no overlong forms, nothing above U+10FFFF, nothing cut).
bool IsValidUtf8(absl::string_view bytes);

// Appends `bytes` decoded the way Rust's String::from_utf8_lossy does: valid sequences as they
// are, one U+FFFD per maximal invalid subpart (Unicode "substitution of maximal subparts"):
// `e6 97` -> 1 U+FFFD, `ed a0 80` -> 3, `ff` -> 1.
void AppendUtf8Lossy(absl::string_view bytes, std::string* out);

inline bool EndsWithReplacementChar(absl::string_view text) {
  return text.size() >= kReplacementChar.size() &&
         text.substr(text.size() - kReplacementChar.size()) == kReplacementChar;
}

}  // namespace detok
}  // namespace ls

#endif  // LORASERVE_TOKENIZER_DETOKENIZER_H_
