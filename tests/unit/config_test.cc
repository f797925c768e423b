// Tests for model/config.h: every supported config form parses to the expected effective values;
// every rule rejects with INVALID_ARGUMENT naming the field and the value; RopeInvFreq matches an
// independent double-precision computation and known float32 values.
#include "model/config.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <initializer_list>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/json.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ls {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::StartsWith;

// ---- Helpers -------------------------------------------------------------------------------

// A small but complete Llama config (GQA, 8 heads of 32).
Json LlamaJson() {
  return Json{
      {"architectures", Json::array({"LlamaForCausalLM"})},
      {"model_type", "llama"},
      {"vocab_size", 1000},
      {"hidden_size", 256},
      {"intermediate_size", 512},
      {"num_hidden_layers", 2},
      {"num_attention_heads", 8},
      {"num_key_value_heads", 4},
      {"max_position_embeddings", 2048},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 10000.0},
      {"rope_scaling", nullptr},
      {"hidden_act", "silu"},
      {"tie_word_embeddings", false},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"mlp_bias", false},
      {"pretraining_tp", 1},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
      {"torch_dtype", "bfloat16"},
      {"transformers_version", "4.44.0"},
      {"use_cache", true},
  };
}

Json MistralJson() {
  Json j = LlamaJson();
  j["model_type"] = "mistral";
  j["architectures"] = Json::array({"MistralForCausalLM"});
  j.erase("attention_bias");
  j.erase("mlp_bias");
  j.erase("pretraining_tp");
  j["max_position_embeddings"] = 32768;
  j["sliding_window"] = nullptr;
  return j;
}

Json Qwen2Json() {
  Json j = LlamaJson();
  j["model_type"] = "qwen2";
  j["architectures"] = Json::array({"Qwen2ForCausalLM"});
  j.erase("attention_bias");
  j.erase("mlp_bias");
  j.erase("pretraining_tp");
  j["max_position_embeddings"] = 32768;
  j["rope_theta"] = 1000000.0;
  j["use_sliding_window"] = false;
  j["sliding_window"] = 4096;
  j["max_window_layers"] = 21;
  j["tie_word_embeddings"] = true;
  return j;
}

absl::StatusOr<ModelConfig> Parse(const Json& config, const ConfigOptions& opts = {}) {
  return ParseModelConfig(config.dump(), "", opts);
}

ModelConfig ParseOk(const Json& config, const ConfigOptions& opts = {},
                    const std::string& generation = "") {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(config.dump(), generation, opts);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : ModelConfig();
}

// Expects INVALID_ARGUMENT whose message starts with "config.json: " (unless `prefix` says
// otherwise) and holds every needle.
void ExpectRejected(const absl::StatusOr<ModelConfig>& result,
                    std::initializer_list<std::string> needles,
                    const std::string& prefix = "config.json: ") {
  ASSERT_FALSE(result.ok()) << "accepted a config that must be rejected";
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
  const std::string message(result.status().message());
  EXPECT_THAT(message, StartsWith(prefix));
  for (const std::string& needle : needles) EXPECT_THAT(message, HasSubstr(needle));
}

void ExpectRejected(const Json& config, std::initializer_list<std::string> needles,
                    const ConfigOptions& opts = {}) {
  ExpectRejected(Parse(config, opts), needles);
}

// ---- Supported forms -----------------------------------------------------------------------

TEST(ConfigTest, ParsesLlama) {
  const ModelConfig c = ParseOk(LlamaJson());
  EXPECT_EQ(c.model_type, ModelType::kLlama);
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.vocab_size, 1000);
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.intermediate_size, 512);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.num_attention_heads, 8);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.q_dim(), 256);
  EXPECT_EQ(c.kv_dim(), 128);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_qkv_bias);
  EXPECT_FALSE(c.attention_o_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(2));
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_FALSE(c.pad_token_id.has_value());
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_EQ(c.max_model_len, 2048);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_FLOAT_EQ(c.RopeAttentionScaling(), 1.0f);
  EXPECT_THAT(c.Summary(), HasSubstr("llama"));
}

TEST(ConfigTest, AppliesDefaults) {
  Json j = LlamaJson();
  for (const char* key : {"num_key_value_heads", "rms_norm_eps", "rope_theta", "hidden_act",
                          "tie_word_embeddings", "attention_bias", "mlp_bias", "pretraining_tp",
                          "bos_token_id", "eos_token_id", "torch_dtype", "architectures"}) {
    j.erase(key);
  }
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.num_key_value_heads, 8);  // = num_attention_heads: plain multi-head attention
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_THAT(c.eos_token_ids, IsEmpty());
  EXPECT_FALSE(c.bos_token_id.has_value());
  EXPECT_EQ(c.torch_dtype, "");
  EXPECT_EQ(c.architecture, "");
}

