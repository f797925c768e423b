// Tests for model/weights.h: tiny random checkpoints written with WriteSafetensors in every disk
// dtype load into both weights dtypes with the fused views holding exactly the converted values;
// every checkpoint problem is listed in one error; biases, tied embeddings, skipped buffers and
// sharded checkpoints.
#include "model/weights.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/dtype.h"
#include "common/json.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace ls {
namespace {

using ::testing::HasSubstr;
using ::testing::SizeIs;
using ::testing::StartsWith;

// ---- Helpers -------------------------------------------------------------------------------

// A fresh directory under the test temp dir, removed (with its files) at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "/weights_test.XXXXXX";
    char* made = ::mkdtemp(tmpl.data());
    EXPECT_NE(made, nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    if (DIR* d = ::opendir(path_.c_str())) {
      std::vector<std::string> names;
      while (const dirent* e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (name != "." && name != "..") names.push_back(name);
      }
      ::closedir(d);
      for (const std::string& name : names) ::unlink((path_ + "/" + name).c_str());
    }
    ::rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// V=19, H=16, I=24, 2 layers, 4 heads of 4, 2 KV heads: Q=16, KV=8.
Json TinyJson(const std::string& model_type = "llama") {
  return Json{{"model_type", model_type}, {"vocab_size", 19},
              {"hidden_size", 16},        {"intermediate_size", 24},
              {"num_hidden_layers", 2},   {"num_attention_heads", 4},
              {"num_key_value_heads", 2}, {"max_position_embeddings", 64},
              {"eos_token_id", 2}};
}

ModelConfig Config(const Json& j) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(j.dump(), "", {});
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : ModelConfig();
}

// A tensor as stored on disk.
struct DiskTensor {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  std::string bytes;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  // The exact value of element i.
  float Value(int64_t i) const {
    const char* p = bytes.data();
    if (dtype == DType::kF32) {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    return dtype == DType::kF16 ? Fp16ToFloat(h) : Bf16ToFloat(h);
  }
  // Element i as the loader must store it in BF16.
  uint16_t Bf16Bits(int64_t i) const {
    if (dtype == DType::kBF16) {
      uint16_t h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      return h;
    }
    return FloatToBf16(Value(i));
  }
  void SetFloat(int64_t i, float f) {
    ASSERT_EQ(dtype, DType::kF32);
    std::memcpy(bytes.data() + 4 * i, &f, 4);
  }
};

DiskTensor MakeTensor(const std::string& name, Shape shape, DType dtype, std::mt19937& rng) {
  DiskTensor t{name, dtype, std::move(shape), ""};
  std::normal_distribution<float> dist(0.0f, 0.5f);
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const float f = dist(rng);
    if (dtype == DType::kF32) {
      t.bytes.append(reinterpret_cast<const char*>(&f), 4);
    } else if (dtype == DType::kF16 || dtype == DType::kBF16) {
      const uint16_t h = dtype == DType::kF16 ? FloatToFp16(f) : FloatToBf16(f);
      t.bytes.append(reinterpret_cast<const char*>(&h), 2);
    } else {
      // Any other dtype: raw random bytes of the right size.
      for (int b = 0; b < DTypeBits(dtype) / 8; ++b) t.bytes.push_back(static_cast<char>(rng()));
    }
  }
  return t;
}

// The tensors a checkpoint of `c` holds, listed independently of the loader.
struct TinyModel {
  std::vector<DiskTensor> tensors;

