// The base model's Hugging Face configuration: config.json (and generation_config.json when
// present) for the Llama family, parsed strictly and validated against what the forward pass
// implements.
//
// The rule: a key that changes the model's math is either implemented exactly as transformers
// does it, or rejected by name with its value. Keys that do not change inference (training-only
// settings, bookkeeping such as "transformers_version") are ignored, as are unknown keys. Every
// rejection is INVALID_ARGUMENT of the form
//   "<file>: <field> <value> <what is wrong>"
// e.g. `config.json: rope_scaling.rope_type "yarn" is not supported (supported: linear, llama3)`,
// where <file> is "config.json" for ParseModelConfig and the full path for LoadModelConfig.
//
// What is accepted (transformers' configuration_llama.py, configuration_mistral.py,
// configuration_qwen2.py and modeling_rope_utils.py, both the 4.x and the 5.x layouts):
// - model_type "llama", "mistral" or "qwen2";
// - RoPE "default" (none), "linear" and "llama3", given either as the older
//   `rope_scaling: {"rope_type" | "type": ..., "factor": ...}` plus a top-level `rope_theta`, or as
//   transformers 5's `rope_parameters: {"rope_type": ..., "rope_theta": ..., ...}`;
// - attention biases: qwen2 always has q/k/v biases (o_proj none); llama has q/k/v/o biases when
//   `attention_bias` is true; mistral has none (its attention_bias must not be true);
// - sliding-window attention only where it cannot take effect (see ConfigOptions).
#ifndef LORASERVE_MODEL_CONFIG_H_
#define LORASERVE_MODEL_CONFIG_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ls {

enum class ModelType : uint8_t { kLlama, kMistral, kQwen2 };
// "llama", "mistral", "qwen2": the config.json spelling.
absl::string_view ModelTypeName(ModelType type);

enum class RopeScalingType : uint8_t { kNone, kLinear, kLlama3 };
// "default", "linear", "llama3": the transformers spelling.
absl::string_view RopeScalingTypeName(RopeScalingType type);

// RoPE frequency scaling. The numbers are kept as config.json wrote them (double); RopeInvFreq()
// rounds them to float32 where transformers does.
struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  // kLinear and kLlama3: inverse frequencies are divided by `factor` (> 0).
  double factor = 1.0;
  // kLlama3 only: the wavelength band [old_ctx / high_freq_factor, old_ctx / low_freq_factor]
  // is interpolated; 0 < low_freq_factor < high_freq_factor.
  double low_freq_factor = 0.0;
  double high_freq_factor = 0.0;
  int64_t original_max_position_embeddings = 0;
};

struct ConfigOptions {
  // The longest sequence (prompt + generated tokens) the server will run. 0 means
  // max_position_embeddings; larger than max_position_embeddings is rejected. A sliding window
  // is accepted only when it is at least this long, so that it never masks anything.
  int64_t max_model_len = 0;
};

// A validated configuration. Every field holds its effective value (defaults applied), so the
// forward pass needs no further checks. Plain data: copyable, and safe to share read-only.
struct ModelConfig {
  ModelType model_type = ModelType::kLlama;
  // architectures[0] (e.g. "LlamaForCausalLM"); empty when config.json has none. Informational.
  std::string architecture;

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  // Defaults to num_attention_heads; fewer means grouped-query attention: query head h reads
  // KV head h / (num_attention_heads / num_key_value_heads).
  int num_key_value_heads = 0;
  // Explicit `head_dim`, else hidden_size / num_attention_heads. Always even.
  int head_dim = 0;

  // Added to mean(x^2) in RMSNorm; transformers adds it to a float32 tensor, i.e. rounded to
  // float32.
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;

  // When true, lm_head reuses the embedding matrix.
  bool tie_word_embeddings = false;
  // q_proj, k_proj and v_proj carry biases (qwen2 always; llama with attention_bias).
  bool attention_qkv_bias = false;
  // o_proj carries a bias (llama with attention_bias).
  bool attention_o_bias = false;
  // Always false: `mlp_bias: true` is rejected.
  bool mlp_bias = false;

  // Generation stops at any of these. generation_config.json's eos_token_id, when present,
  // replaces config.json's (transformers' generate() does the same). May be empty.
  std::vector<int32_t> eos_token_ids;
  // Also taken from generation_config.json when it sets them. Every id is in [0, vocab_size);
  // a negative pad_token_id (old conversions write -1) means none.
  std::optional<int32_t> bos_token_id;
  std::optional<int32_t> pad_token_id;

  int64_t max_position_embeddings = 0;
  // The effective maximum sequence length: ConfigOptions::max_model_len, or
  // max_position_embeddings when that is 0.
  int64_t max_model_len = 0;
  // The configured window, when the config has one that is active; it is then at least
  // max_model_len and so never masks anything. Informational.
  std::optional<int64_t> sliding_window;

  // `torch_dtype` (transformers 4) or `dtype` (5), e.g. "bfloat16"; empty when absent.
  // Informational: the serving dtype is chosen separately.
  std::string torch_dtype;

  int64_t q_dim() const { return int64_t{num_attention_heads} * head_dim; }
  int64_t kv_dim() const { return int64_t{num_key_value_heads} * head_dim; }

  // The RoPE inverse frequencies, head_dim / 2 of them, computed in float32 step by step as
  // transformers' modeling_rope_utils does on the CPU (the rotary embedding's init device):
  //   default: inv[i] = 1 / theta^(float(2i) / float(head_dim))    (powf, float32 division)
  //   linear:  inv[i] / factor
  //   llama3:  _compute_llama3_parameters: wavelen = float(2*pi) / inv; above
  //            old_ctx / low_freq_factor divide by factor, below old_ctx / high_freq_factor keep,
  //            in between (1 - s) * inv / factor + s * inv with
  //            s = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor).
  // torch evaluates the power with SLEEF's powf (<= 1 ulp), this with the C library's, so a
  // rare element may differ from transformers by one ulp.
  std::vector<float> RopeInvFreq() const;
  // The factor cos and sin are multiplied by: 1 for every supported scaling type.
  float RopeAttentionScaling() const { return 1.0f; }

  // One line for logs: type, sizes, heads, RoPE, biases, dtype.
  std::string Summary() const;
};

// Parses config.json's text and, unless empty, generation_config.json's, and validates them.
// Messages name the files "config.json" and "generation_config.json".
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view config_json,
                                             absl::string_view generation_config_json_or_empty,
                                             const ConfigOptions& opts);

// Reads `model_dir`/config.json (NOT_FOUND when absent) and `model_dir`/generation_config.json
// when it exists, then parses as above; messages name the files by path.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir,
                                            const ConfigOptions& opts);

}  // namespace ls

#endif  // LORASERVE_MODEL_CONFIG_H_
