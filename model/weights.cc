#include "model/weights.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/tensor.h"

namespace ls {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian");

// Every region of the arena starts on a cache line, which also satisfies any SIMD load.
constexpr size_t kArenaAlignment = 64;
// Problem lines in one error message; a checkpoint of the wrong model can have thousands.
constexpr size_t kMaxProblemLines = 1000;
// Tensor names echoed into messages are cut to this many bytes.
constexpr size_t kMaxQuotedBytes = 160;

std::string Quote(absl::string_view s) {
  bool cut = false;
  if (s.size() > kMaxQuotedBytes) {
    size_t n = kMaxQuotedBytes;
    while (n > 0 && (static_cast<uint8_t>(s[n]) & 0xc0) == 0x80) --n;
    s = s.substr(0, n);
    cut = true;
  }
  return absl::StrCat("\"", absl::Utf8SafeCEscape(s), cut ? "\"..." : "\"");
}

size_t AlignUp(size_t n) { return (n + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment; }

bool IsFloatDType(DType d) { return d == DType::kF32 || d == DType::kF16 || d == DType::kBF16; }

// Matrices are stored in the weights dtype; norm weights and biases always in F32.
enum class Storage : uint8_t { kMatrix, kF32Vector };

// A destination region of the arena: a [rows, cols] matrix or a [1, cols] F32 vector.
struct Region {
  Storage storage = Storage::kMatrix;
  int64_t rows = 1;
  int64_t cols = 0;
  size_t offset = 0;  // into the arena, assigned once every region is known
};

// One tensor the checkpoint must (or may) hold, and where its elements go: `region`, starting
// `element_offset` elements in (fused layouts put several tensors in one region).
struct Slot {
  std::string name;
  Shape shape;
  size_t region = 0;
  int64_t element_offset = 0;
  // Checked when present, never copied: lm_head.weight of a tied model.
  bool optional_ignored = false;
};

class Plan {
 public:
  size_t AddRegion(Storage storage, int64_t rows, int64_t cols) {
    regions_.push_back(Region{storage, rows, cols, 0});
    return regions_.size() - 1;
  }
  void AddSlot(std::string name, Shape shape, size_t region, int64_t element_offset,
               bool optional_ignored = false) {
    index_.emplace(name, slots_.size());
    slots_.push_back(
        Slot{std::move(name), std::move(shape), region, element_offset, optional_ignored});
  }

  const std::vector<Slot>& slots() const { return slots_; }
  std::vector<Region>& regions() { return regions_; }
  const Slot* Find(absl::string_view name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &slots_[it->second];
  }

 private:
  std::vector<Region> regions_;
  std::vector<Slot> slots_;
  absl::flat_hash_map<std::string, size_t> index_;
};

// Region indices of one layer, in LayerWeights order.
struct LayerRegions {
  size_t input_norm, qkv, qkv_bias, o, o_bias, post_norm, gate_up, down;
};
constexpr size_t kNoRegion = static_cast<size_t>(-1);

struct ModelRegions {
  size_t embed = 0;
  size_t lm_head = kNoRegion;  // none when tied
  size_t final_norm = 0;
  std::vector<LayerRegions> layers;
};

// Lays out every region and slot the config implies.
ModelRegions BuildPlan(const ModelConfig& c, Plan& plan) {
  const int64_t h = c.hidden_size;
  const int64_t v = c.vocab_size;
  const int64_t inter = c.intermediate_size;
  const int64_t q = c.q_dim();
  const int64_t kv = c.kv_dim();
  ModelRegions r;

  r.embed = plan.AddRegion(Storage::kMatrix, v, h);
  plan.AddSlot("model.embed_tokens.weight", {v, h}, r.embed, 0);
  if (c.tie_word_embeddings) {
    plan.AddSlot("lm_head.weight", {v, h}, kNoRegion, 0, /*optional_ignored=*/true);
  } else {
    r.lm_head = plan.AddRegion(Storage::kMatrix, v, h);
    plan.AddSlot("lm_head.weight", {v, h}, r.lm_head, 0);
  }
  r.final_norm = plan.AddRegion(Storage::kF32Vector, 1, h);
  plan.AddSlot("model.norm.weight", {h}, r.final_norm, 0);

  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    LayerRegions l;
    l.input_norm = plan.AddRegion(Storage::kF32Vector, 1, h);
    plan.AddSlot(p + "input_layernorm.weight", {h}, l.input_norm, 0);

    l.qkv = plan.AddRegion(Storage::kMatrix, q + 2 * kv, h);
    plan.AddSlot(p + "self_attn.q_proj.weight", {q, h}, l.qkv, 0);
    plan.AddSlot(p + "self_attn.k_proj.weight", {kv, h}, l.qkv, q * h);
    plan.AddSlot(p + "self_attn.v_proj.weight", {kv, h}, l.qkv, (q + kv) * h);
    l.qkv_bias = kNoRegion;
    if (c.attention_qkv_bias) {
      l.qkv_bias = plan.AddRegion(Storage::kF32Vector, 1, q + 2 * kv);
      plan.AddSlot(p + "self_attn.q_proj.bias", {q}, l.qkv_bias, 0);
      plan.AddSlot(p + "self_attn.k_proj.bias", {kv}, l.qkv_bias, q);
      plan.AddSlot(p + "self_attn.v_proj.bias", {kv}, l.qkv_bias, q + kv);
    }
    l.o = plan.AddRegion(Storage::kMatrix, h, q);
    plan.AddSlot(p + "self_attn.o_proj.weight", {h, q}, l.o, 0);
    l.o_bias = kNoRegion;
    if (c.attention_o_bias) {
      l.o_bias = plan.AddRegion(Storage::kF32Vector, 1, h);
      plan.AddSlot(p + "self_attn.o_proj.bias", {h}, l.o_bias, 0);
    }
    l.post_norm = plan.AddRegion(Storage::kF32Vector, 1, h);
    plan.AddSlot(p + "post_attention_layernorm.weight", {h}, l.post_norm, 0);

    l.gate_up = plan.AddRegion(Storage::kMatrix, 2 * inter, h);
    plan.AddSlot(p + "mlp.gate_proj.weight", {inter, h}, l.gate_up, 0);
    plan.AddSlot(p + "mlp.up_proj.weight", {inter, h}, l.gate_up, inter * h);
    l.down = plan.AddRegion(Storage::kMatrix, h, inter);
    plan.AddSlot(p + "mlp.down_proj.weight", {h, inter}, l.down, 0);
    r.layers.push_back(l);
  }
  return r;
}

// The checkpoint's directory for messages (the first shard's path without its file name).
std::string CheckpointName(const SafetensorsCheckpoint& ckpt) {
  if (ckpt.shards().empty()) return "checkpoint";
  const std::string& path = ckpt.shards().front()->what();
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(0, slash);
}

// Converts `e` (F32, F16 or BF16, any alignment) into `dst`. `f16_table` maps every F16 bit
// pattern to its exact float32 value.
void ConvertToF32(const SafetensorsEntry& e, const std::vector<float>& f16_table, float* dst) {
  const size_t n = static_cast<size_t>(e.numel());
  const uint8_t* src = e.data;
  switch (e.dtype) {
    case DType::kF32:
      if (n != 0) std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, sizeof(h));
        dst[i] = f16_table[h];
      }
      return;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, sizeof(h));
        dst[i] = Bf16ToFloat(h);
      }
      return;
    default:
      LS_CHECK(false) << "dtype checked before conversion";
  }
}

