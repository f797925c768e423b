#include "tokenizer/bpe.h"

#include <algorithm>
#include <utility>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "tokenizer/json_util.h"
#include "tokenizer/utf8.h"

namespace ls::tok {
namespace {

// Heap entry: a candidate merge of the symbol at position `key & 0xFFFFFFFF` with its right
// neighbour; `key >> 32` is the merge rank, so the smallest key is the lowest rank, leftmost.
struct QueuedMerge {
  uint64_t key;
  int32_t new_id;
};
inline uint64_t QueueKey(int32_t rank, int32_t pos) {
  return static_cast<uint64_t>(static_cast<uint32_t>(rank)) << 32 | static_cast<uint32_t>(pos);
}
// std::*_heap keep the largest on top: "larger" = smaller key.
struct QueueOrder {
  bool operator()(const QueuedMerge& a, const QueuedMerge& b) const { return a.key > b.key; }
};

struct TokenizeScratch {
  std::vector<QueuedMerge> heap;
  std::string unit;
};

TokenizeScratch& ThreadScratch() {
  thread_local TokenizeScratch scratch;
  return scratch;
}

// UTF-8 size of ByteToUnicode(b): 1 for printable ASCII, 2 otherwise.
constexpr std::array<uint8_t, 256> MakeMappedSize() {
  std::array<uint8_t, 256> size{};
  for (int b = 0; b < 256; ++b) size[b] = (b >= 0x21 && b <= 0x7E) ? 1 : 2;
  return size;
}
constexpr std::array<uint8_t, 256> kMappedSize = MakeMappedSize();

std::string ByteUnitString(uint8_t b) {
  std::string s;
  AppendUtf8(ByteToUnicode(b), &s);
  return s;
}

}  // namespace

BpeModel::~BpeModel() = default;

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::Create(const Json& json,
                                                           bool byte_level_input) {
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json: model must be an object, found ", JsonTypeName(json)));
  }
  auto type_it = json.find("type");
  if (type_it != json.end()) {
    if (!type_it->is_string()) return FieldError("model", "type", "a string", *type_it);
    const std::string type = type_it->get<std::string>();
    if (type != "BPE") {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: model type \"", type, "\" is not supported (only BPE)"));
    }
  } else if (json.find("merges") == json.end()) {
    // HF guesses the model from its fields; without "type" only a BPE (vocab + merges) is
    // unambiguous.
    return absl::InvalidArgumentError(
        "tokenizer.json: model has no \"type\" and no \"merges\"; only BPE is supported");
  }
  const char* what = "model BPE";
  LS_RETURN_IF_ERROR(
      CheckKeys(json, what,
                {"type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                 "fuse_unk", "byte_fallback", "ignore_merges", "vocab", "merges"}));
  auto dropout = json.find("dropout");
  if (dropout != json.end() && !dropout->is_null()) {
    if (!dropout->is_number() || dropout->get<double>() != 0.0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: model BPE dropout ", dropout->dump(),
                       " is not supported (only null or 0: dropout makes encoding random)"));
    }
  }
  std::unique_ptr<BpeModel> model(new BpeModel());
  model->byte_level_input_ = byte_level_input;
  LS_ASSIGN_OR_RETURN(model->unk_token_,
                      GetOptionalString(json, "unk_token", what, &model->has_unk_));
  bool present = false;
  LS_ASSIGN_OR_RETURN(model->continuing_subword_prefix_,
                      GetOptionalString(json, "continuing_subword_prefix", what, &present));
  LS_ASSIGN_OR_RETURN(model->end_of_word_suffix_,
                      GetOptionalString(json, "end_of_word_suffix", what, &present));
  LS_ASSIGN_OR_RETURN(model->fuse_unk_, GetBool(json, "fuse_unk", what, false));
  LS_ASSIGN_OR_RETURN(model->byte_fallback_, GetBool(json, "byte_fallback", what, false));
  LS_ASSIGN_OR_RETURN(model->ignore_merges_, GetBool(json, "ignore_merges", what, false));

  auto vocab = json.find("vocab");
  if (vocab == json.end() || !vocab->is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: model BPE needs a \"vocab\" object");
  }
  LS_RETURN_IF_ERROR(model->LoadVocab(*vocab));
  auto merges = json.find("merges");
  if (merges == json.end() || !merges->is_array()) {
    return absl::InvalidArgumentError("tokenizer.json: model BPE needs a \"merges\" array");
  }
  LS_RETURN_IF_ERROR(model->LoadMerges(*merges));

  if (model->has_unk_) {
    auto it = model->vocab_.find(model->unk_token_);
    if (it != model->vocab_.end()) model->unk_id_ = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    auto it = model->vocab_.find(absl::StrFormat("<0x%02X>", b));
    model->byte_fallback_id_[b] = it == model->vocab_.end() ? -1 : it->second;
  }
  for (int c = 0; c < 128; ++c) {
    auto it = model->vocab_.find(std::string(1, static_cast<char>(c)));
    model->ascii_id_[c] = it == model->vocab_.end() ? -1 : it->second;
  }
  if (byte_level_input) model->BuildByteTables();
  return model;
}

