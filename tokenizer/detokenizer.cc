// The tokenizer.json decoder chain, as Hugging Face `tokenizers` 0.22.2 runs it.
//
// HF's Decoder::decode is `decode_chain(tokens).join("")`, and every decoder maps a list of
// strings to a list of strings. The list shape matters: Metaspace treats the *first* element
// specially and Strip works per element, so each step below keeps exactly the element
// boundaries HF keeps (ByteLevel and Fuse return one element; ByteFallback one element per
// valid byte run, one "\uFFFD" element per byte of an invalid run). A Sequence is flattened
// into the step list, which is the same thing as chaining its decode_chain calls.
#include "tokenizer/detokenizer.h"

#include <array>
#include <cstddef>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace ls {

using Tokens = std::vector<std::string>;

class DecoderStep {
 public:
  virtual ~DecoderStep() = default;
  virtual void Apply(Tokens* tokens) const = 0;
  // The raw bytes one token stands for, when this step maps tokens to bytes (ByteLevel,
  // ByteFallback) and `token` is such a token; else false.
  virtual bool RawBytes(const std::string& /*token*/, std::string* /*out*/) const { return false; }
};

namespace detok {
namespace {

bool IsContinuation(uint8_t b) { return (b & 0xC0) == 0x80; }

// Length of the valid UTF-8 sequence at `s[i]`, or 0 (with *bad_len the number of bytes that
// form one maximal invalid subpart) when there is none.
size_t NextSequence(absl::string_view s, size_t i, size_t* bad_len) {
  const auto byte = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t b0 = byte(i);
  if (b0 < 0x80) return 1;
  size_t width = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    width = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    width = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    width = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    *bad_len = 1;
    return 0;
  }
  size_t k = 1;
  for (; k < width; ++k) {
    if (i + k >= s.size()) break;
    const uint8_t b = byte(i + k);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : IsContinuation(b);
    if (!ok) break;
  }
  if (k == width) return width;
  *bad_len = k;
  return 0;
}

}  // namespace

