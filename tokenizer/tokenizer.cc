// Encode pipeline, in Hugging Face `tokenizers` order (TokenizerImpl::encode_single_sequence):
//   1. added tokens with normalized=false are cut out of the raw text;
//   2. every other piece is normalized on its own, then normalized=true added tokens are cut out;
//   3. the pre-tokenizer chain splits the text pieces;
//   4. the BPE model tokenizes each piece; offsets map back through the alignment (pieces.h);
//   5. the post-processor trims offsets (ByteLevel) and adds template tokens (BOS).
// See docs/tokenizer.md for the quirks each step reproduces.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/json.h"
#include "common/mmap_file.h"
#include "common/status.h"
#include "tokenizer/added_vocab.h"
#include "tokenizer/bpe.h"
#include "tokenizer/json_util.h"
#include "tokenizer/normalizer.h"
#include "tokenizer/pieces.h"
#include "tokenizer/post_processor.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/utf8.h"

namespace ls {

using tok::AddedMatch;
using tok::AlignedString;
using tok::Piece;
using tok::PieceText;
using tok::PieceTextBuilder;

namespace {

// Offsets are 32-bit. Normalization can grow text (NFKC up to ~11x, Metaspace 3x), so inputs
// are capped well below 4 GiB, and so is the normalized text.
constexpr size_t kMaxInputBytes = size_t{64} << 20;
constexpr size_t kMaxNormalizedBytes = size_t{1} << 30;

// Buffers one thread reuses across Encode calls (and across Tokenizer instances: they hold no
// state between calls).
struct EncodeScratch {
  PieceText text;
  PieceTextBuilder builder;
  tok::PreTokenizeScratch pre;
  AlignedString piece;
  AlignedString tmp;
  std::vector<AddedMatch> matches;
  std::vector<Piece> pieces;
  std::vector<tok::BpeToken> bpe;

  // Gives memory back after an unusually large input instead of holding it for the thread's
  // lifetime.
  void TrimIfHuge() {
    constexpr size_t kKeepBytes = size_t{8} << 20;
    if (text.text().size() > kKeepBytes || piece.text.capacity() > kKeepBytes) {
      text = PieceText();
      builder = PieceTextBuilder();
      pre = tok::PreTokenizeScratch();
      piece = AlignedString();
      tmp = AlignedString();
      pieces = std::vector<Piece>();
      bpe = std::vector<tok::BpeToken>();
    }
  }
};

EncodeScratch& ThreadScratch() {
  thread_local EncodeScratch scratch;
  return scratch;
}

// Appends the pieces of `s` (or of normalized bytes [begin, end)) split around added-token
// matches.
void AddSplitPieces(const AlignedString& s, const std::vector<AddedMatch>& matches,
                    PieceTextBuilder* builder) {
  uint32_t pos = 0;
  for (const AddedMatch& m : matches) {
    builder->AddPieceRange(s, pos, m.start, -1);
    builder->AddPieceRange(s, m.start, m.end, m.id);
    pos = m.end;
  }
  builder->AddPieceRange(s, pos, static_cast<uint32_t>(s.text.size()), -1);
}

absl::StatusOr<std::optional<std::string>> ConfigTokenName(const Json& config, const char* key) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) {
      return std::optional<std::string>(content->get<std::string>());
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("tokenizer_config.json: \"", key,
                                                 "\" must be a string, an object with a "
                                                 "\"content\" string, or null; found ",
                                                 JsonTypeName(*it)));
}

absl::StatusOr<std::vector<int32_t>> ConfigIds(const Json& config, const char* key,
                                               absl::string_view file) {
  std::vector<int32_t> ids;
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return ids;
  auto one = [&](const Json& v) -> absl::Status {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
      return absl::InvalidArgumentError(absl::StrCat(file, ": \"", key,
                                                     "\" must be a non-negative id or a list of "
                                                     "them, found ",
                                                     v.dump()));
    }
    ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    return absl::OkStatus();
  };
  if (it->is_array()) {
    for (const Json& v : *it) LS_RETURN_IF_ERROR(one(v));
  } else {
    LS_RETURN_IF_ERROR(one(*it));
  }
  return ids;
}

absl::StatusOr<std::string> ReadOptionalFile(const std::string& path, bool* present) {
  *present = false;
  auto file = MappedFile::Open(path);
  if (!file.ok()) {
    if (absl::IsNotFound(file.status())) return std::string();
    return file.status();
  }
  *present = true;
  const auto bytes = (*file)->bytes();
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

}  // namespace

struct Tokenizer::Impl {
  std::unique_ptr<tok::Normalizer> normalizer;  // null: none
  tok::PreTokenizerChain pre_tokenizer;
  std::unique_ptr<tok::BpeModel> model;
  std::unique_ptr<tok::AddedVocabulary> added;
  std::unique_ptr<tok::PostProcessor> post_processor;