absl::Status BpeModel::LoadVocab(const Json& vocab) {
  vocab_.reserve(vocab.size());
  int64_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > INT32_MAX - 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: model vocab entry \"", it.key(),
                       "\" must map to an id in [0, 2^31-1), found ", it.value().dump()));
    }
    const int64_t id = it.value().get<int64_t>();
    vocab_.emplace(it.key(), static_cast<int32_t>(id));
    max_id = std::max(max_id, id);
  }
  // Ids index dense tables (here and in decoding): refuse a sparse id that would make them huge.
  const int64_t id_limit = std::max<int64_t>(2 * static_cast<int64_t>(vocab_.size()), 1 << 20);
  if (max_id >= id_limit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer.json: model vocab id ", max_id, " is too large for a vocabulary of ",
        vocab_.size(), " tokens (ids must stay below ", id_limit, ")"));
  }
  id_to_token_.assign(static_cast<size_t>(max_id + 1), std::string());
  present_.assign(static_cast<size_t>(max_id + 1), false);
  for (const auto& [token, id] : vocab_) {
    if (present_[id]) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: model vocab id ", id,
                                                     " is used by both \"", id_to_token_[id],
                                                     "\" and \"", token, "\""));
    }
    present_[id] = true;
    id_to_token_[id] = token;
  }
  return absl::OkStatus();
}

absl::Status BpeModel::LoadMerges(const Json& merges) {
  merges_.reserve(merges.size());
  const size_t prefix_len = continuing_subword_prefix_.size();
  std::string merged;
  int32_t rank = 0;
  for (const Json& m : merges) {
    absl::string_view left, right;
    std::string line;
    if (m.is_string()) {
      // Legacy "a b": exactly one space (HF: line.split(' ') must give two parts).
      line = m.get<std::string>();
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.json: model BPE merges[", rank, "] \"", line,
                         "\" must be two tokens separated by one space"));
      }
      left = absl::string_view(line).substr(0, space);
      right = absl::string_view(line).substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get_ref<const std::string&>();
      right = m[1].get_ref<const std::string&>();
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: model BPE merges[", rank,
                       "] must be a \"a b\" string or a [\"a\", \"b\"] pair, found ", m.dump()));
    }
    auto l = vocab_.find(left);
    if (l == vocab_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: model BPE merges[", rank,
                                                     "]: token \"", left,
                                                     "\" is not in the vocabulary"));
    }
    auto r = vocab_.find(right);
    if (r == vocab_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: model BPE merges[", rank,
                                                     "]: token \"", right,
                                                     "\" is not in the vocabulary"));
    }
    if (right.size() < prefix_len) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: model BPE merges[", rank, "]: token \"", right,
                       "\" is shorter than continuing_subword_prefix"));
    }
    merged.assign(left.data(), left.size());
    merged.append(right.data() + prefix_len, right.size() - prefix_len);
    auto n = vocab_.find(merged);
    if (n == vocab_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: model BPE merges[", rank,
                                                     "]: merged token \"", merged,
                                                     "\" is not in the vocabulary"));
    }
    // A repeated pair keeps its last rank, as HF's HashMap collect does.
    merges_[PairKey(l->second, r->second)] = Merge{rank, n->second};
    ++rank;
  }
  return absl::OkStatus();
}

void BpeModel::BuildByteTables() {
  for (const auto& [token, id] : vocab_) {
    std::string bytes;
    bool ok = true;
    for (size_t i = 0; i < token.size() && ok;) {
      const int b = UnicodeToByte(DecodeUtf8(token, &i));
      if (b < 0) {
        ok = false;
      } else {
        bytes.push_back(static_cast<char>(b));
      }
    }
    if (ok) byte_vocab_.emplace(std::move(bytes), id);
  }
  for (int first = 0; first < 2; ++first) {
    for (int last = 0; last < 2; ++last) {
      for (int b = 0; b < 256; ++b) {
        std::string unit = first ? std::string() : continuing_subword_prefix_;
        unit += ByteUnitString(static_cast<uint8_t>(b));
        if (last) unit += end_of_word_suffix_;
        auto it = vocab_.find(unit);
        byte_unit_id_[first][last][b] = it == vocab_.end() ? -1 : it->second;
      }
    }
  }
}

