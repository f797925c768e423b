#include "tokenizer/utf8.h"

#include <array>

#include "unicode/uchar.h"

namespace ls::tok {

bool IsValidUtf8(absl::string_view text, size_t* error_offset) {
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    // ASCII runs dominate real text: check 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t word;
      __builtin_memcpy(&word, p + i, 8);
      if (word & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    const uint8_t b0 = p[i];
    if (b0 < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      len = 2;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      len = 3;
      if (b0 == 0xE0) lo = 0xA0;  // no overlongs
      if (b0 == 0xED) hi = 0x9F;  // no surrogates
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      len = 4;
      if (b0 == 0xF0) lo = 0x90;  // no overlongs
      if (b0 == 0xF4) hi = 0x8F;  // <= U+10FFFF
    } else {
      if (error_offset != nullptr) *error_offset = i;
      return false;
    }
    if (i + len > n || p[i + 1] < lo || p[i + 1] > hi) {
      if (error_offset != nullptr) *error_offset = i;
      return false;
    }
    for (size_t k = 2; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) {
        if (error_offset != nullptr) *error_offset = i;
        return false;
      }
    }
    i += len;
  }
  return true;
}

size_t AppendUtf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
    return 1;
  }
  if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
    return 2;
  }
  if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
    return 3;
  }
  out->push_back(static_cast<char>(0xF0 | (c >> 18)));
  out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
  out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
  out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  return 4;
}

bool IsWhiteSpace(char32_t c) {
  // The White_Space property; it has not changed since Unicode 6.3, so a table is exact for
  // every Rust version tokenizers is built with.
  if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0D);
  if (c < 0x85) return false;
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
         c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

bool IsWordChar(char32_t c) {
  if (c < 0x80) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  }
  const UChar32 u = static_cast<UChar32>(c);
  if (u_hasBinaryProperty(u, UCHAR_ALPHABETIC) || u_hasBinaryProperty(u, UCHAR_JOIN_CONTROL)) {
    return true;
  }
  const int8_t type = u_charType(u);
  return type == U_NON_SPACING_MARK || type == U_ENCLOSING_MARK ||
         type == U_COMBINING_SPACING_MARK || type == U_DECIMAL_DIGIT_NUMBER ||
         type == U_CONNECTOR_PUNCTUATION;
}

namespace {

struct ByteTables {
  std::array<char32_t, 256> to_unicode{};
  std::array<uint8_t, 68> from_extra{};  // byte of U+0100 + n
  ByteTables() {
    // GPT-2's bytes_to_unicode(): printable Latin-1 bytes keep their code point, the other 68
    // bytes take U+0100, U+0101, ... in byte order.
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      if (keep) {
        to_unicode[b] = static_cast<char32_t>(b);
      } else {
        from_extra[next - 0x100] = static_cast<uint8_t>(b);
        to_unicode[b] = next++;
      }
    }
  }
};

const ByteTables& Tables() {
  static const ByteTables* const tables = new ByteTables();
  return *tables;
}

}  // namespace

char32_t ByteToUnicode(uint8_t b) { return Tables().to_unicode[b]; }

int UnicodeToByte(char32_t c) {
  if ((c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF)) {
    return static_cast<int>(c);
  }
  if (c >= 0x100 && c < 0x100 + 68) return Tables().from_extra[c - 0x100];
  return -1;
}

}  // namespace ls::tok