  DiskTensor& Get(const std::string& name) {
    for (DiskTensor& t : tensors) {
      if (t.name == name) return t;
    }
    ADD_FAILURE() << "no tensor " << name;
    return tensors.front();
  }
  void Remove(const std::string& name) {
    for (auto it = tensors.begin(); it != tensors.end(); ++it) {
      if (it->name == name) {
        tensors.erase(it);
        return;
      }
    }
    ADD_FAILURE() << "no tensor " << name;
  }
};

TinyModel MakeTiny(const ModelConfig& c, const std::function<DType(const std::string&)>& dtype_of,
                   uint32_t seed = 1) {
  std::mt19937 rng(seed);
  TinyModel m;
  const int64_t h = c.hidden_size, v = c.vocab_size, inter = c.intermediate_size;
  const int64_t q = c.q_dim(), kv = c.kv_dim();
  auto add = [&](const std::string& name, Shape shape) {
    m.tensors.push_back(MakeTensor(name, std::move(shape), dtype_of(name), rng));
  };
  add("model.embed_tokens.weight", {v, h});
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    add(p + "input_layernorm.weight", {h});
    add(p + "self_attn.q_proj.weight", {q, h});
    add(p + "self_attn.k_proj.weight", {kv, h});
    add(p + "self_attn.v_proj.weight", {kv, h});
    if (c.attention_qkv_bias) {
      add(p + "self_attn.q_proj.bias", {q});
      add(p + "self_attn.k_proj.bias", {kv});
      add(p + "self_attn.v_proj.bias", {kv});
    }
    add(p + "self_attn.o_proj.weight", {h, q});
    if (c.attention_o_bias) add(p + "self_attn.o_proj.bias", {h});
    add(p + "post_attention_layernorm.weight", {h});
    add(p + "mlp.gate_proj.weight", {inter, h});
    add(p + "mlp.up_proj.weight", {inter, h});
    add(p + "mlp.down_proj.weight", {h, inter});
  }
  add("model.norm.weight", {h});
  if (!c.tie_word_embeddings) add("lm_head.weight", {v, h});
  return m;
}

std::vector<SafetensorsTensorRef> Refs(const std::vector<const DiskTensor*>& tensors) {
  std::vector<SafetensorsTensorRef> refs;
  for (const DiskTensor* t : tensors) {
    refs.push_back({t->name,
                    t->dtype,
                    t->shape,
                    {reinterpret_cast<const uint8_t*>(t->bytes.data()), t->bytes.size()}});
  }
  return refs;
}

void WriteSingle(const TinyModel& m, const TempDir& dir) {
  std::vector<const DiskTensor*> all;
  for (const DiskTensor& t : m.tensors) all.push_back(&t);
  ASSERT_TRUE(WriteSafetensors(dir.File("model.safetensors"), Refs(all)).ok());
}

absl::StatusOr<std::unique_ptr<ModelWeights>> Load(const TinyModel& m, const ModelConfig& c,
                                                   DType weights_dtype, const TempDir& dir) {
  WriteSingle(m, dir);
  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
      SafetensorsCheckpoint::Open(dir.path());
  if (!ckpt.ok()) return ckpt.status();
  return LoadModelWeights(**ckpt, c, weights_dtype);
}

bool BitEqual(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

// Expects rows [row0, row0 + t.shape[0]) of `view` to hold `t` converted to view.dtype.
void ExpectRows(const WeightView& view, int64_t row0, const DiskTensor& t) {
  SCOPED_TRACE(t.name);
  ASSERT_EQ(t.shape.size(), 2u);
  ASSERT_EQ(view.cols, t.shape[1]);
  ASSERT_LE(row0 + t.shape[0], view.rows);
  const int64_t base = row0 * view.cols;
  int64_t mismatches = 0;
  std::string first;
  for (int64_t i = 0; i < t.numel(); ++i) {
    bool ok;
    if (view.dtype == DType::kF32) {
      ok = BitEqual(static_cast<const float*>(view.data)[base + i], t.Value(i));
    } else {
      ok = static_cast<const uint16_t*>(view.data)[base + i] == t.Bf16Bits(i);
    }
    if (!ok && mismatches++ == 0) first = absl::StrCat("first mismatch at element ", i);
  }
  EXPECT_EQ(mismatches, 0) << first;
}

// Expects floats [offset, offset + numel) of `p` to equal `t`'s values exactly.
void ExpectFloats(const float* p, int64_t offset, const DiskTensor& t) {
  SCOPED_TRACE(t.name);
  ASSERT_NE(p, nullptr);
  int64_t mismatches = 0;
  for (int64_t i = 0; i < t.numel(); ++i) mismatches += !BitEqual(p[offset + i], t.Value(i));
  EXPECT_EQ(mismatches, 0);
}

void ExpectAligned(const void* p) { EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u) << p; }

