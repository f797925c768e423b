#include "model/lora_adapter.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "common/tensor.h"

namespace ls {

absl::string_view LoraModuleName(LoraModule module) {
  switch (module) {
    case LoraModule::kQ:
      return "q_proj";
    case LoraModule::kK:
      return "k_proj";
    case LoraModule::kV:
      return "v_proj";
    case LoraModule::kO:
      return "o_proj";
    case LoraModule::kGate:
      return "gate_proj";
    case LoraModule::kUp:
      return "up_proj";
    case LoraModule::kDown:
      return "down_proj";
    case LoraModule::kLmHead:
      return "lm_head";
    case LoraModule::kEmbedTokens:
      return "embed_tokens";
  }
  return "?";
}

namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian");

constexpr absl::string_view kPeftPrefix = "base_model.model.";
constexpr absl::string_view kConfigFile = "adapter_config.json";
constexpr absl::string_view kWeightsFile = "adapter_model.safetensors";
constexpr int kLayerModules = 7;  // q k v o gate up down

std::string Quote(absl::string_view s) {
  bool cut = false;
  if (s.size() > 160) {
    size_t n = 160;
    while (n > 0 && (static_cast<uint8_t>(s[n]) & 0xc0) == 0x80) --n;
    s = s.substr(0, n);
    cut = true;
  }
  return absl::StrCat("\"", absl::Utf8SafeCEscape(s), cut ? "\"..." : "\"");
}

bool IsFloatDType(DType d) { return d == DType::kF32 || d == DType::kF16 || d == DType::kBF16; }

size_t AlignUp(size_t n) {
  return (n + LoraAdapter::kPackAlignment - 1) / LoraAdapter::kPackAlignment *
         LoraAdapter::kPackAlignment;
}

// A module of the base model as transformers names it. Only nn.Linear and nn.Embedding modules
// can carry LoRA; the others are listed so that a config selecting them fails as it does in PEFT.
struct ModuleSpec {
  std::string name;
  bool lora_able = false;
  bool linear_not_head = false;
  int slot = -1;  // index into the LoRA-able slots, -1 for the others
};

// One LoRA-able module and what the config and the file say about it.
struct Slot {
  LoraModule module = LoraModule::kQ;
  int layer = -1;
  std::string name;
  int64_t in = 0;   // nn.Linear in_features; nn.Embedding num_embeddings
  int64_t out = 0;  // out_features; embedding_dim
  // From the config.
  bool targeted = false;
  int64_t expected_rank = 0;
  double alpha = 0.0;
  // From the file.
  const SafetensorsEntry* a = nullptr;
  const SafetensorsEntry* b = nullptr;
  const SafetensorsEntry* base_copy = nullptr;
  int32_t rank = 0;
  bool loadable = false;  // a complete, well-shaped, well-typed pair
};

bool IsEmbedding(LoraModule m) { return m == LoraModule::kEmbedTokens; }

// Slots: kLayerModules per layer, then lm_head, then embed_tokens.
int LayerSlot(int layer, int k) { return layer * kLayerModules + k; }

std::vector<Slot> MakeSlots(const ModelConfig& c) {
  const int64_t h = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), inter = c.intermediate_size;
  std::vector<Slot> slots;
  slots.reserve(static_cast<size_t>(c.num_hidden_layers) * kLayerModules + 2);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string attn = absl::StrCat("model.layers.", l, ".self_attn.");
    const std::string mlp = absl::StrCat("model.layers.", l, ".mlp.");
    auto add = [&](LoraModule m, std::string name, int64_t in, int64_t out) {
      Slot s;
      s.module = m;
      s.layer = l;
      s.name = std::move(name);
      s.in = in;
      s.out = out;
      slots.push_back(std::move(s));
    };
    add(LoraModule::kQ, attn + "q_proj", h, q);
    add(LoraModule::kK, attn + "k_proj", h, kv);
    add(LoraModule::kV, attn + "v_proj", h, kv);
    add(LoraModule::kO, attn + "o_proj", q, h);
    add(LoraModule::kGate, mlp + "gate_proj", h, inter);
    add(LoraModule::kUp, mlp + "up_proj", h, inter);
    add(LoraModule::kDown, mlp + "down_proj", inter, h);
  }
  Slot head;
  head.module = LoraModule::kLmHead;
  head.name = "lm_head";
  head.in = h;
  head.out = c.vocab_size;
  slots.push_back(std::move(head));
  Slot embed;
  embed.module = LoraModule::kEmbedTokens;
  embed.name = "model.embed_tokens";
  embed.in = c.vocab_size;
  embed.out = h;
  slots.push_back(std::move(embed));
  return slots;
}