void ConvertToBf16(const SafetensorsEntry& e, const std::vector<float>& f16_table, uint16_t* dst) {
  const size_t n = static_cast<size_t>(e.numel());
  const uint8_t* src = e.data;
  switch (e.dtype) {
    case DType::kF32:
      for (size_t i = 0; i < n; ++i) {
        float f;
        std::memcpy(&f, src + 4 * i, sizeof(f));
        dst[i] = FloatToBf16(f);
      }
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, sizeof(h));
        dst[i] = FloatToBf16(f16_table[h]);
      }
      return;
    case DType::kBF16:
      if (n != 0) std::memcpy(dst, src, n * sizeof(uint16_t));
      return;
    default:
      LS_CHECK(false) << "dtype checked before conversion";
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(const SafetensorsCheckpoint& ckpt,
                                                               const ModelConfig& config,
                                                               DType weights_dtype) {
  if (weights_dtype != DType::kF32 && weights_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat("weights dtype ", DTypeName(weights_dtype),
                                                   " is not supported (supported: F32, BF16)"));
  }
  Plan plan;
  const ModelRegions model_regions = BuildPlan(config, plan);

  // ---- Check everything before allocating anything.
  std::vector<std::string> missing, misshaped, bad_dtype, unexpected;
  for (const Slot& slot : plan.slots()) {
    const SafetensorsTensor* t = ckpt.Find(slot.name);
    if (t == nullptr) {
      if (!slot.optional_ignored) {
        missing.push_back(absl::StrCat("missing tensor ", Quote(slot.name), " (expected shape ",
                                       ShapeToString(slot.shape), ")"));
      }
      continue;
    }
    const SafetensorsEntry& e = *t->entry;
    if (e.shape != slot.shape) {
      misshaped.push_back(absl::StrCat("tensor ", Quote(slot.name), ": expected shape ",
                                       ShapeToString(slot.shape), ", found ",
                                       ShapeToString(e.shape)));
    }
    if (!slot.optional_ignored && !IsFloatDType(e.dtype)) {
      bad_dtype.push_back(absl::StrCat("tensor ", Quote(slot.name), ": dtype ", DTypeName(e.dtype),
                                       " is not supported (supported: F32, F16, BF16)"));
    }
  }
  // Old conversions saved the rotary embedding's buffer; it is recomputed from the config.
  absl::flat_hash_set<std::string> skipped;
  for (int i = 0; i < config.num_hidden_layers; ++i) {
    skipped.insert(absl::StrCat("model.layers.", i, ".self_attn.rotary_emb.inv_freq"));
  }
  for (const absl::string_view name : ckpt.names()) {
    if (plan.Find(name) != nullptr || skipped.contains(name)) continue;
    const SafetensorsEntry& e = *ckpt.Find(name)->entry;
    unexpected.push_back(absl::StrCat("unexpected tensor ", Quote(name), " (", DTypeName(e.dtype),
                                      " ", ShapeToString(e.shape), ")"));
  }
  const size_t num_problems =
      missing.size() + misshaped.size() + bad_dtype.size() + unexpected.size();
  if (num_problems != 0) {
    std::string message =
        absl::StrCat(CheckpointName(ckpt), ": the weights do not match config.json (",
                     ModelTypeName(config.model_type), ", ", config.num_hidden_layers,
                     " layers, hidden ", config.hidden_size, ", vocab ", config.vocab_size,
                     "): ", num_problems, num_problems == 1 ? " problem" : " problems", " (",
                     missing.size(), " missing, ", misshaped.size(), " mis-shaped, ",
                     bad_dtype.size(), " unsupported dtype, ", unexpected.size(), " unexpected)");
    size_t lines = 0;
    for (const auto* list : {&missing, &misshaped, &bad_dtype, &unexpected}) {
      for (const std::string& line : *list) {
        if (lines == kMaxProblemLines) break;
        ++lines;
        absl::StrAppend(&message, "\n  ", line);
      }
    }
    if (num_problems > kMaxProblemLines) {
      absl::StrAppend(&message, "\n  ... and ", num_problems - kMaxProblemLines, " more");
    }
    return absl::InvalidArgumentError(message);
  }

  // ---- Lay out and allocate the arena.
  const size_t matrix_element_bytes = static_cast<size_t>(DTypeBits(weights_dtype) / 8);
  size_t total = 0;
  for (Region& region : plan.regions()) {
    const size_t element_bytes =
        region.storage == Storage::kMatrix ? matrix_element_bytes : sizeof(float);
    region.offset = total;
    // Every dimension matches a tensor the checkpoint holds, so this fits the files' sizes.
    total += AlignUp(static_cast<size_t>(region.rows * region.cols) * element_bytes);
  }
  std::unique_ptr<ModelWeights> w(new ModelWeights());
  absl::StatusOr<HugeBuffer> arena = HugeBuffer::Allocate(total);
  if (!arena.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", total, " bytes for the model weights"));
  }
  w->arena_ = *std::move(arena);
  w->arena_bytes_ = total;
  w->dtype_ = weights_dtype;
  uint8_t* const arena_data = static_cast<uint8_t*>(w->arena_.data());
  // Zero the alignment padding so the arena's bytes are all defined (it may be copied whole).
  for (const Region& region : plan.regions()) {
    const size_t element_bytes =
        region.storage == Storage::kMatrix ? matrix_element_bytes : sizeof(float);
    const size_t used = static_cast<size_t>(region.rows * region.cols) * element_bytes;
    std::memset(arena_data + region.offset + used, 0, AlignUp(used) - used);
  }

  // ---- Convert, in checkpoint order so each shard is read front to back.
  std::vector<float> f16_table;
  for (const absl::string_view name : ckpt.names()) {
    if (ckpt.Find(name)->entry->dtype == DType::kF16) {
      f16_table.resize(size_t{1} << 16);
      for (size_t h = 0; h < f16_table.size(); ++h) {
        f16_table[h] = Fp16ToFloat(static_cast<uint16_t>(h));
      }
      break;
    }
  }
  int64_t num_parameters = 0;
  for (const absl::string_view name : ckpt.names()) {
    const Slot* slot = plan.Find(name);
    if (slot == nullptr) continue;  // a skipped inv_freq
    if (slot->optional_ignored) {
      LS_LOG(INFO) << "lm_head.weight is present but tie_word_embeddings is true: ignoring it "
                      "and using model.embed_tokens.weight";
      continue;
    }
    const SafetensorsEntry& e = *ckpt.Find(name)->entry;
    const Region& region = plan.regions()[slot->region];
    uint8_t* const base = arena_data + region.offset;
    if (region.storage == Storage::kF32Vector || weights_dtype == DType::kF32) {
      ConvertToF32(e, f16_table, reinterpret_cast<float*>(base) + slot->element_offset);
    } else {
      ConvertToBf16(e, f16_table, reinterpret_cast<uint16_t*>(base) + slot->element_offset);
    }
    // The arena holds the tensor now: let the kernel drop its file pages, so that loading never
    // needs the checkpoint and the arena resident at the same time.
    ckpt.Find(name)->file->ReleasePages(e);
    num_parameters += e.numel();
  }
  w->num_parameters_ = num_parameters;

  // ---- Views.
  const auto matrix = [&](size_t index) {
    const Region& r = plan.regions()[index];
    return WeightView{arena_data + r.offset, weights_dtype, r.rows, r.cols};
  };
  const auto vector = [&](size_t index) {
    const Region& r = plan.regions()[index];
    return WeightView{arena_data + r.offset, DType::kF32, 1, r.cols};
  };
  const auto floats = [&](size_t index) -> const float* {
    if (index == kNoRegion) return nullptr;
    return reinterpret_cast<const float*>(arena_data + plan.regions()[index].offset);
  };
  w->embed_ = matrix(model_regions.embed);
  w->lm_head_ = model_regions.lm_head == kNoRegion ? w->embed_ : matrix(model_regions.lm_head);
  w->final_norm_ = vector(model_regions.final_norm);
  w->layers_.reserve(model_regions.layers.size());
  for (const LayerRegions& l : model_regions.layers) {
    LayerWeights layer;
    layer.input_norm = vector(l.input_norm);
    layer.qkv = matrix(l.qkv);
    layer.qkv_bias = floats(l.qkv_bias);
    layer.o = matrix(l.o);
    layer.o_bias = floats(l.o_bias);
    layer.post_norm = vector(l.post_norm);
    layer.gate_up = matrix(l.gate_up);
    layer.down = matrix(l.down);
    w->layers_.push_back(layer);
  }
  return w;
}

}  // namespace ls