TEST(ConfigTest, NullOptionalFieldsMeanDefault) {
  Json j = LlamaJson();
  j["num_key_value_heads"] = nullptr;
  j["head_dim"] = nullptr;
  j["pad_token_id"] = nullptr;
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_FALSE(c.pad_token_id.has_value());
}

TEST(ConfigTest, GroupedQueryAttention) {
  Json j = LlamaJson();
  j["num_attention_heads"] = 8;
  j["num_key_value_heads"] = 1;
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.num_key_value_heads, 1);
  EXPECT_EQ(c.kv_dim(), 32);
}

TEST(ConfigTest, ExplicitHeadDimNeedNotDivideHidden) {
  Json j = LlamaJson();
  j["hidden_size"] = 250;  // not divisible by 8 heads: fine when head_dim is given
  j["head_dim"] = 64;
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.q_dim(), 512);
  EXPECT_EQ(c.kv_dim(), 256);
  EXPECT_EQ(c.RopeInvFreq().size(), 32u);
}

TEST(ConfigTest, ParsesMistral) {
  const ModelConfig c = ParseOk(MistralJson());
  EXPECT_EQ(c.model_type, ModelType::kMistral);
  EXPECT_FALSE(c.attention_qkv_bias);
  EXPECT_FALSE(c.attention_o_bias);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(c.max_model_len, 32768);
}

TEST(ConfigTest, ParsesQwen2WithQkvBiasesAndTiedEmbeddings) {
  const ModelConfig c = ParseOk(Qwen2Json());
  EXPECT_EQ(c.model_type, ModelType::kQwen2);
  EXPECT_TRUE(c.attention_qkv_bias);
  EXPECT_FALSE(c.attention_o_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  // use_sliding_window false: the 4096 window is off although it is below max_model_len.
  EXPECT_FALSE(c.sliding_window.has_value());
}

TEST(ConfigTest, Qwen2IgnoresAttentionBiasKey) {
  Json j = Qwen2Json();
  j["attention_bias"] = false;  // Qwen2's attention hard-codes q/k/v biases
  const ModelConfig c = ParseOk(j);
  EXPECT_TRUE(c.attention_qkv_bias);
  EXPECT_FALSE(c.attention_o_bias);
}

TEST(ConfigTest, LlamaAttentionBiasEnablesQkvAndOBiases) {
  Json j = LlamaJson();
  j["attention_bias"] = true;
  const ModelConfig c = ParseOk(j);
  EXPECT_TRUE(c.attention_qkv_bias);
  EXPECT_TRUE(c.attention_o_bias);
}

TEST(ConfigTest, TiedEmbeddings) {
  Json j = LlamaJson();
  j["tie_word_embeddings"] = true;
  EXPECT_TRUE(ParseOk(j).tie_word_embeddings);
}

TEST(ConfigTest, LlamaIgnoresSlidingWindow) {
  // transformers' LlamaAttention never reads sliding_window.
  Json j = LlamaJson();
  j["sliding_window"] = 16;
  const ModelConfig c = ParseOk(j);
  EXPECT_FALSE(c.sliding_window.has_value());
}

TEST(ConfigTest, SlidingWindowAtLeastMaxModelLenIsInert) {
  Json j = MistralJson();
  j["sliding_window"] = 4096;
  ConfigOptions opts;
  opts.max_model_len = 4096;
  const ModelConfig c = ParseOk(j, opts);
  EXPECT_EQ(c.max_model_len, 4096);
  EXPECT_EQ(c.sliding_window, 4096);

  j["sliding_window"] = 32768;
  EXPECT_EQ(ParseOk(j).sliding_window, 32768);

  Json q = Qwen2Json();
  q["use_sliding_window"] = true;
  q["sliding_window"] = 32768;
  EXPECT_EQ(ParseOk(q).sliding_window, 32768);
}

TEST(ConfigTest, MaxModelLenOption) {
  ConfigOptions opts;
  opts.max_model_len = 512;
  EXPECT_EQ(ParseOk(LlamaJson(), opts).max_model_len, 512);
  opts.max_model_len = 2048;
  EXPECT_EQ(ParseOk(LlamaJson(), opts).max_model_len, 2048);
}

TEST(ConfigTest, IgnoresUnknownAndTrainingOnlyKeys) {
  Json j = LlamaJson();
  j["attention_dropout"] = 0.1;
  j["initializer_range"] = 0.02;
  j["some_future_key"] = Json{{"nested", Json::array({1, 2, 3})}};
  j["hidden_act"] = "swish";  // ACT2FN's alias of silu
  EXPECT_TRUE(Parse(j).ok());
}

TEST(ConfigTest, DtypeKeyOfTransformers5) {
  Json j = LlamaJson();
  j.erase("torch_dtype");
  j["dtype"] = "float16";
  EXPECT_EQ(ParseOk(j).torch_dtype, "float16");
}

TEST(ConfigTest, RopeScalingLinearOldFormWithType) {
  Json j = LlamaJson();
  j["rope_scaling"] = Json{{"type", "linear"}, {"factor", 2.0}};
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 2.0);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
}