// Every name of transformers' named_modules() on LlamaForCausalLM / MistralForCausalLM /
// Qwen2ForCausalLM (4.x), in that order, except the root "" which PEFT skips.
std::vector<ModuleSpec> MakeModuleList(const ModelConfig& c) {
  std::vector<ModuleSpec> list;
  auto add = [&](std::string name, int slot, bool linear_not_head) {
    ModuleSpec m;
    m.name = std::move(name);
    m.slot = slot;
    m.lora_able = slot >= 0;
    m.linear_not_head = linear_not_head;
    list.push_back(std::move(m));
  };
  const int num_layers = c.num_hidden_layers;
  add("model", -1, false);
  add("model.embed_tokens", num_layers * kLayerModules + 1, false);
  add("model.layers", -1, false);
  for (int l = 0; l < num_layers; ++l) {
    const std::string layer = absl::StrCat("model.layers.", l);
    add(layer, -1, false);
    add(layer + ".self_attn", -1, false);
    add(layer + ".self_attn.q_proj", LayerSlot(l, 0), true);
    add(layer + ".self_attn.k_proj", LayerSlot(l, 1), true);
    add(layer + ".self_attn.v_proj", LayerSlot(l, 2), true);
    add(layer + ".self_attn.o_proj", LayerSlot(l, 3), true);
    add(layer + ".mlp", -1, false);
    add(layer + ".mlp.gate_proj", LayerSlot(l, 4), true);
    add(layer + ".mlp.up_proj", LayerSlot(l, 5), true);
    add(layer + ".mlp.down_proj", LayerSlot(l, 6), true);
    add(layer + ".mlp.act_fn", -1, false);
    add(layer + ".input_layernorm", -1, false);
    add(layer + ".post_attention_layernorm", -1, false);
  }
  add("model.norm", -1, false);
  add("model.rotary_emb", -1, false);
  // The output embedding: all-linear leaves it out.
  add("lm_head", num_layers * kLayerModules, false);
  return list;
}

enum class TensorRole : uint8_t { kA, kB, kBaseCopy };

struct ParsedName {
  std::string module;
  TensorRole role = TensorRole::kA;
  bool embedding_form = false;  // lora_embedding_A / lora_embedding_B
  bool prefixed = false;
  std::string infix;
};

// Splits a tensor name into module, role and adapter-name infix. Errors describe the tensor.
absl::StatusOr<ParsedName> ParseTensorName(absl::string_view full) {
  ParsedName parsed;
  absl::string_view rest = full;
  if (absl::ConsumePrefix(&rest, kPeftPrefix)) parsed.prefixed = true;
  const std::vector<absl::string_view> tokens = absl::StrSplit(rest, '.');
  size_t i = 0;
  while (i < tokens.size() && !absl::StartsWith(tokens[i], "lora_") && tokens[i] != "base_layer") {
    ++i;
  }
  if (i == tokens.size()) {
    // A whole embedding saved next to the adapter (PEFT's save_embedding_layers after a resize).
    if (rest == "model.embed_tokens.weight" || rest == "lm_head.weight") {
      parsed.module = std::string(rest.substr(0, rest.size() - std::string("weight").size() - 1));
      parsed.role = TensorRole::kBaseCopy;
      return parsed;
    }
    return absl::InvalidArgumentError(
        "is not a LoRA tensor (expected <module>.lora_A.weight, <module>.lora_B.weight or "
        "<module>.lora_embedding_A/B; a full weight would come from modules_to_save, which is "
        "not supported)");
  }
  if (i == 0) return absl::InvalidArgumentError("has no module name before its LoRA part");
  parsed.module = absl::StrJoin(tokens.begin(), tokens.begin() + static_cast<ptrdiff_t>(i), ".");
  const std::vector<absl::string_view> tail(tokens.begin() + static_cast<ptrdiff_t>(i),
                                            tokens.end());
  const absl::string_view part = tail[0];
  auto infix_ok = [](absl::string_view s) { return !s.empty(); };
  if (part == "lora_A" || part == "lora_B") {
    parsed.role = part == "lora_A" ? TensorRole::kA : TensorRole::kB;
    if (tail.back() == "bias") {
      return absl::InvalidArgumentError("is a LoRA bias (lora_bias), which is not supported");
    }
    if (tail.size() == 2 && tail[1] == "weight") return parsed;
    if (tail.size() == 3 && tail[2] == "weight" && infix_ok(tail[1])) {
      parsed.infix = std::string(tail[1]);
      return parsed;
    }
    return absl::InvalidArgumentError(absl::StrCat("has an unexpected ", part, " suffix (expected ",
                                                   part, ".weight or ", part,
                                                   ".<adapter>.weight)"));
  }
  if (part == "lora_embedding_A" || part == "lora_embedding_B") {
    parsed.role = part == "lora_embedding_A" ? TensorRole::kA : TensorRole::kB;
    parsed.embedding_form = true;
    if (tail.size() == 1) return parsed;
    if (tail.size() == 2 && infix_ok(tail[1])) {
      parsed.infix = std::string(tail[1]);
      return parsed;
    }
    return absl::InvalidArgumentError(absl::StrCat("has an unexpected ", part, " suffix (expected ",
                                                   part, " or ", part, ".<adapter>)"));
  }
  if (part == "base_layer" && tail.size() == 2 && tail[1] == "weight") {
    parsed.role = TensorRole::kBaseCopy;
    return parsed;
  }
  if (part == "lora_magnitude_vector") {
    return absl::InvalidArgumentError(
        "is a DoRA magnitude vector (use_dora), which is not supported");
  }
  return absl::InvalidArgumentError(absl::StrCat("has an unknown LoRA part \"", absl::CEscape(part),
                                                 "\" (a PEFT method other than plain LoRA?)"));
}