std::optional<int32_t> BpeModel::TokenToId(absl::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

std::optional<int32_t> BpeModel::LookupUnit(absl::string_view unit) const {
  auto it = vocab_.find(unit);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

// HF BPE::merge_word, first half: one symbol per character (per byte for byte-level input).
absl::Status BpeModel::InitialSymbols(absl::string_view word, std::vector<Symbol>* symbols) const {
  symbols->clear();
  TokenizeScratch& scratch = ThreadScratch();
  const bool plain = continuing_subword_prefix_.empty() && end_of_word_suffix_.empty();
  // Pending unknown: id and byte length (fused with fuse_unk).
  bool have_unk = false;
  int32_t pending_unk_id = -1;
  uint32_t pending_unk_len = 0;
  auto add = [symbols](int32_t id, uint32_t len) {
    const int32_t index = static_cast<int32_t>(symbols->size());
    symbols->push_back({id, index - 1, index + 1, len});
  };
  size_t i = 0;
  while (i < word.size()) {
    const size_t begin = i;
    int32_t id = -1;
    absl::string_view unit_for_fallback;
    if (byte_level_input_) {
      const uint8_t b = static_cast<uint8_t>(word[i]);
      ++i;
      id = byte_unit_id_[begin == 0][i == word.size()][b];
      if (id < 0 && (byte_fallback_ || has_unk_)) {
        scratch.unit.clear();
        if (begin != 0) scratch.unit += continuing_subword_prefix_;
        AppendUtf8(ByteToUnicode(b), &scratch.unit);
        if (i == word.size()) scratch.unit += end_of_word_suffix_;
        unit_for_fallback = scratch.unit;
      }
    } else {
      const uint8_t lead = static_cast<uint8_t>(word[i]);
      i += Utf8Len(lead);
      if (plain && lead < 0x80) {
        id = ascii_id_[lead];
        unit_for_fallback = word.substr(begin, 1);
      } else if (plain) {
        unit_for_fallback = word.substr(begin, i - begin);
        auto found = LookupUnit(unit_for_fallback);
        if (found) id = *found;
      } else {
        scratch.unit.clear();
        if (begin != 0) scratch.unit += continuing_subword_prefix_;
        scratch.unit.append(word.data() + begin, i - begin);
        if (i == word.size()) scratch.unit += end_of_word_suffix_;
        unit_for_fallback = scratch.unit;
        auto found = LookupUnit(unit_for_fallback);
        if (found) id = *found;
      }
    }
    // HF counts the bytes of the character string it looks up (for byte-level input, the
    // byte-alphabet character).
    const uint32_t byte_len = byte_level_input_ ? kMappedSize[static_cast<uint8_t>(word[begin])]
                                                : static_cast<uint32_t>(i - begin);
    if (id >= 0) {
      if (have_unk) {
        add(pending_unk_id, pending_unk_len);
        have_unk = false;
      }
      add(id, byte_len);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char c : unit_for_fallback) all = all && byte_fallback_id_[static_cast<uint8_t>(c)] >= 0;
      if (all) {
        // As HF: a pending unknown is not flushed here, so it lands after these bytes.
        for (char c : unit_for_fallback) add(byte_fallback_id_[static_cast<uint8_t>(c)], 1);
        continue;
      }
    }
    if (has_unk_) {
      if (!unk_id_) {
        return absl::FailedPreconditionError(absl::StrCat("tokenizer: unk_token \"", unk_token_,
                                                          "\" is not in the model vocabulary"));
      }
      if (have_unk && fuse_unk_) {
        pending_unk_len += byte_len;
      } else {
        if (have_unk) add(pending_unk_id, pending_unk_len);
        have_unk = true;
        pending_unk_id = *unk_id_;
        pending_unk_len = byte_len;
      }
    }
    // No unk_token: HF drops the character.
  }
  if (have_unk) add(pending_unk_id, pending_unk_len);
  if (!symbols->empty()) symbols->back().next = -1;
  return absl::OkStatus();
}

// HF Word::merge_all without dropout.
void BpeModel::MergeAll(std::vector<Symbol>* symbols_ptr) const {
  std::vector<Symbol>& symbols = *symbols_ptr;
  const int32_t n = static_cast<int32_t>(symbols.size());
  if (n < 2) return;
  std::vector<QueuedMerge>& heap = ThreadScratch().heap;
  heap.clear();
  for (int32_t i = 0; i + 1 < n; ++i) {
    if (const Merge* m = FindMerge(symbols[i].id, symbols[i + 1].id)) {
      heap.push_back({QueueKey(m->rank, i), m->new_id});
    }
  }
  std::make_heap(heap.begin(), heap.end(), QueueOrder());
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), QueueOrder());
    const QueuedMerge top = heap.back();
    heap.pop_back();
    const int32_t top_pos = static_cast<int32_t>(top.key & 0xFFFFFFFFu);
    Symbol& left = symbols[top_pos];
    if (left.len == 0 || left.next < 0) continue;
    const int32_t right_pos = left.next;
    const Symbol right = symbols[right_pos];
    // Skip stale entries: the pair at this position must still produce this token.
    const Merge* current = FindMerge(left.id, right.id);
    if (current == nullptr || current->new_id != top.new_id) continue;
    left.id = top.new_id;
    left.len += right.len;
    left.next = right.next;
    symbols[right_pos].len = 0;
    if (right.next >= 0 && right.next < n) symbols[right.next].prev = top_pos;
    if (left.prev >= 0) {
      if (const Merge* m = FindMerge(symbols[left.prev].id, left.id)) {
        heap.push_back({QueueKey(m->rank, left.prev), m->new_id});
        std::push_heap(heap.begin(), heap.end(), QueueOrder());
      }
    }
    if (left.next >= 0 && left.next < n) {
      if (const Merge* m = FindMerge(left.id, symbols[left.next].id)) {
        heap.push_back({QueueKey(m->rank, top_pos), m->new_id});
        std::push_heap(heap.begin(), heap.end(), QueueOrder());
      }
    }
  }
}

