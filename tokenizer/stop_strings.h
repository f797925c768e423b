// Stop strings for generation: a request may name several strings; generation ends as soon as
// the generated text contains one, and the client never sees the stop string or anything after
// it. StopStringMatcher works on text chunks; TextStreamer composes it with StreamDecoder so the
// server feeds ids and gets text to send.
//
// Semantics. Let T be the generated text (the concatenation of the chunks). Generation stops at
// the smallest end position e at which an occurrence of some stop string ends (the first stop
// string to COMPLETE, reading T left to right, whatever the chunking). The match reported is the
// occurrence ending at e that starts earliest, i.e. the longest one (with duplicates in the
// list, the lowest index). The text emitted is exactly T[0, start of that occurrence).
// Equivalently: within the text generated up to the stop, the earliest-starting occurrence wins,
// and at equal starts the one that completes first. Consequences:
//  - "ab" and "abc": "ab" always wins (same start, completes first); "abc" can never match.
//  - "bc" and "abc" on "xabc": both end at 4; "abc" starts earlier and wins; "x" is emitted.
//  - "b" and "abc" on "abc": "b" completes at 2 and stops generation; "a" is emitted. (A rule
//    "earliest start in the full text" would need text past a completed stop string, i.e. keep
//    generating after the request should have ended.)
#ifndef LORASERVE_TOKENIZER_STOP_STRINGS_H_
#define LORASERVE_TOKENIZER_STOP_STRINGS_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "tokenizer/detokenizer.h"
#include "tokenizer/stream_decoder.h"

namespace ls {

// Matches stop strings over a stream of text chunks and holds back any suffix that could still
// become a stop string. Byte-level KMP, one automaton per stop string: O(chunk bytes x number of
// stop strings) per Consume(), at most kMaxStopStringBytes - 1 bytes held back.
//
// Thread safety: none; one instance per request. Copyable and movable.
class StopStringMatcher {
 public:
  static constexpr size_t kMaxStopStrings = 16;
  static constexpr size_t kMaxStopStringBytes = 256;

  // OK, or INVALID_ARGUMENT naming the offending entry: more than kMaxStopStrings strings, an
  // empty string, one longer than kMaxStopStringBytes bytes, or one that is not valid UTF-8.
  // No stop strings at all is valid (the matcher then passes text through).
  static absl::Status Validate(absl::Span<const std::string> stop_strings);

  static absl::StatusOr<StopStringMatcher> Create(std::vector<std::string> stop_strings);

  // Appends `chunk` to the text and returns the part of the text that is now safe to emit: it
  // can no longer be part of a stop string. Once a stop string matched (stopped() turns true),
  // returns the text before it and afterwards only "". Chunks should be complete UTF-8, as
  // StreamDecoder returns them; the emitted text is then complete UTF-8 as well (stop strings
  // are valid UTF-8, so holding back and cutting happen on character boundaries).
  std::string Consume(absl::string_view chunk);

  // End of the text without a stop: returns the held-back text (a partial stop string is text
  // like any other). After Flush(), Consume() starts a new text.
  std::string Flush();

  bool stopped() const { return matched_index_ >= 0; }
  // Index into the constructor's list of the stop string that matched, -1 while not stopped.
  int matched_index() const { return matched_index_; }
  // The stop string that matched; empty while not stopped.
  absl::string_view matched_stop() const {
    return stopped() ? absl::string_view(patterns_[static_cast<size_t>(matched_index_)].text)
                     : absl::string_view();
  }
  // Bytes consumed but not yet emitted.
  size_t held_back_bytes() const { return held_.size(); }

 private:
  struct Pattern {
    std::string text;
    std::vector<uint32_t> failure;  // KMP: failure[i] = longest proper border of text[0, i]
  };

  StopStringMatcher() = default;

  std::vector<Pattern> patterns_;
  std::vector<uint32_t> state_;  // per pattern: its longest prefix that is a suffix of the text
  std::string held_;             // consumed, not yet emitted
  int matched_index_ = -1;
};

// What TextStreamer returns per step.
struct StreamChunk {
  std::string text;      // send this now (complete UTF-8, possibly empty)
  bool stopped = false;  // a stop string matched: end the generation; `text` excludes it
  int stop_index = -1;   // which stop string matched (index into the request's list)
};

// StreamDecoder + StopStringMatcher for one request: feed each generated id to Step(), send
// `text`, and end the generation when `stopped`. When generation ends for any other reason
// (EOS, max_tokens, cancellation), call Finish() and send its text: it flushes the decoder's and
// the matcher's held-back text (a stop string can still match inside it).
//
// Thread safety: none; one instance per request. The Detokenizer must outlive it.
class TextStreamer {
 public:
  static absl::StatusOr<TextStreamer> Create(const Detokenizer& detokenizer,
                                             bool skip_special_tokens,
                                             std::vector<std::string> stop_strings);

  StreamChunk Step(int32_t id);
  StreamChunk Finish();

  bool stopped() const { return matcher_.stopped(); }
  absl::string_view matched_stop() const { return matcher_.matched_stop(); }

 private:
  TextStreamer(StreamDecoder decoder, StopStringMatcher matcher)
      : decoder_(std::move(decoder)), matcher_(std::move(matcher)) {}
  StreamChunk Feed(const std::string& text, bool flush);

  StreamDecoder decoder_;
  StopStringMatcher matcher_;
};

}  // namespace ls

#endif  // LORASERVE_TOKENIZER_STOP_STRINGS_H_