// Maps a module name to its slot. Errors say why it is not a module of this model.
absl::StatusOr<int> FindSlot(absl::string_view module, const ModelConfig& c) {
  const int num_layers = c.num_hidden_layers;
  if (module == "lm_head") return num_layers * kLayerModules;
  if (module == "model.embed_tokens") return num_layers * kLayerModules + 1;
  absl::string_view rest = module;
  const auto unknown = [&]() {
    return absl::InvalidArgumentError(absl::StrCat(
        "targets module ", Quote(module), ", which does not exist in the base model (",
        ModelTypeName(c.model_type),
        "; LoRA-able modules are model.layers.N.self_attn."
        "{q,k,v,o}_proj, model.layers.N.mlp.{gate,up,down}_proj, lm_head, model.embed_tokens)"));
  };
  if (!absl::ConsumePrefix(&rest, "model.layers.")) return unknown();
  const size_t dot = rest.find('.');
  if (dot == absl::string_view::npos) return unknown();
  const absl::string_view index = rest.substr(0, dot);
  rest.remove_prefix(dot + 1);
  if (index.empty() || index.size() > 9 || (index.size() > 1 && index[0] == '0') ||
      !std::all_of(index.begin(), index.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) {
    return unknown();
  }
  int k = -1;
  static constexpr const char* kNames[kLayerModules] = {
      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
      "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  for (int j = 0; j < kLayerModules; ++j) {
    if (rest == kNames[j]) k = j;
  }
  if (k < 0) return unknown();
  int layer = 0;
  if (!absl::SimpleAtoi(index, &layer)) return unknown();
  if (layer >= num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("targets layer ", layer, ", out of range: the base model has ", num_layers,
                     " layers (0..", num_layers - 1, ")"));
  }
  return LayerSlot(layer, k);
}

// Reads an F32/F16/BF16 entry in chunks of float32, aligned or not, without a whole-tensor copy.
template <typename Fn>
void ForEachChunk(const SafetensorsEntry& e, Fn&& fn) {
  constexpr int64_t kChunk = 4096;
  float floats[kChunk];
  uint16_t halves[kChunk];
  const int64_t n = e.numel();
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t m = std::min(kChunk, n - i);
    const size_t count = static_cast<size_t>(m);
    switch (e.dtype) {
      case DType::kF32:
        std::memcpy(floats, e.data + i * 4, count * 4);
        break;
      case DType::kF16:
        std::memcpy(halves, e.data + i * 2, count * 2);
        Fp16ToFloat(halves, floats, count);
        break;
      case DType::kBF16:
        std::memcpy(halves, e.data + i * 2, count * 2);
        Bf16ToFloat(halves, floats, count);
        break;
      default:
        return;
    }
    fn(static_cast<const float*>(floats), i, m);
  }
}

// Non-finite values on disk, or values that become infinite in `dtype`. "" when clean.
std::string CheckValues(const SafetensorsEntry& e, DType dtype) {
  int64_t non_finite = 0, overflow = 0, first_bad = -1;
  float first_value = 0.f;
  if (e.dtype == DType::kBF16) {
    // The common case, checked on the raw bits (an all-ones exponent is inf or nan); a finite
    // BF16 stays finite in BF16 and in F32, so nothing can overflow.
    const int64_t n = e.numel();
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, e.data + i * 2, 2);
      if ((h & 0x7F80u) == 0x7F80u) {
        if (first_bad < 0) first_bad = i, first_value = Bf16ToFloat(h);
        ++non_finite;
      }
    }
  } else {
    ForEachChunk(e, [&](const float* x, int64_t begin, int64_t m) {
      for (int64_t j = 0; j < m; ++j) {
        if (!std::isfinite(x[j])) {
          if (first_bad < 0) first_bad = begin + j, first_value = x[j];
          ++non_finite;
        } else if (dtype == DType::kBF16 && !std::isfinite(Bf16ToFloat(FloatToBf16(x[j])))) {
          if (first_bad < 0) first_bad = begin + j, first_value = x[j];
          ++overflow;
        }
      }
    });
  }
  if (non_finite > 0) {
    return absl::StrCat("has ", non_finite, " non-finite value", non_finite == 1 ? "" : "s",
                        " (first at flat index ", first_bad, ": ",
                        std::isnan(first_value) ? "nan" : (first_value > 0 ? "inf" : "-inf"), ")");
  }
  if (overflow > 0) {
    return absl::StrCat("has ", overflow, " value", overflow == 1 ? "" : "s",
                        " that overflow BF16 (first at flat index ", first_bad, ": ",
                        absl::StrFormat("%g", first_value), ")");
  }
  return "";
}

