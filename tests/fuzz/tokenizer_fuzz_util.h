// Shared checks for the tokenizer fuzz targets (tokenizer_json_fuzz, tokenizer_encode_fuzz).
// A broken property calls __builtin_trap(), which libFuzzer reports as a crash; the message
// printed just before says which one.
#ifndef LORASERVE_TESTS_FUZZ_TOKENIZER_FUZZ_UTIL_H_
#define LORASERVE_TESTS_FUZZ_TOKENIZER_FUZZ_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "tokenizer/stream_decoder.h"
#include "tokenizer/tokenizer.h"

namespace ls_fuzz {

inline void Check(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "tokenizer fuzz: property broken: %s\n", what);
    __builtin_trap();
  }
}

// Folds values into something the optimizer cannot drop.
inline volatile uint64_t g_sink;
inline void Sink(absl::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  g_sink = g_sink + h;
}

// Length of the well-formed UTF-8 sequence at s[i] (RFC 3629: no overlongs, no surrogates,
// nothing above U+10FFFF), or 0 if there is none.
inline size_t Utf8SequenceLength(absl::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const size_t n = s.size();
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  const auto cont = [&](size_t k) { return k < n && (b(k) & 0xC0) == 0x80; };
  if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (i + 1 >= n) return 0;
    const unsigned char c1 = b(i + 1);
    if (c == 0xE0 && c1 < 0xA0) return 0;  // overlong
    if (c == 0xED && c1 > 0x9F) return 0;  // surrogate
    return cont(i + 1) && cont(i + 2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (i + 1 >= n) return 0;
    const unsigned char c1 = b(i + 1);
    if (c == 0xF0 && c1 < 0x90) return 0;  // overlong
    if (c == 0xF4 && c1 > 0x8F) return 0;  // above U+10FFFF
    return cont(i + 1) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  }
  return 0;
}

inline bool IsValidUtf8(absl::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t len = Utf8SequenceLength(s, i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

// Every invalid byte replaced by U+FFFD (one per byte: simpler than from_utf8_lossy's maximal
// subparts, and just as valid), so any input reaches the deep encode paths.
inline std::string RepairUtf8(absl::string_view s) {
  std::string out;
  out.reserve(s.size() + 8);
  for (size_t i = 0; i < s.size();) {
    const size_t len = Utf8SequenceLength(s, i);
    if (len == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out.append(s.data() + i, len);
      i += len;
    }
  }
  return out;
}

inline bool IsCharBoundary(absl::string_view s, size_t pos) {
  return pos == 0 || pos >= s.size() || (static_cast<unsigned char>(s[pos]) & 0xC0) != 0x80;
}

// The shape of an Encoding: parallel arrays, ids inside the vocabulary, offsets inside the text
// and on character boundaries.
// `strict` is for consistent files (the golden tokenizers); it adds two checks that an arbitrary
// tokenizer.json can break the way HF does too: the ids the post-processor adds are inside the
// vocabulary (TemplateProcessing ids are taken from the file as they are), and with parse_special
// off no id is a special token other than those (IsSpecial() compares token strings, as HF does,
// so a model token " " next to a special added token " " would count).
inline void CheckEncoding(const ls::Tokenizer& tok, absl::string_view text, const ls::Encoding& e,
                          bool parse_special, bool strict) {
  const size_t n = e.ids.size();
  Check(e.tokens.size() == n, "tokens.size() == ids.size()");
  Check(e.offsets.size() == n, "offsets.size() == ids.size()");
  Check(e.special_tokens_mask.size() == n, "special_tokens_mask.size() == ids.size()");
  for (size_t i = 0; i < n; ++i) {
    Check(e.special_tokens_mask[i] <= 1, "special_tokens_mask is 0 or 1");
    const bool from_text = e.special_tokens_mask[i] == 0;
    if (from_text || strict) {
      Check(e.ids[i] >= 0 && e.ids[i] < tok.vocab_size(), "0 <= id < vocab_size()");
    }
    const auto [start, end] = e.offsets[i];
    Check(start <= end && end <= text.size(), "start <= end <= text size");
    Check(IsCharBoundary(text, start) && IsCharBoundary(text, end),
          "offsets on UTF-8 character boundaries");
    if (strict && !parse_special && from_text) {
      Check(!tok.detokenizer().IsSpecial(e.ids[i]),
            "parse_special=false: text yields no special added token");
    }
  }
}

// At most this many ids are stream-decoded per call. A stream whose text keeps ending in U+FFFD
// (4096 invalid bytes repaired to U+FFFD give 12288 byte-level ids) re-decodes a window of up to
// ~2 * StreamDecoder::kMaxPendingTokens ids per step, by design: about 1.3-6 us a step in a
// release build, but ~85 us under ASan + coverage, which would run into libFuzzer's -timeout.
inline constexpr size_t kMaxStreamIds = 1024;

// Decodes `ids` with and without skipping special tokens (valid UTF-8 both ways), and
// stream-decodes the first kMaxStreamIds of them (tokenizer/stream_decoder.h) with
// skip_special_tokens = `stream_skip` (callers alternate the flag rather than run both, for the
// same reason): every chunk is valid UTF-8 and the window stays bounded.
// With `check_concat`, also: when the decoded text holds no U+FFFD (where HF's stream can rewrite
// text it already emitted, and the StreamDecoder departs from it on purpose) the chunks of Step()
// and Flush() add up to Decode() of the same ids. That holds for the decoder chains of real
// tokenizers, not for every chain a file can spell: HF's own DecodeStream re-decodes a window
// that starts one emission back, so e.g. Strip(start=2) strips again inside each window and the
// streamed text loses spaces Decode() keeps (tokenizers 0.22.2 does exactly this).
inline void ExerciseDecode(const ls::Tokenizer& tok, absl::Span<const int32_t> ids,
                           bool stream_skip, bool check_concat) {
  for (bool skip : {false, true}) {
    const std::string text = tok.Decode(ids, skip);
    Check(IsValidUtf8(text), "Decode gives valid UTF-8");
    Sink(text);
  }
  const absl::Span<const int32_t> streamed_ids = ids.subspan(0, kMaxStreamIds);
  ls::StreamDecoder stream(tok.detokenizer(), stream_skip);
  std::string streamed;
  for (int32_t id : streamed_ids) {
    const std::string chunk = stream.Step(id);
    Check(IsValidUtf8(chunk), "every Step() chunk is valid UTF-8");
    Check(stream.window_size() <= 2 * (ls::StreamDecoder::kMaxPendingTokens + 1),
          "StreamDecoder window stays bounded");
    streamed += chunk;
  }
  const std::string rest = stream.Flush();
  Check(IsValidUtf8(rest), "the Flush() chunk is valid UTF-8");
  streamed += rest;
  if (check_concat) {
    const std::string full = tok.Decode(streamed_ids, stream_skip);
    if (full.find("\xEF\xBF\xBD") == std::string::npos) {
      Check(streamed == full, "Step() chunks + Flush() == Decode()");
    }
  }
}

}  // namespace ls_fuzz

#endif  // LORASERVE_TESTS_FUZZ_TOKENIZER_FUZZ_UTIL_H_