  // The whole pipeline; `with_strings` false skips token strings and offsets (EncodeIds).
  absl::Status Run(absl::string_view text, const EncodeOptions& options, bool with_strings,
                   Encoding* out) const;
  absl::Status RunPieces(absl::string_view text, const EncodeOptions& options, bool with_strings,
                         EncodeScratch* scratch, Encoding* out) const;
  // Steps 1-2: added tokens and normalization, leaving the pieces in `s->text`.
  absl::Status SplitAndNormalize(absl::string_view text, bool skip_special, EncodeScratch* s) const;
};

absl::Status Tokenizer::Impl::SplitAndNormalize(absl::string_view text, bool skip_special,
                                                EncodeScratch* s) const {
  PieceText& pt = s->text;
  pt.Reset(text);
  if (pt.pieces().empty()) return absl::OkStatus();
  // 1. Added tokens on the raw text (identity alignment: slicing only).
  s->matches.clear();
  added->FindMatches(text, /*normalized_set=*/false, skip_special, &s->matches);
  if (!s->matches.empty()) {
    std::vector<Piece>& pieces = pt.pieces();
    pieces.clear();
    uint32_t pos = 0;
    for (const AddedMatch& m : s->matches) {
      if (m.start > pos) pieces.push_back({pos, m.start, -1});
      pieces.push_back({m.start, m.end, m.id});
      pos = m.end;
    }
    if (pos < text.size()) pieces.push_back({pos, static_cast<uint32_t>(text.size()), -1});
  }
  // 2. Normalize each text piece on its own, then cut out normalized added tokens.
  const bool normalized_tokens = added->has_normalized_tokens();
  if (normalizer == nullptr && !normalized_tokens) return absl::OkStatus();
  bool rewrites = false;
  if (normalizer != nullptr) {
    for (const Piece& p : pt.pieces()) {
      if (!p.is_added() && !normalizer->IsNoop(pt.PieceString(p))) {
        rewrites = true;
        break;
      }
    }
  }
  if (!rewrites) {
    // The text stays as it is (and identity-aligned): only cut out normalized added tokens.
    if (!normalized_tokens) return absl::OkStatus();
    std::vector<Piece>& out = s->pieces;
    out.clear();
    for (const Piece& p : pt.pieces()) {
      if (p.is_added()) {
        out.push_back(p);
        continue;
      }
      s->matches.clear();
      added->FindMatches(pt.PieceString(p), /*normalized_set=*/true, skip_special, &s->matches);
      uint32_t pos = p.begin;
      for (const AddedMatch& m : s->matches) {
        if (p.begin + m.start > pos) out.push_back({pos, p.begin + m.start, -1});
        out.push_back({p.begin + m.start, p.begin + m.end, m.id});
        pos = p.begin + m.end;
      }
      if (p.end > pos) out.push_back({pos, p.end, -1});
    }
    std::swap(pt.pieces(), out);
    return absl::OkStatus();
  }
  PieceTextBuilder& b = s->builder;
  b.Start(pt);
  for (const Piece& p : pt.pieces()) {
    if (p.is_added()) {
      b.CopyPiece(p);
      continue;
    }
    pt.PieceToAligned(p, &s->piece);
    if (normalizer != nullptr) LS_RETURN_IF_ERROR(normalizer->Normalize(&s->piece, &s->tmp));
    s->matches.clear();
    if (normalized_tokens) {
      added->FindMatches(s->piece.text, /*normalized_set=*/true, skip_special, &s->matches);
    }
    AddSplitPieces(s->piece, s->matches, &b);
  }
  b.Finish(&pt);
  return absl::OkStatus();
}

absl::Status Tokenizer::Impl::Run(absl::string_view text, const EncodeOptions& options,
                                  bool with_strings, Encoding* out) const {
  size_t bad = 0;
  if (!tok::IsValidUtf8(text, &bad)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Encode: input is not valid UTF-8 (bad sequence at byte ", bad, ")"));
  }
  if (text.size() > kMaxInputBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Encode: input of ", text.size(), " bytes is longer than the limit of ", kMaxInputBytes));
  }
  EncodeScratch& s = ThreadScratch();
  absl::Status status = RunPieces(text, options, with_strings, &s, out);
  s.TrimIfHuge();
  return status;
}