// Whether `e` holds the same matrix as `base`, compared at the coarser of the two precisions
// (a BF16 copy of F32 base weights, or the reverse, is equal when the roundings agree). "" when
// equal, else what differs.
std::string CompareWithBase(const SafetensorsEntry& e, const WeightView& base) {
  if (e.shape.size() != 2 || e.shape[0] != base.rows || e.shape[1] != base.cols) {
    return absl::StrCat("has shape ", ShapeToString(e.shape), ", the base model's is [", base.rows,
                        ", ", base.cols, "] (a resized vocabulary is not supported)");
  }
  const DType coarse = (base.dtype == DType::kBF16 || e.dtype == DType::kBF16) ? DType::kBF16
                       : e.dtype == DType::kF16                                ? DType::kF16
                                                                               : DType::kF32;
  auto round = [coarse](float x) -> uint32_t {
    if (coarse == DType::kBF16) return FloatToBf16(x);
    if (coarse == DType::kF16) return FloatToFp16(x);
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    return bits;
  };
  int64_t differ = 0, first = -1;
  ForEachChunk(e, [&](const float* x, int64_t begin, int64_t m) {
    for (int64_t j = 0; j < m; ++j) {
      const int64_t idx = begin + j;
      float b;
      if (base.dtype == DType::kBF16) {
        uint16_t h;
        std::memcpy(&h, static_cast<const uint8_t*>(base.data) + idx * 2, 2);
        b = Bf16ToFloat(h);
      } else {
        std::memcpy(&b, static_cast<const uint8_t*>(base.data) + idx * 4, 4);
      }
      if (round(x[j]) != round(b)) {
        if (first < 0) first = idx;
        ++differ;
      }
    }
  });
  if (differ == 0) return "";
  return absl::StrCat("differs from the base model's weight in ", differ, " of ", e.numel(),
                      " elements (first at flat index ", first,
                      "): an adapter cannot replace base weights");
}

// Writes n floats as `dtype` (F32 or BF16) at `dst`, aligned for that dtype.
void StoreFloats(const float* src, int64_t n, DType dtype, uint8_t* dst) {
  if (dtype == DType::kF32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
  } else {
    FloatToBf16(src, reinterpret_cast<uint16_t*>(dst), static_cast<size_t>(n));
  }
}

// Copies `e` ([rows, cols] row-major) into dst in `dtype`; with `transpose`, as [cols, rows].
void PackMatrix(const SafetensorsEntry& e, DType dtype, bool transpose, uint8_t* dst) {
  const size_t element = dtype == DType::kF32 ? 4 : 2;
  if (!transpose && e.dtype == DType::kBF16 && dtype == DType::kBF16) {
    std::memcpy(dst, e.data, static_cast<size_t>(e.numel()) * 2);  // already in place
    return;
  }
  if (!transpose) {
    ForEachChunk(e, [&](const float* x, int64_t begin, int64_t m) {
      StoreFloats(x, m, dtype, dst + static_cast<size_t>(begin) * element);
    });
    return;
  }
  const int64_t rows = e.shape[0], cols = e.shape[1];
  ForEachChunk(e, [&](const float* x, int64_t begin, int64_t m) {
    for (int64_t j = 0; j < m; ++j) {
      const int64_t r = (begin + j) / cols, c = (begin + j) % cols;
      const size_t at = static_cast<size_t>(c * rows + r);
      if (dtype == DType::kF32) {
        reinterpret_cast<float*>(dst)[at] = x[j];
      } else {
        reinterpret_cast<uint16_t*>(dst)[at] = FloatToBf16(x[j]);
      }
    }
  });
}

// The modules of one projection group, in slice order, with each slice's out_offset.
struct GroupMembers {
  int num = 0;
  int slot[kMaxLoraSlices] = {};
  int64_t out_offset[kMaxLoraSlices] = {};
};

void AppendStatusLines(const absl::Status& status, absl::string_view prefix,
                       std::vector<std::string>* lines) {
  // ParsePeftLoraConfig: "<what>: <problem>", or "<what>: N problems" then "  <problem>" lines.
  const std::vector<absl::string_view> parts = absl::StrSplit(status.message(), '\n');
  if (parts.size() == 1) {
    lines->push_back(std::string(parts[0]));
    return;
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    lines->push_back(absl::StrCat(prefix, ": ", absl::StripLeadingAsciiWhitespace(parts[i])));
  }
}

}  // namespace

LoraAdapter::~LoraAdapter() { std::free(packed_); }

absl::Status LoraAdapter::PackInto(void* dst, size_t dst_bytes) const {
  if (dst_bytes < packed_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("PackInto: destination holds ", dst_bytes,
                                                   " bytes, the adapter needs ", packed_bytes_));
  }
  if (reinterpret_cast<uintptr_t>(dst) % kPackAlignment != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("PackInto: destination is not ", kPackAlignment, "-byte aligned"));
  }
  std::memcpy(dst, packed_, packed_bytes_);
  return absl::OkStatus();
}

LoraGroupTable LoraAdapter::GroupsAt(const void* base) const {
  LoraGroupTable table = layout_;
  const uint8_t* bytes = static_cast<const uint8_t*>(base);
  for (size_t g = 0; g < table.groups_.size(); ++g) {
    LoraGroup& group = table.groups_[g];
    if (group.num_slices == 0) continue;
    group.a.data = bytes + offsets_[g].a;
    for (int j = 0; j < group.num_slices; ++j) group.slices[j].b.data = bytes + offsets_[g].b[j];
  }
  return table;
}