bool IsValidUtf8(absl::string_view bytes) {
  size_t i = 0;
  while (i < bytes.size()) {
    size_t bad = 0;
    const size_t n = NextSequence(bytes, i, &bad);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

void AppendUtf8Lossy(absl::string_view bytes, std::string* out) {
  out->reserve(out->size() + bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    size_t bad = 0;
    const size_t n = NextSequence(bytes, i, &bad);
    if (n == 0) {
      out->append(kReplacementChar.data(), kReplacementChar.size());
      i += bad;
    } else {
      out->append(bytes.data() + i, n);
      i += n;
    }
  }
}

}  // namespace detok

namespace {

using detok::kReplacementChar;

// Decodes the code point at s[*i] (s is valid UTF-8) and advances *i past it.
char32_t NextCodePoint(absl::string_view s, size_t* i) {
  const auto b = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t b0 = b(*i);
  char32_t cp;
  size_t n;
  if (b0 < 0x80) {
    cp = b0;
    n = 1;
  } else if (b0 < 0xE0) {
    cp = b0 & 0x1F;
    n = 2;
  } else if (b0 < 0xF0) {
    cp = b0 & 0x0F;
    n = 3;
  } else {
    cp = b0 & 0x07;
    n = 4;
  }
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (b(*i + k) & 0x3F);
  *i += n;
  return cp;
}

// ---- ByteLevel -----------------------------------------------------------------------------
// GPT-2's bytes_to_unicode, inverted: code point -> byte, -1 where a code point is no byte's
// stand-in. Printable Latin-1 bytes stand for themselves; the other 68 bytes map to U+0100...
constexpr size_t kByteLevelMaxCodePoint = 0x100 + 68;

std::array<int16_t, kByteLevelMaxCodePoint> MakeByteLevelTable() {
  std::array<int16_t, kByteLevelMaxCodePoint> table;
  table.fill(-1);
  int next = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const int cp = printable ? b : 0x100 + next++;
    table[static_cast<size_t>(cp)] = static_cast<int16_t>(b);
  }
  return table;
}

class ByteLevelStep final : public DecoderStep {
 public:
  // Every token becomes the bytes its characters stand for; a token with any character that
  // stands for no byte (an added token such as "▁x", or "\u00a0") contributes its UTF-8 as is.
  // All bytes are joined and decoded lossily into ONE element.
  void Apply(Tokens* tokens) const override {
    std::string bytes;
    for (const std::string& token : *tokens) AppendBytes(token, &bytes);
    std::string text;
    detok::AppendUtf8Lossy(bytes, &text);
    tokens->assign(1, std::move(text));
  }

  bool RawBytes(const std::string& token, std::string* out) const override {
    out->clear();
    AppendBytes(token, out);
    return true;
  }

 private:
  static void AppendBytes(const std::string& token, std::string* bytes) {
    static const std::array<int16_t, kByteLevelMaxCodePoint> kTable = MakeByteLevelTable();
    const size_t mark = bytes->size();
    size_t i = 0;
    while (i < token.size()) {
      const char32_t cp = NextCodePoint(token, &i);
      if (cp >= kByteLevelMaxCodePoint || kTable[cp] < 0) {
        bytes->resize(mark);
        bytes->append(token);
        return;
      }
      bytes->push_back(static_cast<char>(kTable[cp]));
    }
  }
};

// ---- Replace -------------------------------------------------------------------------------
// HF compiles a String pattern into an escaped Oniguruma regex; for a literal that is leftmost
// non-overlapping matching. The empty pattern matches before every character and at the end of
// a non-empty token ("ab" -> "xaxbx"), and leaves an empty token empty.
class ReplaceStep final : public DecoderStep {
 public:
  ReplaceStep(std::string pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}

  void Apply(Tokens* tokens) const override {
    for (std::string& token : *tokens) {
      if (token.empty()) continue;
      std::string out;
      if (pattern_.empty()) {
        size_t i = 0;
        while (i < token.size()) {
          const size_t start = i;
          NextCodePoint(token, &i);
          out.append(content_);
          out.append(token, start, i - start);
        }
        out.append(content_);
      } else {
        size_t pos = 0;
        while (true) {
          const size_t hit = token.find(pattern_, pos);
          if (hit == std::string::npos) break;
          out.append(token, pos, hit - pos);
          out.append(content_);
          pos = hit + pattern_.size();
        }
        if (pos == 0) continue;  // no match: keep the token as it is
        out.append(token, pos, std::string::npos);
      }
      token = std::move(out);
    }
  }

 private:
  std::string pattern_;
  std::string content_;
};

// ---- ByteFallback --------------------------------------------------------------------------
// "<0xNN>" tokens are bytes. A run of them that is valid UTF-8 becomes one element; an invalid
// run becomes one "\uFFFD" element PER BYTE, valid ASCII bytes of the run included.
class ByteFallbackStep final : public DecoderStep {
 public:
  void Apply(Tokens* tokens) const override {
    Tokens out;
    out.reserve(tokens->size());
    std::string run;
    const auto flush = [&] {
      if (run.empty()) return;
      if (detok::IsValidUtf8(run)) {
        out.push_back(run);
      } else {
        for (size_t i = 0; i < run.size(); ++i) out.emplace_back(kReplacementChar);
      }
      run.clear();
    };
    for (std::string& token : *tokens) {
      int byte = -1;
      if (ParseByteToken(token, &byte)) {
        run.push_back(static_cast<char>(byte));
      } else {
        flush();
        out.push_back(std::move(token));
      }
    }
    flush();
    *tokens = std::move(out);
  }

  bool RawBytes(const std::string& token, std::string* out) const override {
    int byte = -1;
    if (!ParseByteToken(token, &byte)) return false;
    out->assign(1, static_cast<char>(byte));
    return true;
  }

 private:
  static int HexDigit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  // HF: `len == 6 && starts_with("<0x") && ends_with('>')` and u8::from_str_radix(token[3..5],
  // 16), which takes either case and a leading '+' ("<0x+F>" is byte 0x0F).
  static bool ParseByteToken(absl::string_view token, int* byte) {
    if (token.size() != 6 || token.substr(0, 3) != "<0x" || token[5] != '>') return false;
    const int hi = HexDigit(token[3]);
    const int lo = HexDigit(token[4]);
    if (token[3] == '+' && lo >= 0) {
      *byte = lo;
      return true;
    }
    if (hi < 0 || lo < 0) return false;
    *byte = hi * 16 + lo;
    return true;
  }
};

// ---- Fuse ----------------------------------------------------------------------------------
class FuseStep final : public DecoderStep {
 public:
  void Apply(Tokens* tokens) const override {
    std::string joined = absl::StrJoin(*tokens, "");
    tokens->assign(1, std::move(joined));
  }
};

// ---- Strip ---------------------------------------------------------------------------------
// Removes up to `start` leading and `stop` trailing `content` characters from every element.
// HF 0.22.2 panics when the two cuts cross or `stop` exceeds the element's length (" " with
// start=stop=1); we clamp instead: the trailing cut never passes the leading one.
class StripStep final : public DecoderStep {
 public:
  StripStep(char32_t content, uint64_t start, uint64_t stop)
      : content_(content), start_(start), stop_(stop) {}

  void Apply(Tokens* tokens) const override {
    std::vector<size_t> starts;  // byte offset of each code point, plus the end
    for (std::string& token : *tokens) {
      starts.clear();
      std::vector<char32_t> cps;
      size_t i = 0;
      while (i < token.size()) {
        starts.push_back(i);
        cps.push_back(NextCodePoint(token, &i));
      }
      starts.push_back(token.size());
      size_t start_cut = 0;
      while (start_cut < cps.size() && start_cut < start_ && cps[start_cut] == content_) {
        ++start_cut;
      }
      size_t stop_cut = cps.size();
      for (uint64_t k = 0; k < stop_ && stop_cut > start_cut && cps[stop_cut - 1] == content_;
           ++k) {
        --stop_cut;
      }
      if (start_cut == 0 && stop_cut == cps.size()) continue;
      token = token.substr(starts[start_cut], starts[stop_cut] - starts[start_cut]);
    }
  }

 private:
  char32_t content_;
  uint64_t start_;
  uint64_t stop_;
};

// ---- Metaspace -----------------------------------------------------------------------------
// The replacement character becomes a space, except in the FIRST element of the list, where
// every occurrence (not only a leading one) is dropped unless prepend_scheme is "never".
class MetaspaceStep final : public DecoderStep {
 public:
  MetaspaceStep(char32_t replacement, bool drop_in_first)
      : replacement_(replacement), drop_in_first_(drop_in_first) {}

  void Apply(Tokens* tokens) const override {
    for (size_t t = 0; t < tokens->size(); ++t) {
      std::string& token = (*tokens)[t];
      std::string out;
      out.reserve(token.size());
      size_t i = 0;
      while (i < token.size()) {
        const size_t begin = i;
        const char32_t cp = NextCodePoint(token, &i);
        if (cp != replacement_) {
          out.append(token, begin, i - begin);
        } else if (t != 0 || !drop_in_first_) {
          out.push_back(' ');
        }
      }
      token = std::move(out);
    }
  }

 private:
  char32_t replacement_;
  bool drop_in_first_;
};

// ---- JSON ----------------------------------------------------------------------------------

class DecoderParser {
 public:
  explicit DecoderParser(std::vector<std::unique_ptr<DecoderStep>>* steps) : steps_(steps) {}

  absl::Status Parse(const Json& j, const std::string& where, int depth) {
    if (depth > 16) return Invalid(where, "decoder Sequences nested more than 16 deep");
    if (!j.is_object()) {
      return Invalid(where, absl::StrCat("expected an object, found ", JsonTypeName(j)));
    }
    const auto type_it = j.find("type");
    if (type_it == j.end()) return Invalid(where, "decoder has no \"type\"");
    if (!type_it->is_string()) {
      return Invalid(where,
                     absl::StrCat("\"type\" must be a string, found ", JsonTypeName(*type_it)));
    }
    const std::string type = type_it->get<std::string>();
    const std::string at = absl::StrCat(where, " (", type, ")");
    if (type == "ByteLevel") {
      LS_RETURN_IF_ERROR(CheckKeys(j, at, {"add_prefix_space", "trim_offsets", "use_regex"}));
      // The three options only matter to the pre-tokenizer/post-processor; HF's decoder
      // ignores them, but they must still be booleans.
      for (const char* key : {"add_prefix_space", "trim_offsets", "use_regex"}) {
        LS_RETURN_IF_ERROR(OptionalBool(j, at, key, nullptr));
      }
      steps_->push_back(std::make_unique<ByteLevelStep>());
    } else if (type == "Replace") {
      LS_RETURN_IF_ERROR(CheckKeys(j, at, {"pattern", "content"}));
      const auto pattern = j.find("pattern");
      if (pattern == j.end()) return Invalid(at, "missing option \"pattern\"");
      if (!pattern->is_object() || pattern->size() != 1) {
        return Invalid(at, "\"pattern\" must be {\"String\": ...} or {\"Regex\": ...}");
      }
      if (pattern->contains("Regex")) {
        return absl::UnimplementedError(
            absl::StrCat(at, ": a Replace decoder with a Regex pattern is not supported"));
      }
      if (!pattern->contains("String")) {
        return Invalid(at, absl::StrCat("unknown pattern kind \"", pattern->begin().key(),
                                        "\" (expected \"String\" or \"Regex\")"));
      }
      std::string literal, content;
      LS_RETURN_IF_ERROR(RequiredString(*pattern, at + " pattern", "String", &literal));
      LS_RETURN_IF_ERROR(RequiredString(j, at, "content", &content));
      steps_->push_back(std::make_unique<ReplaceStep>(std::move(literal), std::move(content)));
    } else if (type == "ByteFallback") {
      LS_RETURN_IF_ERROR(CheckKeys(j, at, {}));
      steps_->push_back(std::make_unique<ByteFallbackStep>());
    } else if (type == "Fuse") {
      LS_RETURN_IF_ERROR(CheckKeys(j, at, {}));
      steps_->push_back(std::make_unique<FuseStep>());
    } else if (type == "Strip") {
      LS_RETURN_IF_ERROR(CheckKeys(j, at, {"content", "start", "stop"}));
      char32_t content = 0;
      uint64_t start = 0, stop = 0;
      LS_RETURN_IF_ERROR(RequiredChar(j, at, "content", &content));
      LS_RETURN_IF_ERROR(RequiredUnsigned(j, at, "start", &start));
      LS_RETURN_IF_ERROR(RequiredUnsigned(j, at, "stop", &stop));
      steps_->push_back(std::make_unique<StripStep>(content, start, stop));
    } else if (type == "Metaspace") {
      LS_RETURN_IF_ERROR(CheckKeys(
          j, at, {"replacement", "prepend_scheme", "split", "add_prefix_space", "str_rep"}));
      char32_t replacement = 0;
      LS_RETURN_IF_ERROR(RequiredChar(j, at, "replacement", &replacement));
      // HF: prepend_scheme defaults to "always"; a legacy `add_prefix_space: false` means
      // "never" and is an error next to any other scheme (the default included).
      std::string scheme = "always";
      const auto scheme_it = j.find("prepend_scheme");
      if (scheme_it != j.end()) {
        LS_RETURN_IF_ERROR(RequiredString(j, at, "prepend_scheme", &scheme));
        if (scheme != "first" && scheme != "never" && scheme != "always") {
          return Invalid(at, absl::StrCat("unknown prepend_scheme \"", scheme,
                                          "\" (expected \"first\", \"never\" or \"always\")"));
        }
      }
      bool add_prefix_space = true;
      LS_RETURN_IF_ERROR(OptionalBool(j, at, "add_prefix_space", &add_prefix_space));
      if (!add_prefix_space && scheme != "never") {
        return Invalid(at, absl::StrCat("add_prefix_space false does not match prepend_scheme \"",
                                        scheme, "\""));
      }
      LS_RETURN_IF_ERROR(OptionalBool(j, at, "split", nullptr));
      if (j.contains("str_rep") && !j["str_rep"].is_string()) {
        return Invalid(at, absl::StrCat("option \"str_rep\" must be a string, found ",
                                        JsonTypeName(j["str_rep"])));
      }
      steps_->push_back(std::make_unique<MetaspaceStep>(replacement, scheme != "never"));
    } else if (type == "Sequence") {
      LS_RETURN_IF_ERROR(CheckKeys(j, at, {"decoders"}));
      const auto list = j.find("decoders");
      if (list == j.end()) return Invalid(at, "missing option \"decoders\"");
      if (!list->is_array()) {
        return Invalid(at,
                       absl::StrCat("\"decoders\" must be an array, found ", JsonTypeName(*list)));
      }
      for (size_t i = 0; i < list->size(); ++i) {
        LS_RETURN_IF_ERROR(Parse((*list)[i], absl::StrCat(where, ".decoders[", i, "]"), depth + 1));
      }
    } else if (type == "WordPiece" || type == "BPEDecoder" || type == "CTC") {
      return absl::UnimplementedError(absl::StrCat(
          where, ": decoder type \"", type,
          "\" is not supported (supported: ByteLevel, Replace, ByteFallback, Fuse, Strip, "
          "Metaspace, Sequence)"));
    } else {
      return Invalid(where, absl::StrCat("unknown decoder type \"", type, "\""));
    }
    return absl::OkStatus();
  }

 private:
  static absl::Status Invalid(const std::string& where, absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", what));
  }

  static absl::Status CheckKeys(const Json& j, const std::string& at,
                                std::initializer_list<absl::string_view> allowed) {
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() == "type") continue;
      bool known = false;
      for (absl::string_view a : allowed) known = known || it.key() == a;
      if (!known) return Invalid(at, absl::StrCat("unknown option \"", it.key(), "\""));
    }
    return absl::OkStatus();
  }

  static absl::Status OptionalBool(const Json& j, const std::string& at, const char* key,
                                   bool* out) {
    const auto it = j.find(key);
    if (it == j.end()) return absl::OkStatus();
    if (!it->is_boolean()) {
      return Invalid(
          at, absl::StrCat("option \"", key, "\" must be a boolean, found ", JsonTypeName(*it)));
    }
    if (out != nullptr) *out = it->get<bool>();
    return absl::OkStatus();
  }

  static absl::Status RequiredString(const Json& j, const std::string& at, const char* key,
                                     std::string* out) {
    const auto it = j.find(key);
    if (it == j.end()) return Invalid(at, absl::StrCat("missing option \"", key, "\""));
    if (!it->is_string()) {
      return Invalid(
          at, absl::StrCat("option \"", key, "\" must be a string, found ", JsonTypeName(*it)));
    }
    *out = it->get<std::string>();
    return absl::OkStatus();
  }

  // A Rust `char`: a string holding exactly one code point.
  static absl::Status RequiredChar(const Json& j, const std::string& at, const char* key,
                                   char32_t* out) {
    std::string s;
    LS_RETURN_IF_ERROR(RequiredString(j, at, key, &s));
    size_t i = 0;
    if (!s.empty() && detok::IsValidUtf8(s)) *out = NextCodePoint(s, &i);
    if (s.empty() || i != s.size()) {
      return Invalid(at, absl::StrCat("option \"", key,
                                      "\" must be exactly one character, found \"", s, "\""));
    }
    return absl::OkStatus();
  }

  static absl::Status RequiredUnsigned(const Json& j, const std::string& at, const char* key,
                                       uint64_t* out) {
    const auto it = j.find(key);
    if (it == j.end()) return Invalid(at, absl::StrCat("missing option \"", key, "\""));
    if (!it->is_number_unsigned()) {
      return Invalid(at, absl::StrCat("option \"", key, "\" must be an unsigned integer, found ",
                                      JsonTypeName(*it)));
    }
    *out = it->get<uint64_t>();
    return absl::OkStatus();
  }

  std::vector<std::unique_ptr<DecoderStep>>* steps_;
};

}  // namespace

