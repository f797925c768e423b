// Tests for model/peft_config.h, model/lora_adapter.h and model/adapter_store.h: small PEFT
// adapters built here (adapter_config.json text + a safetensors file from our writer) against the
// golden fixtures' base configs; one rejection test per class of bad adapter, each checking its
// message; PEFT's matching rules (target_modules list / regex / all-linear, exclude_modules,
// layers_to_transform, rank_pattern / alpha_pattern in file order); scales; name forms; disk
// dtypes; the packed layout and group slices; versions and their cache; ids and symlinks; and,
// when present, every adapter under tests/golden/fixtures/*/adapters/ against the module list,
// ranks and scales PEFT itself reported (expected_lora.json).
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/json.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/adapter_store.h"
#include "model/config.h"
#include "model/lora_adapter.h"
#include "model/peft_config.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace ls {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using OJson = nlohmann::ordered_json;

// ---- Helpers -------------------------------------------------------------------------------

std::string SourceDir() {
  const char* dir = std::getenv("LS_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

std::string FixtureDir(const std::string& model) {
  return SourceDir() + "/tests/golden/fixtures/" + model;
}

ModelConfig FixtureConfig(const std::string& model) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(FixtureDir(model), {});
  EXPECT_TRUE(config.ok()) << config.status();
  return config.ok() ? *config : ModelConfig();
}

std::unique_ptr<ModelWeights> FixtureWeights(const std::string& model, const ModelConfig& config,
                                             DType dtype) {
  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
      SafetensorsCheckpoint::Open(FixtureDir(model));
  EXPECT_TRUE(ckpt.ok()) << ckpt.status();
  if (!ckpt.ok()) return nullptr;
  absl::StatusOr<std::unique_ptr<ModelWeights>> weights = LoadModelWeights(**ckpt, config, dtype);
  EXPECT_TRUE(weights.ok()) << weights.status();
  return weights.ok() ? *std::move(weights) : nullptr;
}

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }

// A fresh directory, removed with everything below it (symlinks not followed) at the end.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "/peft_adapter_test.XXXXXX";
    char* made = ::mkdtemp(tmpl.data());
    EXPECT_NE(made, nullptr);
    path_ = tmpl;
  }
  ~TempDir() { ::nftw(path_.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS); }
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
  ASSERT_TRUE(out.good()) << path;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Values k/32 for k in [-16, 16]: exact in F32, F16 and BF16, so every dtype path compares
// exactly.
float Value(uint32_t seed, int64_t i) {
  const uint32_t h = seed * 2654435761u + static_cast<uint32_t>(i) * 40503u;
  return static_cast<float>(static_cast<int>((h >> 7) % 33u) - 16) / 32.0f;
}

std::vector<uint8_t> Encode(const std::vector<float>& values, DType dtype) {
  std::vector<uint8_t> bytes;
  for (const float v : values) {
    uint8_t b[4];
    size_t n = 4;
    if (dtype == DType::kF32) {
      std::memcpy(b, &v, 4);
    } else {
      const uint16_t h = dtype == DType::kF16 ? FloatToFp16(v) : FloatToBf16(v);
      std::memcpy(b, &h, 2);
      n = 2;
    }
    bytes.insert(bytes.end(), b, b + n);
  }
  return bytes;
}

struct TestTensor {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  std::vector<float> values;
};

// (in, out) of a module of `c` as the test knows them (independently of the loader).
std::pair<int64_t, int64_t> Dims(const ModelConfig& c, const std::string& module) {
  const int64_t h = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), i = c.intermediate_size;
  if (module == "q_proj") return {h, q};
  if (module == "k_proj" || module == "v_proj") return {h, kv};
  if (module == "o_proj") return {q, h};
  if (module == "gate_proj" || module == "up_proj") return {h, i};
  if (module == "down_proj") return {i, h};
  if (module == "lm_head") return {h, c.vocab_size};
  ADD_FAILURE() << module;
  return {0, 0};
}

std::string ModulePath(int layer, const std::string& module) {
  if (module == "lm_head") return "lm_head";
  if (module == "embed_tokens") return "model.embed_tokens";
  const bool attn =
      module == "q_proj" || module == "k_proj" || module == "v_proj" || module == "o_proj";
  return absl::StrCat("model.layers.", layer, attn ? ".self_attn." : ".mlp.", module);
}

// An adapter under construction: adapter_config.json (ordered, as PEFT writes it) and tensors.
struct AdapterFiles {
  OJson config = OJson{
      {"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 8}, {"target_modules", {"q_proj", "v_proj"}}};
  std::vector<TestTensor> tensors;
  // Name form for AddPair / AddEmbedding.
  std::string prefix = "base_model.model.";
  std::string infix;  // e.g. ".default"

  TestTensor& Add(std::string name, DType dtype, Shape shape, uint32_t seed) {
    TestTensor t{std::move(name), dtype, std::move(shape), {}};
    int64_t n = 1;
    for (const int64_t d : t.shape) n *= d;
    for (int64_t i = 0; i < n; ++i) t.values.push_back(Value(seed, i));
    tensors.push_back(std::move(t));
    return tensors.back();
  }
  // lora_A [rank, in] and lora_B [out, rank] of a Linear module.
  void AddPair(const ModelConfig& c, int layer, const std::string& module, int64_t rank,
               DType dtype = DType::kF32) {
    const auto [in, out] = Dims(c, module);
    const std::string base = prefix + ModulePath(layer, module);
    const uint32_t seed = static_cast<uint32_t>(layer * 100 + module.size() * 7 + rank);
    Add(base + ".lora_A" + infix + ".weight", dtype, {rank, in}, seed);
    Add(base + ".lora_B" + infix + ".weight", dtype, {out, rank}, seed + 1);
  }
  // lora_embedding_A [rank, vocab] and lora_embedding_B [hidden, rank].
  void AddEmbedding(const ModelConfig& c, int64_t rank, DType dtype = DType::kF32) {
    const std::string base = prefix + "model.embed_tokens";
    Add(base + ".lora_embedding_A" + infix, dtype, {rank, c.vocab_size}, 77);
    Add(base + ".lora_embedding_B" + infix, dtype, {c.hidden_size, rank}, 78);
  }
  const TestTensor* Find(const std::string& name) const {
    for (const TestTensor& t : tensors) {
      if (t.name == name) return &t;
    }
    return nullptr;
  }
  TestTensor* Find(const std::string& name) {
    return const_cast<TestTensor*>(static_cast<const AdapterFiles*>(this)->Find(name));
  }
  void Remove(const std::string& name) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].name == name) tensors.erase(tensors.begin() + static_cast<ptrdiff_t>(i));
    }
  }

  std::string ConfigText() const { return config.dump(2); }
  std::string SafetensorsBytes() const {
    std::vector<std::vector<uint8_t>> bytes;
    std::vector<SafetensorsTensorRef> refs;
    bytes.reserve(tensors.size());
    for (const TestTensor& t : tensors) bytes.push_back(Encode(t.values, t.dtype));
    for (size_t i = 0; i < tensors.size(); ++i) {
      refs.push_back({tensors[i].name, tensors[i].dtype, tensors[i].shape,
                      absl::Span<const uint8_t>(bytes[i])});
    }
    absl::StatusOr<std::string> out = SerializeSafetensors(refs, {{"format", "pt"}});
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : "";
  }
  void WriteTo(const std::string& dir) const {
    ::mkdir(dir.c_str(), 0755);
    WriteFile(dir + "/adapter_config.json", ConfigText());
    WriteFile(dir + "/adapter_model.safetensors", SafetensorsBytes());
  }
};

// q_proj and v_proj in every layer, rank 4, alpha 8.
AdapterFiles QvAdapter(const ModelConfig& c, DType dtype = DType::kF32) {
  AdapterFiles f;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    f.AddPair(c, l, "q_proj", 4, dtype);
    f.AddPair(c, l, "v_proj", 4, dtype);
  }
  return f;
}