TEST(ConfigTest, RopeScalingLinearOldFormWithRopeType) {
  Json j = LlamaJson();
  j["rope_scaling"] = Json{{"rope_type", "linear"}, {"type", "linear"}, {"factor", 4}};
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 4.0);
}

Json Llama3Scaling() {
  return Json{{"rope_type", "llama3"},
              {"factor", 8.0},
              {"low_freq_factor", 1.0},
              {"high_freq_factor", 4.0},
              {"original_max_position_embeddings", 8192}};
}

TEST(ConfigTest, RopeScalingLlama3OldForm) {
  Json j = LlamaJson();
  j["rope_theta"] = 500000.0;
  j["max_position_embeddings"] = 131072;
  j["rope_scaling"] = Llama3Scaling();
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
}

TEST(ConfigTest, RopeScalingDefaultAndNullMeanNone) {
  Json j = LlamaJson();
  j["rope_scaling"] = Json{{"rope_type", "default"}};
  EXPECT_EQ(ParseOk(j).rope_scaling.type, RopeScalingType::kNone);
  j["rope_scaling"] = Json{{"type", "default"}, {"factor", 3.0}};
  EXPECT_EQ(ParseOk(j).rope_scaling.type, RopeScalingType::kNone);
  j["rope_scaling"] = nullptr;
  EXPECT_EQ(ParseOk(j).rope_scaling.type, RopeScalingType::kNone);
}

TEST(ConfigTest, RopeScalingExtraKeysAreFine) {
  Json j = LlamaJson();
  j["rope_scaling"] = Json{{"type", "linear"}, {"factor", 2.0}, {"note", "whatever"}};
  EXPECT_EQ(ParseOk(j).rope_scaling.type, RopeScalingType::kLinear);
}

TEST(ConfigTest, RopeParametersV5Default) {
  Json j = LlamaJson();
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j["rope_parameters"] = Json{{"rope_type", "default"}, {"rope_theta", 250000.0}};
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kNone);
  EXPECT_DOUBLE_EQ(c.rope_theta, 250000.0);
}

TEST(ConfigTest, RopeParametersV5Linear) {
  Json j = LlamaJson();
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j["rope_parameters"] = Json{{"rope_type", "linear"}, {"rope_theta", 20000.0}, {"factor", 2.0}};
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 2.0);
  EXPECT_DOUBLE_EQ(c.rope_theta, 20000.0);
}

TEST(ConfigTest, RopeParametersV5Llama3) {
  Json j = LlamaJson();
  j.erase("rope_theta");
  j.erase("rope_scaling");
  Json p = Llama3Scaling();
  p["rope_theta"] = 500000.0;
  j["rope_parameters"] = p;
  j["max_position_embeddings"] = 131072;
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
}

TEST(ConfigTest, RopeParametersV5ThetaFallsBackToTopLevel) {
  Json j = LlamaJson();
  j["rope_theta"] = 123456.0;
  j.erase("rope_scaling");
  j["rope_parameters"] = Json{{"rope_type", "default"}};
  EXPECT_DOUBLE_EQ(ParseOk(j).rope_theta, 123456.0);
}

TEST(ConfigTest, RopeParametersV5NestedPerLayerType) {
  Json j = LlamaJson();
  j.erase("rope_scaling");
  j["rope_parameters"] =
      Json{{"full_attention", Json{{"rope_type", "linear"}, {"rope_theta", 1e5}, {"factor", 2}}}};
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e5);
}

TEST(ConfigTest, EosTokenIdIntOrList) {
  Json j = LlamaJson();
  j["eos_token_id"] = Json::array({2, 7, 9});
  EXPECT_THAT(ParseOk(j).eos_token_ids, ElementsAre(2, 7, 9));
  j["eos_token_id"] = 5;
  EXPECT_THAT(ParseOk(j).eos_token_ids, ElementsAre(5));
  j["eos_token_id"] = 0;  // id 0 is a valid id
  EXPECT_THAT(ParseOk(j).eos_token_ids, ElementsAre(0));
}