absl::Status BpeModel::Tokenize(absl::string_view word, std::vector<BpeToken>* out) const {
  if (word.empty()) return absl::OkStatus();
  if (ignore_merges_) {
    const auto& vocab = byte_level_input_ ? byte_vocab_ : vocab_;
    auto it = vocab.find(word);
    if (it != vocab.end()) {
      out->push_back({it->second, 0, static_cast<uint32_t>(word.size())});
      return absl::OkStatus();
    }
  }
  thread_local CachedTokens tokens;
  tokens.clear();
  const bool cacheable = word.size() < kMaxCachedWordBytes;
  CacheShard* shard = nullptr;
  bool hit = false;
  if (cacheable) {
    shard = &cache_[absl::Hash<absl::string_view>{}(word) % kCacheShards];
    MutexLock lock(&shard->mu);
    auto it = shard->map.find(word);
    if (it != shard->map.end()) {
      tokens = it->second;
      hit = true;
    }
  }
  if (!hit) {
    thread_local std::vector<Symbol> symbols;
    LS_RETURN_IF_ERROR(InitialSymbols(word, &symbols));
    MergeAll(&symbols);
    for (const Symbol& s : symbols) {
      if (s.len != 0) tokens.emplace_back(s.id, s.len);
    }
    if (cacheable) {
      MutexLock lock(&shard->mu);
      if (shard->map.size() >= kCacheEntriesPerShard) shard->map.clear();
      shard->map.emplace(std::string(word), tokens);
    }
  }
  // Offsets are the running sum of symbol lengths, as HF's Word (so a dropped character or a
  // reordered unknown shifts them exactly as there).
  if (!byte_level_input_) {
    uint32_t pos = 0;
    for (const auto& [id, len] : tokens) {
      out->push_back({id, pos, pos + len});
      pos += len;
    }
    return absl::OkStatus();
  }
  // Byte-level: lengths count bytes of the byte-alphabet string HF would have built (1 or 2 per
  // input byte); map them back to input bytes, widening a boundary that falls inside one.
  size_t raw = 0;
  uint32_t mapped = 0;  // byte-alphabet position of `raw`
  auto to_raw = [&](uint32_t target, bool round_up) {
    while (raw < word.size()) {
      const uint32_t size = kMappedSize[static_cast<uint8_t>(word[raw])];
      if (mapped + size > target) break;
      mapped += size;
      ++raw;
    }
    return static_cast<uint32_t>(raw + (round_up && mapped < target ? 1 : 0));
  };
  uint32_t pos = 0;
  for (const auto& [id, len] : tokens) {
    const uint32_t start = to_raw(pos, false);
    pos += len;
    const uint32_t end = to_raw(pos, true);
    out->push_back({id, start, std::max(end, start + 1)});
  }
  return absl::OkStatus();
}

}  // namespace ls::tok