Detokenizer::Detokenizer() = default;
Detokenizer::~Detokenizer() = default;

absl::StatusOr<std::unique_ptr<Detokenizer>> Detokenizer::Create(DecodeVocab vocab,
                                                                 const Json& decoder_json) {
  const size_t n = vocab.id_to_token.size();
  if (vocab.present.size() != n || vocab.special.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeVocab: id_to_token has ", n, " entries but present has ",
                     vocab.present.size(), " and special has ", vocab.special.size()));
  }
  if (n > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeVocab: ", n, " ids do not fit int32"));
  }
  std::unordered_set<std::string> special_strings;
  for (size_t id = 0; id < n; ++id) {
    if (!vocab.present[id]) continue;
    if (!detok::IsValidUtf8(vocab.id_to_token[id])) {
      return absl::InvalidArgumentError(
          absl::StrCat("DecodeVocab: token of id ", id, " is not valid UTF-8"));
    }
    if (vocab.special[id]) special_strings.insert(vocab.id_to_token[id]);
  }

  auto detokenizer = std::unique_ptr<Detokenizer>(new Detokenizer());
  if (!decoder_json.is_null()) {
    DecoderParser parser(&detokenizer->steps_);
    LS_RETURN_IF_ERROR(parser.Parse(decoder_json, "tokenizer.json decoder", 0));
    detokenizer->has_decoder_ = true;
  }
  // HF skips by token string (AddedVocabulary::is_special_token), so a model-vocabulary id whose
  // string equals a special added token's content is skipped too.
  detokenizer->skip_.assign(n, false);
  for (size_t id = 0; id < n; ++id) {
    detokenizer->skip_[id] = vocab.present[id] && special_strings.count(vocab.id_to_token[id]) > 0;
  }
  detokenizer->vocab_ = std::move(vocab);
  // TokenBytes decodes a token after this one, so that first-token rules (Metaspace, Strip of
  // the dummy prefix) leave it as it reads mid-text.
  for (int32_t id = 0; id < detokenizer->vocab_size(); ++id) {
    if (detokenizer->IsDropped(id, /*skip_special_tokens=*/true)) continue;
    const std::string text = detokenizer->Decode(absl::MakeConstSpan(&id, 1), false);
    if (!text.empty() && !absl::StrContains(text, detok::kReplacementChar)) {
      detokenizer->anchor_id_ = id;
      break;
    }
  }
  return detokenizer;
}

