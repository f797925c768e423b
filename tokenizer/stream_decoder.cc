// HF DecodeStream (tokenizers 0.22.2, step_decode_stream), with the two bounded departures the
// header lists.
#include "tokenizer/stream_decoder.h"

#include <utility>

namespace ls {
namespace {

bool StartsWith(const std::string& text, const std::string& prefix) {
  return text.size() >= prefix.size() && text.compare(0, prefix.size(), prefix) == 0;
}

}  // namespace

StreamDecoder::StreamDecoder(const Detokenizer& detokenizer, bool skip_special_tokens)
    : detokenizer_(&detokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string StreamDecoder::Step(int32_t id) {
  if (detokenizer_->IsDropped(id, skip_special_tokens_)) return {};
  // HF: a context that decoded to nothing is replaced by the whole window, once that window
  // decodes to text not ending in U+FFFD. This moves the context/pending split, which decides
  // what the next emission is measured against.
  if (prefix_.empty() && !ids_.empty()) {
    std::string text = Decode();
    if (!detok::EndsWithReplacementChar(text)) {
      prefix_ = std::move(text);
      prefix_index_ = ids_.size();
    }
  }
  ids_.push_back(id);
  const std::string text = Decode();
  const bool ready = text.size() > prefix_.size() && !detok::EndsWithReplacementChar(text);
  const bool forced = ids_.size() - prefix_index_ > kMaxPendingTokens;
  if (!ready && !forced) return {};
  return Commit(text);
}

std::string StreamDecoder::Flush() {
  if (ids_.size() == prefix_index_) return {};  // nothing pending
  return Commit(Decode());
}

std::string StreamDecoder::Commit(const std::string& text) {
  std::string out;
  if (text.size() > prefix_.size()) {
    size_t from = prefix_.size();
    if (!StartsWith(text, prefix_)) {
      // HF's InvalidPrefix (see the header): skip as many bytes as were already emitted for
      // this window, then on to the next character boundary so the chunk stays valid UTF-8.
      while (from < text.size() && (static_cast<uint8_t>(text[from]) & 0xC0) == 0x80) ++from;
    }
    out = text.substr(from);
  }
  ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(prefix_index_));
  prefix_ = Decode();
  prefix_index_ = ids_.size();
  return out;
}

}  // namespace ls