// Checks every view of `w` against `m`.
void ExpectLoaded(const ModelWeights& w, TinyModel& m, const ModelConfig& c, DType dtype) {
  const int64_t h = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), inter = c.intermediate_size;
  EXPECT_EQ(w.dtype(), dtype);
  EXPECT_EQ(w.embed().dtype, dtype);
  EXPECT_EQ(w.embed().rows, c.vocab_size);
  ExpectRows(w.embed(), 0, m.Get("model.embed_tokens.weight"));
  ExpectAligned(w.embed().data);
  if (c.tie_word_embeddings) {
    EXPECT_TRUE(w.lm_head_tied());
    EXPECT_EQ(w.lm_head().data, w.embed().data);
  } else {
    EXPECT_FALSE(w.lm_head_tied());
    ExpectRows(w.lm_head(), 0, m.Get("lm_head.weight"));
    ExpectAligned(w.lm_head().data);
  }
  EXPECT_EQ(w.final_norm().dtype, DType::kF32);
  EXPECT_EQ(w.final_norm().rows, 1);
  EXPECT_EQ(w.final_norm().cols, h);
  ExpectFloats(static_cast<const float*>(w.final_norm().data), 0, m.Get("model.norm.weight"));
  ASSERT_THAT(w.layers(), SizeIs(c.num_hidden_layers));
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    SCOPED_TRACE(absl::StrCat("layer ", i));
    const LayerWeights& l = w.layers()[static_cast<size_t>(i)];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    EXPECT_EQ(l.input_norm.dtype, DType::kF32);
    EXPECT_EQ(l.input_norm.cols, h);
    ExpectFloats(static_cast<const float*>(l.input_norm.data), 0,
                 m.Get(p + "input_layernorm.weight"));
    ExpectFloats(static_cast<const float*>(l.post_norm.data), 0,
                 m.Get(p + "post_attention_layernorm.weight"));

    EXPECT_EQ(l.qkv.dtype, dtype);
    EXPECT_EQ(l.qkv.rows, q + 2 * kv);
    EXPECT_EQ(l.qkv.cols, h);
    ExpectRows(l.qkv, 0, m.Get(p + "self_attn.q_proj.weight"));
    ExpectRows(l.qkv, q, m.Get(p + "self_attn.k_proj.weight"));
    ExpectRows(l.qkv, q + kv, m.Get(p + "self_attn.v_proj.weight"));
    if (c.attention_qkv_bias) {
      ExpectFloats(l.qkv_bias, 0, m.Get(p + "self_attn.q_proj.bias"));
      ExpectFloats(l.qkv_bias, q, m.Get(p + "self_attn.k_proj.bias"));
      ExpectFloats(l.qkv_bias, q + kv, m.Get(p + "self_attn.v_proj.bias"));
      ExpectAligned(l.qkv_bias);
    } else {
      EXPECT_EQ(l.qkv_bias, nullptr);
    }
    EXPECT_EQ(l.o.rows, h);
    EXPECT_EQ(l.o.cols, q);
    ExpectRows(l.o, 0, m.Get(p + "self_attn.o_proj.weight"));
    if (c.attention_o_bias) {
      ExpectFloats(l.o_bias, 0, m.Get(p + "self_attn.o_proj.bias"));
    } else {
      EXPECT_EQ(l.o_bias, nullptr);
    }
    EXPECT_EQ(l.gate_up.rows, 2 * inter);
    EXPECT_EQ(l.gate_up.cols, h);
    ExpectRows(l.gate_up, 0, m.Get(p + "mlp.gate_proj.weight"));
    ExpectRows(l.gate_up, inter, m.Get(p + "mlp.up_proj.weight"));
    EXPECT_EQ(l.down.rows, h);
    EXPECT_EQ(l.down.cols, inter);
    ExpectRows(l.down, 0, m.Get(p + "mlp.down_proj.weight"));
    for (const void* ptr :
         {l.input_norm.data, l.qkv.data, l.o.data, l.post_norm.data, l.gate_up.data, l.down.data}) {
      ExpectAligned(ptr);
    }
  }
  int64_t params = 0;
  for (const DiskTensor& t : m.tensors) params += t.numel();
  if (c.tie_word_embeddings && w.lm_head_tied()) {
    for (const DiskTensor& t : m.tensors) {
      if (t.name == "lm_head.weight") params -= t.numel();
    }
  }
  EXPECT_EQ(w.num_parameters(), params);
  EXPECT_EQ(w.arena_bytes() % 64, 0u);
  EXPECT_GE(w.arena_bytes(), static_cast<size_t>(params) * 2);
}