absl::StatusOr<std::unique_ptr<LoraAdapter>> Load(const AdapterFiles& f, const ModelConfig& base,
                                                  const LoraLoadOptions& options = {}) {
  const std::string bytes = f.SafetensorsBytes();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Parse(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  if (!file.ok()) return file.status();
  return LoadLoraAdapter(f.ConfigText(), **file, base, options);
}

// The loader's error message for `f` (fails the test when it loads).
std::string LoadError(const AdapterFiles& f, const ModelConfig& base,
                      const LoraLoadOptions& options = {}) {
  absl::StatusOr<std::unique_ptr<LoraAdapter>> a = Load(f, base, options);
  EXPECT_FALSE(a.ok()) << "loaded unexpectedly";
  if (a.ok()) return "";
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument) << a.status();
  return std::string(a.status().message());
}

PeftLoraConfig ParseOk(const std::string& text) {
  absl::StatusOr<PeftLoraConfig> c = ParsePeftLoraConfig(text);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : PeftLoraConfig();
}

std::string ParseError(const std::string& text) {
  absl::StatusOr<PeftLoraConfig> c = ParsePeftLoraConfig(text);
  EXPECT_FALSE(c.ok()) << text;
  if (c.ok()) return "";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  return std::string(c.status().message());
}

bool Targets(const PeftLoraConfig& c, const std::string& name, bool linear = true) {
  absl::StatusOr<bool> t = c.Targets(name, linear);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() && *t;
}

// Reads element i of a packed F32 or BF16 matrix as float.
float At(const WeightView& w, int64_t i) {
  if (w.dtype == DType::kF32) return static_cast<const float*>(w.data)[i];
  return Bf16ToFloat(static_cast<const uint16_t*>(w.data)[i]);
}

const LoraModuleReport* FindModule(const LoraAdapterReport& r, const std::string& name) {
  for (const LoraModuleReport& m : r.modules) {
    if (m.name == name) return &m;
  }
  return nullptr;
}

// ---- adapter_config.json -------------------------------------------------------------------

TEST(PeftConfigTest, ParsesAConfigAsPeftWritesIt) {
  const std::string text =
      ReadFile(FixtureDir("llama_gqa") + "/adapters/all_linear_r16_patterns/adapter_config.json");
  if (text.empty()) GTEST_SKIP() << "fixture adapter not present";
  const PeftLoraConfig c = ParseOk(text);
  EXPECT_EQ(c.r, 16);
  EXPECT_EQ(c.lora_alpha, 32.0);
  EXPECT_EQ(c.target_kind, PeftTargetKind::kList);
  ASSERT_EQ(c.rank_pattern.size(), 2u);
  EXPECT_EQ(c.init_lora_weights, "false");
  EXPECT_EQ(c.peft_version, "0.21.2");
  EXPECT_THAT(c.ignored_keys, ::testing::Contains("lora_dropout"));
}

TEST(PeftConfigTest, RejectsNonJson) {
  EXPECT_THAT(ParseError("{\"peft_type\": \"LORA\", r: 8}"), HasSubstr("adapter_config.json"));
  EXPECT_THAT(ParseError("[1, 2]"), HasSubstr("expected a JSON object"));
  // Duplicate keys: the strict parser refuses what Python would silently overwrite.
  EXPECT_THAT(ParseError(R"({"peft_type": "LORA", "r": 8, "r": 16})"), HasSubstr("duplicate"));
}

TEST(PeftConfigTest, RejectsWrongPeftType) {
  EXPECT_THAT(ParseError(R"({"peft_type": "IA3", "r": 8})"),
              HasSubstr("peft_type \"IA3\" is not supported (only \"LORA\")"));
  EXPECT_THAT(ParseError(R"({"peft_type": "lora"})"), HasSubstr("peft_type \"lora\""));
  EXPECT_THAT(ParseError(R"({"r": 8})"), HasSubstr("peft_type is missing"));
}

// Every option that changes the math and that loraserve does not implement is refused by name
// when set; its default is accepted.
TEST(PeftConfigTest, RejectsEachUnsupportedOptionByName) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"use_dora", "true"},
      {"bias", "\"all\""},
      {"bias", "\"lora_only\""},
      {"lora_bias", "true"},
      {"modules_to_save", "[\"lm_head\"]"},
      {"layer_replication", "[[0, 1], [1, 2]]"},
      {"megatron_config", "{\"tensor_model_parallel_size\": 2}"},
      {"use_qalora", "true"},
      {"target_parameters", "[\"feed_forward.experts.down_proj\"]"},
      {"trainable_token_indices", "[1, 2]"},
      {"alora_invocation_tokens", "[5, 6]"},
      {"use_bdlora", "{\"nblocks\": 2}"},
      {"arrow_config", "{\"top_k\": 2}"},
      {"kasa_config", "{\"beta\": 0.1}"},
      {"monteclora_config", "{\"num_samples\": 4}"},
      {"enable_lora", "[true, false, true]"},
  };
  for (const auto& [key, value] : cases) {
    SCOPED_TRACE(key);
    const std::string msg =
        ParseError(absl::StrCat(R"({"peft_type": "LORA", ")", key, "\": ", value, "}"));
    EXPECT_THAT(msg, HasSubstr(absl::StrCat(key, " ")));
    EXPECT_THAT(msg, HasSubstr("is not supported"));
    // The default of the same option is fine.
    const std::string def = key == "bias" ? "\"none\"" : (value[0] == '[' ? "[]" : "null");
    ParseOk(absl::StrCat(R"({"peft_type": "LORA", ")", key, "\": ", def, "}"));
  }
  for (const std::string init : {"pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"}) {
    SCOPED_TRACE(init);
    EXPECT_THAT(
        ParseError(absl::StrCat(R"({"peft_type": "LORA", "init_lora_weights": ")", init, "\"}")),
        HasSubstr("modifies the base model's weights"));
  }
  for (const std::string init : {"true", "false", "\"gaussian\"", "\"eva\"", "\"orthogonal\""}) {
    ParseOk(absl::StrCat(R"({"peft_type": "LORA", "init_lora_weights": )", init, "}"));
  }
}

TEST(PeftConfigTest, UnknownKeysAreRejectedByNameIgnoredKeysAccepted) {
  EXPECT_THAT(ParseError(R"({"peft_type": "LORA", "lora_scaling_mode": "fancy"})"),
              HasSubstr("unknown key \"lora_scaling_mode\""));
  const PeftLoraConfig c = ParseOk(
      R"({"peft_type": "LORA", "lora_dropout": 0.1, "task_type": "CAUSAL_LM",
          "inference_mode": false, "revision": "main", "auto_mapping": {"x": 1},
          "base_model_name_or_path": "meta-llama/Llama-3.1-8B", "loftq_config": {"loftq_bits": 4},
          "eva_config": null, "runtime_config": {}, "fan_in_fan_out": true,
          "megatron_core": "megatron.core", "qalora_group_size": 16})");
  EXPECT_EQ(c.base_model_name_or_path, "meta-llama/Llama-3.1-8B");
  EXPECT_TRUE(c.fan_in_fan_out);  // no effect on nn.Linear in PEFT either
  EXPECT_THAT(c.ignored_keys, ElementsAre("auto_mapping", "eva_config", "inference_mode",
                                          "loftq_config", "lora_dropout", "megatron_core",
                                          "qalora_group_size", "revision", "runtime_config"));
}

TEST(PeftConfigTest, ListsEveryProblem) {
  const std::string msg = ParseError(
      R"({"peft_type": "LORA", "r": 0, "use_dora": true, "bias": "all", "mystery": 1,
          "rank_pattern": {"q_proj": -2}, "target_modules": 7})");
  EXPECT_THAT(msg, HasSubstr("6 problems"));
  for (const char* part :
       {"r 0", "use_dora", "bias", "\"mystery\"", "rank -2", "target_modules must be a list"}) {
    EXPECT_THAT(msg, HasSubstr(part));
  }
}

TEST(PeftConfigTest, LoraConfigPostInitRules) {
  EXPECT_THAT(
      ParseError(
          R"({"peft_type": "LORA", "target_modules": ".*q_proj", "layers_to_transform": 0})"),
      HasSubstr("layers_to_transform cannot be used when target_modules is a string"));
  EXPECT_THAT(
      ParseError(
          R"({"peft_type": "LORA", "target_modules": "all-linear", "layers_pattern": "layers"})"),
      HasSubstr("layers_pattern cannot be used"));
  EXPECT_THAT(ParseError(R"({"peft_type": "LORA", "layers_pattern": ["layers"]})"),
              HasSubstr("layers_to_transform is not"));
  EXPECT_THAT(ParseError(R"({"peft_type": "LORA", "r": 8.0})"),
              HasSubstr("r 8.0 must be an integer"));
  EXPECT_THAT(ParseError(R"({"peft_type": "LORA", "use_rslora": "yes"})"),
              HasSubstr("use_rslora must be true or false"));
}