bool Detokenizer::IsSpecial(int32_t id) const {
  return HasToken(id) && skip_[static_cast<size_t>(id)];
}

std::string Detokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const {
  Tokens tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) {
    if (IsDropped(id, skip_special_tokens)) continue;
    tokens.push_back(vocab_.id_to_token[static_cast<size_t>(id)]);
  }
  if (!has_decoder_) return absl::StrJoin(tokens, " ");
  for (const auto& step : steps_) step->Apply(&tokens);
  return absl::StrJoin(tokens, "");
}

std::string Detokenizer::TokenBytes(int32_t id) const {
  if (!HasToken(id)) return "";
  const std::string& token = vocab_.id_to_token[static_cast<size_t>(id)];
  std::string text = Decode(absl::MakeConstSpan(&id, 1), /*skip_special_tokens=*/false);
  if (anchor_id_ >= 0) {
    const int32_t pair[2] = {anchor_id_, id};
    const std::string anchor = Decode(absl::MakeConstSpan(pair, 1), false);
    const std::string both = Decode(pair, false);
    if (absl::StartsWith(both, anchor)) text = both.substr(anchor.size());
  }
  // A repaired text means the token is part of a character: its own bytes instead.
  if (!absl::StrContains(text, detok::kReplacementChar)) return text;
  std::string bytes;
  for (const auto& step : steps_) {
    if (step->RawBytes(token, &bytes)) return bytes;
  }
  return text;
}

const std::string& Detokenizer::TokenPiece(int32_t id) const {
  static const std::string kEmpty;
  return HasToken(id) ? vocab_.id_to_token[static_cast<size_t>(id)] : kEmpty;
}

}  // namespace ls
