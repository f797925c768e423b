#include "tokenizer/pre_tokenizer.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "tokenizer/json_util.h"

namespace ls::tok {
namespace {

// How a Split keeps its matches (HF SplitDelimiterBehavior).
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Turns the matches in a piece of length `len` into HF's (range, is_match) list covering the
// whole piece, then applies `behavior` as NormalizedString::split does. Output ranges may be
// empty; the caller drops those (HF drops empty splits). Removed ranges are not emitted.
void ApplyBehavior(const std::vector<MatchRange>& matches, uint32_t len, bool invert,
                   SplitBehavior behavior, std::vector<PreTokenizeScratch::Split>* out) {
  using Split = PreTokenizeScratch::Split;
  thread_local std::vector<Split> all;
  all.clear();
  uint32_t prev = 0;
  for (const MatchRange& m : matches) {
    if (prev != m.first) all.push_back({prev, m.first, invert});
    all.push_back({m.first, m.second, !invert});
    prev = m.second;
  }
  if (prev != len) all.push_back({prev, len, invert});
  out->clear();
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Split& s : all) out->push_back({s.begin, s.end, false});
      return;
    case SplitBehavior::kRemoved:
      for (const Split& s : all) {
        if (!s.is_match) out->push_back(s);
      }
      return;
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const Split& s : all) {
        if (s.is_match == previous_match && !out->empty()) {
          out->back().end = s.end;
        } else {
          out->push_back({s.begin, s.end, false});
        }
        previous_match = s.is_match;
      }
      return;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const Split& s : all) {
        if (s.is_match && !previous_match && !out->empty()) {
          out->back().end = s.end;
        } else {
          out->push_back({s.begin, s.end, false});
        }
        previous_match = s.is_match;
      }
      return;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = all.rbegin(); it != all.rend(); ++it) {
        if (it->is_match && !previous_match && !out->empty()) {
          out->back().begin = it->begin;
        } else {
          out->push_back({it->begin, it->end, false});
        }
        previous_match = it->is_match;
      }
      std::reverse(out->begin(), out->end());
      return;
    }
  }
}

// Splits every text piece of `text` in place, using `find` to list the matches of a piece.
template <typename FindFn>
absl::Status SplitPieces(PieceText* text, PreTokenizeScratch* scratch, bool invert,
                         SplitBehavior behavior, FindFn find) {
  std::vector<Piece>& out = scratch->pieces;
  out.clear();
  const absl::string_view all = text->text();
  for (const Piece& p : text->pieces()) {
    if (p.is_added()) {
      out.push_back(p);
      continue;
    }
    scratch->matches.clear();
    LS_RETURN_IF_ERROR(find(all.substr(p.begin, p.end - p.begin), &scratch->matches));
    ApplyBehavior(scratch->matches, p.end - p.begin, invert, behavior, &scratch->splits);
    for (const auto& s : scratch->splits) {
      if (s.end > s.begin) out.push_back({p.begin + s.begin, p.begin + s.end, -1});
    }
  }
  std::swap(text->pieces(), out);
  return absl::OkStatus();
}

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  absl::Status Apply(PieceText* text, PreTokenizeScratch* scratch) const override {
    return SplitPieces(
        text, scratch, invert_, behavior_,
        [this](absl::string_view s, std::vector<MatchRange>* m) { return pattern_.FindAll(s, m); });
  }

 private:
  Pattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

// Prepends `prefix` to every text piece for which `wants(piece text, piece)` says so; every
// prefix byte takes the span of the piece's first character (NormalizedString::prepend).
template <typename WantsFn>
void PrependToPieces(PieceText* text, PreTokenizeScratch* scratch, absl::string_view prefix,
                     WantsFn wants) {
  bool any = false;
  for (const Piece& p : text->pieces()) {
    if (!p.is_added() && wants(text->PieceString(p), p)) {
      any = true;
      break;
    }
  }
  if (!any) return;
  PieceTextBuilder& b = scratch->builder;
  b.Start(*text);
  for (const Piece& p : text->pieces()) {
    if (p.is_added() || !wants(text->PieceString(p), p)) {
      b.CopyPiece(p);
      continue;
    }
    AlignedString& s = scratch->piece;
    text->PieceToAligned(p, &s);
    const Span first = s.align[0];
    s.text.insert(0, prefix.data(), prefix.size());
    s.align.insert(s.align.begin(), prefix.size(), first);
    b.AddPiece(s);
  }
  b.Finish(text);
}

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::shared_ptr<const Regex> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}
  absl::Status Apply(PieceText* text, PreTokenizeScratch* scratch) const override {
    if (add_prefix_space_) {
      PrependToPieces(text, scratch, " ",
                      [](absl::string_view s, const Piece&) { return s.empty() || s[0] != ' '; });
    }
    if (regex_ == nullptr) return absl::OkStatus();
    return SplitPieces(
        text, scratch, false, SplitBehavior::kIsolated,
        [this](absl::string_view s, std::vector<MatchRange>* m) { return regex_->FindAll(s, m); });
  }

 private:
  bool add_prefix_space_;
  std::shared_ptr<const Regex> regex_;  // null: use_regex false
};