TEST(ConfigTest, GenerationConfigWins) {
  const ModelConfig c =
      ParseOk(LlamaJson(), {}, R"({"bos_token_id": 3, "eos_token_id": [4, 5], "pad_token_id": 6,
                                   "do_sample": true, "temperature": 0.6})");
  EXPECT_THAT(c.eos_token_ids, ElementsAre(4, 5));
  EXPECT_EQ(c.bos_token_id, 3);
  EXPECT_EQ(c.pad_token_id, 6);
}

TEST(ConfigTest, GenerationConfigWithoutIdsKeepsConfigs) {
  const ModelConfig c = ParseOk(LlamaJson(), {}, R"({"temperature": 0.6, "eos_token_id": null})");
  EXPECT_THAT(c.eos_token_ids, ElementsAre(2));
  EXPECT_EQ(c.bos_token_id, 1);
}

TEST(ConfigTest, NegativePadTokenIdMeansNone) {
  Json j = LlamaJson();
  j["pad_token_id"] = -1;
  EXPECT_FALSE(ParseOk(j).pad_token_id.has_value());
  j["pad_token_id"] = 0;
  EXPECT_EQ(ParseOk(j).pad_token_id, 0);
}

// ---- Rejections ----------------------------------------------------------------------------

TEST(ConfigRejectTest, UnsupportedModelType) {
  Json j = LlamaJson();
  j["model_type"] = "gemma";
  ExpectRejected(j, {"model_type \"gemma\" is not supported (supported: llama, mistral, qwen2)"});
  j["model_type"] = 3;
  ExpectRejected(j, {"model_type must be a string, found 3"});
}

TEST(ConfigRejectTest, MissingRequiredFields) {
  for (const char* key : {"model_type", "vocab_size", "hidden_size", "intermediate_size",
                          "num_hidden_layers", "num_attention_heads", "max_position_embeddings"}) {
    SCOPED_TRACE(key);
    Json j = LlamaJson();
    j.erase(key);
    ExpectRejected(j, {std::string(key) + " is missing (required)"});
    j[key] = nullptr;
    ExpectRejected(j, {std::string(key) + " is missing (required)"});
  }
}

TEST(ConfigRejectTest, IntegersMustBePositiveIntegers) {
  for (const char* key :
       {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"}) {
    SCOPED_TRACE(key);
    Json j = LlamaJson();
    j[key] = -5;
    ExpectRejected(j, {std::string(key) + " must be a positive integer, found -5"});
    j[key] = 0;
    ExpectRejected(j, {std::string(key) + " must be a positive integer, found 0"});
    j[key] = 1.5;
    ExpectRejected(j, {std::string(key) + " must be a positive integer, found 1.5"});
    j[key] = "256";
    ExpectRejected(j, {std::string(key) + " must be a positive integer, found \"256\""});
    j[key] = true;
    ExpectRejected(j, {std::string(key) + " must be a positive integer, found true"});
    j[key] = uint64_t{1} << 40;
    ExpectRejected(j, {std::string(key) + " 1099511627776 is too large"});
  }
}

TEST(ConfigRejectTest, OtherFieldTypes) {
  Json j = LlamaJson();
  j["tie_word_embeddings"] = "true";
  ExpectRejected(j, {"tie_word_embeddings must be true or false, found \"true\""});
  j = LlamaJson();
  j["rms_norm_eps"] = -1e-5;
  ExpectRejected(j, {"rms_norm_eps must be a positive number, found -1e-05"});
  j = LlamaJson();
  j["rope_theta"] = "10000";
  ExpectRejected(j, {"rope_theta must be a finite number, found \"10000\""});
  j = LlamaJson();
  j["rope_theta"] = 0;
  ExpectRejected(j, {"rope_theta must be a positive number, found 0"});
  j = LlamaJson();
  j["architectures"] = "LlamaForCausalLM";
  ExpectRejected(j, {"architectures must be a list of strings, found \"LlamaForCausalLM\""});
  j = LlamaJson();
  j["attention_bias"] = "yes";
  ExpectRejected(j, {"attention_bias must be true or false, found \"yes\""});
  j = LlamaJson();
  j["torch_dtype"] = 16;
  ExpectRejected(j, {"torch_dtype must be a string, found 16"});
}

TEST(ConfigRejectTest, NotAJsonObject) {
  ExpectRejected(ParseModelConfig("[1, 2]", "", {}), {"expected a JSON object, found array"});
  ExpectRejected(ParseModelConfig("{\"model_type\": ", "", {}), {});
  // The strict parser refuses duplicate keys, which json.loads would silently resolve.
  ExpectRejected(ParseModelConfig(R"({"model_type": "llama", "model_type": "qwen2"})", "", {}),
                 {"model_type"});
}

TEST(ConfigRejectTest, HiddenNotDivisibleByHeads) {
  Json j = LlamaJson();
  j["hidden_size"] = 250;
  ExpectRejected(j, {"hidden_size 250 is not divisible by num_attention_heads 8"});
}

TEST(ConfigRejectTest, HeadsNotDivisibleByKvHeads) {
  Json j = LlamaJson();
  j["num_key_value_heads"] = 3;
  ExpectRejected(j, {"num_attention_heads 8 is not divisible by num_key_value_heads 3"});
  j["num_key_value_heads"] = 16;
  ExpectRejected(j, {"num_attention_heads 8 is not divisible by num_key_value_heads 16"});
}

TEST(ConfigRejectTest, OddHeadDim) {
  Json j = LlamaJson();
  j["head_dim"] = 33;
  ExpectRejected(j, {"head_dim 33 must be even"});
}

TEST(ConfigRejectTest, UnsupportedRopeTypesOldForm) {
  for (const char* type : {"yarn", "dynamic", "longrope", "ntk", "su"}) {
    SCOPED_TRACE(type);
    Json j = LlamaJson();
    j["rope_scaling"] = Json{{"rope_type", type}, {"factor", 4.0}};
    const absl::StatusOr<ModelConfig> c = Parse(j);
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.status().message(),
              absl::StrCat("config.json: rope_scaling.rope_type \"", type,
                           "\" is not supported (supported: linear, llama3)"));
  }
  Json j = LlamaJson();
  j["rope_scaling"] = Json{{"type", "dynamic"}, {"factor", 2.0}};
  ExpectRejected(j, {"rope_scaling.type \"dynamic\" is not supported"});
}

