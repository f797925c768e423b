#include "tokenizer/post_processor.h"

#include <algorithm>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "tokenizer/json_util.h"
#include "tokenizer/utf8.h"

namespace ls::tok {
namespace {

// Leading (or trailing) characters of a token string that ByteLevel trimming counts: 'Ġ' (the
// byte-level space) or White_Space.
bool IsTrimChar(char32_t c) { return c == 0x120 || IsWhiteSpace(c); }

size_t CountLeading(absl::string_view token) {
  size_t count = 0;
  for (size_t i = 0; i < token.size();) {
    if (!IsTrimChar(DecodeUtf8(token, &i))) break;
    ++count;
  }
  return count;
}

size_t CountTrailing(absl::string_view token) {
  size_t count = 0;
  for (size_t end = token.size(); end > 0;) {
    size_t start = PrevCharStart(token, end);
    size_t k = start;
    if (!IsTrimChar(DecodeUtf8(token, &k))) break;
    ++count;
    end = start;
  }
  return count;
}

absl::StatusOr<std::vector<int32_t>> ParseIds(const Json& json, absl::string_view what) {
  std::vector<int32_t> ids;
  if (!json.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", what, " must be an array"));
  }
  for (const Json& id : json) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: ", what, " must hold non-negative ids, found ", id.dump()));
    }
    ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
  }
  return ids;
}

}  // namespace

absl::StatusOr<std::unique_ptr<PostProcessor>> PostProcessor::Create(const Json& json) {
  std::unique_ptr<PostProcessor> p(new PostProcessor());
  if (json.is_null()) return p;
  LS_RETURN_IF_ERROR(Flatten(json, &p->steps_));
  return p;
}

absl::Status PostProcessor::Flatten(const Json& json, std::vector<Step>* steps) {
  LS_ASSIGN_OR_RETURN(const std::string type, ComponentType(json, "post_processor"));
  const std::string what = absl::StrCat("post_processor ", type);
  if (type == "Sequence") {
    LS_RETURN_IF_ERROR(CheckKeys(json, what, {"type", "processors"}));
    auto it = json.find("processors");
    if (it == json.end() || !it->is_array()) {
      return absl::InvalidArgumentError(
          "tokenizer.json: post_processor Sequence needs a \"processors\" array");
    }
    for (const Json& step : *it) LS_RETURN_IF_ERROR(Flatten(step, steps));
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    LS_RETURN_IF_ERROR(
        CheckKeys(json, what, {"type", "add_prefix_space", "trim_offsets", "use_regex"}));
    Step step;
    step.kind = Step::Kind::kByteLevel;
    LS_ASSIGN_OR_RETURN(step.trim_offsets, GetBool(json, "trim_offsets", what, true));
    LS_ASSIGN_OR_RETURN(step.add_prefix_space, GetBool(json, "add_prefix_space", what, true));
    LS_RETURN_IF_ERROR(GetBool(json, "use_regex", what, true).status());
    steps->push_back(std::move(step));
    return absl::OkStatus();
  }
  if (type == "TemplateProcessing") {
    LS_RETURN_IF_ERROR(CheckKeys(json, what, {"type", "single", "pair", "special_tokens"}));
    // special_tokens: name -> {id, ids, tokens}
    absl::flat_hash_map<std::string, TemplatePiece> specials;
    auto st = json.find("special_tokens");
    if (st != json.end() && !st->is_null()) {
      if (!st->is_object()) {
        return absl::InvalidArgumentError(
            "tokenizer.json: post_processor TemplateProcessing special_tokens must be an object");
      }
      for (auto it = st->begin(); it != st->end(); ++it) {
        const std::string sw = absl::StrCat(what, " special_tokens[\"", it.key(), "\"]");
        if (!it.value().is_object()) {
          return absl::InvalidArgumentError(
              absl::StrCat("tokenizer.json: ", sw, " must be an object"));
        }
        LS_RETURN_IF_ERROR(CheckKeys(it.value(), sw, {"id", "ids", "tokens"}));
        TemplatePiece piece;
        piece.is_sequence = false;
        auto ids = it.value().find("ids");
        auto tokens = it.value().find("tokens");
        if (ids == it.value().end() || tokens == it.value().end() || !tokens->is_array()) {
          return absl::InvalidArgumentError(
              absl::StrCat("tokenizer.json: ", sw, " needs \"ids\" and \"tokens\" arrays"));
        }
        LS_ASSIGN_OR_RETURN(piece.ids, ParseIds(*ids, absl::StrCat(sw, " ids")));
        for (const Json& t : *tokens) {
          if (!t.is_string()) {
            return absl::InvalidArgumentError(
                absl::StrCat("tokenizer.json: ", sw, " tokens must be strings"));
          }
          piece.tokens.push_back(t.get<std::string>());
        }
        if (piece.ids.size() != piece.tokens.size()) {
          return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", sw, " has ",
                                                         piece.ids.size(), " ids but ",
                                                         piece.tokens.size(), " tokens"));
        }
        specials.emplace(it.key(), std::move(piece));
      }
    }
    auto parse_template = [&](const char* key, bool allow_b,
                              std::vector<TemplatePiece>* out) -> absl::Status {
      auto t = json.find(key);
      if (t == json.end() || !t->is_array()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tokenizer.json: post_processor TemplateProcessing \"", key, "\" must be an array"));
      }
      for (const Json& item : *t) {
        if (!item.is_object() || item.size() != 1) {
          return absl::InvalidArgumentError(
              absl::StrCat("tokenizer.json: post_processor TemplateProcessing ", key,
                           " items must be {\"SpecialToken\": ...} or {\"Sequence\": ...}, found ",
                           item.dump()));
        }
        const auto kv = item.begin();
        const Json& body = kv.value();
        if (!body.is_object() || !body.contains("id") || !body["id"].is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat("tokenizer.json: post_processor TemplateProcessing ", key, " item ",
                           item.dump(), " needs a string \"id\""));
        }
        const std::string id = body["id"].get<std::string>();
        if (kv.key() == "Sequence") {
          if (id != "A" && !(allow_b && id == "B")) {
            return absl::InvalidArgumentError(
                absl::StrCat("tokenizer.json: post_processor TemplateProcessing ", key,
                             " sequence \"", id, "\" is not supported"));
          }
          out->push_back({true, {}, {}});
        } else if (kv.key() == "SpecialToken") {
          auto s = specials.find(id);
          if (s == specials.end()) {
            return absl::InvalidArgumentError(
                absl::StrCat("tokenizer.json: post_processor TemplateProcessing ", key,
                             " uses special token \"", id, "\" missing from special_tokens"));
          }
          out->push_back(s->second);
        } else {
          return absl::InvalidArgumentError(
              absl::StrCat("tokenizer.json: post_processor TemplateProcessing ", key,
                           " item kind \"", kv.key(), "\" is not supported"));
        }
      }
      return absl::OkStatus();
    };
    Step step;
    step.kind = Step::Kind::kTemplate;
    LS_RETURN_IF_ERROR(parse_template("single", false, &step.single));
    std::vector<TemplatePiece> pair;
    if (json.contains("pair") && !json["pair"].is_null()) {
      LS_RETURN_IF_ERROR(parse_template("pair", true, &pair));
    }
    steps->push_back(std::move(step));
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer.json: post_processor type \"", type, "\" is not supported"));
}

