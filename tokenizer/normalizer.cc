#include "tokenizer/normalizer.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "tokenizer/json_util.h"
#include "tokenizer/regex.h"
#include "tokenizer/utf8.h"
#include "unicode/normalizer2.h"
#include "unicode/uchar.h"
#include "unicode/unistr.h"

namespace ls::tok {
namespace {

// ---- Unicode normalization forms -----------------------------------------------------------
//
// `tokenizers` runs the `unicode-normalization-alignments` crate, which yields every output
// character with a "change": 0 = replaces the next input character, +1 = inserted (aligned to
// the previous input character), -n = replaces the next input character and removes n more.
// The alignment is positional: output characters take the spans of input characters by
// position, even when canonical reordering moved them. We reproduce the crate's algorithm
// (decompose, stable-sort each run of non-starters by combining class, recompose) with ICU for
// the character data, so the alignment matches exactly, not just the text.
//
// The crate's tables are older than ICU's: characters assigned after Unicode 9.0 are to it
// unassigned (no decomposition, class 0, no composition). kCrateUnicodeMajor pins that.
constexpr uint8_t kCrateUnicodeMajor = 9;

bool NewerThanCrate(char32_t c) {
  if (c < 0x0370) return false;  // Latin, IPA and the basic combining marks: Unicode 1.1
  UVersionInfo age;
  u_charAge(static_cast<UChar32>(c), age);
  return age[0] > kCrateUnicodeMajor;
}

struct UChar {
  char32_t c;
  int32_t change;
  uint8_t ccc;
};

enum class Form { kNFC, kNFD, kNFKC, kNFKD };

class UnicodeNormalizer final : public Normalizer {
 public:
  static absl::StatusOr<std::unique_ptr<Normalizer>> Create(Form form, absl::string_view name) {
    UErrorCode status = U_ZERO_ERROR;
    const bool compat = form == Form::kNFKC || form == Form::kNFKD;
    const icu::Normalizer2* decompose = compat ? icu::Normalizer2::getNFKDInstance(status)
                                               : icu::Normalizer2::getNFDInstance(status);
    const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
    const icu::Normalizer2* check = nullptr;
    switch (form) {
      case Form::kNFC:
        check = nfc;
        break;
      case Form::kNFD:
        check = decompose;
        break;
      case Form::kNFKC:
        check = icu::Normalizer2::getNFKCInstance(status);
        break;
      case Form::kNFKD:
        check = decompose;
        break;
    }
    if (U_FAILURE(status)) {
      return absl::InternalError(
          absl::StrCat("tokenizer: ICU ", name, " data is unavailable: ", u_errorName(status)));
    }
    auto n = std::make_unique<UnicodeNormalizer>();
    n->compose_ = form == Form::kNFC || form == Form::kNFKC;
    n->decompose_ = decompose;
    n->nfc_ = nfc;
    n->check_ = check;
    return std::unique_ptr<Normalizer>(std::move(n));
  }

  bool IsNoop(absl::string_view text) const override { return IsNormalizedFast(text); }

  absl::Status Normalize(AlignedString* s, AlignedString* tmp) const override {
    if (IsNormalizedFast(s->text)) return absl::OkStatus();
    thread_local std::vector<Span> src_spans;
    thread_local std::vector<UChar> chars;
    thread_local std::vector<UChar> out;
    src_spans.clear();
    chars.clear();
    out.clear();
    Decompose(*s, &src_spans, &chars);
    const std::vector<UChar>* result = &chars;
    if (compose_) {
      Compose(chars, &out);
      result = &out;
    }
    // Positional alignment, as NormalizedString::transform.
    tmp->clear();
    size_t idx = 0;
    for (const UChar& u : *result) {
      Span span;
      if (u.change > 0) {
        span = idx == 0 ? Span{src_spans.empty() ? 0 : src_spans[0].start,
                               src_spans.empty() ? 0 : src_spans[0].start}
                        : src_spans[idx - 1];
      } else {
        span = src_spans[std::min(idx, src_spans.size() - 1)];
        idx += 1 + static_cast<size_t>(-u.change);
      }
      tmp->AppendChar(u.c, span);
    }
    std::swap(*s, *tmp);
    return absl::OkStatus();
  }

 private:
  // True when the text is already in this form; the crate then leaves it alone too, with every
  // change 0. (ICU's data is a superset of the crate's: where the crate knows less it can only
  // leave more characters alone, never rewrite text that ICU considers normalized.)
  bool IsNormalizedFast(absl::string_view text) const {
    size_t i = 0;
    while (i < text.size() && static_cast<uint8_t>(text[i]) < 0x80) ++i;
    if (i == text.size()) return true;
    UErrorCode status = U_ZERO_ERROR;
    return check_->isNormalizedUTF8(
               icu::StringPiece(text.data(), static_cast<int32_t>(text.size())), status) &&
           U_SUCCESS(status);
  }

  uint8_t Ccc(char32_t c) const {
    if (c < 0x300 || NewerThanCrate(c)) return 0;
    return decompose_->getCombiningClass(static_cast<UChar32>(c));
  }