// Expects INVALID_ARGUMENT starting with the checkpoint directory, holding every needle.
void ExpectRejected(const absl::StatusOr<std::unique_ptr<ModelWeights>>& result, const TempDir& dir,
                    std::initializer_list<std::string> needles) {
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  const std::string message(result.status().message());
  EXPECT_THAT(message, StartsWith(dir.path() + ": the weights do not match config.json"));
  for (const std::string& needle : needles) EXPECT_THAT(message, HasSubstr(needle));
}

// ---- Loading -------------------------------------------------------------------------------

TEST(WeightsTest, EveryDiskDtypeIntoEveryWeightsDtype) {
  const ModelConfig c = Config(TinyJson());
  for (const DType disk : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (const DType target : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(disk), " -> ", DTypeName(target)));
      TempDir dir;
      TinyModel m = MakeTiny(c, [disk](const std::string&) { return disk; });
      absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, target, dir);
      ASSERT_TRUE(w.ok()) << w.status();
      ExpectLoaded(**w, m, c, target);
    }
  }
}

TEST(WeightsTest, MixedDiskDtypes) {
  const ModelConfig c = Config(TinyJson());
  const auto mixed = [](const std::string& name) {
    const size_t h = std::hash<std::string>()(name) % 3;
    return h == 0 ? DType::kF32 : h == 1 ? DType::kF16 : DType::kBF16;
  };
  for (const DType target : {DType::kF32, DType::kBF16}) {
    TempDir dir;
    TinyModel m = MakeTiny(c, mixed, 7);
    absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, target, dir);
    ASSERT_TRUE(w.ok()) << w.status();
    ExpectLoaded(**w, m, c, target);
  }
}

TEST(WeightsTest, Bf16RoundsToNearestEven) {
  const ModelConfig c = Config(TinyJson());
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kF32; });
  DiskTensor& embed = m.Get("model.embed_tokens.weight");
  // float32 bits -> expected bfloat16 bits, written out by hand.
  const std::vector<std::pair<uint32_t, uint16_t>> cases = {
      {0x3F808000u, 0x3F80u},  // 1 + 2^-8: a tie, rounds to the even 0x3F80
      {0x3F818000u, 0x3F82u},  // 1 + 3*2^-8: a tie, rounds to the even 0x3F82
      {0x3F808001u, 0x3F81u},  // just above the tie: up
      {0x3F807FFFu, 0x3F80u},  // just below: down
      {0xBF818000u, 0xBF82u},  // negative tie
      {0x7F7FFFFFu, 0x7F80u},  // FLT_MAX rounds to +inf
      {0x00000001u, 0x0000u},  // smallest subnormal rounds to zero
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    float f;
    std::memcpy(&f, &cases[i].first, 4);
    embed.SetFloat(static_cast<int64_t>(i), f);
  }
  absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, DType::kBF16, dir);
  ASSERT_TRUE(w.ok()) << w.status();
  const uint16_t* e = static_cast<const uint16_t*>((*w)->embed().data);
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(e[i], cases[i].second) << std::hex << cases[i].first;
  }
  ExpectLoaded(**w, m, c, DType::kBF16);
}