absl::Status Tokenizer::Impl::RunPieces(absl::string_view text, const EncodeOptions& options,
                                        bool with_strings, EncodeScratch* scratch,
                                        Encoding* out) const {
  EncodeScratch& s = *scratch;
  LS_RETURN_IF_ERROR(SplitAndNormalize(text, !options.parse_special, &s));
  PieceText& pt = s.text;
  if (pt.text().size() > kMaxNormalizedBytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("Encode: normalization grew a ", text.size(), "-byte input to ",
                     pt.text().size(), " bytes, over the limit of ", kMaxNormalizedBytes));
  }
  // 3. Pre-tokenize.
  LS_RETURN_IF_ERROR(pre_tokenizer.Apply(&pt, &s.pre));
  // 4. Model.
  *out = Encoding();
  const size_t expected_tokens = pt.text().size() / 3 + 4;
  out->ids.reserve(expected_tokens);
  if (with_strings) {
    out->tokens.reserve(expected_tokens);
    out->offsets.reserve(expected_tokens);
  }
  for (const Piece& p : pt.pieces()) {
    if (p.is_added()) {
      out->ids.push_back(p.added_id);
      if (with_strings) {
        out->tokens.emplace_back(pt.PieceString(p));
        const tok::Span o = pt.Original(p.begin, p.end);
        out->offsets.emplace_back(o.start, o.end);
      }
      continue;
    }
    s.bpe.clear();
    LS_RETURN_IF_ERROR(model->Tokenize(pt.PieceString(p), &s.bpe));
    for (const tok::BpeToken& t : s.bpe) {
      out->ids.push_back(t.id);
      if (with_strings) {
        out->tokens.push_back(model->IdToToken(t.id));
        const tok::Span o = pt.Original(p.begin + t.start, p.begin + t.end);
        out->offsets.emplace_back(o.start, o.end);
      }
    }
  }
  if (with_strings) out->special_tokens_mask.assign(out->ids.size(), 0);
  // 5. Post-process.
  post_processor->Process(text, options.add_special_tokens, with_strings, out);
  return absl::OkStatus();
}

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    absl::string_view tokenizer_json, absl::string_view tokenizer_config_json,
    absl::string_view generation_config_json) {
  LS_ASSIGN_OR_RETURN(const Json json, ParseJsonStrict(tokenizer_json, "tokenizer.json"));
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json: must be an object, found ", JsonTypeName(json)));
  }
  // truncation and padding are ignored, as transformers does by default (it resets both on every
  // call unless asked to truncate or pad).
  LS_RETURN_IF_ERROR(
      tok::CheckKeys(json, "top level",
                     {"version", "truncation", "padding", "added_tokens", "normalizer",
                      "pre_tokenizer", "model", "post_processor", "decoder"}));
  auto member = [&json](const char* key) -> const Json& {
    static const Json* const kNull = new Json(nullptr);
    auto it = json.find(key);
    return it == json.end() ? *kNull : *it;
  };
  std::unique_ptr<Tokenizer> tokenizer(new Tokenizer());
  auto impl = std::make_unique<Impl>();
  if (!member("normalizer").is_null()) {
    LS_ASSIGN_OR_RETURN(impl->normalizer, tok::CreateNormalizer(member("normalizer")));
  }
  LS_ASSIGN_OR_RETURN(impl->pre_tokenizer, tok::CreatePreTokenizer(member("pre_tokenizer")));
  if (member("model").is_null()) {
    return absl::InvalidArgumentError("tokenizer.json: \"model\" is missing");
  }
  LS_ASSIGN_OR_RETURN(impl->model,
                      tok::BpeModel::Create(member("model"), impl->pre_tokenizer.byte_level));
  LS_ASSIGN_OR_RETURN(
      impl->added,
      tok::AddedVocabulary::Create(member("added_tokens"), *impl->model, impl->normalizer.get()));
  LS_ASSIGN_OR_RETURN(impl->post_processor, tok::PostProcessor::Create(member("post_processor")));

  // The id -> token table decoding uses: added tokens over the model vocabulary (HF
  // id_to_token looks at the added vocabulary first).
  DecodeVocab vocab;
  size_t size = impl->model->id_to_token().size();
  for (const auto& [id, token] : impl->added->by_id()) {
    size = std::max(size, static_cast<size_t>(id) + 1);
  }
  vocab.id_to_token = impl->model->id_to_token();
  vocab.id_to_token.resize(size);
  vocab.present = impl->model->present();
  vocab.present.resize(size, false);
  for (const auto& [id, token] : impl->added->by_id()) {
    vocab.id_to_token[id] = token.content;
    vocab.present[id] = true;
  }
  vocab.special.assign(size, false);
  for (size_t id = 0; id < size; ++id) {
    vocab.special[id] = vocab.present[id] && impl->added->IsSpecialContent(vocab.id_to_token[id]);
  }
  LS_ASSIGN_OR_RETURN(tokenizer->detokenizer_,
                      Detokenizer::Create(std::move(vocab), member("decoder")));
  tokenizer->impl_ = std::move(impl);

  // BOS / EOS.
  auto lookup = [&tokenizer](absl::string_view file, const char* key,
                             const std::string& name) -> absl::StatusOr<int32_t> {
    auto id = tokenizer->TokenToId(name);
    if (!id) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": ", key, " \"", name, "\" is not in the vocabulary"));
    }
    return *id;
  };
  if (!tokenizer_config_json.empty()) {
    LS_ASSIGN_OR_RETURN(const Json config,
                        ParseJsonStrict(tokenizer_config_json, "tokenizer_config.json"));
    if (!config.is_object()) {
      return absl::InvalidArgumentError("tokenizer_config.json: must be an object");
    }
    LS_ASSIGN_OR_RETURN(auto bos, ConfigTokenName(config, "bos_token"));
    if (bos) {
      LS_ASSIGN_OR_RETURN(tokenizer->bos_token_id_,
                          lookup("tokenizer_config.json", "bos_token", *bos));
    }
    LS_ASSIGN_OR_RETURN(auto eos, ConfigTokenName(config, "eos_token"));
    if (eos) {
      LS_ASSIGN_OR_RETURN(const int32_t id, lookup("tokenizer_config.json", "eos_token", *eos));
      tokenizer->eos_token_ids_ = {id};
    }
  }
  if (!generation_config_json.empty()) {
    LS_ASSIGN_OR_RETURN(const Json config,
                        ParseJsonStrict(generation_config_json, "generation_config.json"));
    if (!config.is_object()) {
      return absl::InvalidArgumentError("generation_config.json: must be an object");
    }
    LS_ASSIGN_OR_RETURN(auto eos, ConfigIds(config, "eos_token_id", "generation_config.json"));
    if (!eos.empty()) tokenizer->eos_token_ids_ = std::move(eos);
    LS_ASSIGN_OR_RETURN(auto bos, ConfigIds(config, "bos_token_id", "generation_config.json"));
    if (!tokenizer->bos_token_id_ && !bos.empty()) tokenizer->bos_token_id_ = bos[0];
  }
  return tokenizer;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadFromDir(const std::string& dir) {
  bool present = false;
  LS_ASSIGN_OR_RETURN(const std::string tokenizer_json,
                      ReadOptionalFile(dir + "/tokenizer.json", &present));
  if (!present) {
    return absl::NotFoundError(absl::StrCat(dir, "/tokenizer.json does not exist"));
  }
  LS_ASSIGN_OR_RETURN(const std::string config,
                      ReadOptionalFile(dir + "/tokenizer_config.json", &present));
  LS_ASSIGN_OR_RETURN(const std::string generation,
                      ReadOptionalFile(dir + "/generation_config.json", &present));
  auto tokenizer = FromJson(tokenizer_json, config, generation);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat(dir, ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

absl::StatusOr<Encoding> Tokenizer::Encode(absl::string_view text,
                                           const EncodeOptions& options) const {
  Encoding encoding;
  LS_RETURN_IF_ERROR(impl_->Run(text, options, /*with_strings=*/true, &encoding));
  return encoding;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::EncodeIds(absl::string_view text,
                                                          const EncodeOptions& options) const {
  Encoding encoding;
  LS_RETURN_IF_ERROR(impl_->Run(text, options, /*with_strings=*/false, &encoding));
  return std::move(encoding.ids);
}

std::optional<int32_t> Tokenizer::TokenToId(absl::string_view token) const {
  if (auto id = impl_->added->TokenToId(token)) return id;
  return impl_->model->TokenToId(token);
}

absl::StatusOr<std::string> Tokenizer::Normalize(absl::string_view text) const {
  if (!tok::IsValidUtf8(text)) {
    return absl::InvalidArgumentError("Normalize: input is not valid UTF-8");
  }
  if (impl_->normalizer == nullptr) return std::string(text);
  AlignedString s, tmp;
  s.AppendBytes(text, tok::Span{0, 0});
  LS_RETURN_IF_ERROR(impl_->normalizer->Normalize(&s, &tmp));
  return s.text;
}

absl::StatusOr<std::vector<std::string>> Tokenizer::PreTokenize(absl::string_view text) const {
  if (!tok::IsValidUtf8(text)) {
    return absl::InvalidArgumentError("PreTokenize: input is not valid UTF-8");
  }
  PieceText pt;
  pt.Reset(text);
  tok::PreTokenizeScratch scratch;
  LS_RETURN_IF_ERROR(impl_->pre_tokenizer.Apply(&pt, &scratch));
  std::vector<std::string> out;
  for (const Piece& p : pt.pieces()) {
    const absl::string_view piece = pt.PieceString(p);
    if (!impl_->pre_tokenizer.byte_level) {
      out.emplace_back(piece);
      continue;
    }
    std::string mapped;
    for (char c : piece) tok::AppendUtf8(tok::ByteToUnicode(static_cast<uint8_t>(c)), &mapped);
    out.push_back(std::move(mapped));
  }
  return out;
}

}  // namespace ls
