// tokenizer.json "pre_tokenizer": Split, ByteLevel, Metaspace and Sequence. A pre-tokenizer
// cuts the text pieces of a PieceText into smaller ones (added-token pieces pass through) and may
// rewrite them (Metaspace's "▁", ByteLevel's prefix space).
//
// ByteLevel's byte -> character mapping is not applied to the text: the BPE model reads the raw
// bytes of each piece and maps them itself (see bpe.h), which saves a copy and an alignment per
// byte. That is exact only when ByteLevel is the last step, so the loader requires it.
#ifndef LORASERVE_TOKENIZER_PRE_TOKENIZER_H_
#define LORASERVE_TOKENIZER_PRE_TOKENIZER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/json.h"
#include "tokenizer/pieces.h"
#include "tokenizer/regex.h"

namespace ls::tok {

// Buffers one Encode call reuses across pre-tokenizer steps.
struct PreTokenizeScratch {
  std::vector<MatchRange> matches;
  struct Split {
    uint32_t begin;
    uint32_t end;
    bool is_match;
  };
  std::vector<Split> splits;
  std::vector<Piece> pieces;
  PieceTextBuilder builder;
  AlignedString piece;
};

// Immutable after creation; Apply is thread-safe.
class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Fails only when a regex hits its match limit.
  virtual absl::Status Apply(PieceText* text, PreTokenizeScratch* scratch) const = 0;
};

struct PreTokenizerChain {
  std::vector<std::unique_ptr<PreTokenizer>> steps;  // Sequence flattened, in order
  // The chain ends with ByteLevel: pieces are raw bytes the model maps to the byte alphabet.
  bool byte_level = false;

  absl::Status Apply(PieceText* text, PreTokenizeScratch* scratch) const {
    for (const auto& step : steps) {
      absl::Status status = step->Apply(text, scratch);
      if (!status.ok()) return status;
    }
    return absl::OkStatus();
  }
};

// `json` is the "pre_tokenizer" member (null: an empty chain).
absl::StatusOr<PreTokenizerChain> CreatePreTokenizer(const Json& json);

// The GPT-2 pattern ByteLevel(use_regex=true) splits with.
inline constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

}  // namespace ls::tok

#endif  // LORASERVE_TOKENIZER_PRE_TOKENIZER_H_
