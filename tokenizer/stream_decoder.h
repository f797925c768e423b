// Incremental detokenization for streamed generation: one StreamDecoder per request turns the
// generated ids, one at a time, into text chunks that are always complete UTF-8.
#ifndef LORASERVE_TOKENIZER_STREAM_DECODER_H_
#define LORASERVE_TOKENIZER_STREAM_DECODER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/detokenizer.h"

namespace ls {

// Reproduces HF `tokenizers.decoders.DecodeStream` (0.22.2) token by token: Step(id) returns
// exactly what DecodeStream.step(id) returns ("" where it returns None).
//
// How it works (HF's algorithm): the decoder keeps a window of ids = "context" (the ids of the
// previous emission) + "pending" (ids not yet emitted), and `prefix`, the decoded context.
// Each step decodes the window; when that text is longer than `prefix` and does not end in
// U+FFFD (a character cut in the middle, or a real U+FFFD, which is therefore held back until
// Flush), the part after `prefix` is emitted and the pending ids become the new context.
// Decoding a window that starts one emission back, rather than from the first id, is what keeps
// the "first token" rules (Metaspace drops its leading "▁", Strip removes one leading space)
// from eating spaces mid-stream, and byte-fallback runs and byte-level characters split over
// several ids from being emitted half-done.
//
// Work per step is O(window), never O(history). Ids the decode ignores (out of range, holes,
// special tokens with skip_special_tokens) are no-ops that never enter the window (this changes
// nothing: HF's decode filters them out before the decoder chain). Two departures from HF,
// both outside anything a sane model produces:
//  - HF raises InvalidPrefix when the decoded window no longer starts with `prefix` (possible
//    with ByteFallback: "<0xE6><0x97><0xA5>" emits "日", then "<0x80>" turns the whole byte run
//    into four U+FFFD). We do not fail a request for it: we emit what lies beyond the number of
//    bytes already emitted for the window (from the next character boundary) and go on.
//  - HF's window grows without bound while the text keeps ending in U+FFFD (e.g. a model
//    looping on a "\uFFFD" token): quadratic work. After kMaxPendingTokens pending ids we emit
//    the text as it is, U+FFFD included, and move the window on, so a window never exceeds
//    about 2 * kMaxPendingTokens ids.
//
// Thread safety: none; one instance per request, used by one thread at a time. The Detokenizer
// must outlive it.
class StreamDecoder {
 public:
  static constexpr size_t kMaxPendingTokens = 64;

  StreamDecoder(const Detokenizer& detokenizer, bool skip_special_tokens);

  // Feeds the next generated id; returns the newly completed text, possibly empty. Every
  // returned chunk is valid, complete UTF-8.
  std::string Step(int32_t id);

  // At the end of generation: returns whatever is held back (text ending in U+FFFD, or a
  // character still missing bytes, which then decodes to U+FFFD exactly as Decode() would). The
  // chunks of all Step() calls followed by Flush() concatenate to Detokenizer::Decode() of all
  // ids for the decoder chains tokenizers use (short of the two departures above); like HF's
  // DecodeStream, a chain whose Strip removes more than one leading character per decode
  // (Strip start >= 2) loses those characters at each window start. Later Step() calls
  // continue the same text.
  std::string Flush();

  // Ids in the window (context + pending); for tests of the O(window) bound.
  size_t window_size() const { return ids_.size(); }

 private:
  std::string Decode() const { return detokenizer_->Decode(ids_, skip_special_tokens_); }
  // Emits `text` (the decoded window) beyond `prefix_` and makes the pending ids the context.
  std::string Commit(const std::string& text);

  const Detokenizer* detokenizer_;  // not owned
  bool skip_special_tokens_;
  std::vector<int32_t> ids_;  // the window: context ids, then pending ids
  std::string prefix_;        // decode of the context ids
  size_t prefix_index_ = 0;   // number of context ids at the front of ids_
};

}  // namespace ls

#endif  // LORASERVE_TOKENIZER_STREAM_DECODER_H_