TEST(PeftConfigTest, RegexThatDoesNotCompileIsNamed) {
  EXPECT_THAT(ParseError(R"({"peft_type": "LORA", "target_modules": ".*(q_proj"})"),
              HasSubstr("target_modules \".*(q_proj\" does not compile"));
  EXPECT_THAT(ParseError(R"({"peft_type": "LORA", "rank_pattern": {"q_proj[": 4}})"),
              HasSubstr("rank_pattern key \"q_proj[\""));
}

// ---- PEFT's matching rules -----------------------------------------------------------------

TEST(PeftMatchingTest, TargetModulesListMatchesExactNameOrDottedSuffix) {
  const PeftLoraConfig c = ParseOk(
      R"({"peft_type": "LORA", "target_modules": ["q_proj", "mlp.down_proj", "lm_head",
          "model.layers.1.self_attn.o_proj"]})");
  EXPECT_TRUE(Targets(c, "model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(Targets(c, "model.layers.3.mlp.down_proj"));
  EXPECT_TRUE(Targets(c, "lm_head", false));
  EXPECT_TRUE(Targets(c, "model.layers.1.self_attn.o_proj"));
  EXPECT_FALSE(Targets(c, "model.layers.0.self_attn.o_proj"));
  EXPECT_FALSE(Targets(c, "model.layers.0.self_attn.xq_proj"));  // suffix must follow a dot
  EXPECT_FALSE(Targets(c, "model.layers.0.mlp.up_proj"));
}

TEST(PeftMatchingTest, DefaultTargetsAreQAndV) {
  const PeftLoraConfig c = ParseOk(R"({"peft_type": "LORA"})");
  EXPECT_TRUE(Targets(c, "model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(Targets(c, "model.layers.0.self_attn.v_proj"));
  EXPECT_FALSE(Targets(c, "model.layers.0.self_attn.k_proj"));
}

TEST(PeftMatchingTest, TargetModulesStringIsAFullMatchRegex) {
  const PeftLoraConfig c =
      ParseOk(R"({"peft_type": "LORA", "target_modules": ".*\\.layers\\.1\\..*(q|down)_proj"})");
  EXPECT_TRUE(Targets(c, "model.layers.1.self_attn.q_proj"));
  EXPECT_TRUE(Targets(c, "model.layers.1.mlp.down_proj"));
  EXPECT_FALSE(Targets(c, "model.layers.0.self_attn.q_proj"));
  EXPECT_FALSE(Targets(c, "model.layers.11.self_attn.q_proj"));
  // re.fullmatch, not re.search: a bare name matches no full module path (PEFT: no match).
  const PeftLoraConfig bare = ParseOk(R"({"peft_type": "LORA", "target_modules": "q_proj"})");
  EXPECT_FALSE(Targets(bare, "model.layers.0.self_attn.q_proj"));
  // Alternation needs backtracking to reach the end (fullmatch semantics, not first match).
  const PeftLoraConfig alt = ParseOk(R"({"peft_type": "LORA", "target_modules": ".*q|.*q_proj"})");
  EXPECT_TRUE(Targets(alt, "model.layers.0.self_attn.q_proj"));
}

TEST(PeftMatchingTest, AllLinearIsEveryLinearButTheHead) {
  for (const std::string spelling : {"all-linear", "ALL-Linear"}) {
    const PeftLoraConfig c =
        ParseOk(absl::StrCat(R"({"peft_type": "LORA", "target_modules": ")", spelling, "\"}"));
    EXPECT_EQ(c.target_kind, PeftTargetKind::kAllLinear);
    EXPECT_TRUE(Targets(c, "model.layers.0.mlp.gate_proj", true));
    EXPECT_FALSE(Targets(c, "lm_head", false));
    EXPECT_FALSE(Targets(c, "model.embed_tokens", false));
  }
}

TEST(PeftMatchingTest, ExcludeModulesListAndRegexWin) {
  const PeftLoraConfig list = ParseOk(
      R"({"peft_type": "LORA", "target_modules": ["q_proj", "k_proj", "up_proj"],
          "exclude_modules": ["k_proj", "model.layers.0.mlp.up_proj"]})");
  EXPECT_TRUE(Targets(list, "model.layers.0.self_attn.q_proj"));
  EXPECT_FALSE(Targets(list, "model.layers.0.self_attn.k_proj"));
  EXPECT_FALSE(Targets(list, "model.layers.0.mlp.up_proj"));
  EXPECT_TRUE(Targets(list, "model.layers.1.mlp.up_proj"));
  const PeftLoraConfig regex = ParseOk(
      R"({"peft_type": "LORA", "target_modules": "all-linear",
          "exclude_modules": "model\\.layers\\.0\\..*"})");
  EXPECT_FALSE(Targets(regex, "model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(Targets(regex, "model.layers.1.self_attn.q_proj"));
}

TEST(PeftMatchingTest, LayersToTransformAndLayersPattern) {
  const PeftLoraConfig one =
      ParseOk(R"({"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": 1})");
  EXPECT_FALSE(Targets(one, "model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(Targets(one, "model.layers.1.self_attn.q_proj"));
  EXPECT_FALSE(Targets(one, "model.layers.10.self_attn.q_proj"));
  // As PEFT 0.21.2 does with target_modules ["q_proj", "lm_head", "embed_tokens"] and
  // layers_to_transform [1]: layer 1's q_proj and lm_head, not embed_tokens.
  const PeftLoraConfig list = ParseOk(
      R"({"peft_type": "LORA", "target_modules": ["q_proj", "lm_head", "embed_tokens"],
          "layers_to_transform": [0, 2], "layers_pattern": ["foo", "layers"]})");
  EXPECT_TRUE(Targets(list, "model.layers.2.self_attn.q_proj"));
  EXPECT_FALSE(Targets(list, "model.layers.1.self_attn.q_proj"));
  // A suffix match without a layer index is not targeted once layers_to_transform is set...
  EXPECT_FALSE(Targets(list, "model.embed_tokens", false));
  // ...but a name listed verbatim is: the exact-name rule comes before the layer filter.
  EXPECT_TRUE(Targets(list, "lm_head", false));
  const PeftLoraConfig exact = ParseOk(
      R"({"peft_type": "LORA", "target_modules": ["model.layers.0.self_attn.q_proj"],
          "layers_to_transform": [1]})");
  EXPECT_TRUE(Targets(exact, "model.layers.0.self_attn.q_proj"));
  // An empty list means every layer.
  const PeftLoraConfig empty =
      ParseOk(R"({"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": []})");
  EXPECT_TRUE(Targets(empty, "model.layers.5.self_attn.q_proj"));
  // A layers_pattern that names no ModuleList matches nothing.
  const PeftLoraConfig wrong = ParseOk(
      R"({"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": [0],
          "layers_pattern": "h"})");
  EXPECT_FALSE(Targets(wrong, "model.layers.0.self_attn.q_proj"));
}

// get_pattern_key takes the first key in dict (= file) order whose rf"(.*\.)?({key})$" matches
// (checked against PEFT 0.21.2: {"q_proj": 2, "layers.1.self_attn.q_proj": 6} gives rank 2 to
// every q_proj; in the other order layer 1 gets 6).
TEST(PeftMatchingTest, RankAndAlphaPatternsUseTheFirstMatchingKeyInFileOrder) {
  const PeftLoraConfig first = ParseOk(
      R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
          "rank_pattern": {"q_proj": 2, "layers.1.self_attn.q_proj": 6},
          "alpha_pattern": {"v_proj": 3}})");
  EXPECT_EQ(*first.RankFor("model.layers.1.self_attn.q_proj"), 2);
  EXPECT_EQ(*first.RankFor("model.layers.1.self_attn.v_proj"), 4);
  EXPECT_EQ(*first.AlphaFor("model.layers.0.self_attn.v_proj"), 3.0);
  EXPECT_EQ(*first.AlphaFor("model.layers.0.self_attn.q_proj"), 8.0);
  const PeftLoraConfig second = ParseOk(
      R"({"peft_type": "LORA", "r": 4,
          "rank_pattern": {"layers.1.self_attn.q_proj": 6, "q_proj": 2}})");
  EXPECT_EQ(*second.RankFor("model.layers.1.self_attn.q_proj"), 6);
  EXPECT_EQ(*second.RankFor("model.layers.0.self_attn.q_proj"), 2);
  // Keys are regexes anchored at a dot boundary and at the end.
  const PeftLoraConfig regex = ParseOk(
      R"({"peft_type": "LORA", "r": 4,
          "rank_pattern": {"layers\\.[01]\\.mlp\\.(gate|up)_proj": 12, "proj": 9}})");
  EXPECT_EQ(*regex.RankFor("model.layers.0.mlp.up_proj"), 12);
  EXPECT_EQ(*regex.RankFor("model.layers.2.mlp.up_proj"), 4);  // "proj" needs a dot before it
  EXPECT_EQ(*regex.RankFor("model.layers.2.mlp.down_proj"), 4);
}

