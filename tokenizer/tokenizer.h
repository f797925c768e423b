// A Hugging Face tokenizer.json, loaded once and used from many threads: encode gives exactly
// the ids (and tokens, offsets) HF `tokenizers` gives for the same folder; decode goes through
// Detokenizer.
#ifndef LORASERVE_TOKENIZER_TOKENIZER_H_
#define LORASERVE_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "tokenizer/detokenizer.h"

namespace ls {

struct EncodeOptions {
  // Run the post-processor (TemplateProcessing BOS/EOS, ...), like HF add_special_tokens.
  bool add_special_tokens = true;
  // false (the default for user text): added tokens marked "special" are NOT matched, their
  // literal text is tokenized as ordinary text (HF split_special_tokens=True), so users cannot
  // inject control tokens. Non-special added tokens are matched either way. true: HF's default.
  bool parse_special = false;
};

struct Encoding {
  std::vector<int32_t> ids;
  std::vector<std::string> tokens;                     // token strings, as HF Encoding.tokens
  std::vector<std::pair<uint32_t, uint32_t>> offsets;  // [start, end) UTF-8 byte offsets
  std::vector<uint8_t> special_tokens_mask;            // 1 for tokens the post-processor added
};

class Tokenizer {
 public:
  // Loads DIR/tokenizer.json, plus DIR/tokenizer_config.json and DIR/generation_config.json
  // when present (BOS/EOS names and flags). Anything we do not implement is an error naming it.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadFromDir(const std::string& dir);
  // The same from file contents; empty config strings mean "file absent".
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      absl::string_view tokenizer_json, absl::string_view tokenizer_config_json = "",
      absl::string_view generation_config_json = "");
  ~Tokenizer();

  // INVALID_ARGUMENT if `text` is not valid UTF-8. Thread-safe.
  absl::StatusOr<Encoding> Encode(absl::string_view text, const EncodeOptions& options = {}) const;
  absl::StatusOr<std::vector<int32_t>> EncodeIds(absl::string_view text,
                                                 const EncodeOptions& options = {}) const;

  std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens = true) const {
    return detokenizer_->Decode(ids, skip_special_tokens);
  }
  const Detokenizer& detokenizer() const { return *detokenizer_; }

  int32_t vocab_size() const { return detokenizer_->vocab_size(); }  // model vocab + added
  std::optional<int32_t> TokenToId(absl::string_view token) const;

  // Debugging and test hooks, the counterparts of HF `normalizer.normalize_str` and
  // `pre_tokenizer.pre_tokenize_str`: the normalizer's output for the whole of `text` (`text`
  // itself without a normalizer; added tokens are not split out first), and the pre-tokens of
  // `text` (byte-level pre-tokens written in the byte alphabet, "Ġ" for a space). Thread-safe.
  absl::StatusOr<std::string> Normalize(absl::string_view text) const;
  absl::StatusOr<std::vector<std::string>> PreTokenize(absl::string_view text) const;
  std::optional<int32_t> bos_token_id() const { return bos_token_id_; }
  // From generation_config.json when present, else tokenizer_config.json's eos_token.
  const std::vector<int32_t>& eos_token_ids() const { return eos_token_ids_; }

 private:
  struct Impl;  // encode-side state, defined in tokenizer.cc
  Tokenizer();
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<Detokenizer> detokenizer_;
  std::optional<int32_t> bos_token_id_;
  std::vector<int32_t> eos_token_ids_;
};

}  // namespace ls

#endif  // LORASERVE_TOKENIZER_TOKENIZER_H_