std::string LoraAdapterReport::Summary() const {
  std::vector<std::string> kind_parts;
  for (const LoraModuleKindReport& k : kinds) {
    std::string part = absl::StrCat(LoraModuleName(k.module), " x", k.count, " r");
    absl::StrAppend(&part, k.rank_min == k.rank_max ? absl::StrCat(k.rank_min)
                                                    : absl::StrCat(k.rank_min, "-", k.rank_max));
    absl::StrAppend(&part, " scale ",
                    k.scale_min == k.scale_max
                        ? absl::StrFormat("%g", k.scale_min)
                        : absl::StrFormat("%g-%g", k.scale_min, k.scale_max));
    kind_parts.push_back(std::move(part));
  }
  std::vector<std::string> disk;
  for (DType d : disk_dtypes) disk.push_back(std::string(DTypeName(d)));
  return absl::StrCat(name, version.empty() ? "" : absl::StrCat(" version ", version.substr(0, 12)),
                      ": ", modules.size(), modules.size() == 1 ? " module in " : " modules in ",
                      num_layers_touched, num_layers_touched == 1 ? " layer (" : " layers (",
                      absl::StrJoin(kind_parts, ", "), "), r ", r, ", lora_alpha ",
                      absl::StrFormat("%g", lora_alpha), use_rslora ? ", rsLoRA" : "", ", ",
                      absl::StrJoin(disk, "/"), " -> ", DTypeName(dtype), ", ", num_parameters,
                      " parameters, ", packed_bytes, " bytes packed");
}

