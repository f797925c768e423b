// The working state of one Encode call, mirroring Hugging Face's PreTokenizedString: the input
// cut into pieces (added tokens, and text still to be normalized, pre-tokenized and tokenized),
// together with where every byte of the (normalized) text came from in the original input.
//
// Alignment follows `tokenizers`' NormalizedString exactly: every byte of normalized text
// carries the [start, end) span of one original character, and a range of normalized bytes maps
// to [min start, max end) over its bytes. Until something rewrites the text (a normalizer, a
// Metaspace or a prefix space) the text *is* the input and the alignment is implicit (each byte
// maps to its own character), so the common byte-level path never copies or aligns anything.
//
// Not thread-safe; each Encode call owns its own (a thread-local scratch reuses the buffers).
#ifndef LORASERVE_TOKENIZER_PIECES_H_
#define LORASERVE_TOKENIZER_PIECES_H_

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "tokenizer/utf8.h"

namespace ls::tok {

// The [start, end) byte span of the original input one normalized byte came from.
struct Span {
  uint32_t start;
  uint32_t end;
};

struct Piece {
  uint32_t begin;  // byte range of PieceText::text()
  uint32_t end;
  int32_t added_id;  // >= 0: an added token, already tokenized; -1: text
  bool is_added() const { return added_id >= 0; }
};

// A string with one Span per byte: what normalizers read and write.
struct AlignedString {
  std::string text;
  std::vector<Span> align;

  void clear() {
    text.clear();
    align.clear();
  }
  // Appends code point `c` with every byte aligned to `span`.
  void AppendChar(char32_t c, Span span) {
    const size_t n = AppendUtf8(c, &text);
    for (size_t i = 0; i < n; ++i) align.push_back(span);
  }
  void AppendBytes(absl::string_view bytes, Span span) {
    text.append(bytes.data(), bytes.size());
    for (size_t i = 0; i < bytes.size(); ++i) align.push_back(span);
  }
};

class PieceText {
 public:
  // Starts from `input` as one text piece (none if empty), identity-aligned. `input` must outlive
  // every use of this object until the next Reset.
  void Reset(absl::string_view input) {
    input_ = input;
    materialized_ = false;
    storage_.clear();
    pieces_.clear();
    if (!input.empty()) pieces_.push_back({0, static_cast<uint32_t>(input.size()), -1});
  }

  absl::string_view text() const {
    return materialized_ ? absl::string_view(storage_.text) : input_;
  }
  absl::string_view PieceString(const Piece& p) const {
    return text().substr(p.begin, p.end - p.begin);
  }
  bool materialized() const { return materialized_; }
  absl::string_view input() const { return input_; }
  std::vector<Piece>& pieces() { return pieces_; }
  const std::vector<Piece>& pieces() const { return pieces_; }

  // Original [start, end) of normalized bytes [begin, end) (non-empty), as HF convert_offsets:
  // the smallest start and largest end over those bytes' spans. In identity mode a byte maps to
  // its whole character, so a range that cuts a character widens to it.
  Span Original(uint32_t begin, uint32_t end) const {
    if (!materialized_) {
      uint32_t s = begin;
      while (s > 0 && (static_cast<uint8_t>(input_[s]) & 0xC0) == 0x80) --s;
      uint32_t e = end;
      while (e < input_.size() && (static_cast<uint8_t>(input_[e]) & 0xC0) == 0x80) ++e;
      return {s, e};
    }
    const std::vector<Span>& a = storage_.align;
    Span r = a[begin];
    for (uint32_t i = begin + 1; i < end; ++i) {
      r.start = std::min(r.start, a[i].start);
      r.end = std::max(r.end, a[i].end);
    }
    return r;
  }

  // Copies piece `p`'s text and alignment into `out` (cleared first).
  void PieceToAligned(const Piece& p, AlignedString* out) const {
    out->clear();
    AppendRangeAligned(p.begin, p.end, out);
  }
  // Appends normalized bytes [begin, end) and their alignment to `out`.
  void AppendRangeAligned(uint32_t begin, uint32_t end, AlignedString* out) const {
    const absl::string_view t = text();
    out->text.append(t.data() + begin, end - begin);
    if (materialized_) {
      out->align.insert(out->align.end(), storage_.align.begin() + begin,
                        storage_.align.begin() + end);
      return;
    }
    // Identity: every byte of a character maps to that character's span.
    const size_t base = out->align.size();
    out->align.resize(base + (end - begin));
    Span* a = out->align.data() + base - begin;
    uint32_t i = begin;
    while (i < end) {
      const uint8_t lead = static_cast<uint8_t>(t[i]);
      if (lead < 0x80) {
        a[i] = Span{i, i + 1};
        ++i;
        continue;
      }
      const uint32_t n = static_cast<uint32_t>(Utf8Len(lead));
      for (uint32_t k = 0; k < n; ++k) a[i + k] = Span{i, i + n};
      i += n;
    }
  }

  // Rebuilding: a transformation writes a new text into `next` (see Builder) and swaps it in.
  friend class PieceTextBuilder;

 private:
  absl::string_view input_;
  bool materialized_ = false;
  AlignedString storage_;
  std::vector<Piece> pieces_;
};

// Builds the next PieceText from the current one, piece by piece; Finish swaps it in. The
// builder's buffers are reused across calls.
class PieceTextBuilder {
 public:
  void Start(const PieceText& from) {
    from_ = &from;
    out_.clear();
    pieces_.clear();
  }
  // Appends piece `p` of the source unchanged.
  void CopyPiece(const Piece& p) {
    const uint32_t begin = static_cast<uint32_t>(out_.text.size());
    from_->AppendRangeAligned(p.begin, p.end, &out_);
    pieces_.push_back({begin, static_cast<uint32_t>(out_.text.size()), p.added_id});
  }
  // Appends a new text piece (skipped when empty, as HF drops empty splits).
  void AddPiece(const AlignedString& s, int32_t added_id = -1) {
    AddPieceRange(s, 0, static_cast<uint32_t>(s.text.size()), added_id);
  }
  void AddPieceRange(const AlignedString& s, uint32_t begin, uint32_t end, int32_t added_id) {
    if (begin == end) return;
    const uint32_t out_begin = static_cast<uint32_t>(out_.text.size());
    out_.text.append(s.text.data() + begin, end - begin);
    out_.align.insert(out_.align.end(), s.align.begin() + begin, s.align.begin() + end);
    pieces_.push_back({out_begin, static_cast<uint32_t>(out_.text.size()), added_id});
  }
  void Finish(PieceText* target) {
    std::swap(target->storage_, out_);
    std::swap(target->pieces_, pieces_);
    target->materialized_ = true;
  }

 private:
  const PieceText* from_ = nullptr;
  AlignedString out_;
  std::vector<Piece> pieces_;
};

}  // namespace ls::tok

#endif  // LORASERVE_TOKENIZER_PIECES_H_