TEST(WeightsTest, ParameterCountAndArenaSize) {
  const ModelConfig c = Config(TinyJson());
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kBF16; });
  absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, DType::kBF16, dir);
  ASSERT_TRUE(w.ok()) << w.status();
  // V*H (embed) + V*H (lm_head) + H (norm) + per layer 2H + (Q+2KV)*H + H*Q + 2*I*H + H*I.
  const int64_t per_layer = 2 * 16 + 32 * 16 + 16 * 16 + 2 * 24 * 16 + 16 * 24;
  EXPECT_EQ((*w)->num_parameters(), 19 * 16 * 2 + 16 + 2 * per_layer);
  // Matrices 2 bytes, vectors 4; each region padded to 64 bytes.
  size_t expected = 0;
  const auto region = [&](size_t bytes) { expected += (bytes + 63) / 64 * 64; };
  region(19 * 16 * 2);  // embed
  region(19 * 16 * 2);  // lm_head
  region(16 * 4);       // final norm
  for (int i = 0; i < 2; ++i) {
    region(16 * 4);           // input norm
    region(32 * 16 * 2);      // qkv
    region(16 * 16 * 2);      // o
    region(16 * 4);           // post norm
    region(2 * 24 * 16 * 2);  // gate_up
    region(16 * 24 * 2);      // down
  }
  EXPECT_EQ((*w)->arena_bytes(), expected);
}

TEST(WeightsTest, RejectsUnsupportedWeightsDtype) {
  const ModelConfig c = Config(TinyJson());
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kF32; });
  absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, DType::kF16, dir);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(w.status().message(), HasSubstr("weights dtype F16 is not supported"));
}

// ---- Checkpoint problems -------------------------------------------------------------------

TEST(WeightsTest, ListsEveryProblemAtOnce) {
  const ModelConfig c = Config(TinyJson());
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kF32; });
  std::mt19937 rng(3);
  m.Remove("model.layers.1.mlp.up_proj.weight");
  m.Remove("lm_head.weight");
  m.Get("model.norm.weight") = MakeTensor("model.norm.weight", {17}, DType::kF32, rng);
  m.Get("model.layers.0.self_attn.k_proj.weight") =
      MakeTensor("model.layers.0.self_attn.k_proj.weight", {8, 15}, DType::kF32, rng);
  m.tensors.push_back(MakeTensor("model.layers.2.input_layernorm.weight", {16}, DType::kF32, rng));
  m.tensors.push_back(MakeTensor("model.layers.0.self_attn.q_proj.bias", {16}, DType::kF32, rng));
  const absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, DType::kF32, dir);
  ExpectRejected(
      w, dir,
      {"6 problems (2 missing, 2 mis-shaped, 0 unsupported dtype, 2 unexpected)",
       "\n  missing tensor \"model.layers.1.mlp.up_proj.weight\" (expected shape [24, 16])",
       "\n  missing tensor \"lm_head.weight\" (expected shape [19, 16])",
       "\n  tensor \"model.norm.weight\": expected shape [16], found [17]",
       "\n  tensor \"model.layers.0.self_attn.k_proj.weight\": expected shape [8, 16], found "
       "[8, 15]",
       "\n  unexpected tensor \"model.layers.2.input_layernorm.weight\" (F32 [16])",
       "\n  unexpected tensor \"model.layers.0.self_attn.q_proj.bias\" (F32 [16])"});
  if (!w.ok()) {
    EXPECT_THAT(std::vector<std::string>(absl::StrSplit(w.status().message(), '\n')), SizeIs(7));
  }
}

