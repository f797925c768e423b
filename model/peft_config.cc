#include "model/peft_config.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "common/status.h"

namespace ls {
namespace internal {

// One Python `re` pattern compiled with PCRE2. Matching allocates its own match data, so a
// PeftRegex is immutable and thread-safe; adapters are matched at load time only, against
// module names of a few dozen bytes, so there is no JIT and no per-thread cache.
class PeftRegex {
 public:
  static absl::StatusOr<std::unique_ptr<PeftRegex>> Compile(std::string pattern, std::string what);
  ~PeftRegex() { pcre2_code_free(code_); }
  PeftRegex(const PeftRegex&) = delete;
  PeftRegex& operator=(const PeftRegex&) = delete;

  // re.match (anchored at the start) or, with `full`, re.fullmatch. When `group` is given and
  // the pattern matched, *group_value receives that named group's text (empty if unset).
  absl::StatusOr<bool> Match(absl::string_view subject, bool full, const char* group = nullptr,
                             std::string* group_value = nullptr) const;

  const std::string& what() const { return what_; }

 private:
  PeftRegex() = default;
  pcre2_code* code_ = nullptr;
  std::string pattern_;
  std::string what_;
};

struct PeftPatterns {
  std::unique_ptr<PeftRegex> target;   // target_modules as a string (not all-linear)
  std::unique_ptr<PeftRegex> exclude;  // exclude_modules as a string
  // The layer-index rules of check_target_module_exists: one per layers_pattern entry, or the
  // generic one when layers_pattern is empty.
  std::vector<std::unique_ptr<PeftRegex>> layer_index;
  // get_pattern_key's rf"(.*\.)?({key})$" for each key, in file order.
  std::vector<std::unique_ptr<PeftRegex>> rank_keys;
  std::vector<std::unique_ptr<PeftRegex>> alpha_keys;
};

namespace {

// Module names are short; legitimate patterns need a few thousand steps at most. These bound a
// pathological pattern (nested quantifiers) to milliseconds.
constexpr uint32_t kMatchLimit = 1'000'000;
constexpr uint32_t kDepthLimit = 10'000;
constexpr uint32_t kHeapLimitKib = 16 * 1024;

std::string Pcre2ErrorText(int code) {
  PCRE2_UCHAR buffer[256];
  if (pcre2_get_error_message(code, buffer, sizeof(buffer)) < 0) {
    return absl::StrCat("PCRE2 error ", code);
  }
  return std::string(reinterpret_cast<const char*>(buffer));
}

struct MatchDataDeleter {
  void operator()(pcre2_match_data* p) const { pcre2_match_data_free(p); }
};
struct MatchContextDeleter {
  void operator()(pcre2_match_context* p) const { pcre2_match_context_free(p); }
};

}  // namespace

absl::StatusOr<std::unique_ptr<PeftRegex>> PeftRegex::Compile(std::string pattern,
                                                              std::string what) {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  // UTF + UCP: Python 3 str patterns are Unicode (\d, \w, case folding).
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset, nullptr);
  if (code == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " does not compile as a regular expression: ", Pcre2ErrorText(error_code),
        " at offset ", error_offset));
  }
  std::unique_ptr<PeftRegex> regex(new PeftRegex());
  regex->code_ = code;
  regex->pattern_ = std::move(pattern);
  regex->what_ = std::move(what);
  return regex;
}

