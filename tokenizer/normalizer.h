// tokenizer.json "normalizer": NFC, NFD, NFKC, NFKD, Prepend, Replace and Sequence, with the
// byte alignment Hugging Face `tokenizers` computes (see pieces.h). Anything else is a load
// error naming it.
#ifndef LORASERVE_TOKENIZER_NORMALIZER_H_
#define LORASERVE_TOKENIZER_NORMALIZER_H_

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/json.h"
#include "tokenizer/pieces.h"

namespace ls::tok {

// Immutable after creation; Normalize is thread-safe.
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  // Rewrites `s` (text and alignment) in place; `tmp` is scratch space the caller reuses.
  // Fails only when a regex hits its match limit.
  virtual absl::Status Normalize(AlignedString* s, AlignedString* tmp) const = 0;
  // True when Normalize would leave `text` exactly as it is (alignment included), so the caller
  // can skip copying it; false when unsure.
  virtual bool IsNoop(absl::string_view text) const = 0;
};

// `json` is the (non-null) "normalizer" member. Errors name the unsupported type or option.
absl::StatusOr<std::unique_ptr<Normalizer>> CreateNormalizer(const Json& json);

}  // namespace ls::tok

#endif  // LORASERVE_TOKENIZER_NORMALIZER_H_