TEST(ConfigRejectTest, UnsupportedRopeTypeV5Form) {
  Json j = LlamaJson();
  j.erase("rope_scaling");
  j["rope_parameters"] = Json{{"rope_type", "yarn"}, {"rope_theta", 1e4}, {"factor", 4.0}};
  ExpectRejected(j, {"rope_parameters.rope_type \"yarn\" is not supported"});
}

TEST(ConfigRejectTest, RopeTypeAndTypeDisagree) {
  Json j = LlamaJson();
  j["rope_scaling"] = Json{{"rope_type", "linear"}, {"type", "dynamic"}, {"factor", 2.0}};
  ExpectRejected(j, {"rope_scaling.rope_type \"linear\"", "rope_scaling.type \"dynamic\""});
}

TEST(ConfigRejectTest, RopeScalingFieldProblems) {
  Json j = LlamaJson();
  j["rope_scaling"] = Json{{"type", "linear"}};
  ExpectRejected(j, {"rope_scaling.factor is missing"});
  j["rope_scaling"] = Json{{"type", "linear"}, {"factor", -2.0}};
  ExpectRejected(j, {"rope_scaling.factor must be a positive number, found -2.0"});
  j["rope_scaling"] = Json{{"type", "linear"}, {"factor", "2"}};
  ExpectRejected(j, {"rope_scaling.factor must be a finite number, found \"2\""});
  j["rope_scaling"] = "linear";
  ExpectRejected(j, {"rope_scaling must be an object or null, found \"linear\""});
  j["rope_scaling"] = Json{{"rope_type", 7}};
  ExpectRejected(j, {"rope_scaling.rope_type must be a string, found 7"});

  Json s = Llama3Scaling();
  s.erase("low_freq_factor");
  j["rope_scaling"] = s;
  ExpectRejected(j, {"rope_scaling.low_freq_factor is missing"});
  s = Llama3Scaling();
  s.erase("original_max_position_embeddings");
  j["rope_scaling"] = s;
  ExpectRejected(j, {"rope_scaling.original_max_position_embeddings is missing"});
  s = Llama3Scaling();
  s["high_freq_factor"] = 1.0;
  j["rope_scaling"] = s;
  ExpectRejected(j, {"rope_scaling.high_freq_factor 1.0 must be greater than "
                     "rope_scaling.low_freq_factor 1.0"});
}

TEST(ConfigRejectTest, BothRopeScalingAndRopeParameters) {
  Json j = LlamaJson();
  j["rope_scaling"] = Json{{"type", "linear"}, {"factor", 2.0}};
  j["rope_parameters"] = Json{{"rope_type", "default"}, {"rope_theta", 1e4}};
  ExpectRejected(j, {"both rope_scaling and rope_parameters are set"});
}