TEST(WeightsTest, NamesUnsupportedDiskDtypes) {
  const ModelConfig c = Config(TinyJson());
  TempDir dir;
  const auto dtype_of = [](const std::string& name) {
    if (name == "model.layers.0.mlp.down_proj.weight") return DType::kI32;
    if (name == "model.norm.weight") return DType::kF64;
    return DType::kBF16;
  };
  TinyModel m = MakeTiny(c, dtype_of);
  ExpectRejected(Load(m, c, DType::kBF16, dir), dir,
                 {"2 problems (0 missing, 0 mis-shaped, 2 unsupported dtype, 0 unexpected)",
                  "tensor \"model.layers.0.mlp.down_proj.weight\": dtype I32 is not supported "
                  "(supported: F32, F16, BF16)",
                  "tensor \"model.norm.weight\": dtype F64 is not supported"});
}

TEST(WeightsTest, SingleProblemIsSingular) {
  const ModelConfig c = Config(TinyJson());
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kF32; });
  m.Remove("model.layers.0.input_layernorm.weight");
  ExpectRejected(Load(m, c, DType::kF32, dir), dir,
                 {": 1 problem (1 missing", "model.layers.0.input_layernorm.weight"});
}

// ---- Tied embeddings -----------------------------------------------------------------------

TEST(WeightsTest, TiedEmbeddingsWithoutLmHead) {
  Json j = TinyJson();
  j["tie_word_embeddings"] = true;
  const ModelConfig c = Config(j);
  for (const DType target : {DType::kF32, DType::kBF16}) {
    TempDir dir;
    TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kBF16; });
    absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, target, dir);
    ASSERT_TRUE(w.ok()) << w.status();
    ExpectLoaded(**w, m, c, target);
    EXPECT_EQ((*w)->lm_head().rows, 19);
    EXPECT_EQ((*w)->lm_head().cols, 16);
    EXPECT_EQ((*w)->lm_head().dtype, target);
  }
}

TEST(WeightsTest, TiedEmbeddingsIgnoreAPresentLmHead) {
  Json j = TinyJson();
  j["tie_word_embeddings"] = true;
  const ModelConfig c = Config(j);
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kF32; });
  std::mt19937 rng(5);
  m.tensors.push_back(MakeTensor("lm_head.weight", {19, 16}, DType::kF32, rng));
  absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, DType::kF32, dir);
  ASSERT_TRUE(w.ok()) << w.status();
  ExpectLoaded(**w, m, c, DType::kF32);
  EXPECT_TRUE((*w)->lm_head_tied());
}

TEST(WeightsTest, TiedEmbeddingsRejectAMisshapedLmHead) {
  Json j = TinyJson();
  j["tie_word_embeddings"] = true;
  const ModelConfig c = Config(j);
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kF32; });
  std::mt19937 rng(5);
  m.tensors.push_back(MakeTensor("lm_head.weight", {19, 15}, DType::kF32, rng));
  ExpectRejected(Load(m, c, DType::kF32, dir), dir,
                 {"tensor \"lm_head.weight\": expected shape [19, 16], found [19, 15]"});
}

// ---- Biases and skipped buffers ------------------------------------------------------------

TEST(WeightsTest, Qwen2QkvBiasesFused) {
  const ModelConfig c = Config(TinyJson("qwen2"));
  ASSERT_TRUE(c.attention_qkv_bias);
  ASSERT_FALSE(c.attention_o_bias);
  for (const DType target : {DType::kF32, DType::kBF16}) {
    TempDir dir;
    TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kBF16; });
    absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, target, dir);
    ASSERT_TRUE(w.ok()) << w.status();
    ExpectLoaded(**w, m, c, target);
    EXPECT_NE((*w)->layers()[0].qkv_bias, nullptr);
    EXPECT_EQ((*w)->layers()[0].o_bias, nullptr);
  }
}

TEST(WeightsTest, Qwen2MissingBiasIsReported) {
  const ModelConfig c = Config(TinyJson("qwen2"));
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kF32; });
  m.Remove("model.layers.1.self_attn.k_proj.bias");
  ExpectRejected(Load(m, c, DType::kF32, dir), dir,
                 {"missing tensor \"model.layers.1.self_attn.k_proj.bias\" (expected shape [8])"});
}

