// UTF-8 helpers for the encode path: validation, decoding one code point at a time, and the
// Unicode properties Hugging Face `tokenizers` reads through Rust's `char` methods
// (White_Space, `\w`). All functions are pure and thread-safe.
#ifndef LORASERVE_TOKENIZER_UTF8_H_
#define LORASERVE_TOKENIZER_UTF8_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace ls::tok {

// True when `text` is well-formed UTF-8 (no surrogates, no overlongs, <= U+10FFFF). On failure
// `*error_offset` (if not null) receives the byte offset of the first bad sequence.
bool IsValidUtf8(absl::string_view text, size_t* error_offset = nullptr);

// Length in bytes of the UTF-8 sequence that starts with `lead` (1 for continuation bytes, so a
// loop over valid text always advances). Only meaningful on valid UTF-8.
inline size_t Utf8Len(uint8_t lead) {
  if (lead < 0x80) return 1;
  if (lead < 0xE0) return lead < 0xC0 ? 1 : 2;
  return lead < 0xF0 ? 3 : 4;
}

// Decodes the code point at `s[i]` of valid UTF-8 and advances `*i` past it.
inline char32_t DecodeUtf8(absl::string_view s, size_t* i) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data()) + *i;
  const uint8_t b0 = p[0];
  if (b0 < 0x80) {
    *i += 1;
    return b0;
  }
  if (b0 < 0xE0) {
    *i += 2;
    return (char32_t{b0} & 0x1F) << 6 | (p[1] & 0x3F);
  }
  if (b0 < 0xF0) {
    *i += 3;
    return (char32_t{b0} & 0x0F) << 12 | (char32_t{p[1]} & 0x3F) << 6 | (p[2] & 0x3F);
  }
  *i += 4;
  return (char32_t{b0} & 0x07) << 18 | (char32_t{p[1]} & 0x3F) << 12 |
         (char32_t{p[2]} & 0x3F) << 6 | (p[3] & 0x3F);
}

// Start of the code point that ends just before byte `end` (end > 0) of valid UTF-8.
inline size_t PrevCharStart(absl::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<uint8_t>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

// Appends the UTF-8 encoding of `c` (a valid scalar value) to `out`; returns the byte count.
size_t AppendUtf8(char32_t c, std::string* out);
// Bytes of `c` in UTF-8.
inline size_t Utf8Size(char32_t c) { return c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4; }

// Rust `char::is_whitespace`: the Unicode White_Space property.
bool IsWhiteSpace(char32_t c);
// Rust regex `\w` (Unicode): Alphabetic, marks, decimal numbers, connector punctuation,
// Join_Control.
bool IsWordChar(char32_t c);

// The GPT-2 byte-level alphabet: byte b <-> one code point (printable bytes map to themselves,
// the others to U+0100 + n). Used by the ByteLevel pre-tokenizer and by the BPE model when its
// input is byte-level.
char32_t ByteToUnicode(uint8_t b);
// Inverse of ByteToUnicode; -1 for code points outside the alphabet.
int UnicodeToByte(char32_t c);

}  // namespace ls::tok

#endif  // LORASERVE_TOKENIZER_UTF8_H_