TEST(ConfigRejectTest, NestedRopeParametersDisagree) {
  Json j = LlamaJson();
  j.erase("rope_scaling");
  j["rope_parameters"] = Json{{"full_attention", Json{{"rope_type", "default"}}},
                              {"sliding_attention", Json{{"rope_type", "linear"}, {"factor", 2}}}};
  ExpectRejected(
      j, {"rope_parameters differs between layer types", "full_attention", "sliding_attention"});
}

TEST(ConfigRejectTest, PartialRotaryFactor) {
  Json j = LlamaJson();
  j["partial_rotary_factor"] = 0.5;
  ExpectRejected(j, {"partial_rotary_factor 0.5 is not supported"});
  j = LlamaJson();
  j.erase("rope_scaling");
  j["rope_parameters"] =
      Json{{"rope_type", "default"}, {"rope_theta", 1e4}, {"partial_rotary_factor", 0.25}};
  ExpectRejected(j, {"rope_parameters.partial_rotary_factor 0.25 is not supported"});
  j = LlamaJson();
  j["partial_rotary_factor"] = 1.0;
  EXPECT_TRUE(Parse(j).ok());
}

TEST(ConfigRejectTest, MlpBias) {
  Json j = LlamaJson();
  j["mlp_bias"] = true;
  ExpectRejected(j, {"mlp_bias true is not supported"});
  j = Qwen2Json();
  j["mlp_bias"] = true;
  ExpectRejected(j, {"mlp_bias true is not supported"});
}

TEST(ConfigRejectTest, MistralAttentionBias) {
  Json j = MistralJson();
  j["attention_bias"] = true;
  ExpectRejected(j, {"attention_bias true is not supported for mistral"});
}

TEST(ConfigRejectTest, HiddenAct) {
  Json j = LlamaJson();
  j["hidden_act"] = "gelu";
  ExpectRejected(j, {"hidden_act \"gelu\" is not supported (supported: silu)"});
}

TEST(ConfigRejectTest, PretrainingTp) {
  Json j = LlamaJson();
  j["pretraining_tp"] = 2;
  ExpectRejected(j, {"pretraining_tp 2 is not supported"});
}

TEST(ConfigRejectTest, QuantizationConfig) {
  Json j = LlamaJson();
  j["quantization_config"] = Json{{"quant_method", "gptq"}, {"bits", 4}};
  ExpectRejected(j, {"quantization_config is present (quant_method \"gptq\")", "not supported"});
}

TEST(ConfigRejectTest, MistralSlidingWindowSmallerThanMaxModelLen) {
  Json j = MistralJson();
  j["sliding_window"] = 4096;
  ExpectRejected(j, {"sliding_window 4096 is smaller than max_model_len 32768"});
  ConfigOptions opts;
  opts.max_model_len = 8192;
  ExpectRejected(j, {"sliding_window 4096 is smaller than max_model_len 8192"}, opts);
  j["sliding_window"] = 0;
  ExpectRejected(j, {"sliding_window must be a positive integer, found 0"});
}

TEST(ConfigRejectTest, Qwen2SlidingWindowInUse) {
  Json j = Qwen2Json();
  j["use_sliding_window"] = true;
  j["sliding_window"] = 4096;
  ExpectRejected(j, {"sliding_window 4096 is smaller than max_model_len 32768"});
  j["use_sliding_window"] = "no";
  ExpectRejected(j, {"use_sliding_window must be true or false, found \"no\""});
}

TEST(ConfigRejectTest, MaxModelLenBeyondMaxPositionEmbeddings) {
  ConfigOptions opts;
  opts.max_model_len = 4096;
  ExpectRejected(Parse(LlamaJson(), opts), {"max_model_len 4096", "max_position_embeddings 2048"},
                 "max_model_len");
  opts.max_model_len = -1;
  ExpectRejected(Parse(LlamaJson(), opts), {"max_model_len -1 must be >= 0"}, "max_model_len");
}

TEST(ConfigRejectTest, TokenIds) {
  Json j = LlamaJson();
  j["eos_token_id"] = "2";
  ExpectRejected(j, {"eos_token_id must be an integer token id or a list of them, found \"2\""});
  j["eos_token_id"] = 1000;
  ExpectRejected(j, {"eos_token_id 1000 is out of range [0, vocab_size 1000)"});
  j["eos_token_id"] = -3;
  ExpectRejected(j, {"eos_token_id -3 is out of range"});
  j["eos_token_id"] = Json::array({2, 1.5});
  ExpectRejected(j, {"eos_token_id[1] must be an integer token id, found 1.5"});
  j = LlamaJson();
  j["bos_token_id"] = 5000;
  ExpectRejected(j, {"bos_token_id 5000 is out of range"});
  j = LlamaJson();
  j["pad_token_id"] = 1000;
  ExpectRejected(j, {"pad_token_id 1000 is out of range"});
}