TEST(WeightsTest, LlamaAttentionBiasFused) {
  Json j = TinyJson();
  j["attention_bias"] = true;
  const ModelConfig c = Config(j);
  for (const DType target : {DType::kF32, DType::kBF16}) {
    TempDir dir;
    TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kF16; });
    absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, target, dir);
    ASSERT_TRUE(w.ok()) << w.status();
    ExpectLoaded(**w, m, c, target);
    EXPECT_NE((*w)->layers()[1].o_bias, nullptr);
  }
}

TEST(WeightsTest, SkipsRotaryInvFreqBuffers) {
  const ModelConfig c = Config(TinyJson());
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kF32; });
  std::mt19937 rng(9);
  for (int i = 0; i < 2; ++i) {
    m.tensors.push_back(MakeTensor(
        absl::StrCat("model.layers.", i, ".self_attn.rotary_emb.inv_freq"), {2}, DType::kF32, rng));
  }
  TinyModel loaded = m;
  absl::StatusOr<std::unique_ptr<ModelWeights>> w = Load(m, c, DType::kF32, dir);
  ASSERT_TRUE(w.ok()) << w.status();
  loaded.tensors.resize(loaded.tensors.size() - 2);  // not parameters
  ExpectLoaded(**w, loaded, c, DType::kF32);

  // A layer the config does not have is still unexpected.
  TempDir dir2;
  m.tensors.push_back(
      MakeTensor("model.layers.5.self_attn.rotary_emb.inv_freq", {2}, DType::kF32, rng));
  ExpectRejected(Load(m, c, DType::kF32, dir2), dir2,
                 {"unexpected tensor \"model.layers.5.self_attn.rotary_emb.inv_freq\""});
}

// ---- Sharded checkpoints -------------------------------------------------------------------

TEST(WeightsTest, ShardedCheckpoint) {
  const ModelConfig c = Config(TinyJson());
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kBF16; });
  std::vector<const DiskTensor*> first, second;
  Json weight_map = Json::object();
  for (const DiskTensor& t : m.tensors) {
    const bool in_first = t.name.rfind("model.layers.1.", 0) != 0 && t.name != "lm_head.weight";
    (in_first ? first : second).push_back(&t);
    weight_map[t.name] =
        in_first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  ASSERT_TRUE(WriteSafetensors(dir.File("model-00001-of-00002.safetensors"), Refs(first)).ok());
  ASSERT_TRUE(WriteSafetensors(dir.File("model-00002-of-00002.safetensors"), Refs(second)).ok());
  {
    std::FILE* f = std::fopen(dir.File("model.safetensors.index.json").c_str(), "w");
    ASSERT_NE(f, nullptr);
    const std::string index =
        Json{{"metadata", Json{{"total_size", 1234}}}, {"weight_map", weight_map}}.dump();
    std::fwrite(index.data(), 1, index.size(), f);
    std::fclose(f);
  }
  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
      SafetensorsCheckpoint::Open(dir.path());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  ASSERT_TRUE((*ckpt)->sharded());
  for (const DType target : {DType::kF32, DType::kBF16}) {
    absl::StatusOr<std::unique_ptr<ModelWeights>> w = LoadModelWeights(**ckpt, c, target);
    ASSERT_TRUE(w.ok()) << w.status();
    ExpectLoaded(**w, m, c, target);
  }
}

TEST(WeightsTest, OutlivesTheCheckpoint) {
  const ModelConfig c = Config(TinyJson());
  TempDir dir;
  TinyModel m = MakeTiny(c, [](const std::string&) { return DType::kBF16; });
  WriteSingle(m, dir);
  std::unique_ptr<ModelWeights> w;
  {
    absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
        SafetensorsCheckpoint::Open(dir.path());
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    absl::StatusOr<std::unique_ptr<ModelWeights>> loaded =
        LoadModelWeights(**ckpt, c, DType::kBF16);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    w = *std::move(loaded);
  }
  ExpectLoaded(*w, m, c, DType::kBF16);
}

}  // namespace
}  // namespace ls