  void Decompose(const AlignedString& s, std::vector<Span>* src_spans,
                 std::vector<UChar>* chars) const {
    icu::UnicodeString decomposition;
    size_t run_start = 0;  // first non-starter of the current run
    auto push = [&](char32_t c, int32_t change) {
      const uint8_t ccc = Ccc(c);
      if (ccc == 0) {
        SortRun(chars, run_start);
        chars->push_back({c, change, 0});
        run_start = chars->size();
      } else {
        chars->push_back({c, change, ccc});
      }
    };
    size_t i = 0;
    while (i < s.text.size()) {
      const size_t begin = i;
      const char32_t c = DecodeUtf8(s.text, &i);
      src_spans->push_back(s.align[begin]);
      if (c < 0xA0 || NewerThanCrate(c) ||
          !decompose_->getDecomposition(static_cast<UChar32>(c), decomposition)) {
        push(c, 0);
        continue;
      }
      int32_t change = 0;
      for (int32_t k = 0; k < decomposition.length();) {
        const UChar32 d = decomposition.char32At(k);
        k += U16_LENGTH(d);
        push(static_cast<char32_t>(d), change);
        change = 1;
      }
    }
    SortRun(chars, run_start);
  }

  static void SortRun(std::vector<UChar>* chars, size_t run_start) {
    if (chars->size() - run_start > 1) {
      std::stable_sort(chars->begin() + static_cast<ptrdiff_t>(run_start), chars->end(),
                       [](const UChar& a, const UChar& b) { return a.ccc < b.ccc; });
    }
  }

  int32_t ComposePair(char32_t a, char32_t b) const {
    if (b < 0x300 && !(b >= 0x1100 && b < 0x1200)) {
      // Fast reject: every canonical composition's second character is >= U+0300.
      return -1;
    }
    const UChar32 r = nfc_->composePair(static_cast<UChar32>(a), static_cast<UChar32>(b));
    if (r < 0 || NewerThanCrate(a) || NewerThanCrate(b) ||
        NewerThanCrate(static_cast<char32_t>(r))) {
      return -1;
    }
    return r;
  }

  // The crate's Recompositions iterator, carrying the changes: a composite takes
  // change(first) + change(second) - 1.
  void Compose(const std::vector<UChar>& in, std::vector<UChar>* out) const {
    bool have_composee = false;
    UChar composee{};
    bool have_last_ccc = false;
    uint8_t last_ccc = 0;
    std::vector<UChar>& buffer = ComposeBuffer();
    buffer.clear();
    for (const UChar& ch : in) {
      if (!have_composee) {
        if (ch.ccc != 0) {
          out->push_back(ch);
          continue;
        }
        composee = ch;
        have_composee = true;
        continue;
      }
      if (!have_last_ccc) {
        const int32_t r = ComposePair(composee.c, ch.c);
        if (r >= 0) {
          composee = {static_cast<char32_t>(r), composee.change + ch.change - 1, 0};
          continue;
        }
        if (ch.ccc == 0) {
          out->push_back(composee);
          composee = ch;
          continue;
        }
        buffer.push_back(ch);
        last_ccc = ch.ccc;
        have_last_ccc = true;
        continue;
      }
      if (last_ccc >= ch.ccc) {
        // Blocked from the composee.
        if (ch.ccc == 0) {
          out->push_back(composee);
          out->insert(out->end(), buffer.begin(), buffer.end());
          buffer.clear();
          composee = ch;
          have_last_ccc = false;
          continue;
        }
        buffer.push_back(ch);
        last_ccc = ch.ccc;
        continue;
      }
      const int32_t r = ComposePair(composee.c, ch.c);
      if (r >= 0) {
        composee = {static_cast<char32_t>(r), composee.change + ch.change - 1, 0};
        continue;
      }
      buffer.push_back(ch);
      last_ccc = ch.ccc;
    }
    if (have_composee) out->push_back(composee);
    out->insert(out->end(), buffer.begin(), buffer.end());
  }

  static std::vector<UChar>& ComposeBuffer() {
    thread_local std::vector<UChar> buffer;
    return buffer;
  }

  bool compose_ = false;
  const icu::Normalizer2* decompose_ = nullptr;  // NFD or NFKD: decompositions, classes
  const icu::Normalizer2* nfc_ = nullptr;        // canonical pairwise composition
  const icu::Normalizer2* check_ = nullptr;      // quick "already normalized" test
};

// ---- Prepend, Replace, Sequence ------------------------------------------------------------

// Prepends a string to non-empty text; every prepended byte takes the first character's span.
class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prepend) : prepend_(std::move(prepend)) {}
  bool IsNoop(absl::string_view text) const override { return text.empty() || prepend_.empty(); }
  absl::Status Normalize(AlignedString* s, AlignedString* tmp) const override {
    if (s->text.empty() || prepend_.empty()) return absl::OkStatus();
    tmp->clear();
    tmp->AppendBytes(prepend_, s->align[0]);
    tmp->text.append(s->text);
    tmp->align.insert(tmp->align.end(), s->align.begin(), s->align.end());
    std::swap(*s, *tmp);
    return absl::OkStatus();
  }