TEST(ConfigRejectTest, GenerationConfigProblemsNameThatFile) {
  ExpectRejected(ParseModelConfig(LlamaJson().dump(), R"({"eos_token_id": [1, "x"]})", {}),
                 {"eos_token_id[1] must be an integer token id, found \"x\""},
                 "generation_config.json: ");
  ExpectRejected(ParseModelConfig(LlamaJson().dump(), "[]", {}),
                 {"expected a JSON object, found array"}, "generation_config.json: ");
}

// ---- RopeInvFreq ---------------------------------------------------------------------------

ModelConfig RopeConfig(double theta, int head_dim) {
  ModelConfig c;
  c.rope_theta = theta;
  c.head_dim = head_dim;
  return c;
}

// The textbook formulas, in double.
std::vector<double> DefaultInvFreqDouble(double theta, int d) {
  std::vector<double> out;
  for (int i = 0; i < d / 2; ++i) out.push_back(1.0 / std::pow(theta, 2.0 * i / d));
  return out;
}

std::vector<double> Llama3InvFreqDouble(double theta, int d, double factor, double low, double high,
                                        double old_ctx) {
  std::vector<double> out;
  for (double f : DefaultInvFreqDouble(theta, d)) {
    const double wavelen = 2.0 * 3.14159265358979323846 / f;
    if (wavelen < old_ctx / high) {
      out.push_back(f);
    } else if (wavelen > old_ctx / low) {
      out.push_back(f / factor);
    } else {
      const double smooth = (old_ctx / wavelen - low) / (high - low);
      out.push_back((1.0 - smooth) * f / factor + smooth * f);
    }
  }
  return out;
}

void ExpectClose(const std::vector<float>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-6 * want[i]) << "i=" << i;
  }
}

TEST(RopeInvFreqTest, DefaultMatchesDoubleReference) {
  for (const auto& [theta, d] : std::vector<std::pair<double, int>>{
           {10000.0, 128}, {500000.0, 128}, {1000000.0, 64}, {10000.0, 2}, {10000.0, 80}}) {
    SCOPED_TRACE(absl::StrCat("theta=", theta, " d=", d));
    ExpectClose(RopeConfig(theta, d).RopeInvFreq(), DefaultInvFreqDouble(theta, d));
  }
}

TEST(RopeInvFreqTest, DefaultKnownValues) {
  // float32 values of transformers' 1 / (10000 ** (arange(0, 128, 2).float() / 128)).
  const std::vector<float> inv = RopeConfig(10000.0, 128).RopeInvFreq();
  ASSERT_EQ(inv.size(), 64u);
  EXPECT_EQ(inv[0], 1.0f);
  EXPECT_FLOAT_EQ(inv[1], 0x1.bb5faep-1f);    // 0.86596435
  EXPECT_FLOAT_EQ(inv[2], 0x1.7ff222p-1f);    // 0.74989420
  EXPECT_FLOAT_EQ(inv[32], 0x1.47ae14p-7f);   // 0.01
  EXPECT_FLOAT_EQ(inv[63], 0x1.e459c4p-14f);  // 1.1547819e-4
  const std::vector<float> qwen = RopeConfig(1e6, 64).RopeInvFreq();
  EXPECT_FLOAT_EQ(qwen[1], 0x1.4c7bc0p-1f);
  EXPECT_FLOAT_EQ(qwen[31], 0x1.9d5ef2p-20f);
}

TEST(RopeInvFreqTest, LinearDividesByFactor) {
  ModelConfig c = RopeConfig(10000.0, 64);
  c.rope_scaling.type = RopeScalingType::kLinear;
  c.rope_scaling.factor = 4.0;
  std::vector<double> want = DefaultInvFreqDouble(10000.0, 64);
  for (double& w : want) w /= 4.0;
  ExpectClose(c.RopeInvFreq(), want);
  // Exactly the default divided by the float factor, element by element.
  const std::vector<float> plain = RopeConfig(10000.0, 64).RopeInvFreq();
  const std::vector<float> scaled = c.RopeInvFreq();
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_EQ(scaled[i], plain[i] / 4.0f);
}

