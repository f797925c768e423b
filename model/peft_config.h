// adapter_config.json of a PEFT LoRA adapter (peft.LoraConfig, PEFT 0.21), parsed strictly, and
// PEFT's rules for which modules of the base model a config targets and with which rank and
// alpha. docs/adapters.md has the full policy; the short form:
//
// Keys fall in exactly one of four classes (kPeftLoraKeys in peft_config.cc lists them all):
// - implemented: peft_type ("LORA", required), r, lora_alpha, use_rslora, target_modules,
//   exclude_modules, layers_to_transform, layers_pattern, rank_pattern, alpha_pattern;
// - accepted but without effect on inference: bookkeeping (task_type, peft_version,
//   base_model_name_or_path, revision, auto_mapping, inference_mode), training-only settings
//   (lora_dropout, eva_config, velora_config, loftq_config unless init_lora_weights is "loftq",
//   qalora_group_size, megatron_core, ...), init_lora_weights where it leaves the base weights
//   alone (true, false, gaussian, eva, orthogonal, mica) and fan_in_fan_out (PEFT resets it for
//   nn.Linear); ensure_weight_tying is refused by the loader only where it would take effect;
// - accepted only at their default, rejected by name otherwise, because they change the math
//   and loraserve does not implement them: use_dora, bias, lora_bias, modules_to_save,
//   layer_replication, megatron_config, use_qalora, target_parameters, trainable_token_indices,
//   alora_invocation_tokens, use_bdlora, arrow_config, kasa_config, monteclora_config,
//   enable_lora, and init_lora_weights "pissa*"/"olora"/"corda"/"loftq"/"lora_ga" (the adapter
//   is relative to base weights that initialisation modified);
// - anything else is rejected by name: a key we do not know might change the math.
// Every problem in the file is reported together in one INVALID_ARGUMENT that starts with `what`
// (e.g. "adapter_config.json: use_dora true is not supported (DoRA, weight-decomposed LoRA); only
// its default is"; with several, "<what>: N problems" and one indented line each).
//
// Matching follows PEFT's source (tuners/tuners_utils.py check_target_module_exists,
// utils/other.py get_pattern_key and match_target_against_key, lora/model.py
// _create_and_replace, tuners_utils.py _maybe_include_all_linear_layers). Module names are those
// of transformers' named_modules() on the *ForCausalLM model, e.g. "model.layers.3.mlp.up_proj",
// "lm_head", "model.embed_tokens". Regular expressions are Python `re` patterns; they run on
// PCRE2, whose syntax is a superset of what PEFT configs use (named groups (?P<n>...),
// lookaround, lazy quantifiers, inline flags), under match limits so a hostile pattern fails
// instead of hanging.
#ifndef LORASERVE_MODEL_PEFT_CONFIG_H_
#define LORASERVE_MODEL_PEFT_CONFIG_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ls {

namespace internal {
struct PeftPatterns;  // the compiled regular expressions (peft_config.cc)
}  // namespace internal

// How target_modules selects modules.
enum class PeftTargetKind : uint8_t {
  kDefault,    // absent or null: PEFT's per-architecture default (q_proj, v_proj for ours)
  kList,       // a list: exact name, or name ends with "." + entry
  kRegex,      // a string: re.fullmatch on the module name
  kAllLinear,  // "all-linear" (any case): every nn.Linear except the output head
};

enum class PeftExcludeKind : uint8_t { kNone, kList, kRegex };

// A parsed, validated adapter_config.json. Plain data plus shared, immutable compiled patterns:
// copyable, and safe to use from any number of threads.
struct PeftLoraConfig {
  int64_t r = 8;            // >= 1
  double lora_alpha = 8.0;  // finite
  bool use_rslora = false;  // scale alpha / sqrt(r) instead of alpha / r

  PeftTargetKind target_kind = PeftTargetKind::kDefault;
  std::vector<std::string> target_modules;  // kList
  std::string target_regex;                 // kRegex (and the spelling of kAllLinear)

  PeftExcludeKind exclude_kind = PeftExcludeKind::kNone;
  std::vector<std::string> exclude_modules;  // kList
  std::string exclude_regex;                 // kRegex

  // Empty: every layer. A single integer in the file becomes a one-element list; an empty list
  // means every layer, as in PEFT.
  std::vector<int64_t> layers_to_transform;
  // Names of the layer ModuleList ("layers"); empty: PEFT's generic layer-index rule.
  std::vector<std::string> layers_pattern;

  // In file order: PEFT uses the first key (dict order) that matches.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;  // values >= 1
  std::vector<std::pair<std::string, double>> alpha_pattern;  // values finite

  // Accepted and informational only.
  std::string peft_version;
  std::string base_model_name_or_path;
  std::string task_type;
  std::string init_lora_weights = "true";
  // Accepted: PEFT resets it to false for nn.Linear (lora/layer.py dispatch_default) and the
  // embedding forward ignores it, so it never changes a Llama-family adapter.
  bool fan_in_fan_out = false;
  // Rejected by the loader only where it takes effect (tied embeddings with embed_tokens or
  // lm_head targeted); see lora_adapter.h.
  bool ensure_weight_tying = false;
  // Keys present in the file and ignored, sorted (for the load report).
  std::vector<std::string> ignored_keys;

  std::shared_ptr<const internal::PeftPatterns> patterns;

  // PEFT's check_target_module_exists plus the default and all-linear resolution, for the module
  // `name` (the default, ["q_proj", "v_proj"], is PEFT's for llama, mistral and qwen2 alike).
  // True when the module gets a LoRA layer. `is_linear_not_head` says whether the module is an
  // nn.Linear other than the output head, which is what all-linear picks. Errors only when a
  // pattern exceeds its match limits (RESOURCE_EXHAUSTED naming it).
  absl::StatusOr<bool> Targets(absl::string_view name, bool is_linear_not_head) const;
  // get_pattern_key over rank_pattern / alpha_pattern, falling back to r / lora_alpha.
  absl::StatusOr<int64_t> RankFor(absl::string_view name) const;
  absl::StatusOr<double> AlphaFor(absl::string_view name) const;
  // The value PEFT stores in LoraLayer.scaling (a Python float, i.e. double).
  double Scale(int64_t rank, double alpha) const;

  // "['q_proj', 'v_proj']", "regex '.*proj'", "all-linear", "default" for reports.
  std::string DescribeTargets() const;
};

// Caps on what the parser accepts (config files are tiny; these only bound hostile input).
struct PeftConfigLimits {
  size_t max_bytes = 1 << 20;
  size_t max_pattern_bytes = 4096;  // one regular expression or module name
  size_t max_list_entries = 10000;  // target/exclude lists, pattern maps, layer lists
};

// Parses and validates adapter_config.json's text. `what` starts every message. Regular
// expressions are compiled here, so a pattern that does not compile is a parse error.
absl::StatusOr<PeftLoraConfig> ParsePeftLoraConfig(absl::string_view json_text,
                                                   absl::string_view what = "adapter_config.json",
                                                   const PeftConfigLimits& limits = {});

}  // namespace ls

#endif  // LORASERVE_MODEL_PEFT_CONFIG_H_