TEST(PeftMatchingTest, ScaleIsAlphaOverROrOverSqrtR) {
  const PeftLoraConfig plain = ParseOk(R"({"peft_type": "LORA"})");
  EXPECT_EQ(plain.Scale(4, 8.0), 2.0);
  EXPECT_EQ(plain.Scale(3, 1.0), 1.0 / 3.0);
  const PeftLoraConfig rs = ParseOk(R"({"peft_type": "LORA", "use_rslora": true})");
  EXPECT_EQ(rs.Scale(16, 8.0), 2.0);
  EXPECT_EQ(rs.Scale(3, 8.0), 8.0 / std::sqrt(3.0));
}

TEST(PeftMatchingTest, PathologicalRegexFailsInsteadOfHanging) {
  // Exponential backtracking on every module name; PCRE2's match limit stops it.
  const PeftLoraConfig c =
      ParseOk(R"({"peft_type": "LORA", "target_modules": "((.)*)*[^a-z0-9._]"})");
  const auto start = std::chrono::steady_clock::now();
  const absl::StatusOr<bool> t = c.Targets("model.layers.10.self_attn.q_proj", true);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(t.status().message(), HasSubstr("target_modules \"((.)*)*[^a-z0-9._]\" could "
                                              "not be matched"));
  // The loader reports it once, as a config problem, and does not try every module.
  const ModelConfig base = FixtureConfig("llama_gqa");
  const std::string text = R"({"peft_type": "LORA", "target_modules": "((.)*)*[^a-z0-9._]"})";
  const absl::StatusOr<std::unique_ptr<SafetensorsFile>> empty = SafetensorsFile::Parse(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>("\x02\0\0\0\0\0\0\0{}"), 10));
  ASSERT_TRUE(empty.ok()) << empty.status();
  const auto a = LoadLoraAdapter(text, **empty, base, {});
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(a.status().message(), HasSubstr("adapter: 1 problem "));
  EXPECT_THAT(a.status().message(), HasSubstr("match limit"));
}

// ---- Loading: rejections, one per class of bad adapter ------------------------------------

class LoadTest : public ::testing::Test {
 protected:
  // llama_gqa: hidden 64, 4 heads of 16, 2 KV heads (Q 64, KV 32), intermediate 160, vocab 256,
  // 2 layers, untied.
  ModelConfig base_ = FixtureConfig("llama_gqa");
};