absl::StatusOr<bool> PeftRegex::Match(absl::string_view subject, bool full, const char* group,
                                      std::string* group_value) const {
  std::unique_ptr<pcre2_match_data, MatchDataDeleter> data(
      pcre2_match_data_create_from_pattern(code_, nullptr));
  std::unique_ptr<pcre2_match_context, MatchContextDeleter> context(
      pcre2_match_context_create(nullptr));
  if (data == nullptr || context == nullptr) {
    return absl::ResourceExhaustedError("out of memory for a PCRE2 match");
  }
  pcre2_set_match_limit(context.get(), kMatchLimit);
  pcre2_set_depth_limit(context.get(), kDepthLimit);
  pcre2_set_heap_limit(context.get(), kHeapLimitKib);
  const uint32_t options = PCRE2_ANCHORED | (full ? PCRE2_ENDANCHORED : 0u);
  const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(subject.data()), subject.size(), 0,
                             options, data.get(), context.get());
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    return absl::ResourceExhaustedError(absl::StrCat(what_, " could not be matched against \"",
                                                     absl::CEscape(subject),
                                                     "\": ", Pcre2ErrorText(rc)));
  }
  if (group != nullptr && group_value != nullptr) {
    group_value->clear();
    PCRE2_SIZE length = 0;
    if (pcre2_substring_length_byname(data.get(), reinterpret_cast<PCRE2_SPTR>(group), &length) ==
        0) {
      std::string value(length + 1, '\0');
      PCRE2_SIZE size = value.size();
      if (pcre2_substring_copy_byname(data.get(), reinterpret_cast<PCRE2_SPTR>(group),
                                      reinterpret_cast<PCRE2_UCHAR*>(value.data()), &size) == 0) {
        value.resize(size);
        *group_value = std::move(value);
      }
    }
  }
  return true;
}

}  // namespace internal