absl::StatusOr<std::unique_ptr<LoraAdapter>> LoadLoraAdapter(absl::string_view config_json,
                                                             const SafetensorsFile& weights,
                                                             const ModelConfig& base,
                                                             const LoraLoadOptions& options) {
  if (options.dtype != DType::kBF16 && options.dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LoadLoraAdapter: dtype ", DTypeName(options.dtype), " is not supported (BF16 or F32)"));
  }
  if (options.max_lora_rank < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoadLoraAdapter: max_lora_rank ", options.max_lora_rank, " must be >= 1"));
  }
  std::vector<std::string> problems;
  auto tensor_problem = [&](absl::string_view tensor, absl::string_view text) {
    problems.push_back(absl::StrCat(kWeightsFile, ": tensor ", Quote(tensor), " ", text));
  };
  auto module_problem = [&](const Slot& s, absl::string_view text) {
    problems.push_back(absl::StrCat(kWeightsFile, ": module ", s.name, " ", text));
  };
  auto config_problem = [&](absl::string_view text) {
    problems.push_back(absl::StrCat(kConfigFile, ": ", text));
  };

  // ---- The config and what it targets in this model.
  std::vector<Slot> slots = MakeSlots(base);
  const absl::StatusOr<PeftLoraConfig> config = ParsePeftLoraConfig(config_json, kConfigFile);
  if (!config.ok()) AppendStatusLines(config.status(), kConfigFile, &problems);
  // False when the config did not parse or its patterns could not be matched: then nothing is
  // known about which modules it targets, and tensors are checked against the base model only.
  bool config_usable = config.ok();
  if (config.ok()) {
    int num_targeted = 0;
    for (const ModuleSpec& m : MakeModuleList(base)) {
      const absl::StatusOr<bool> targeted = config->Targets(m.name, m.linear_not_head);
      if (!targeted.ok()) {
        // A pattern over its match limits: once is enough (each try costs the whole limit).
        config_problem(targeted.status().message());
        config_usable = false;
        break;
      }
      if (!*targeted) continue;
      if (!m.lora_able) {
        config_problem(absl::StrCat("target_modules ", config->DescribeTargets(), " selects ",
                                    Quote(m.name),
                                    ", which is not an nn.Linear or nn.Embedding (PEFT refuses "
                                    "this config too)"));
        continue;
      }
      Slot& s = slots[static_cast<size_t>(m.slot)];
      const absl::StatusOr<int64_t> rank = config->RankFor(m.name);
      const absl::StatusOr<double> alpha = config->AlphaFor(m.name);
      if (!rank.ok() || !alpha.ok()) {
        config_problem(!rank.ok() ? rank.status().message() : alpha.status().message());
        config_usable = false;
        break;
      }
      s.targeted = true;
      s.expected_rank = *rank;
      s.alpha = *alpha;
      ++num_targeted;
    }
    if (config_usable && num_targeted == 0) {
      config_problem(absl::StrCat(
          "targets no module of this model (target_modules ", config->DescribeTargets(),
          config->exclude_kind != PeftExcludeKind::kNone ? ", with exclude_modules" : "",
          config->layers_to_transform.empty() ? "" : ", with layers_to_transform", ")"));
    }
    if (config->ensure_weight_tying && base.tie_word_embeddings &&
        (slots[slots.size() - 1].targeted || slots[slots.size() - 2].targeted)) {
      config_problem(
          "ensure_weight_tying true with tied embeddings and embed_tokens or lm_head targeted "
          "is not supported (lm_head would reuse the transposed embedding adapter)");
    }
  }

  // ---- Every tensor maps to a module of this model.
  bool any_prefixed = false;
  std::optional<std::string> infix;
  for (const SafetensorsEntry& e : weights.entries()) {
    const absl::StatusOr<ParsedName> parsed = ParseTensorName(e.name);
    if (!parsed.ok()) {
      tensor_problem(e.name, parsed.status().message());
      continue;
    }
    any_prefixed |= parsed->prefixed;
    if (parsed->role != TensorRole::kBaseCopy) {
      if (!infix.has_value()) {
        infix = parsed->infix;
      } else if (*infix != parsed->infix) {
        tensor_problem(e.name, absl::StrCat("has adapter name ", Quote(parsed->infix),
                                            " but other tensors have ", Quote(*infix),
                                            " (one adapter per file)"));
        continue;
      }
    }
    const absl::StatusOr<int> slot_index = FindSlot(parsed->module, base);
    if (!slot_index.ok()) {
      tensor_problem(e.name, slot_index.status().message());
      continue;
    }
    Slot& s = slots[static_cast<size_t>(*slot_index)];
    const bool embedding = IsEmbedding(s.module);
    if (parsed->role == TensorRole::kBaseCopy) {
      if (s.module != LoraModule::kLmHead && !embedding) {
        tensor_problem(e.name, "is a base-layer weight, which an adapter cannot replace");
        continue;
      }
      if (s.base_copy != nullptr) {
        tensor_problem(e.name, absl::StrCat("duplicates ", Quote(s.base_copy->name)));
        continue;
      }
      s.base_copy = &e;
      continue;
    }
    if (parsed->embedding_form != embedding) {
      tensor_problem(e.name, embedding ? "uses lora_A/lora_B, but embed_tokens is an nn.Embedding "
                                         "(lora_embedding_A/lora_embedding_B)"
                                       : "uses lora_embedding_A/B, but the module is an nn.Linear "
                                         "(lora_A/lora_B)");
      continue;
    }
    const SafetensorsEntry*& target = parsed->role == TensorRole::kA ? s.a : s.b;
    if (target != nullptr) {
      tensor_problem(e.name, absl::StrCat("duplicates ", Quote(target->name),
                                          " (the same tensor with and without the "
                                          "base_model.model. prefix?)"));
      continue;
    }
    target = &e;
  }

  // ---- Pairs, shapes, dtypes, ranks, and agreement with the config.
  for (Slot& s : slots) {
    const bool has_tensors = s.a != nullptr || s.b != nullptr;
    if (!has_tensors) {
      if (config_usable && s.targeted) {
        module_problem(s, absl::StrCat("is targeted by ", kConfigFile, " (target_modules ",
                                       config->DescribeTargets(), ") but has no tensors"));
      }
      continue;
    }
    const bool embedding = IsEmbedding(s.module);
    const char* a_part = embedding ? "lora_embedding_A" : "lora_A";
    const char* b_part = embedding ? "lora_embedding_B" : "lora_B";
    if (config_usable && !s.targeted) {
      module_problem(s, absl::StrCat("has LoRA tensors but ", kConfigFile,
                                     " does not target it (target_modules ",
                                     config->DescribeTargets(), "); PEFT would not load them"));
    }
    if (s.a == nullptr || s.b == nullptr) {
      module_problem(s, absl::StrCat("has an incomplete pair: ", s.a == nullptr ? b_part : a_part,
                                     " without ", s.a == nullptr ? a_part : b_part));
      continue;
    }
    bool ok = true;
    for (const SafetensorsEntry* e : {s.a, s.b}) {
      if (!IsFloatDType(e->dtype)) {
        tensor_problem(e->name, absl::StrCat("has dtype ", DTypeName(e->dtype),
                                             " (supported: F32, F16, BF16)"));
        ok = false;
      }
    }
    // Linear: A [r, in], B [out, r]. Embedding: A [r, num_embeddings], B [embedding_dim, r].
    const int64_t rank = s.a->shape.size() == 2 ? s.a->shape[0] : -1;
    const std::string a_expected = absl::StrCat("[r, ", s.in, "]");
    const std::string b_expected = absl::StrCat("[", s.out, ", r]");
    const char* in_what = embedding ? "vocab_size" : "in_features";
    const char* out_what = embedding ? "hidden_size" : "out_features";
    if (s.a->shape.size() != 2 || s.a->shape[1] != s.in) {
      tensor_problem(s.a->name, absl::StrCat("has shape ", ShapeToString(s.a->shape), ", expected ",
                                             a_expected, " (", LoraModuleName(s.module), " ",
                                             in_what, " ", s.in, " in the base model)"));
      ok = false;
    }
    if (s.b->shape.size() != 2 || s.b->shape[0] != s.out) {
      tensor_problem(s.b->name, absl::StrCat("has shape ", ShapeToString(s.b->shape), ", expected ",
                                             b_expected, " (", LoraModuleName(s.module), " ",
                                             out_what, " ", s.out, " in the base model)"));
      ok = false;
    } else if (rank >= 0 && s.b->shape[1] != rank) {
      module_problem(s, absl::StrCat("has ", a_part, " of rank ", rank, " but ", b_part,
                                     " of rank ", s.b->shape[1]));
      ok = false;
    }
    if (rank == 0) {
      module_problem(s, "has rank 0");
      ok = false;
    } else if (rank > options.max_lora_rank) {
      module_problem(
          s, absl::StrCat("has rank ", rank, ", more than max_lora_rank ", options.max_lora_rank));
      ok = false;
    }
    if (rank > 0 && config_usable && s.targeted && rank != s.expected_rank) {
      module_problem(
          s, absl::StrCat("has rank ", rank, " in the tensors but rank ", s.expected_rank, " in ",
                          kConfigFile, " (r, or its rank_pattern entry)"));
      ok = false;
    }
    if (ok && config_usable && !std::isfinite(static_cast<float>(config->Scale(rank, s.alpha)))) {
      module_problem(s, absl::StrCat("has scale ", config->Scale(rank, s.alpha), " (alpha ",
                                     s.alpha, ", rank ", rank, "), which does not fit a float"));
      ok = false;
    }
    if (ok) {
      s.rank = static_cast<int32_t>(rank);
      s.loadable = true;
    }
  }

  // ---- Values (only of well-formed tensors) and base-weight copies.
  for (const Slot& s : slots) {
    if (s.loadable) {
      for (const SafetensorsEntry* e : {s.a, s.b}) {
        const std::string bad = CheckValues(*e, options.dtype);
        if (!bad.empty()) tensor_problem(e->name, bad);
      }
    }
    if (s.base_copy != nullptr) {
      if (options.base_weights == nullptr) {
        tensor_problem(s.base_copy->name,
                       "is a copy of a base model weight (PEFT saves one when embed_tokens or "
                       "lm_head is targeted); checking that it equals the base needs the base "
                       "weights, which were not given");
      } else if (!IsFloatDType(s.base_copy->dtype)) {
        tensor_problem(s.base_copy->name, absl::StrCat("has dtype ", DTypeName(s.base_copy->dtype),
                                                       " (supported: F32, F16, BF16)"));
      } else {
        const WeightView& w = s.module == LoraModule::kLmHead ? options.base_weights->lm_head()
                                                              : options.base_weights->embed();
        const std::string bad = CompareWithBase(*s.base_copy, w);
        if (!bad.empty()) tensor_problem(s.base_copy->name, bad);
      }
    }
  }

  if (!problems.empty()) {
    std::string message = absl::StrCat(options.name, ": ", problems.size(),
                                       problems.size() == 1 ? " problem" : " problems",
                                       " (the adapter does not load)");
    const size_t shown = std::min(problems.size(), options.max_problem_lines);
    for (size_t i = 0; i < shown; ++i) absl::StrAppend(&message, "\n  ", problems[i]);
    if (problems.size() > shown) {
      absl::StrAppend(&message, "\n  ... and ", problems.size() - shown, " more");
    }
    return absl::InvalidArgumentError(message);
  }

  // ---- Layout: groups in LoraProjection order per layer, then lm_head, then embed_tokens.
  const int num_layers = base.num_hidden_layers;
  const size_t element = options.dtype == DType::kF32 ? 4 : 2;
  std::vector<GroupMembers> members(static_cast<size_t>(num_layers) * kNumLoraProjections + 2);
  auto add_member = [&](size_t g, int slot, int64_t out_offset) {
    if (!slots[static_cast<size_t>(slot)].loadable) return;
    GroupMembers& gm = members[g];
    gm.slot[gm.num] = slot;
    gm.out_offset[gm.num] = out_offset;
    ++gm.num;
  };
  for (int l = 0; l < num_layers; ++l) {
    const size_t g = static_cast<size_t>(l) * kNumLoraProjections;
    add_member(g + 0, LayerSlot(l, 0), 0);
    add_member(g + 0, LayerSlot(l, 1), base.q_dim());
    add_member(g + 0, LayerSlot(l, 2), base.q_dim() + base.kv_dim());
    add_member(g + 1, LayerSlot(l, 3), 0);
    add_member(g + 2, LayerSlot(l, 4), 0);
    add_member(g + 2, LayerSlot(l, 5), base.intermediate_size);
    add_member(g + 3, LayerSlot(l, 6), 0);
  }
  add_member(members.size() - 2, num_layers * kLayerModules, 0);
  add_member(members.size() - 1, num_layers * kLayerModules + 1, 0);

  std::unique_ptr<LoraAdapter> adapter(new LoraAdapter());
  adapter->layout_.num_layers_ = num_layers;
  adapter->layout_.groups_.resize(members.size());
  adapter->offsets_.resize(members.size());
  size_t total = 0;
  for (size_t g = 0; g < members.size(); ++g) {
    const GroupMembers& gm = members[g];
    if (gm.num == 0) continue;
    LoraGroup& group = adapter->layout_.groups_[g];
    const Slot& first = slots[static_cast<size_t>(gm.slot[0])];
    const bool embedding = IsEmbedding(first.module);
    int32_t rank_total = 0;
    for (int j = 0; j < gm.num; ++j) {
      const Slot& s = slots[static_cast<size_t>(gm.slot[j])];
      LoraSlice& slice = group.slices[j];
      slice.rank_offset = rank_total;
      slice.rank = s.rank;
      slice.out_offset = gm.out_offset[j];
      slice.b = WeightView{nullptr, options.dtype, s.out, s.rank};
      slice.scale = static_cast<float>(config->Scale(s.rank, s.alpha));
      rank_total += s.rank;
    }
    group.num_slices = gm.num;
    group.rank_total = rank_total;
    group.a = embedding ? WeightView{nullptr, options.dtype, first.in, rank_total}
                        : WeightView{nullptr, options.dtype, rank_total, first.in};
    adapter->offsets_[g].a = total;
    total += AlignUp(static_cast<size_t>(group.a.rows * group.a.cols) * element);
    for (int j = 0; j < gm.num; ++j) {
      adapter->offsets_[g].b[j] = total;
      const WeightView& b = group.slices[j].b;
      total += AlignUp(static_cast<size_t>(b.rows * b.cols) * element);
    }
  }

  // ---- Pack.
  void* memory = std::aligned_alloc(LoraAdapter::kPackAlignment, total);
  if (memory == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat(options.name, ": cannot allocate ", total, " bytes for the adapter"));
  }
  adapter->packed_ = static_cast<uint8_t*>(memory);
  adapter->packed_bytes_ = total;
  std::memset(adapter->packed_, 0, total);  // padding too: the bytes are reproducible
  for (size_t g = 0; g < members.size(); ++g) {
    const GroupMembers& gm = members[g];
    const LoraGroup& group = adapter->layout_.groups_[g];
    for (int j = 0; j < gm.num; ++j) {
      const Slot& s = slots[static_cast<size_t>(gm.slot[j])];
      const bool embedding = IsEmbedding(s.module);
      // Stacked A: slice j's rows start rank_offset rows in; for the transposed embedding A
      // (one slice) the whole matrix.
      uint8_t* a_dst = adapter->packed_ + adapter->offsets_[g].a +
                       static_cast<size_t>(group.slices[j].rank_offset * s.in) * element;
      PackMatrix(*s.a, options.dtype, embedding, a_dst);
      PackMatrix(*s.b, options.dtype, false, adapter->packed_ + adapter->offsets_[g].b[j]);
    }
  }
  adapter->host_groups_ = adapter->GroupsAt(adapter->packed_);

  // ---- Report.
  LoraAdapterReport& report = adapter->report_;
  report.name = options.name;
  report.version = options.version;
  report.peft_version = config->peft_version;
  report.base_model_name_or_path = config->base_model_name_or_path;
  report.r = config->r;
  report.lora_alpha = config->lora_alpha;
  report.use_rslora = config->use_rslora;
  report.target_modules = config->DescribeTargets();
  report.num_rank_pattern = config->rank_pattern.size();
  report.num_alpha_pattern = config->alpha_pattern.size();
  report.ignored_config_keys = config->ignored_keys;
  report.dtype = options.dtype;
  report.packed_bytes = total;
  report.names_prefixed = any_prefixed;
  report.adapter_infix = infix.value_or("");
  std::set<DType> disk_dtypes;
  std::vector<bool> layer_touched(static_cast<size_t>(num_layers), false);
  // Report order: by layer, then q k v o gate up down (slot order), then lm_head, embed_tokens.
  for (const Slot& s : slots) {
    if (s.base_copy != nullptr) report.skipped_base_copies.push_back(s.base_copy->name);
    if (!s.loadable) continue;
    LoraModuleReport m;
    m.name = s.name;
    m.module = s.module;
    m.layer = s.layer;
    m.rank = s.rank;
    m.alpha = s.alpha;
    m.scale = static_cast<float>(config->Scale(s.rank, s.alpha));
    m.disk_dtype = s.a->dtype;
    report.modules.push_back(m);
    disk_dtypes.insert(s.a->dtype);
    disk_dtypes.insert(s.b->dtype);
    report.disk_bytes += s.a->nbytes() + s.b->nbytes();
    report.num_parameters += s.a->numel() + s.b->numel();
    if (s.layer >= 0) layer_touched[static_cast<size_t>(s.layer)] = true;
  }
  report.num_layers_touched =
      static_cast<int>(std::count(layer_touched.begin(), layer_touched.end(), true));
  report.disk_dtypes.assign(disk_dtypes.begin(), disk_dtypes.end());
  for (int k = 0; k < kNumLoraModules; ++k) {
    LoraModuleKindReport kind;
    kind.module = static_cast<LoraModule>(k);
    for (const LoraModuleReport& m : report.modules) {
      if (m.module != kind.module) continue;
      if (kind.count == 0) {
        kind.rank_min = kind.rank_max = m.rank;
        kind.alpha_min = kind.alpha_max = m.alpha;
        kind.scale_min = kind.scale_max = m.scale;
      }
      ++kind.count;
      kind.rank_min = std::min(kind.rank_min, m.rank);
      kind.rank_max = std::max(kind.rank_max, m.rank);
      kind.alpha_min = std::min(kind.alpha_min, m.alpha);
      kind.alpha_max = std::max(kind.alpha_max, m.alpha);
      kind.scale_min = std::min(kind.scale_min, m.scale);
      kind.scale_max = std::max(kind.scale_max, m.scale);
    }
    if (kind.count > 0) report.kinds.push_back(kind);
  }
  return adapter;
}

}  // namespace ls