void PostProcessor::TrimOffsets(absl::string_view text, bool add_prefix_space, Encoding* encoding) {
  // HF ByteLevel process_offsets. The Python binding (which expected.json comes from) does this
  // arithmetic on character offsets, so we step over characters of the original text.
  for (size_t i = 0; i < encoding->tokens.size(); ++i) {
    const std::string& token = encoding->tokens[i];
    size_t leading = CountLeading(token);
    const size_t trailing = CountTrailing(token);
    if (leading == 0 && trailing == 0) continue;
    auto& [start, end] = encoding->offsets[i];
    if (leading > 0) {
      const bool is_first = i == 0 || start == 0;
      if (is_first && add_prefix_space && leading == 1) leading = 0;
      for (size_t k = 0; k < leading && start < end; ++k) {
        start += static_cast<uint32_t>(Utf8Len(static_cast<uint8_t>(text[start])));
      }
      start = std::min(start, end);
    }
    if (trailing > 0) {
      // Only if `end` is at least `trailing` characters into the text.
      uint32_t e = end;
      size_t k = 0;
      for (; k < trailing && e > 0; ++k) e = static_cast<uint32_t>(PrevCharStart(text, e));
      if (k == trailing) end = std::max(e, start);
    }
  }
}

void PostProcessor::Process(absl::string_view text, bool add_special_tokens, bool with_strings,
                            Encoding* encoding) const {
  for (const Step& step : steps_) {
    if (step.kind == Step::Kind::kByteLevel) {
      if (step.trim_offsets && with_strings) TrimOffsets(text, step.add_prefix_space, encoding);
      continue;
    }
    if (!add_special_tokens) continue;
    size_t extra = 0;
    for (const TemplatePiece& p : step.single) extra += p.is_sequence ? 0 : p.ids.size();
    if (extra == 0) continue;
    Encoding out;
    out.ids.reserve(encoding->ids.size() + extra);
    for (const TemplatePiece& p : step.single) {
      if (p.is_sequence) {
        out.ids.insert(out.ids.end(), encoding->ids.begin(), encoding->ids.end());
        if (with_strings) {
          std::move(encoding->tokens.begin(), encoding->tokens.end(),
                    std::back_inserter(out.tokens));
          out.offsets.insert(out.offsets.end(), encoding->offsets.begin(), encoding->offsets.end());
          out.special_tokens_mask.insert(out.special_tokens_mask.end(),
                                         encoding->special_tokens_mask.begin(),
                                         encoding->special_tokens_mask.end());
        }
        continue;
      }
      out.ids.insert(out.ids.end(), p.ids.begin(), p.ids.end());
      if (with_strings) {
        out.tokens.insert(out.tokens.end(), p.tokens.begin(), p.tokens.end());
        out.offsets.insert(out.offsets.end(), p.ids.size(), {0, 0});
        out.special_tokens_mask.insert(out.special_tokens_mask.end(), p.ids.size(), 1);
      }
    }
    *encoding = std::move(out);
  }
}

}  // namespace ls::tok