namespace {

using internal::PeftPatterns;
using internal::PeftRegex;

// PEFT's default target_modules for llama, mistral and qwen2
// (utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
const std::vector<std::string>& DefaultTargets() {
  static const std::vector<std::string>* targets = new std::vector<std::string>{"q_proj", "v_proj"};
  return *targets;
}

// How a key of adapter_config.json is treated; see the header.
enum class KeyClass : uint8_t {
  kImplemented,
  kIgnored,
  // Accepted only at its default (null, false, "none", an empty list or object); the reason
  // names the feature in the rejection.
  kDefaultOnly,
};

struct KeyRule {
  const char* key;
  KeyClass key_class;
  const char* reason;  // kDefaultOnly: what the option does
};

// Every field of peft.LoraConfig 0.21 and its PeftConfig bases, plus keys older PEFT versions
// wrote. The implemented keys are parsed below; this table decides the others.
constexpr KeyRule kPeftLoraKeys[] = {
    {"peft_type", KeyClass::kImplemented, ""},
    {"r", KeyClass::kImplemented, ""},
    {"lora_alpha", KeyClass::kImplemented, ""},
    {"use_rslora", KeyClass::kImplemented, ""},
    {"target_modules", KeyClass::kImplemented, ""},
    {"exclude_modules", KeyClass::kImplemented, ""},
    {"layers_to_transform", KeyClass::kImplemented, ""},
    {"layers_pattern", KeyClass::kImplemented, ""},
    {"rank_pattern", KeyClass::kImplemented, ""},
    {"alpha_pattern", KeyClass::kImplemented, ""},
    {"init_lora_weights", KeyClass::kImplemented, ""},
    {"fan_in_fan_out", KeyClass::kImplemented, ""},
    {"ensure_weight_tying", KeyClass::kImplemented, ""},
    {"task_type", KeyClass::kImplemented, ""},
    {"peft_version", KeyClass::kImplemented, ""},
    {"base_model_name_or_path", KeyClass::kImplemented, ""},
    // Bookkeeping.
    {"revision", KeyClass::kIgnored, ""},
    {"auto_mapping", KeyClass::kIgnored, ""},
    {"inference_mode", KeyClass::kIgnored, ""},
    // Training only: dropout is the identity at inference; these configure initialisation or
    // the backward pass (VeLoRA's forward is plain LoRA outside training, lora/variants.py).
    {"lora_dropout", KeyClass::kIgnored, ""},
    {"eva_config", KeyClass::kIgnored, ""},
    {"corda_config", KeyClass::kIgnored, ""},
    {"lora_ga_config", KeyClass::kIgnored, ""},
    {"loftq_config", KeyClass::kIgnored, ""},
    {"velora_config", KeyClass::kIgnored, ""},
    {"qalora_group_size", KeyClass::kIgnored, ""},
    {"megatron_core", KeyClass::kIgnored, ""},
    {"runtime_config", KeyClass::kIgnored, ""},
    {"merge_weights", KeyClass::kIgnored, ""},  // PEFT < 0.3, training-time merge flag
    // Change the adapter's math; loraserve implements only their defaults.
    {"use_dora", KeyClass::kDefaultOnly, "DoRA, weight-decomposed LoRA"},
    {"bias", KeyClass::kDefaultOnly, "trained base-layer biases"},
    {"lora_bias", KeyClass::kDefaultOnly, "a bias on lora_B"},
    {"modules_to_save", KeyClass::kDefaultOnly, "fully fine-tuned modules saved with the adapter"},
    {"layer_replication", KeyClass::kDefaultOnly, "layers stacked beyond the base model's"},
    {"megatron_config", KeyClass::kDefaultOnly, "Megatron parallel LoRA layers"},
    {"use_qalora", KeyClass::kDefaultOnly, "quantization-aware LoRA input pooling"},
    {"target_parameters", KeyClass::kDefaultOnly, "LoRA on nn.Parameter tensors"},
    {"trainable_token_indices", KeyClass::kDefaultOnly, "trainable embedding rows"},
    {"alora_invocation_tokens", KeyClass::kDefaultOnly, "activated LoRA (aLoRA)"},
    {"use_bdlora", KeyClass::kDefaultOnly, "block-diagonal LoRA"},
    {"arrow_config", KeyClass::kDefaultOnly, "Arrow routing between adapters"},
    {"kasa_config", KeyClass::kDefaultOnly, "KaSA singular-value adaptation"},
    {"monteclora_config", KeyClass::kDefaultOnly, "Monte Carlo LoRA sampling"},
    {"enable_lora", KeyClass::kDefaultOnly, "PEFT < 0.3 merged q/k/v LoRA"},
};

const KeyRule* FindRule(absl::string_view key) {
  for (const KeyRule& rule : kPeftLoraKeys) {
    if (key == rule.key) return &rule;
  }
  return nullptr;
}

// Whether a kDefaultOnly value is that option's default.
bool IsDefaultValue(absl::string_view key, const Json& v) {
  if (v.is_null()) return true;
  if (v.is_boolean()) return !v.get<bool>();
  if (v.is_array() || v.is_object()) return v.empty();
  if (key == "bias") return v.is_string() && v.get<std::string>() == "none";
  return false;
}

// A short rendering of a JSON value for messages (hostile input: bounded and escaped).
template <typename JsonT>
std::string Show(const JsonT& v) {
  std::string s = v.dump(-1, ' ', /*ensure_ascii=*/true, JsonT::error_handler_t::replace);
  if (s.size() > 120) s = s.substr(0, 117) + "...";
  return s;
}

std::string Quote(absl::string_view s) {
  if (s.size() > 160) return absl::StrCat("\"", absl::CEscape(s.substr(0, 160)), "\"...");
  return absl::StrCat("\"", absl::CEscape(s), "\"");
}

// Collects every problem of one file.
class Problems {
 public:
  explicit Problems(absl::string_view what) : what_(what) {}
  void Add(std::string line) { lines_.push_back(std::move(line)); }
  bool empty() const { return lines_.empty(); }
  absl::Status ToStatus() const {
    if (lines_.size() == 1) return absl::InvalidArgumentError(absl::StrCat(what_, ": ", lines_[0]));
    std::string message = absl::StrCat(what_, ": ", lines_.size(), " problems");
    for (const std::string& line : lines_) absl::StrAppend(&message, "\n  ", line);
    return absl::InvalidArgumentError(message);
  }