ModelConfig Llama31Rope() {
  ModelConfig c = RopeConfig(500000.0, 128);
  c.rope_scaling.type = RopeScalingType::kLlama3;
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 8192;
  return c;
}

TEST(RopeInvFreqTest, Llama3MatchesDoubleReference) {
  ExpectClose(Llama31Rope().RopeInvFreq(),
              Llama3InvFreqDouble(500000.0, 128, 8.0, 1.0, 4.0, 8192.0));
  // Another band: Llama-3.2 style factor 32.
  ModelConfig c = Llama31Rope();
  c.rope_scaling.factor = 32.0;
  c.rope_theta = 10000.0;
  c.head_dim = 64;
  ExpectClose(c.RopeInvFreq(), Llama3InvFreqDouble(10000.0, 64, 32.0, 1.0, 4.0, 8192.0));
}

TEST(RopeInvFreqTest, Llama3KnownValuesInEachBand) {
  // Llama 3.1 (theta 500000, head_dim 128, factor 8, low 1, high 4, original 8192): wavelengths
  // below 2048 are kept, above 8192 divided by 8, and indices 29..34 fall in between.
  const std::vector<float> inv = Llama31Rope().RopeInvFreq();
  const std::vector<float> plain = RopeConfig(500000.0, 128).RopeInvFreq();
  ASSERT_EQ(inv.size(), 64u);
  for (int i = 0; i <= 28; ++i) EXPECT_EQ(inv[i], plain[i]) << i;
  for (int i = 35; i < 64; ++i) EXPECT_EQ(inv[i], plain[i] / 8.0f) << i;
  for (int i = 29; i <= 34; ++i) {
    EXPECT_LT(inv[i], plain[i]) << i;
    EXPECT_GT(inv[i], plain[i] / 8.0f) << i;
  }
  EXPECT_EQ(inv[0], 1.0f);
  EXPECT_FLOAT_EQ(inv[1], 0x1.a11582p-1f);
  EXPECT_FLOAT_EQ(inv[31], 0x1.c12f3cp-11f);  // smoothed
  EXPECT_FLOAT_EQ(inv[63], 0x1.4985fep-22f);  // divided by 8
}

TEST(RopeInvFreqTest, FromParsedConfig) {
  Json j = LlamaJson();
  j["rope_theta"] = 500000.0;
  j["max_position_embeddings"] = 131072;
  j["head_dim"] = 128;
  j["rope_scaling"] = Llama3Scaling();
  const ModelConfig c = ParseOk(j);
  EXPECT_EQ(c.RopeInvFreq(), Llama31Rope().RopeInvFreq());
  EXPECT_FLOAT_EQ(c.RopeAttentionScaling(), 1.0f);
}

// ---- LoadModelConfig -----------------------------------------------------------------------

class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "/config_test.XXXXXX";
    char* made = ::mkdtemp(tmpl.data());
    EXPECT_NE(made, nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    for (const char* name : {"config.json", "generation_config.json"}) {
      ::unlink((path_ + "/" + name).c_str());
    }
    ::rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }
  void Write(const std::string& name, const std::string& text) const {
    std::ofstream out(path_ + "/" + name, std::ios::binary);
    out << text;
  }

 private:
  std::string path_;
};

TEST(LoadModelConfigTest, ReadsConfigAndGenerationConfig) {
  TempDir dir;
  dir.Write("config.json", LlamaJson().dump(2));
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir.path(), {});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));

  dir.Write("generation_config.json", R"({"eos_token_id": [2, 8]})");
  c = LoadModelConfig(dir.path(), {});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2, 8));
}

TEST(LoadModelConfigTest, MessagesNameThePaths) {
  TempDir dir;
  Json j = LlamaJson();
  j["hidden_act"] = "relu";
  dir.Write("config.json", j.dump());
  ExpectRejected(LoadModelConfig(dir.path(), {}), {"hidden_act \"relu\""},
                 dir.path() + "/config.json: ");

  dir.Write("config.json", LlamaJson().dump());
  dir.Write("generation_config.json", "{not json");
  ExpectRejected(LoadModelConfig(dir.path(), {}), {}, dir.path() + "/generation_config.json");
  dir.Write("generation_config.json", "");
  ExpectRejected(LoadModelConfig(dir.path(), {}), {"empty"},
                 dir.path() + "/generation_config.json");
}

TEST(LoadModelConfigTest, MissingConfigIsNotFound) {
  TempDir dir;
  const absl::StatusOr<ModelConfig> c = LoadModelConfig(dir.path(), {});
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound) << c.status();
  EXPECT_THAT(c.status().message(), HasSubstr("config.json"));
}

}  // namespace
}  // namespace ls