TEST_F(LoadTest, NonJsonConfig) {
  AdapterFiles f = QvAdapter(base_);
  const std::string bytes = f.SafetensorsBytes();
  auto file = SafetensorsFile::Parse(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  ASSERT_TRUE(file.ok());
  const auto a = LoadLoraAdapter("not json at all", **file, base_, {});
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(a.status().message(), HasSubstr("adapter_config.json"));
}

TEST_F(LoadTest, WrongPeftType) {
  AdapterFiles f = QvAdapter(base_);
  f.config["peft_type"] = "LOHA";
  EXPECT_THAT(LoadError(f, base_), HasSubstr("peft_type \"LOHA\" is not supported"));
}

TEST_F(LoadTest, RankAboveMax) {
  AdapterFiles f;
  f.config["r"] = 8;
  f.config["target_modules"] = {"q_proj"};
  f.AddPair(base_, 0, "q_proj", 8);
  f.AddPair(base_, 1, "q_proj", 8);
  LoraLoadOptions options;
  options.max_lora_rank = 4;
  const std::string msg = LoadError(f, base_, options);
  EXPECT_THAT(msg, HasSubstr("module model.layers.0.self_attn.q_proj has rank 8, more than "
                             "max_lora_rank 4"));
  EXPECT_THAT(msg, HasSubstr("2 problems"));
}

TEST_F(LoadTest, ShapeMismatch) {
  AdapterFiles f = QvAdapter(base_);
  // k/v are GQA-sized: a v_proj B with q's 64 rows is wrong for this model.
  TestTensor* b = f.Find("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
  ASSERT_NE(b, nullptr);
  b->shape = {64, 4};
  b->values.resize(256);
  TestTensor* a = f.Find("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  a->shape = {4, 63};
  a->values.resize(4 * 63);
  const std::string msg = LoadError(f, base_);
  EXPECT_THAT(msg, HasSubstr("v_proj.lora_B.weight\" has shape [64, 4], expected [32, r] "
                             "(v_proj out_features 32 in the base model)"));
  EXPECT_THAT(msg, HasSubstr("q_proj.lora_A.weight\" has shape [4, 63], expected [r, 64]"));
}

TEST_F(LoadTest, UnknownModule) {
  AdapterFiles f = QvAdapter(base_);
  f.Add("base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight", DType::kF32, {4, 64}, 1);
  f.Add("base_model.model.model.layers.0.mlp.act_fn.lora_A.weight", DType::kF32, {4, 64}, 1);
  f.Add("base_model.model.model.layers.0.self_attn.q_proj.weight", DType::kF32, {64, 64}, 1);
  const std::string msg = LoadError(f, base_);
  EXPECT_THAT(msg, HasSubstr("targets module \"model.layers.0.self_attn.qq_proj\", which does "
                             "not exist in the base model"));
  EXPECT_THAT(msg, HasSubstr("model.layers.0.mlp.act_fn"));
  EXPECT_THAT(msg, HasSubstr("is not a LoRA tensor"));
}

TEST_F(LoadTest, LayerOutOfRange) {
  AdapterFiles f = QvAdapter(base_);
  f.AddPair(base_, 2, "q_proj", 4);
  EXPECT_THAT(LoadError(f, base_),
              HasSubstr("targets layer 2, out of range: the base model has 2 layers (0..1)"));
}

TEST_F(LoadTest, IncompletePair) {
  AdapterFiles f = QvAdapter(base_);
  f.Remove("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight");
  EXPECT_THAT(LoadError(f, base_),
              HasSubstr("module model.layers.1.self_attn.q_proj has an incomplete pair: lora_A "
                        "without lora_B"));
}

TEST_F(LoadTest, NonFiniteValuesNameTheTensor) {
  AdapterFiles f = QvAdapter(base_);
  f.Find("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")->values[5] = NAN;
  f.Find("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")->values[0] = -INFINITY;
  std::string msg = LoadError(f, base_);
  EXPECT_THAT(msg, HasSubstr("layers.0.self_attn.q_proj.lora_A.weight\" has 1 non-finite value "
                             "(first at flat index 5: nan)"));
  EXPECT_THAT(msg, HasSubstr("layers.1.self_attn.v_proj.lora_B.weight\" has 1 non-finite value "
                             "(first at flat index 0: -inf)"));
  // F16 and BF16 infinities too, and F32 values too large for BF16.
  AdapterFiles g = QvAdapter(base_, DType::kF16);
  g.Find("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight")->values[3] = INFINITY;
  EXPECT_THAT(LoadError(g, base_), HasSubstr("(first at flat index 3: inf)"));
  AdapterFiles h = QvAdapter(base_);
  h.Find("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight")->values[2] = 3.4e38f;
  EXPECT_THAT(LoadError(h, base_), HasSubstr("overflow BF16"));
  LoraLoadOptions f32;
  f32.dtype = DType::kF32;
  EXPECT_TRUE(Load(h, base_, f32).ok());
}

TEST_F(LoadTest, UnsupportedOptionsReachTheLoaderByName) {
  for (const auto& [key, value] : std::vector<std::pair<std::string, OJson>>{
           {"use_dora", true}, {"modules_to_save", {"lm_head"}}, {"bias", "all"}, {"fan_out", 1}}) {
    SCOPED_TRACE(key);
    AdapterFiles f = QvAdapter(base_);
    f.config[key] = value;
    EXPECT_THAT(LoadError(f, base_), HasSubstr(key));
  }
  // DoRA magnitudes and LoRA biases in the file are refused even without the config flag.
  AdapterFiles f = QvAdapter(base_);
  f.Add("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", DType::kF32, {64},
        3);
  f.Add("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", DType::kF32, {64}, 3);
  const std::string msg = LoadError(f, base_);
  EXPECT_THAT(msg, HasSubstr("DoRA magnitude vector"));
  EXPECT_THAT(msg, HasSubstr("LoRA bias (lora_bias)"));
}

TEST_F(LoadTest, EnsureWeightTyingIsRefusedWhereItTakesEffect) {
  const ModelConfig tied = FixtureConfig("llama_tied_llama3rope");
  AdapterFiles f;
  f.config["target_modules"] = {"embed_tokens"};
  f.config["ensure_weight_tying"] = true;
  f.AddEmbedding(tied, 4);
  EXPECT_THAT(LoadError(f, tied), HasSubstr("ensure_weight_tying true with tied embeddings"));
  // Untied base: the flag has no effect in PEFT.
  AdapterFiles g;
  g.config["target_modules"] = {"embed_tokens"};
  g.config["ensure_weight_tying"] = true;
  g.AddEmbedding(base_, 4);
  EXPECT_TRUE(Load(g, base_).ok());
}

TEST_F(LoadTest, RankMismatchWithConfig) {
  AdapterFiles f = QvAdapter(base_);
  f.config["r"] = 8;
  f.config["rank_pattern"] = {{"v_proj", 4}};
  const std::string msg = LoadError(f, base_);
  EXPECT_THAT(msg, HasSubstr("module model.layers.0.self_attn.q_proj has rank 4 in the tensors "
                             "but rank 8 in adapter_config.json"));
  EXPECT_THAT(msg, Not(HasSubstr("v_proj has rank")));
  EXPECT_THAT(msg, HasSubstr("2 problems"));
}

TEST_F(LoadTest, TensorsAndConfigMustAgreeOnModules) {
  AdapterFiles f = QvAdapter(base_);
  f.AddPair(base_, 0, "k_proj", 4);  // not targeted
  f.Remove("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight");
  f.Remove("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
  const std::string msg = LoadError(f, base_);
  EXPECT_THAT(msg, HasSubstr("module model.layers.0.self_attn.k_proj has LoRA tensors but "
                             "adapter_config.json does not target it"));
  EXPECT_THAT(msg, HasSubstr("module model.layers.1.self_attn.v_proj is targeted by "
                             "adapter_config.json"));
  EXPECT_THAT(msg, HasSubstr("but has no tensors"));
}

TEST_F(LoadTest, ConfigSelectingANonLinearModuleFailsAsInPeft) {
  AdapterFiles f = QvAdapter(base_);
  f.config["target_modules"] = {"q_proj", "v_proj", "mlp"};
  EXPECT_THAT(LoadError(f, base_),
              HasSubstr("selects \"model.layers.0.mlp\", which is not an nn.Linear"));
  AdapterFiles g = QvAdapter(base_);
  g.config["target_modules"] = {"nothing_here"};
  EXPECT_THAT(LoadError(g, base_), HasSubstr("targets no module of this model"));
}

TEST_F(LoadTest, HostileSafetensorsIsRejectedByTheParser) {
  TempDir root;
  AdapterFiles f = QvAdapter(base_);
  f.WriteTo(root.Sub("bad"));
  std::string bytes = f.SafetensorsBytes();
  // Header lies: claim a header longer than the file.
  std::string lying = bytes;
  const uint64_t huge = bytes.size() + 100;
  std::memcpy(lying.data(), &huge, 8);
  WriteFile(root.Sub("bad") + "/adapter_model.safetensors", lying);
  auto store = AdapterStore::Open(root.path(), {});
  ASSERT_TRUE(store.ok());
  auto loaded = (*store)->Load("bad", base_, {});
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(loaded.status().message(), HasSubstr("adapter \"bad\": "));
  EXPECT_THAT(loaded.status().message(), HasSubstr("adapter_model.safetensors"));
  // Overlapping data offsets.
  const std::string header =
      R"({"a.lora_A.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("a.lora_B.weight":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  std::string overlap(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(overlap.data(), &n, 8);
  overlap += header + std::string(12, '\0');
  WriteFile(root.Sub("bad") + "/adapter_model.safetensors", overlap);
  loaded = (*store)->Load("bad", base_, {});
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(loaded.status().message(), HasSubstr("adapter_model.safetensors"));
}

TEST_F(LoadTest, MixedAdapterNamesAndDuplicatesAfterNormalization) {
  AdapterFiles f = QvAdapter(base_);
  f.infix = ".other";
  f.AddPair(base_, 0, "k_proj", 4);
  f.config["target_modules"] = {"q_proj", "k_proj", "v_proj"};
  const std::string msg = LoadError(f, base_);
  EXPECT_THAT(msg, HasSubstr("\"other\""));
  EXPECT_THAT(msg, HasSubstr("(one adapter per file)"));
  AdapterFiles g = QvAdapter(base_);
  g.prefix = "";
  g.AddPair(base_, 0, "q_proj", 4);
  EXPECT_THAT(LoadError(g, base_), HasSubstr("duplicates"));
}

TEST_F(LoadTest, ListsEveryProblemCapped) {
  AdapterFiles f = QvAdapter(base_);
  f.config["use_dora"] = true;
  for (TestTensor& t : f.tensors) t.values[0] = NAN;
  f.AddPair(base_, 7, "o_proj", 4);
  LoraLoadOptions options;
  options.max_problem_lines = 3;
  const std::string msg = LoadError(f, base_, options);
  // 1 config + 8 NaN tensors + 2 out-of-range tensors.
  EXPECT_THAT(msg, HasSubstr("adapter: 11 problems"));
  EXPECT_THAT(msg, HasSubstr("... and 8 more"));
}

// ---- Loading: what lands in memory ---------------------------------------------------------

TEST_F(LoadTest, KeyNormalizationVariants) {
  for (const auto& [prefix, infix] :
       std::vector<std::pair<std::string, std::string>>{{"base_model.model.", ""},
                                                        {"", ""},
                                                        {"base_model.model.", ".default"},
                                                        {"", ".my-adapter"}}) {
    SCOPED_TRACE(prefix + "|" + infix);
    AdapterFiles f;
    f.prefix = prefix;
    f.infix = infix;
    f.config["target_modules"] = {"q_proj", "embed_tokens"};
    f.AddPair(base_, 0, "q_proj", 4);
    f.AddPair(base_, 1, "q_proj", 4);
    f.AddEmbedding(base_, 4);
    auto a = Load(f, base_);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ((*a)->report().modules.size(), 3u);
    EXPECT_EQ((*a)->report().names_prefixed, !prefix.empty());
    EXPECT_EQ((*a)->report().adapter_infix, infix.empty() ? "" : infix.substr(1));
    EXPECT_EQ((*a)->embed().num_slices, 1);
  }
}

TEST_F(LoadTest, DiskDtypesConvertToTheComputeDtype) {
  for (const DType disk : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (const DType mem : {DType::kBF16, DType::kF32}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(disk), " -> ", DTypeName(mem)));
      const AdapterFiles f = QvAdapter(base_, disk);
      LoraLoadOptions options;
      options.dtype = mem;
      auto a = Load(f, base_, options);
      ASSERT_TRUE(a.ok()) << a.status();
      EXPECT_EQ((*a)->dtype(), mem);
      EXPECT_THAT((*a)->report().disk_dtypes, ElementsAre(disk));
      const LoraGroup& g = (*a)->group(1, LoraProjection::kQkv);
      ASSERT_EQ(g.num_slices, 2);
      EXPECT_EQ(g.a.dtype, mem);
      const TestTensor* qa =
          f.Find("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight");
      const TestTensor* vb =
          f.Find("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
      for (int64_t i = 0; i < 4 * 64; ++i) ASSERT_EQ(At(g.a, i), qa->values[i]) << i;
      for (int64_t i = 0; i < 32 * 4; ++i) ASSERT_EQ(At(g.slices[1].b, i), vb->values[i]) << i;
    }
  }
  // Real rounding: F32 -> BF16 is round-to-nearest-even.
  AdapterFiles f = QvAdapter(base_);
  TestTensor* qa = f.Find("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  qa->values[0] = 1.0f + 1.0f / 256.0f;  // a tie: rounds to even, 1.0
  qa->values[1] = 1.0f + 3.0f / 256.0f;  // a tie: rounds up to 1 + 1/64
  auto a = Load(f, base_);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(At((*a)->group(0, LoraProjection::kQkv).a, 0), 1.0f);
  EXPECT_EQ(At((*a)->group(0, LoraProjection::kQkv).a, 1), 1.0f + 1.0f / 64.0f);
}

TEST_F(LoadTest, PackingGroupsAndSlices) {
  AdapterFiles f;
  f.config["target_modules"] = "all-linear";
  f.config["r"] = 4;
  f.config["lora_alpha"] = 8;
  f.config["rank_pattern"] = {{"v_proj", 2}, {"up_proj", 6}};
  f.config["alpha_pattern"] = {{"layers\\.1\\.mlp\\.down_proj", 1}};
  f.config["exclude_modules"] = {"model.layers.0.self_attn.k_proj"};
  for (int l = 0; l < 2; ++l) {
    for (const std::string m :
         {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}) {
      if (l == 0 && m == "k_proj") continue;
      f.AddPair(base_, l, m, m == "v_proj" ? 2 : m == "up_proj" ? 6 : 4);
    }
  }
  LoraLoadOptions options;
  options.dtype = DType::kF32;
  auto loaded = Load(f, base_, options);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const LoraAdapter& a = **loaded;
  const int64_t q = 64, kv = 32, inter = 160;

  // Layer 0 qkv: k excluded, so q then v, v writing at Q + KV.
  const LoraGroup& qkv0 = a.group(0, LoraProjection::kQkv);
  ASSERT_EQ(qkv0.num_slices, 2);
  EXPECT_EQ(qkv0.rank_total, 6);
  EXPECT_EQ(qkv0.a.rows, 6);
  EXPECT_EQ(qkv0.a.cols, 64);
  EXPECT_EQ(qkv0.slices[0].rank_offset, 0);
  EXPECT_EQ(qkv0.slices[0].out_offset, 0);
  EXPECT_EQ(qkv0.slices[1].rank_offset, 4);
  EXPECT_EQ(qkv0.slices[1].rank, 2);
  EXPECT_EQ(qkv0.slices[1].out_offset, q + kv);
  EXPECT_EQ(qkv0.slices[1].b.rows, kv);
  EXPECT_EQ(qkv0.slices[1].b.cols, 2);
  EXPECT_EQ(qkv0.slices[0].scale, 2.0f);
  EXPECT_EQ(qkv0.slices[1].scale, 4.0f);
  // Stacked A: rows 4..5 are v's A.
  const TestTensor* va = f.Find("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight");
  for (int64_t i = 0; i < 2 * 64; ++i) ASSERT_EQ(At(qkv0.a, 4 * 64 + i), va->values[i]);
  // Layer 1 qkv: all three, at 0, Q, Q + KV.
  const LoraGroup& qkv1 = a.group(1, LoraProjection::kQkv);
  ASSERT_EQ(qkv1.num_slices, 3);
  EXPECT_EQ(qkv1.slices[1].out_offset, q);
  EXPECT_EQ(qkv1.slices[2].out_offset, q + kv);
  EXPECT_EQ(qkv1.slices[2].rank_offset, 8);
  EXPECT_EQ(qkv1.rank_total, 10);
  // gate_up: gate at 0, up at I with rank 6.
  const LoraGroup& gu = a.group(1, LoraProjection::kGateUp);
  ASSERT_EQ(gu.num_slices, 2);
  EXPECT_EQ(gu.slices[1].out_offset, inter);
  EXPECT_EQ(gu.slices[1].rank, 6);
  EXPECT_EQ(gu.slices[1].scale, static_cast<float>(8.0 / 6.0));
  const LoraGroup& down1 = a.group(1, LoraProjection::kDown);
  ASSERT_EQ(down1.num_slices, 1);
  EXPECT_EQ(down1.a.cols, inter);
  EXPECT_EQ(down1.slices[0].scale, 0.25f);  // alpha_pattern 1 / r 4
  EXPECT_EQ(a.group(0, LoraProjection::kDown).slices[0].scale, 2.0f);
  EXPECT_EQ(a.group(0, LoraProjection::kO).a.cols, q);
  EXPECT_EQ(a.lm_head().num_slices, 0);
  EXPECT_EQ(a.embed().num_slices, 0);

  // Every matrix is aligned; the buffer is a multiple of the alignment.
  EXPECT_EQ(a.packed_bytes() % LoraAdapter::kPackAlignment, 0u);
  for (int l = 0; l < 2; ++l) {
    for (int p = 0; p < kNumLoraProjections; ++p) {
      const LoraGroup& g = a.group(l, static_cast<LoraProjection>(p));
      EXPECT_EQ(reinterpret_cast<uintptr_t>(g.a.data) % LoraAdapter::kPackAlignment, 0u);
      for (int j = 0; j < g.num_slices; ++j) {
        EXPECT_EQ(reinterpret_cast<uintptr_t>(g.slices[j].b.data) % LoraAdapter::kPackAlignment,
                  0u);
      }
    }
  }

  // Placement elsewhere: same bytes, same structure, pointers rebased.
  void* dst = std::aligned_alloc(LoraAdapter::kPackAlignment, a.packed_bytes());
  ASSERT_TRUE(a.PackInto(dst, a.packed_bytes()).ok());
  EXPECT_EQ(std::memcmp(dst, a.packed_data(), a.packed_bytes()), 0);
  const LoraGroupTable moved = a.GroupsAt(dst);
  const LoraGroup& m = moved.group(1, LoraProjection::kGateUp);
  EXPECT_EQ(static_cast<const uint8_t*>(m.slices[1].b.data) - static_cast<const uint8_t*>(dst),
            static_cast<const uint8_t*>(gu.slices[1].b.data) -
                static_cast<const uint8_t*>(a.packed_data()));
  EXPECT_EQ(At(m.slices[1].b, 17), At(gu.slices[1].b, 17));
  EXPECT_EQ(moved.group(0, LoraProjection::kQkv).slices[1].out_offset, q + kv);
  EXPECT_EQ(moved.embed().a.data, nullptr);
  EXPECT_FALSE(a.PackInto(static_cast<uint8_t*>(dst) + 2, a.packed_bytes()).ok());
  EXPECT_FALSE(a.PackInto(dst, a.packed_bytes() - 1).ok());
  std::free(dst);

  // Report.
  const LoraAdapterReport& r = a.report();
  EXPECT_EQ(r.modules.size(), 13u);
  EXPECT_EQ(r.num_layers_touched, 2);
  ASSERT_EQ(r.kinds.size(), 7u);
  EXPECT_EQ(r.kinds[1].module, LoraModule::kK);
  EXPECT_EQ(r.kinds[1].count, 1);
  EXPECT_EQ(r.kinds[6].module, LoraModule::kDown);
  EXPECT_EQ(r.kinds[6].scale_min, 0.25f);
  EXPECT_EQ(r.kinds[6].scale_max, 2.0f);
  EXPECT_EQ(r.kinds[2].rank_min, 2);
  EXPECT_EQ(r.dtype, DType::kF32);
  int64_t params = 0;
  for (const TestTensor& t : f.tensors) params += static_cast<int64_t>(t.values.size());
  EXPECT_EQ(r.num_parameters, params);
  EXPECT_EQ(r.disk_bytes, static_cast<uint64_t>(params) * 4);
  EXPECT_EQ(r.packed_bytes, a.packed_bytes());
  EXPECT_THAT(r.Summary(), HasSubstr("13 modules in 2 layers"));
  EXPECT_THAT(r.Summary(), HasSubstr("down_proj x2 r4 scale 0.25-2"));
}

TEST_F(LoadTest, RsLoraScale) {
  AdapterFiles f = QvAdapter(base_);
  f.config["use_rslora"] = true;
  f.config["lora_alpha"] = 6;
  auto a = Load(f, base_);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->group(0, LoraProjection::kQkv).slices[0].scale, 3.0f);  // 6 / sqrt(4)
  EXPECT_TRUE((*a)->report().use_rslora);
}

TEST_F(LoadTest, ScaleThatOverflowsFloatIsRefused) {
  AdapterFiles f = QvAdapter(base_);
  f.config["lora_alpha"] = 1e300;
  EXPECT_THAT(LoadError(f, base_), HasSubstr("which does not fit a float"));
}

TEST_F(LoadTest, EmbeddingAndHeadDeltasOnATiedModelAreSeparate) {
  const ModelConfig tied = FixtureConfig("llama_tied_llama3rope");
  ASSERT_TRUE(tied.tie_word_embeddings);
  AdapterFiles f;
  f.config["target_modules"] = {"embed_tokens", "lm_head"};
  f.config["r"] = 3;
  f.config["lora_alpha"] = 6;
  f.AddEmbedding(tied, 3);
  const auto [in, out] = Dims(tied, "lm_head");
  f.Add("base_model.model.lm_head.lora_A.weight", DType::kF32, {3, in}, 5);
  f.Add("base_model.model.lm_head.lora_B.weight", DType::kF32, {out, 3}, 6);
  LoraLoadOptions options;
  options.dtype = DType::kF32;
  auto a = Load(f, tied, options);
  ASSERT_TRUE(a.ok()) << a.status();
  const LoraGroup& e = (*a)->embed();
  ASSERT_EQ(e.num_slices, 1);
  // A transposed: [vocab, r], row v holds column v of lora_embedding_A.
  EXPECT_EQ(e.a.rows, tied.vocab_size);
  EXPECT_EQ(e.a.cols, 3);
  const TestTensor* ea = f.Find("base_model.model.model.embed_tokens.lora_embedding_A");
  for (int64_t v = 0; v < tied.vocab_size; ++v) {
    for (int64_t k = 0; k < 3; ++k) {
      ASSERT_EQ(At(e.a, v * 3 + k), ea->values[static_cast<size_t>(k * tied.vocab_size + v)]);
    }
  }
  EXPECT_EQ(e.slices[0].b.rows, tied.hidden_size);
  EXPECT_EQ(e.slices[0].scale, 2.0f);
  const LoraGroup& h = (*a)->lm_head();
  ASSERT_EQ(h.num_slices, 1);
  EXPECT_EQ(h.a.rows, 3);
  EXPECT_EQ(h.a.cols, tied.hidden_size);
  EXPECT_EQ(h.slices[0].b.rows, tied.vocab_size);
  EXPECT_NE(h.a.data, e.a.data);
  // The embedding must use lora_embedding_*, lm_head lora_A/B.
  AdapterFiles g;
  g.config["target_modules"] = {"embed_tokens"};
  g.Add("base_model.model.model.embed_tokens.lora_A.weight", DType::kF32, {4, 256}, 1);
  g.Add("base_model.model.model.embed_tokens.lora_B.weight", DType::kF32, {64, 4}, 1);
  EXPECT_THAT(LoadError(g, tied), HasSubstr("embed_tokens is an nn.Embedding"));
}

TEST_F(LoadTest, BaseEmbeddingCopiesMustEqualTheBase) {
  AdapterFiles f;
  f.config["target_modules"] = {"embed_tokens", "lm_head"};
  f.AddEmbedding(base_, 4);
  f.Add("base_model.model.lm_head.lora_A.weight", DType::kF32, {4, 64}, 5);
  f.Add("base_model.model.lm_head.lora_B.weight", DType::kF32, {256, 4}, 6);
  // What PEFT's save_embedding_layers="auto" adds: the base embedding and head, as F32.
  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ckpt =
      SafetensorsCheckpoint::Open(FixtureDir("llama_gqa"));
  ASSERT_TRUE(ckpt.ok());
  for (const auto& [file_name, copy_name] : std::vector<std::pair<std::string, std::string>>{
           {"model.embed_tokens.weight", "base_model.model.model.embed_tokens.base_layer.weight"},
           {"lm_head.weight", "base_model.model.lm_head.base_layer.weight"}}) {
    const SafetensorsTensor* t = (*ckpt)->Find(file_name);
    ASSERT_NE(t, nullptr);
    TestTensor copy{copy_name, DType::kF32, t->entry->shape, {}};
    copy.values = *t->file->ReadAsFloat32(*t->entry);
    f.tensors.push_back(copy);
  }
  // Without base weights: refused, saying why.
  EXPECT_THAT(LoadError(f, base_), HasSubstr("needs the base weights"));
  // With them (a BF16 arena from the F32 checkpoint: compared at BF16): accepted and skipped.
  const std::unique_ptr<ModelWeights> bf16 = FixtureWeights("llama_gqa", base_, DType::kBF16);
  ASSERT_NE(bf16, nullptr);
  LoraLoadOptions options;
  options.base_weights = bf16.get();
  auto a = Load(f, base_, options);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->report().skipped_base_copies.size(), 2u);
  // A changed copy would replace base weights: refused.
  f.Find("base_model.model.lm_head.base_layer.weight")->values[100] += 1.0f;
  EXPECT_THAT(LoadError(f, base_, options),
              HasSubstr("differs from the base model's weight in 1 of 16384 elements (first at "
                        "flat index 100)"));
}

// ---- Ids, layout, versions -----------------------------------------------------------------

TEST(AdapterIdTest, Validation) {
  for (const std::string& ok : std::vector<std::string>{"a", "A9", "my-adapter_v2.1", "0",
                                                        std::string(128, 'x'), "a..b", "x-"}) {
    EXPECT_TRUE(ValidateAdapterId(ok).ok()) << ok;
  }
  for (const std::string& bad : std::vector<std::string>{
           std::string(), std::string("."), std::string(".."), std::string(".hidden"),
           std::string("-x"), std::string("_x"), std::string("a/b"), std::string("../x"),
           std::string("a b"), std::string("caf\xc3\xa9"), std::string(129, 'x'),
           std::string("a\0b", 3), std::string("a\\b")}) {
    const absl::Status s = ValidateAdapterId(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_THAT(ValidateAdapterId("a/b").message(), HasSubstr("has character \"/\""));
}

TEST(AdapterVersionTest, HashOfBytes) {
  // sha256 of the single byte 0x00 (empty config, empty weights).
  EXPECT_EQ(AdapterVersionOfBytes({}, {}),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d");
  const std::string c = "abc", w = "def";
  // hashlib.sha256(b"abc\x00def").hexdigest()
  EXPECT_EQ(AdapterVersionOfBytes(
                absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(c.data()), 3),
                absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(w.data()), 3)),
            "516a5e926ce20c5f4d80f00e1a01abdf14986def6588d6abeed9fce090bc660c");
}

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    AdapterStoreOptions options;
    options.racy_window_ns = 0;  // freshly written files may be cached
    auto store = AdapterStore::Open(root_.path(), options);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }
  std::string Dir(const std::string& id) const { return root_.Sub(id); }

  ModelConfig base_ = FixtureConfig("llama_gqa");
  TempDir root_;
  std::unique_ptr<AdapterStore> store_;
};

TEST_F(StoreTest, PickleOnlyIsRefusedWithTheConversion) {
  ::mkdir(Dir("pickled").c_str(), 0755);
  WriteFile(Dir("pickled") + "/adapter_config.json", QvAdapter(base_).ConfigText());
  WriteFile(Dir("pickled") + "/adapter_model.bin", "\x80\x02}q\x00.");
  const auto s = store_->Load("pickled", base_, {});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("has adapter_model.bin but no "
                                              "adapter_model.safetensors"));
  EXPECT_THAT(s.status().message(), HasSubstr("arbitrary code"));
  EXPECT_THAT(s.status().message(), HasSubstr("safe_serialization=True"));
}

TEST_F(StoreTest, MissingFiles) {
  ::mkdir(Dir("empty").c_str(), 0755);
  WriteFile(Dir("empty") + "/adapter_config.json", QvAdapter(base_).ConfigText());
  auto s = store_->Load("empty", base_, {});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.status().message(), HasSubstr("no adapter_model.safetensors"));
  s = store_->Load("absent", base_, {});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Load("../x", base_, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(StoreTest, LoadVersionsAndCaches) {
  QvAdapter(base_).WriteTo(Dir("qv"));
  const std::string config = ReadFile(Dir("qv") + "/adapter_config.json");
  const std::string weights = ReadFile(Dir("qv") + "/adapter_model.safetensors");
  const std::string expected = AdapterVersionOfBytes(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(config.data()), config.size()),
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(weights.data()), weights.size()));

  auto v1 = store_->Version("qv");
  ASSERT_TRUE(v1.ok()) << v1.status();
  EXPECT_EQ(v1->sha256, expected);
  EXPECT_FALSE(v1->from_cache);
  EXPECT_TRUE(v1->cache_written);
  const std::string cache = ReadFile(Dir("qv") + "/.loraserve-version.json");
  EXPECT_THAT(cache, HasSubstr(expected));
  EXPECT_THAT(cache, HasSubstr("mtime_ns"));

  auto loaded = store_->Load("qv", base_, {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(loaded->version.from_cache);
  EXPECT_EQ(loaded->version.sha256, expected);
  EXPECT_EQ(loaded->adapter->report().version, expected);
  EXPECT_EQ(loaded->adapter->report().name, "adapter \"qv\"");

  // A touched mtime invalidates the cache; the content, and so the version, is the same.
  struct timespec times[2] = {{0, UTIME_OMIT}, {1'000'000'000, 123}};
  ASSERT_EQ(::utimensat(AT_FDCWD, (Dir("qv") + "/adapter_config.json").c_str(), times, 0), 0);
  auto v2 = store_->Version("qv");
  ASSERT_TRUE(v2.ok());
  EXPECT_FALSE(v2->from_cache);
  EXPECT_EQ(v2->sha256, expected);
  EXPECT_TRUE(store_->Version("qv")->from_cache);

  // New content: a new version (the file is replaced by rename, as documented).
  AdapterFiles changed = QvAdapter(base_);
  changed.config["lora_alpha"] = 16;
  WriteFile(Dir("qv") + "/adapter_config.json.new", changed.ConfigText());
  ASSERT_EQ(::rename((Dir("qv") + "/adapter_config.json.new").c_str(),
                     (Dir("qv") + "/adapter_config.json").c_str()),
            0);
  auto v3 = store_->Version("qv");
  ASSERT_TRUE(v3.ok());
  EXPECT_FALSE(v3->from_cache);
  EXPECT_NE(v3->sha256, expected);
  auto reloaded = store_->Load("qv", base_, {});
  ASSERT_TRUE(reloaded.ok());
  EXPECT_EQ(reloaded->version.sha256, v3->sha256);
  EXPECT_EQ(reloaded->adapter->group(0, LoraProjection::kQkv).slices[0].scale, 4.0f);

  // A corrupt cache is recomputed and rewritten, never an error.
  WriteFile(Dir("qv") + "/.loraserve-version.json", "{\"sha256\": 12");
  auto v4 = store_->Version("qv");
  ASSERT_TRUE(v4.ok());
  EXPECT_FALSE(v4->from_cache);
  EXPECT_EQ(v4->sha256, v3->sha256);
  EXPECT_TRUE(store_->Version("qv")->from_cache);
  // A forged cache entry for other stamps is ignored.
  std::string forged = ReadFile(Dir("qv") + "/.loraserve-version.json");
  forged.replace(forged.find(v3->sha256), 64, std::string(64, 'a'));
  WriteFile(Dir("qv") + "/.loraserve-version.json", forged);
  EXPECT_EQ(store_->Version("qv")->sha256, std::string(64, 'a'));  // stamps match: trusted
  ::utimensat(AT_FDCWD, (Dir("qv") + "/adapter_model.safetensors").c_str(), times, 0);
  EXPECT_EQ(store_->Version("qv")->sha256, v3->sha256);
}

TEST_F(StoreTest, RacyFilesAreNotCached) {
  auto store = AdapterStore::Open(root_.path(), {});  // default 2 s window
  ASSERT_TRUE(store.ok());
  QvAdapter(base_).WriteTo(Dir("fresh"));
  auto v = (*store)->Version("fresh");
  ASSERT_TRUE(v.ok());
  EXPECT_FALSE(v->cache_written);
  EXPECT_FALSE((*store)->Version("fresh")->from_cache);
}

TEST_F(StoreTest, SymlinksMustStayInsideTheRoot) {
  TempDir outside;
  QvAdapter(base_).WriteTo(outside.Sub("adapter"));
  // A directory link leaving the root.
  ASSERT_EQ(::symlink(outside.Sub("adapter").c_str(), Dir("escape").c_str()), 0);
  auto s = store_->Load("escape", base_, {});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(s.status().message(), HasSubstr("outside the adapter root"));
  // A file link leaving the root.
  ::mkdir(Dir("half").c_str(), 0755);
  WriteFile(Dir("half") + "/adapter_config.json", QvAdapter(base_).ConfigText());
  ASSERT_EQ(::symlink((outside.Sub("adapter") + "/adapter_model.safetensors").c_str(),
                      (Dir("half") + "/adapter_model.safetensors").c_str()),
            0);
  EXPECT_EQ(store_->Load("half", base_, {}).status().code(), absl::StatusCode::kPermissionDenied);
  // A link to the root itself is not an adapter directory inside it.
  ASSERT_EQ(::symlink(root_.path().c_str(), Dir("self").c_str()), 0);
  EXPECT_EQ(store_->Resolve("self").status().code(), absl::StatusCode::kPermissionDenied);
  // Links within the root are fine (e.g. an alias to a versioned directory).
  QvAdapter(base_).WriteTo(Dir("qv-v1"));
  ASSERT_EQ(::symlink("qv-v1", Dir("qv").c_str()), 0);
  auto ok = store_->Load("qv", base_, {});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_THAT(*store_->List(), ElementsAre("escape", "half", "qv", "qv-v1", "self"));
}

// ---- The golden PEFT fixtures --------------------------------------------------------------

// Every adapter tools/make_lora_fixtures.py saved with PEFT loads, and its report matches the
// modules, ranks, alphas and scales PEFT reported for it in expected_lora.json.
TEST(FixtureAdaptersTest, ReportsMatchPeft) {
  int checked = 0;
  for (const std::string model :
       {"llama_gqa", "llama_linear_rope", "llama_tied_llama3rope", "mistral", "qwen2_bias"}) {
    const std::string expected_text = ReadFile(FixtureDir(model) + "/expected_lora.json");
    if (expected_text.empty()) continue;
    const absl::StatusOr<Json> expected = ParseJsonStrict(expected_text, "expected_lora.json");
    ASSERT_TRUE(expected.ok()) << expected.status();
    const ModelConfig base = FixtureConfig(model);
    const std::unique_ptr<ModelWeights> weights = FixtureWeights(model, base, DType::kBF16);
    for (const auto& [name, info] : (*expected)["adapters"].items()) {
      SCOPED_TRACE(model + "/" + name);
      // Load from the files directly: the store would write a version cache into the source tree.
      const std::string dir = FixtureDir(model) + "/adapters/" + name;
      auto file = SafetensorsFile::Open(dir + "/adapter_model.safetensors");
      ASSERT_TRUE(file.ok()) << file.status();
      LoraLoadOptions options;
      options.base_weights = weights.get();
      auto a = LoadLoraAdapter(ReadFile(dir + "/adapter_config.json"), **file, base, options);
      ASSERT_TRUE(a.ok()) << a.status();
      const LoraAdapterReport& r = (*a)->report();
      const Json& wrapped = info["wrapped_modules"];
      EXPECT_EQ(r.modules.size(), wrapped.size());
      for (const Json& w : wrapped) {
        const std::string module = w["module"].get<std::string>();
        const LoraModuleReport* m = FindModule(r, module);
        ASSERT_NE(m, nullptr) << module;
        EXPECT_EQ(m->rank, w["r"].get<int>()) << module;
        EXPECT_EQ(m->alpha, w["alpha"].get<double>()) << module;
        EXPECT_EQ(m->scale, static_cast<float>(w["scale"].get<double>())) << module;
        EXPECT_EQ(m->module == LoraModule::kEmbedTokens, w["kind"] == "Embedding") << module;
      }
      ++checked;
    }
  }
  if (checked == 0) GTEST_SKIP() << "no PEFT fixture adapters present";
}

}  // namespace
}  // namespace ls