 private:
  std::string what_;
  std::vector<std::string> lines_;
};

// A list of strings, or a single string (`allow_string`); nullopt and a problem otherwise.
std::optional<std::vector<std::string>> StringList(const Json& v, absl::string_view key,
                                                   const PeftConfigLimits& limits,
                                                   Problems* problems) {
  if (!v.is_array()) {
    problems->Add(absl::StrCat(key, " must be a list of strings, found ", JsonTypeName(v)));
    return std::nullopt;
  }
  if (v.size() > limits.max_list_entries) {
    problems->Add(absl::StrCat(key, " has ", v.size(), " entries, more than the limit of ",
                               limits.max_list_entries));
    return std::nullopt;
  }
  std::vector<std::string> out;
  for (const Json& e : v) {
    if (!e.is_string()) {
      problems->Add(absl::StrCat(key, " entries must be strings, found ", Show(e)));
      return std::nullopt;
    }
    std::string s = e.get<std::string>();
    if (s.size() > limits.max_pattern_bytes) {
      problems->Add(absl::StrCat(key, " entry of ", s.size(), " bytes is longer than the limit of ",
                                 limits.max_pattern_bytes));
      return std::nullopt;
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::unique_ptr<PeftRegex> CompileOrReport(std::string pattern, std::string what,
                                           Problems* problems) {
  absl::StatusOr<std::unique_ptr<PeftRegex>> regex =
      PeftRegex::Compile(std::move(pattern), std::move(what));
  if (!regex.ok()) {
    problems->Add(std::string(regex.status().message()));
    return nullptr;
  }
  return *std::move(regex);
}

// Exact name, or the name ends with "." + entry (check_target_module_exists' list rule).
bool ListMatches(const std::vector<std::string>& list, absl::string_view name) {
  for (const std::string& entry : list) {
    if (name == entry) return true;
    if (name.size() > entry.size() && absl::EndsWith(name, entry) &&
        name[name.size() - entry.size() - 1] == '.') {
      return true;
    }
  }
  return false;
}

// get_pattern_key: the first key whose rf"(.*\.)?({key})$" matches, else the name itself.
template <typename V>
absl::StatusOr<V> PatternValue(const std::vector<std::pair<std::string, V>>& map,
                               const std::vector<std::unique_ptr<PeftRegex>>& regexes,
                               absl::string_view name, V fallback) {
  for (size_t i = 0; i < map.size(); ++i) {
    LS_ASSIGN_OR_RETURN(const bool matched, regexes[i]->Match(name, /*full=*/false));
    if (matched) return map[i].second;
  }
  // rank_pattern.get(name, r): a key equal to the name always matches its own regex unless it
  // holds regex syntax, so this is the fallback in practice.
  for (const auto& [key, value] : map) {
    if (key == name) return value;
  }
  return fallback;
}

}  // namespace

absl::StatusOr<bool> PeftLoraConfig::Targets(absl::string_view name,
                                             bool is_linear_not_head) const {
  const PeftPatterns& p = *patterns;
  // exclude_modules is checked first and wins.
  if (exclude_kind == PeftExcludeKind::kRegex) {
    LS_ASSIGN_OR_RETURN(const bool excluded, p.exclude->Match(name, /*full=*/true));
    if (excluded) return false;
  } else if (exclude_kind == PeftExcludeKind::kList && ListMatches(exclude_modules, name)) {
    return false;
  }
  switch (target_kind) {
    case PeftTargetKind::kRegex:
      // A string never combines with layers_to_transform (rejected at parse, as in PEFT).
      return p.target->Match(name, /*full=*/true);
    case PeftTargetKind::kAllLinear:
      // _maybe_include_all_linear_layers replaces the string by the set of full names of every
      // nn.Linear but the output embedding; names of that set only match themselves.
      return is_linear_not_head;
    case PeftTargetKind::kDefault:
    case PeftTargetKind::kList:
      break;
  }
  const std::vector<std::string>& list =
      target_kind == PeftTargetKind::kDefault ? DefaultTargets() : target_modules;
  // An exact name is targeted whatever layers_to_transform says.
  for (const std::string& entry : list) {
    if (name == entry) return true;
  }
  if (!ListMatches(list, name)) return false;
  if (layers_to_transform.empty()) return true;
  std::string index;
  bool found = false;
  for (const std::unique_ptr<PeftRegex>& regex : p.layer_index) {
    LS_ASSIGN_OR_RETURN(found, regex->Match(name, /*full=*/false, "idx", &index));
    if (found) break;
  }
  if (!found || index.empty()) return false;
  // (?P<idx>\d+) over an ASCII module name: decimal digits. Longer than any int64 layer: no match.
  if (index.size() > 18) return false;
  int64_t layer = 0;
  for (const char c : index) {
    if (c < '0' || c > '9') return false;
    layer = layer * 10 + (c - '0');
  }
  return std::find(layers_to_transform.begin(), layers_to_transform.end(), layer) !=
         layers_to_transform.end();
}

absl::StatusOr<int64_t> PeftLoraConfig::RankFor(absl::string_view name) const {
  return PatternValue(rank_pattern, patterns->rank_keys, name, r);
}

absl::StatusOr<double> PeftLoraConfig::AlphaFor(absl::string_view name) const {
  return PatternValue(alpha_pattern, patterns->alpha_keys, name, lora_alpha);
}

double PeftLoraConfig::Scale(int64_t rank, double alpha) const {
  // lora/layer.py update_layer: lora_alpha / math.sqrt(r) with rsLoRA, else lora_alpha / r.
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank))
                    : alpha / static_cast<double>(rank);
}

std::string PeftLoraConfig::DescribeTargets() const {
  switch (target_kind) {
    case PeftTargetKind::kDefault:
      return "default [q_proj, v_proj]";
    case PeftTargetKind::kAllLinear:
      return "all-linear";
    case PeftTargetKind::kRegex:
      return absl::StrCat("regex ", Quote(target_regex));
    case PeftTargetKind::kList:
      break;
  }
  std::vector<std::string> quoted;
  for (const std::string& t : target_modules) quoted.push_back(Quote(t));
  return absl::StrCat("[", absl::StrJoin(quoted, ", "), "]");
}

absl::StatusOr<PeftLoraConfig> ParsePeftLoraConfig(absl::string_view json_text,
                                                   absl::string_view what,
                                                   const PeftConfigLimits& limits) {
  if (json_text.size() > limits.max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": ", json_text.size(), " bytes, more than the limit of ", limits.max_bytes));
  }
  LS_ASSIGN_OR_RETURN(const Json json, ParseJsonStrict(json_text, what));
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected a JSON object, found ", JsonTypeName(json)));
  }
  Problems problems(what);
  PeftLoraConfig config;
  auto patterns = std::make_shared<PeftPatterns>();

  // peft_type first: for another PEFT method every other key is meaningless.
  const auto peft_type = json.find("peft_type");
  if (peft_type == json.end() || peft_type->is_null()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": peft_type is missing; loraserve serves \"LORA\" adapters"));
  }
  if (!peft_type->is_string() || peft_type->get<std::string>() != "LORA") {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": peft_type ", Show(*peft_type), " is not supported (only \"LORA\")"));
  }

  // Classify every key before interpreting any.
  for (const auto& [key, value] : json.items()) {
    const KeyRule* rule = FindRule(key);
    if (rule == nullptr) {
      problems.Add(absl::StrCat("unknown key ", Quote(key), " = ", Show(value),
                                " (not a LoraConfig field loraserve knows; refused because it "
                                "might change the adapter's output)"));
      continue;
    }
    if (rule->key_class == KeyClass::kIgnored) {
      config.ignored_keys.push_back(key);
    } else if (rule->key_class == KeyClass::kDefaultOnly && !IsDefaultValue(key, value)) {
      problems.Add(absl::StrCat(key, " ", Show(value), " is not supported (", rule->reason,
                                "); only its default is"));
    }
  }

  auto get = [&](const char* key) -> const Json* {
    const auto it = json.find(key);
    return it == json.end() ? nullptr : &*it;
  };
  auto get_bool = [&](const char* key, bool* out) {
    const Json* v = get(key);
    if (v == nullptr || v->is_null()) return;
    if (!v->is_boolean()) {
      problems.Add(absl::StrCat(key, " must be true or false, found ", Show(*v)));
      return;
    }
    *out = v->get<bool>();
  };
  auto get_string = [&](const char* key, std::string* out) {
    const Json* v = get(key);
    if (v == nullptr || v->is_null()) return;
    if (!v->is_string()) {
      problems.Add(absl::StrCat(key, " must be a string, found ", Show(*v)));
      return;
    }
    *out = v->get<std::string>();
  };

  // ---- r, lora_alpha, use_rslora.
  if (const Json* v = get("r"); v != nullptr && !v->is_null()) {
    if (!v->is_number_unsigned() || v->get<uint64_t>() < 1 || v->get<uint64_t>() > (1u << 20)) {
      problems.Add(absl::StrCat("r ", Show(*v), " must be an integer in [1, 1048576]"));
    } else {
      config.r = static_cast<int64_t>(v->get<uint64_t>());
    }
  }
  if (const Json* v = get("lora_alpha"); v != nullptr && !v->is_null()) {
    if (!v->is_number() || !std::isfinite(v->get<double>())) {
      problems.Add(absl::StrCat("lora_alpha ", Show(*v), " must be a finite number"));
    } else {
      config.lora_alpha = v->get<double>();
    }
  }
  get_bool("use_rslora", &config.use_rslora);
  get_bool("fan_in_fan_out", &config.fan_in_fan_out);
  get_bool("ensure_weight_tying", &config.ensure_weight_tying);
  get_string("peft_version", &config.peft_version);
  get_string("base_model_name_or_path", &config.base_model_name_or_path);
  get_string("task_type", &config.task_type);

  // ---- init_lora_weights: how training started. Some schemes rewrite the base weights, and the
  // adapter is then only valid on top of those; PEFT converts such an adapter to plain LoRA
  // (and writes init_lora_weights true) when saved with path_initial_model_for_weight_conversion.
  if (const Json* v = get("init_lora_weights"); v != nullptr && !v->is_null()) {
    if (v->is_boolean()) {
      config.init_lora_weights = v->get<bool>() ? "true" : "false";
    } else if (v->is_string()) {
      const std::string s = v->get<std::string>();
      const std::string lower = absl::AsciiStrToLower(s);
      if (lower == "gaussian" || lower == "eva" || lower == "orthogonal" || lower == "mica") {
        config.init_lora_weights = s;
      } else if (absl::StartsWith(lower, "pissa") || lower == "olora" || lower == "corda" ||
                 lower == "loftq" || lower == "lora_ga") {
        problems.Add(absl::StrCat(
            "init_lora_weights ", Show(*v),
            " is not supported: this initialisation modifies the base model's weights, so the "
            "adapter only applies on top of those; re-save it as plain LoRA with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...)"));
      } else {
        problems.Add(absl::StrCat("init_lora_weights ", Show(*v), " is not a known value"));
      }
    } else {
      problems.Add(
          absl::StrCat("init_lora_weights must be a boolean or a string, found ", Show(*v)));
    }
  }

  // ---- target_modules / exclude_modules.
  const Json* target = get("target_modules");
  if (target != nullptr && !target->is_null()) {
    if (target->is_string()) {
      config.target_regex = target->get<std::string>();
      if (config.target_regex.size() > limits.max_pattern_bytes) {
        problems.Add(absl::StrCat("target_modules is ", config.target_regex.size(),
                                  " bytes, more than the limit of ", limits.max_pattern_bytes));
      } else if (absl::AsciiStrToLower(config.target_regex) == "all-linear") {
        config.target_kind = PeftTargetKind::kAllLinear;
      } else {
        config.target_kind = PeftTargetKind::kRegex;
        patterns->target =
            CompileOrReport(config.target_regex,
                            absl::StrCat("target_modules ", Quote(config.target_regex)), &problems);
      }
    } else if (auto list = StringList(*target, "target_modules", limits, &problems)) {
      config.target_kind = PeftTargetKind::kList;
      config.target_modules = *std::move(list);
    }
  }
  const Json* exclude = get("exclude_modules");
  if (exclude != nullptr && !exclude->is_null()) {
    if (exclude->is_string()) {
      config.exclude_regex = exclude->get<std::string>();
      // An empty string is falsy in Python: no exclusion.
      if (!config.exclude_regex.empty()) {
        if (config.exclude_regex.size() > limits.max_pattern_bytes) {
          problems.Add(absl::StrCat("exclude_modules is ", config.exclude_regex.size(),
                                    " bytes, more than the limit of ", limits.max_pattern_bytes));
        } else {
          config.exclude_kind = PeftExcludeKind::kRegex;
          patterns->exclude = CompileOrReport(
              config.exclude_regex, absl::StrCat("exclude_modules ", Quote(config.exclude_regex)),
              &problems);
        }
      }
    } else if (auto list = StringList(*exclude, "exclude_modules", limits, &problems)) {
      config.exclude_modules = *std::move(list);
      if (!config.exclude_modules.empty()) config.exclude_kind = PeftExcludeKind::kList;
    }
  }

  // ---- layers_to_transform / layers_pattern, with LoraConfig.__post_init__'s checks.
  const Json* layers = get("layers_to_transform");
  const bool has_layers = layers != nullptr && !layers->is_null();
  if (has_layers) {
    if (layers->is_number_integer()) {
      config.layers_to_transform.push_back(layers->get<int64_t>());
    } else if (layers->is_array() && layers->size() <= limits.max_list_entries) {
      for (const Json& e : *layers) {
        if (!e.is_number_integer()) {
          problems.Add(
              absl::StrCat("layers_to_transform entries must be integers, found ", Show(e)));
          break;
        }
        config.layers_to_transform.push_back(e.get<int64_t>());
      }
    } else {
      problems.Add(absl::StrCat("layers_to_transform must be an integer or a list of at most ",
                                limits.max_list_entries, " integers, found ", Show(*layers)));
    }
  }
  const Json* layers_pattern = get("layers_pattern");
  const bool has_layers_pattern = layers_pattern != nullptr && !layers_pattern->is_null();
  if (has_layers_pattern) {
    if (layers_pattern->is_string()) {
      if (!layers_pattern->get<std::string>().empty()) {
        config.layers_pattern.push_back(layers_pattern->get<std::string>());
      }
    } else if (auto list = StringList(*layers_pattern, "layers_pattern", limits, &problems)) {
      config.layers_pattern = *std::move(list);
    }
    for (const std::string& p : config.layers_pattern) {
      if (p.size() > limits.max_pattern_bytes) {
        problems.Add(absl::StrCat("layers_pattern entry of ", p.size(),
                                  " bytes is longer than the limit of ", limits.max_pattern_bytes));
        config.layers_pattern.clear();
        break;
      }
    }
  }
  if (target != nullptr && target->is_string()) {
    if (has_layers) {
      problems.Add(
          "layers_to_transform cannot be used when target_modules is a string (PEFT "
          "rejects this too)");
    }
    if (has_layers_pattern) {
      problems.Add(
          "layers_pattern cannot be used when target_modules is a string (PEFT "
          "rejects this too)");
    }
  }
  const bool layers_pattern_truthy =
      has_layers_pattern &&
      !(layers_pattern->is_string() ? layers_pattern->get<std::string>().empty()
                                    : layers_pattern->empty());
  if (layers_pattern_truthy && !has_layers) {
    problems.Add("layers_pattern is set but layers_to_transform is not (PEFT rejects this too)");
  }
  if (config.layers_pattern.empty()) {
    // Lazy: the first numbered segment is the layer index.
    if (auto regex =
            CompileOrReport(R"(.*?\.[^.]*\.(?P<idx>\d+)\.)", "the layer-index rule", &problems)) {
      patterns->layer_index.push_back(std::move(regex));
    }
  } else {
    for (const std::string& p : config.layers_pattern) {
      if (auto regex = CompileOrReport(absl::StrCat(R"((?:^|.*?\.))", p, R"(\.(?P<idx>\d+)\.)"),
                                       absl::StrCat("layers_pattern ", Quote(p)), &problems)) {
        patterns->layer_index.push_back(std::move(regex));
      }
    }
  }

  // ---- rank_pattern / alpha_pattern, in file order (nlohmann::json sorts keys, so the order
  // comes from a second, order-preserving parse of text the strict parser already accepted).
  const Json* rank_pattern = get("rank_pattern");
  const Json* alpha_pattern = get("alpha_pattern");
  const bool has_rank_pattern = rank_pattern != nullptr && !rank_pattern->is_null();
  const bool has_alpha_pattern = alpha_pattern != nullptr && !alpha_pattern->is_null();
  if (has_rank_pattern || has_alpha_pattern) {
    const nlohmann::ordered_json ordered =
        nlohmann::ordered_json::parse(json_text.begin(), json_text.end(), nullptr,
                                      /*allow_exceptions=*/false);
    for (const bool is_rank : {true, false}) {
      if (!(is_rank ? has_rank_pattern : has_alpha_pattern)) continue;
      const char* key = is_rank ? "rank_pattern" : "alpha_pattern";
      const auto it = ordered.find(key);
      if (ordered.is_discarded() || it == ordered.end()) {
        problems.Add(absl::StrCat(key, " could not be read in file order"));
        continue;
      }
      if (!it->is_object()) {
        problems.Add(absl::StrCat(key, " must be an object, found ",
                                  Show(*(is_rank ? rank_pattern : alpha_pattern))));
        continue;
      }
      if (it->size() > limits.max_list_entries) {
        problems.Add(absl::StrCat(key, " has ", it->size(), " entries, more than the limit of ",
                                  limits.max_list_entries));
        continue;
      }
      for (const auto& [pattern_key, value] : it->items()) {
        if (pattern_key.size() > limits.max_pattern_bytes) {
          problems.Add(absl::StrCat(key, " key of ", pattern_key.size(),
                                    " bytes is longer than the limit of ",
                                    limits.max_pattern_bytes));
          continue;
        }
        const std::string label = absl::StrCat(key, " key ", Quote(pattern_key));
        std::unique_ptr<PeftRegex> regex =
            CompileOrReport(absl::StrCat(R"((.*\.)?()", pattern_key, ")$"), label, &problems);
        if (is_rank) {
          if (!value.is_number_unsigned() || value.get<uint64_t>() < 1 ||
              value.get<uint64_t>() > (1u << 20)) {
            problems.Add(
                absl::StrCat(label, ": rank ", Show(value), " must be an integer in [1, 1048576]"));
            continue;
          }
          if (regex == nullptr) continue;
          config.rank_pattern.emplace_back(pattern_key,
                                           static_cast<int64_t>(value.get<uint64_t>()));
          patterns->rank_keys.push_back(std::move(regex));
        } else {
          if (!value.is_number() || !std::isfinite(value.get<double>())) {
            problems.Add(absl::StrCat(label, ": alpha ", Show(value), " must be a finite number"));
            continue;
          }
          if (regex == nullptr) continue;
          config.alpha_pattern.emplace_back(pattern_key, value.get<double>());
          patterns->alpha_keys.push_back(std::move(regex));
        }
      }
    }
  }

  if (!problems.empty()) return problems.ToStatus();
  std::sort(config.ignored_keys.begin(), config.ignored_keys.end());
  config.patterns = std::move(patterns);
  return config;
}

}  // namespace ls