enum class PrependScheme { kAlways, kFirst, kNever };

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {}

  absl::Status Apply(PieceText* text, PreTokenizeScratch* scratch) const override {
    PieceTextBuilder& b = scratch->builder;
    b.Start(*text);
    AlignedString& s = scratch->piece;
    for (const Piece& p : text->pieces()) {
      if (p.is_added()) {
        b.CopyPiece(p);
        continue;
      }
      // The original offset where this piece starts: HF's offsets_original().0.
      const uint32_t original_start = text->Original(p.begin, p.end).start;
      // Replace ' ' with the replacement; it takes the space's span.
      text->PieceToAligned(p, &s);
      if (s.text.find(' ') != std::string::npos) {
        AlignedString& r = scratch_replaced();
        r.clear();
        for (size_t i = 0; i < s.text.size(); ++i) {
          if (s.text[i] == ' ') {
            r.AppendBytes(replacement_, s.align[i]);
          } else {
            r.text.push_back(s.text[i]);
            r.align.push_back(s.align[i]);
          }
        }
        std::swap(s, r);
      }
      const bool starts = s.text.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts && (scheme_ == PrependScheme::kAlways ||
                      (scheme_ == PrependScheme::kFirst && original_start == 0))) {
        const Span first = s.align[0];
        s.text.insert(0, replacement_);
        s.align.insert(s.align.begin(), replacement_.size(), first);
      }
      if (!split_) {
        b.AddPiece(s);
        continue;
      }
      // Split on the replacement, MergedWithNext: each "▁" starts a new piece.
      scratch->matches.clear();
      for (size_t pos = s.text.find(replacement_); pos != std::string::npos;
           pos = s.text.find(replacement_, pos + replacement_.size())) {
        scratch->matches.emplace_back(static_cast<uint32_t>(pos),
                                      static_cast<uint32_t>(pos + replacement_.size()));
      }
      ApplyBehavior(scratch->matches, static_cast<uint32_t>(s.text.size()), false,
                    SplitBehavior::kMergedWithNext, &scratch->splits);
      for (const auto& sp : scratch->splits) b.AddPieceRange(s, sp.begin, sp.end, -1);
    }
    b.Finish(text);
    return absl::OkStatus();
  }

 private:
  static AlignedString& scratch_replaced() {
    thread_local AlignedString r;
    return r;
  }
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

std::shared_ptr<const Regex> Gpt2Regex(absl::Status* status) {
  static const auto* const compiled =
      new absl::StatusOr<std::unique_ptr<Regex>>(Regex::Compile(kGpt2Pattern, "ByteLevel pattern"));
  if (!compiled->ok()) {
    *status = compiled->status();
    return nullptr;
  }
  // The static owns the Regex for the life of the process; hand out a non-owning shared_ptr.
  return std::shared_ptr<const Regex>(compiled->value().get(), [](const Regex*) {});
}

