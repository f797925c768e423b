// tokenizer.json "post_processor": TemplateProcessing (the single-sequence template; a pair
// template is parsed and checked but never used), ByteLevel (offset trimming only), Sequence and
// null. Anything else is a load error naming it.
#ifndef LORASERVE_TOKENIZER_POST_PROCESSOR_H_
#define LORASERVE_TOKENIZER_POST_PROCESSOR_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/json.h"
#include "tokenizer/tokenizer.h"

namespace ls::tok {

// Immutable after creation; Process is thread-safe.
class PostProcessor {
 public:
  // `json` is the "post_processor" member (null: nothing to do).
  static absl::StatusOr<std::unique_ptr<PostProcessor>> Create(const Json& json);

  // Applies the chain to the encoding of `text` (the original input, for character-unit offset
  // arithmetic). `with_strings`: tokens and offsets are filled (else only ids are).
  void Process(absl::string_view text, bool add_special_tokens, bool with_strings,
               Encoding* encoding) const;

 private:
  struct TemplatePiece {
    bool is_sequence;
    std::vector<int32_t> ids;  // special token
    std::vector<std::string> tokens;
  };
  struct Step {
    enum class Kind { kByteLevel, kTemplate } kind;
    bool trim_offsets = false;          // ByteLevel
    bool add_prefix_space = false;      // ByteLevel
    std::vector<TemplatePiece> single;  // Template
  };

  static absl::Status Flatten(const Json& json, std::vector<Step>* steps);
  static void TrimOffsets(absl::string_view text, bool add_prefix_space, Encoding* encoding);

  std::vector<Step> steps_;
};

}  // namespace ls::tok

#endif  // LORASERVE_TOKENIZER_POST_PROCESSOR_H_