 private:
  std::string prepend_;
};

// Replaces every match with `content`; the new bytes take the span of the match's last byte
// (NormalizedString::replace inserts them as "+1" changes after removing the match).
class ReplaceNormalizer final : public Normalizer {
 public:
  static constexpr size_t kMaxReplacedBytes = size_t{1} << 30;

  ReplaceNormalizer(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  bool IsNoop(absl::string_view text) const override {
    if (const std::string* literal = pattern_.literal()) {
      return text.find(*literal) == absl::string_view::npos;
    }
    thread_local std::vector<MatchRange> matches;
    matches.clear();
    return pattern_.FindAll(text, &matches).ok() && matches.empty();
  }
  absl::Status Normalize(AlignedString* s, AlignedString* tmp) const override {
    thread_local std::vector<MatchRange> matches;
    matches.clear();
    LS_RETURN_IF_ERROR(pattern_.FindAll(s->text, &matches));
    if (matches.empty()) return absl::OkStatus();
    tmp->clear();
    uint32_t pos = 0;
    for (const MatchRange& m : matches) {
      tmp->text.append(s->text, pos, m.first - pos);
      tmp->align.insert(tmp->align.end(), s->align.begin() + pos, s->align.begin() + m.first);
      if (tmp->text.size() > kMaxReplacedBytes) {
        return absl::ResourceExhaustedError(absl::StrCat("tokenizer: normalizer Replace grew a ",
                                                         s->text.size(), "-byte piece past ",
                                                         kMaxReplacedBytes, " bytes"));
      }
      if (m.second > m.first) {
        tmp->AppendBytes(content_, s->align[m.second - 1]);
      } else if (!content_.empty()) {
        // An empty regex match: HF aligns inserted text to the byte before (or (0, 0)).
        const Span span = m.first > 0 ? s->align[m.first - 1] : Span{0, 0};
        tmp->AppendBytes(content_, span);
      }
      pos = m.second;
    }
    tmp->text.append(s->text, pos, std::string::npos);
    tmp->align.insert(tmp->align.end(), s->align.begin() + pos, s->align.end());
    std::swap(*s, *tmp);
    return absl::OkStatus();
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> steps)
      : steps_(std::move(steps)) {}
  // Each step sees the unchanged text when the ones before it are no-ops.
  bool IsNoop(absl::string_view text) const override {
    for (const auto& step : steps_) {
      if (!step->IsNoop(text)) return false;
    }
    return true;
  }
  absl::Status Normalize(AlignedString* s, AlignedString* tmp) const override {
    for (const auto& step : steps_) LS_RETURN_IF_ERROR(step->Normalize(s, tmp));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Normalizer>> CreateNormalizer(const Json& json) {
  LS_ASSIGN_OR_RETURN(const std::string type, ComponentType(json, "normalizer"));
  const std::string what = absl::StrCat("normalizer ", type);
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    LS_RETURN_IF_ERROR(CheckKeys(json, what, {"type"}));
    const Form form = type == "NFC"    ? Form::kNFC
                      : type == "NFD"  ? Form::kNFD
                      : type == "NFKC" ? Form::kNFKC
                                       : Form::kNFKD;
    return UnicodeNormalizer::Create(form, type);
  }
  if (type == "Prepend") {
    LS_RETURN_IF_ERROR(CheckKeys(json, what, {"type", "prepend"}));
    LS_ASSIGN_OR_RETURN(std::string prepend, GetString(json, "prepend", what));
    return std::unique_ptr<Normalizer>(new PrependNormalizer(std::move(prepend)));
  }
  if (type == "Replace") {
    LS_RETURN_IF_ERROR(CheckKeys(json, what, {"type", "pattern", "content"}));
    auto it = json.find("pattern");
    if (it == json.end()) {
      return absl::InvalidArgumentError("tokenizer.json: normalizer Replace has no \"pattern\"");
    }
    LS_ASSIGN_OR_RETURN(Pattern pattern, Pattern::FromJson(*it, what));
    LS_ASSIGN_OR_RETURN(std::string content, GetString(json, "content", what));
    return std::unique_ptr<Normalizer>(
        new ReplaceNormalizer(std::move(pattern), std::move(content)));
  }
  if (type == "Sequence") {
    LS_RETURN_IF_ERROR(CheckKeys(json, what, {"type", "normalizers"}));
    auto it = json.find("normalizers");
    if (it == json.end() || !it->is_array()) {
      return absl::InvalidArgumentError(
          "tokenizer.json: normalizer Sequence needs a \"normalizers\" array");
    }
    std::vector<std::unique_ptr<Normalizer>> steps;
    for (const Json& step : *it) {
      LS_ASSIGN_OR_RETURN(auto n, CreateNormalizer(step));
      steps.push_back(std::move(n));
    }
    return std::unique_ptr<Normalizer>(new SequenceNormalizer(std::move(steps)));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer.json: normalizer type \"", type, "\" is not supported"));
}

}  // namespace ls::tok