absl::Status Flatten(const Json& json, PreTokenizerChain* chain, bool* saw_byte_level) {
  LS_ASSIGN_OR_RETURN(const std::string type, ComponentType(json, "pre_tokenizer"));
  const std::string what = absl::StrCat("pre_tokenizer ", type);
  if (*saw_byte_level) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer.json: pre_tokenizer ", type,
        " after ByteLevel is not supported (ByteLevel must be the last pre-tokenizer)"));
  }
  if (type == "Sequence") {
    LS_RETURN_IF_ERROR(CheckKeys(json, what, {"type", "pretokenizers"}));
    auto it = json.find("pretokenizers");
    if (it == json.end() || !it->is_array()) {
      return absl::InvalidArgumentError(
          "tokenizer.json: pre_tokenizer Sequence needs a \"pretokenizers\" array");
    }
    for (const Json& step : *it) LS_RETURN_IF_ERROR(Flatten(step, chain, saw_byte_level));
    return absl::OkStatus();
  }
  if (type == "Split") {
    LS_RETURN_IF_ERROR(CheckKeys(json, what, {"type", "pattern", "behavior", "invert"}));
    auto it = json.find("pattern");
    if (it == json.end()) {
      return absl::InvalidArgumentError("tokenizer.json: pre_tokenizer Split has no \"pattern\"");
    }
    LS_ASSIGN_OR_RETURN(Pattern pattern, Pattern::FromJson(*it, what));
    LS_ASSIGN_OR_RETURN(const std::string behavior_name, GetString(json, "behavior", what));
    SplitBehavior behavior;
    if (behavior_name == "Removed") {
      behavior = SplitBehavior::kRemoved;
    } else if (behavior_name == "Isolated") {
      behavior = SplitBehavior::kIsolated;
    } else if (behavior_name == "MergedWithPrevious") {
      behavior = SplitBehavior::kMergedWithPrevious;
    } else if (behavior_name == "MergedWithNext") {
      behavior = SplitBehavior::kMergedWithNext;
    } else if (behavior_name == "Contiguous") {
      behavior = SplitBehavior::kContiguous;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokenizer.json: pre_tokenizer Split behavior \"", behavior_name, "\" is not supported"));
    }
    LS_ASSIGN_OR_RETURN(const bool invert, GetBool(json, "invert", what, false));
    chain->steps.push_back(
        std::make_unique<SplitPreTokenizer>(std::move(pattern), behavior, invert));
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    LS_RETURN_IF_ERROR(
        CheckKeys(json, what, {"type", "add_prefix_space", "trim_offsets", "use_regex"}));
    LS_ASSIGN_OR_RETURN(const bool add_prefix_space, GetBool(json, "add_prefix_space", what, true));
    LS_ASSIGN_OR_RETURN(const bool use_regex, GetBool(json, "use_regex", what, true));
    // trim_offsets only matters to the ByteLevel post-processor.
    LS_RETURN_IF_ERROR(GetBool(json, "trim_offsets", what, true).status());
    std::shared_ptr<const Regex> regex;
    if (use_regex) {
      absl::Status status;
      regex = Gpt2Regex(&status);
      LS_RETURN_IF_ERROR(status);
    }
    chain->steps.push_back(std::make_unique<ByteLevelPreTokenizer>(add_prefix_space, regex));
    chain->byte_level = true;
    *saw_byte_level = true;
    return absl::OkStatus();
  }
  if (type == "Metaspace") {
    LS_RETURN_IF_ERROR(CheckKeys(
        json, what,
        {"type", "replacement", "prepend_scheme", "split", "add_prefix_space", "str_rep"}));
    LS_ASSIGN_OR_RETURN(std::string replacement, GetString(json, "replacement", what));
    if (replacement.empty() ||
        Utf8Len(static_cast<uint8_t>(replacement[0])) != replacement.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokenizer.json: pre_tokenizer Metaspace replacement must be one character, found \"",
          replacement, "\""));
    }
    bool has_scheme = false;
    LS_ASSIGN_OR_RETURN(const std::string scheme_name,
                        GetOptionalString(json, "prepend_scheme", what, &has_scheme));
    auto legacy = json.find("add_prefix_space");
    const bool legacy_false = legacy != json.end() && legacy->is_boolean() && !legacy->get<bool>();
    if (legacy != json.end() && !legacy->is_boolean() && !legacy->is_null()) {
      return FieldError(what, "add_prefix_space", "true or false", *legacy);
    }
    PrependScheme scheme = legacy_false ? PrependScheme::kNever : PrependScheme::kAlways;
    if (has_scheme) {
      if (scheme_name == "always") {
        scheme = PrependScheme::kAlways;
      } else if (scheme_name == "first") {
        scheme = PrependScheme::kFirst;
      } else if (scheme_name == "never") {
        scheme = PrependScheme::kNever;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.json: pre_tokenizer Metaspace prepend_scheme \"", scheme_name,
                         "\" is not supported"));
      }
      if (legacy_false && scheme != PrependScheme::kNever) {
        return absl::InvalidArgumentError(
            "tokenizer.json: pre_tokenizer Metaspace has add_prefix_space false with "
            "prepend_scheme \"" +
            scheme_name + "\"; ambiguous, not supported");
      }
    }
    LS_ASSIGN_OR_RETURN(const bool split, GetBool(json, "split", what, true));
    chain->steps.push_back(
        std::make_unique<MetaspacePreTokenizer>(std::move(replacement), scheme, split));
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer.json: pre_tokenizer type \"", type, "\" is not supported"));
}

}  // namespace

absl::StatusOr<PreTokenizerChain> CreatePreTokenizer(const Json& json) {
  PreTokenizerChain chain;
  if (json.is_null()) return chain;
  bool saw_byte_level = false;
  LS_RETURN_IF_ERROR(Flatten(json, &chain, &saw_byte_level));
  return chain;
}

}  // namespace ls::tok
