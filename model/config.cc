#include "model/config.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "common/mmap_file.h"
#include "common/status.h"

namespace ls {
namespace {

// Sizes, counts and token ids must fit int32: token ids are int32 everywhere, and with every
// dimension below 2^31 any product of two of them fits int64.
constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();
// config.json files are a few KiB; anything this large is not one.
constexpr size_t kMaxConfigBytes = 16 << 20;
// Values echoed into messages are cut to this many bytes.
constexpr size_t kMaxValueChars = 80;

constexpr double kDefaultRopeTheta = 10000.0;
constexpr double kDefaultRmsNormEps = 1e-6;
// Python's math.pi.
constexpr double kPi = 3.14159265358979323846;

// The JSON text of `value` for messages (strings keep their quotes), cut when long.
std::string Show(const Json& value) {
  std::string s = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > kMaxValueChars) {
    s.resize(kMaxValueChars);
    s += "...";
  }
  return s;
}

absl::Status Invalid(absl::string_view what, absl::string_view detail) {
  return absl::InvalidArgumentError(absl::StrCat(what, ": ", detail));
}

// Reads the keys of one JSON object; `prefix` ("", "rope_scaling.") names them in messages.
// A key whose value is null counts as absent, as transformers treats None as "use the default".
class Fields {
 public:
  Fields(const Json& object, absl::string_view what, std::string prefix = "")
      : object_(object), what_(what), prefix_(std::move(prefix)) {}

  absl::string_view what() const { return what_; }
  std::string Name(absl::string_view key) const { return absl::StrCat(prefix_, key); }

  const Json* Get(absl::string_view key) const {
    const auto it = object_.find(std::string(key));
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  absl::Status Error(absl::string_view key, absl::string_view detail) const {
    return Invalid(what_, absl::StrCat(Name(key), " ", detail));
  }
  // "<key> <value> <detail>".
  absl::Status ValueError(absl::string_view key, const Json& value,
                          absl::string_view detail) const {
    return Invalid(what_, absl::StrCat(Name(key), " ", Show(value), " ", detail));
  }
  absl::Status TypeError(absl::string_view key, const Json& value,
                         absl::string_view expected) const {
    return Invalid(what_, absl::StrCat(Name(key), " must be ", expected, ", found ", Show(value)));
  }
  absl::Status Missing(absl::string_view key) const {
    return Invalid(what_, absl::StrCat(Name(key), " is missing (required)"));
  }

  // An integer in [min, kMaxInt]; nullopt when absent.
  absl::StatusOr<std::optional<int64_t>> OptionalInt(absl::string_view key, int64_t min,
                                                     absl::string_view expected) const {
    const Json* v = Get(key);
    if (v == nullptr) return std::optional<int64_t>();
    if (v->is_number_unsigned()) {
      const uint64_t u = v->get<uint64_t>();
      if (u <= static_cast<uint64_t>(kMaxInt) && static_cast<int64_t>(u) >= min) {
        return std::optional<int64_t>(static_cast<int64_t>(u));
      }
      if (u > static_cast<uint64_t>(kMaxInt)) {
        return ValueError(key, *v, absl::StrCat("is too large (at most ", kMaxInt, ")"));
      }
    } else if (v->is_number_integer()) {
      const int64_t i = v->get<int64_t>();
      if (i >= min && i <= kMaxInt) return std::optional<int64_t>(i);
    }
    return TypeError(key, *v, expected);
  }
  absl::StatusOr<std::optional<int64_t>> OptionalPositiveInt(absl::string_view key) const {
    return OptionalInt(key, 1, "a positive integer");
  }
  absl::StatusOr<int64_t> RequiredPositiveInt(absl::string_view key) const {
    LS_ASSIGN_OR_RETURN(const std::optional<int64_t> v, OptionalPositiveInt(key));
    if (!v.has_value()) return Missing(key);
    return *v;
  }

  // A finite number; nullopt when absent.
  absl::StatusOr<std::optional<double>> OptionalNumber(absl::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) return std::optional<double>();
    if (!v->is_number() || !std::isfinite(v->get<double>())) {
      return TypeError(key, *v, "a finite number");
    }
    return std::optional<double>(v->get<double>());
  }
  // A finite number > 0.
  absl::StatusOr<std::optional<double>> OptionalPositiveNumber(absl::string_view key) const {
    LS_ASSIGN_OR_RETURN(const std::optional<double> v, OptionalNumber(key));
    if (v.has_value() && !(*v > 0.0)) return TypeError(key, *Get(key), "a positive number");
    return v;
  }

  absl::StatusOr<std::optional<bool>> OptionalBool(absl::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) return std::optional<bool>();
    if (!v->is_boolean()) return TypeError(key, *v, "true or false");
    return std::optional<bool>(v->get<bool>());
  }

  absl::StatusOr<std::optional<std::string>> OptionalString(absl::string_view key) const {
    const Json* v = Get(key);
    if (v == nullptr) return std::optional<std::string>();
    if (!v->is_string()) return TypeError(key, *v, "a string");
    return std::optional<std::string>(v->get<std::string>());
  }

 private:
  const Json& object_;
  absl::string_view what_;
  std::string prefix_;
};

absl::StatusOr<Json> ParseObject(absl::string_view text, absl::string_view what) {
  if (text.size() > kMaxConfigBytes) {
    return Invalid(
        what, absl::StrCat("file is ", text.size(), " bytes; expected at most ", kMaxConfigBytes));
  }
  LS_ASSIGN_OR_RETURN(Json root, ParseJsonStrict(text, what));
  if (!root.is_object()) {
    return Invalid(what, absl::StrCat("expected a JSON object, found ", JsonTypeName(root)));
  }
  return root;
}

// A token id in [0, vocab_size).
absl::StatusOr<int32_t> TokenId(const Fields& f, absl::string_view name, const Json& v,
                                int64_t vocab_size) {
  if (!v.is_number_integer()) return f.TypeError(name, v, "an integer token id");
  if (v.is_number_unsigned() ? v.get<uint64_t>() >= static_cast<uint64_t>(vocab_size)
                             : (v.get<int64_t>() < 0 || v.get<int64_t>() >= vocab_size)) {
    return f.ValueError(name, v, absl::StrCat("is out of range [0, vocab_size ", vocab_size, ")"));
  }
  return static_cast<int32_t>(v.get<int64_t>());
}

// Reads eos_token_id, bos_token_id and pad_token_id from `f` into `config` where present.
absl::Status ReadTokenIds(const Fields& f, ModelConfig& config) {
  const int64_t vocab = config.vocab_size;
  if (const Json* eos = f.Get("eos_token_id")) {
    std::vector<int32_t> ids;
    if (eos->is_array()) {
      for (size_t i = 0; i < eos->size(); ++i) {
        LS_ASSIGN_OR_RETURN(const int32_t id,
                            TokenId(f, absl::StrCat("eos_token_id[", i, "]"), (*eos)[i], vocab));
        ids.push_back(id);
      }
    } else if (eos->is_number_integer()) {
      LS_ASSIGN_OR_RETURN(const int32_t id, TokenId(f, "eos_token_id", *eos, vocab));
      ids.push_back(id);
    } else {
      return f.TypeError("eos_token_id", *eos, "an integer token id or a list of them");
    }
    config.eos_token_ids = std::move(ids);
  }
  if (const Json* bos = f.Get("bos_token_id")) {
    LS_ASSIGN_OR_RETURN(config.bos_token_id, TokenId(f, "bos_token_id", *bos, vocab));
  }
  if (const Json* pad = f.Get("pad_token_id")) {
    if (pad->is_number_integer() && !pad->is_number_unsigned() && pad->get<int64_t>() < 0) {
      config.pad_token_id.reset();
    } else {
      LS_ASSIGN_OR_RETURN(config.pad_token_id, TokenId(f, "pad_token_id", *pad, vocab));
    }
  }
  return absl::OkStatus();
}

// `partial_rotary_factor` (top level or inside the RoPE dict) rotates only part of each head;
// transformers' Llama honours it, we do not.
absl::Status CheckPartialRotary(const Fields& f) {
  LS_ASSIGN_OR_RETURN(const std::optional<double> p, f.OptionalNumber("partial_rotary_factor"));
  if (p.has_value() && *p != 1.0) {
    return f.ValueError("partial_rotary_factor", *f.Get("partial_rotary_factor"),
                        "is not supported (only 1.0: RoPE over the whole head)");
  }
  return absl::OkStatus();
}

// RoPE: `rope_scaling` (transformers 4) or `rope_parameters` (5). Sets rope_theta and
// rope_scaling.
absl::Status ReadRope(const Fields& top, ModelConfig& config) {
  const Json* scaling = top.Get("rope_scaling");
  const Json* parameters = top.Get("rope_parameters");
  if (scaling != nullptr && parameters != nullptr) {
    return Invalid(top.what(),
                   "both rope_scaling and rope_parameters are set; expected at most one");
  }
  LS_ASSIGN_OR_RETURN(const std::optional<double> top_theta,
                      top.OptionalPositiveNumber("rope_theta"));
  config.rope_theta = top_theta.value_or(kDefaultRopeTheta);
  const absl::string_view key = scaling != nullptr ? "rope_scaling" : "rope_parameters";
  const Json* dict = scaling != nullptr ? scaling : parameters;
  if (dict == nullptr) return absl::OkStatus();
  if (!dict->is_object()) return top.TypeError(key, *dict, "an object or null");

  std::string prefix = absl::StrCat(key, ".");
  // transformers 5 may nest the parameters per layer type ({"full_attention": {...}}). Every
  // layer of these models runs the same RoPE, so the nested dicts must agree.
  bool nested = !dict->empty();
  for (const auto& item : dict->items()) nested = nested && item.value().is_object();
  if (nested) {
    for (const auto& item : dict->items()) {
      if (item.value() != dict->begin().value()) {
        return Invalid(top.what(),
                       absl::StrCat(key, " differs between layer types (", dict->begin().key(),
                                    " vs ", item.key(), "); per-layer RoPE is not supported"));
      }
    }
    absl::StrAppend(&prefix, dict->begin().key(), ".");
    dict = &dict->begin().value();
  }
  const Fields f(*dict, top.what(), prefix);

  LS_ASSIGN_OR_RETURN(const std::optional<double> theta, f.OptionalPositiveNumber("rope_theta"));
  if (theta.has_value()) config.rope_theta = *theta;
  LS_RETURN_IF_ERROR(CheckPartialRotary(f));

  // "rope_type" wins over the older "type", as in transformers; both set and different is
  // ambiguous.
  LS_ASSIGN_OR_RETURN(const std::optional<std::string> rope_type, f.OptionalString("rope_type"));
  LS_ASSIGN_OR_RETURN(const std::optional<std::string> old_type, f.OptionalString("type"));
  if (rope_type.has_value() && old_type.has_value() && *rope_type != *old_type) {
    return Invalid(top.what(),
                   absl::StrCat(f.Name("rope_type"), " ", Show(*f.Get("rope_type")), " and ",
                                f.Name("type"), " ", Show(*f.Get("type")), " disagree"));
  }
  const absl::string_view type_key = rope_type.has_value() ? "rope_type" : "type";
  const std::string type = rope_type.value_or(old_type.value_or("default"));

  RopeScaling& rs = config.rope_scaling;
  rs = RopeScaling();
  if (type == "default") return absl::OkStatus();
  if (type != "linear" && type != "llama3") {
    return f.ValueError(type_key, *f.Get(type_key), "is not supported (supported: linear, llama3)");
  }
  LS_ASSIGN_OR_RETURN(const std::optional<double> factor, f.OptionalPositiveNumber("factor"));
  if (!factor.has_value()) return f.Missing("factor");
  rs.factor = *factor;
  if (type == "linear") {
    rs.type = RopeScalingType::kLinear;
    return absl::OkStatus();
  }
  rs.type = RopeScalingType::kLlama3;
  LS_ASSIGN_OR_RETURN(const std::optional<double> low, f.OptionalPositiveNumber("low_freq_factor"));
  if (!low.has_value()) return f.Missing("low_freq_factor");
  LS_ASSIGN_OR_RETURN(const std::optional<double> high,
                      f.OptionalPositiveNumber("high_freq_factor"));
  if (!high.has_value()) return f.Missing("high_freq_factor");
  if (!(*high > *low)) {
    return f.ValueError("high_freq_factor", *f.Get("high_freq_factor"),
                        absl::StrCat("must be greater than ", f.Name("low_freq_factor"), " ",
                                     Show(*f.Get("low_freq_factor"))));
  }
  LS_ASSIGN_OR_RETURN(const int64_t old_ctx,
                      f.RequiredPositiveInt("original_max_position_embeddings"));
  rs.low_freq_factor = *low;
  rs.high_freq_factor = *high;
  rs.original_max_position_embeddings = old_ctx;
  return absl::OkStatus();
}

// Keys that change the math and that we do not implement.
absl::Status CheckUnsupported(const Fields& f, ModelType type) {
  if (const Json* q = f.Get("quantization_config")) {
    std::string method;
    if (q->is_object() && q->contains("quant_method")) {
      method = absl::StrCat(" (quant_method ", Show((*q)["quant_method"]), ")");
    }
    return Invalid(f.what(), absl::StrCat("quantization_config is present", method,
                                          ": quantized checkpoints are not supported"));
  }
  LS_ASSIGN_OR_RETURN(const std::optional<std::string> act, f.OptionalString("hidden_act"));
  // transformers' ACT2FN maps "swish" to the same SiLU.
  if (act.has_value() && *act != "silu" && *act != "swish") {
    return f.ValueError("hidden_act", *f.Get("hidden_act"), "is not supported (supported: silu)");
  }
  LS_ASSIGN_OR_RETURN(const std::optional<int64_t> tp, f.OptionalPositiveInt("pretraining_tp"));
  if (tp.has_value() && *tp > 1) {
    return f.ValueError("pretraining_tp", *f.Get("pretraining_tp"),
                        "is not supported (only 1: unsliced projections)");
  }
  LS_ASSIGN_OR_RETURN(const std::optional<bool> mlp_bias, f.OptionalBool("mlp_bias"));
  if (mlp_bias.value_or(false)) {
    return f.ValueError("mlp_bias", *f.Get("mlp_bias"),
                        "is not supported (MLP projections without bias only)");
  }
  LS_ASSIGN_OR_RETURN(const std::optional<bool> attention_bias, f.OptionalBool("attention_bias"));
  if (type == ModelType::kMistral && attention_bias.value_or(false)) {
    return f.ValueError("attention_bias", *f.Get("attention_bias"),
                        "is not supported for mistral (its attention has no biases)");
  }
  return CheckPartialRotary(f);
}

absl::StatusOr<ModelConfig> ParseImpl(absl::string_view config_json, absl::string_view what,
                                      absl::string_view generation_json,
                                      absl::string_view generation_what,
                                      const ConfigOptions& opts) {
  LS_ASSIGN_OR_RETURN(const Json root, ParseObject(config_json, what));
  const Fields f(root, what);
  ModelConfig c;

  LS_ASSIGN_OR_RETURN(const std::optional<std::string> model_type, f.OptionalString("model_type"));
  if (!model_type.has_value()) return f.Missing("model_type");
  if (*model_type == "llama") {
    c.model_type = ModelType::kLlama;
  } else if (*model_type == "mistral") {
    c.model_type = ModelType::kMistral;
  } else if (*model_type == "qwen2") {
    c.model_type = ModelType::kQwen2;
  } else {
    return f.ValueError("model_type", *f.Get("model_type"),
                        "is not supported (supported: llama, mistral, qwen2)");
  }
  if (const Json* arch = f.Get("architectures")) {
    if (!arch->is_array() || (!arch->empty() && !(*arch)[0].is_string())) {
      return f.TypeError("architectures", *arch, "a list of strings");
    }
    if (!arch->empty()) c.architecture = (*arch)[0].get<std::string>();
  }
  LS_RETURN_IF_ERROR(CheckUnsupported(f, c.model_type));

  LS_ASSIGN_OR_RETURN(c.vocab_size, f.RequiredPositiveInt("vocab_size"));
  LS_ASSIGN_OR_RETURN(c.hidden_size, f.RequiredPositiveInt("hidden_size"));
  LS_ASSIGN_OR_RETURN(c.intermediate_size, f.RequiredPositiveInt("intermediate_size"));
  LS_ASSIGN_OR_RETURN(const int64_t layers, f.RequiredPositiveInt("num_hidden_layers"));
  LS_ASSIGN_OR_RETURN(const int64_t heads, f.RequiredPositiveInt("num_attention_heads"));
  LS_ASSIGN_OR_RETURN(const std::optional<int64_t> kv_heads,
                      f.OptionalPositiveInt("num_key_value_heads"));
  LS_ASSIGN_OR_RETURN(const std::optional<int64_t> head_dim, f.OptionalPositiveInt("head_dim"));
  LS_ASSIGN_OR_RETURN(c.max_position_embeddings, f.RequiredPositiveInt("max_position_embeddings"));
  c.num_hidden_layers = static_cast<int>(layers);
  c.num_attention_heads = static_cast<int>(heads);
  c.num_key_value_heads = static_cast<int>(kv_heads.value_or(heads));

  if (head_dim.has_value()) {
    c.head_dim = static_cast<int>(*head_dim);
  } else {
    if (c.hidden_size % heads != 0) {
      return Invalid(what, absl::StrCat("hidden_size ", c.hidden_size,
                                        " is not divisible by num_attention_heads ", heads,
                                        " (and head_dim is not given)"));
    }
    c.head_dim = static_cast<int>(c.hidden_size / heads);
  }
  if (c.head_dim % 2 != 0) {
    return Invalid(what, absl::StrCat("head_dim ", c.head_dim, head_dim ? "" : " (derived)",
                                      " must be even (RoPE rotates pairs)"));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return Invalid(
        what, absl::StrCat("num_attention_heads ", c.num_attention_heads,
                           " is not divisible by num_key_value_heads ", c.num_key_value_heads));
  }
  if (c.q_dim() > kMaxInt) {
    return Invalid(what, absl::StrCat("num_attention_heads * head_dim = ", c.q_dim(),
                                      " is too large (at most ", kMaxInt, ")"));
  }

  LS_ASSIGN_OR_RETURN(const std::optional<double> eps, f.OptionalPositiveNumber("rms_norm_eps"));
  c.rms_norm_eps = eps.value_or(kDefaultRmsNormEps);
  LS_ASSIGN_OR_RETURN(const std::optional<bool> tie, f.OptionalBool("tie_word_embeddings"));
  c.tie_word_embeddings = tie.value_or(false);

  LS_ASSIGN_OR_RETURN(const std::optional<bool> attention_bias, f.OptionalBool("attention_bias"));
  switch (c.model_type) {
    case ModelType::kQwen2:
      // Qwen2's attention hard-codes q/k/v biases and none on o_proj; attention_bias is not read.
      c.attention_qkv_bias = true;
      c.attention_o_bias = false;
      break;
    case ModelType::kLlama:
      c.attention_qkv_bias = c.attention_o_bias = attention_bias.value_or(false);
      break;
    case ModelType::kMistral:
      break;
  }

  LS_ASSIGN_OR_RETURN(std::optional<std::string> dtype, f.OptionalString("torch_dtype"));
  if (!dtype.has_value()) {
    LS_ASSIGN_OR_RETURN(dtype, f.OptionalString("dtype"));
  }
  c.torch_dtype = dtype.value_or("");

  LS_RETURN_IF_ERROR(ReadRope(f, c));
  LS_RETURN_IF_ERROR(ReadTokenIds(f, c));

  // The effective context length.
  if (opts.max_model_len < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_model_len ", opts.max_model_len,
                                                   " must be >= 0 (0: use ", what,
                                                   " max_position_embeddings)"));
  }
  if (opts.max_model_len > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("max_model_len ", opts.max_model_len,
                                                   " exceeds ", what, " max_position_embeddings ",
                                                   c.max_position_embeddings));
  }
  c.max_model_len = opts.max_model_len == 0 ? c.max_position_embeddings : opts.max_model_len;

  // Sliding-window attention. Llama has none (transformers' LlamaAttention never reads the
  // key); Qwen2 uses it only with use_sliding_window; Mistral whenever sliding_window is set.
  // A window at least max_model_len long masks nothing, so it is accepted.
  if (c.model_type != ModelType::kLlama) {
    bool active = true;
    if (c.model_type == ModelType::kQwen2) {
      LS_ASSIGN_OR_RETURN(const std::optional<bool> use, f.OptionalBool("use_sliding_window"));
      active = use.value_or(false);
    }
    LS_ASSIGN_OR_RETURN(const std::optional<int64_t> window,
                        f.OptionalPositiveInt("sliding_window"));
    if (active && window.has_value()) {
      if (*window < c.max_model_len) {
        return Invalid(what, absl::StrCat("sliding_window ", *window,
                                          " is smaller than max_model_len ", c.max_model_len,
                                          ": sliding-window attention is not supported (a "
                                          "max_model_len of at most ",
                                          *window, " makes the window inert)"));
      }
      c.sliding_window = *window;
    }
  }

  if (!generation_json.empty()) {
    LS_ASSIGN_OR_RETURN(const Json gen, ParseObject(generation_json, generation_what));
    LS_RETURN_IF_ERROR(ReadTokenIds(Fields(gen, generation_what), c));
  }
  return c;
}

// The whole file as a string. NOT_FOUND (from MappedFile) when it does not exist.
absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  LS_ASSIGN_OR_RETURN(const std::unique_ptr<MappedFile> file, MappedFile::Open(path));
  if (file->size() > kMaxConfigBytes) {
    return Invalid(
        path, absl::StrCat("file is ", file->size(), " bytes; expected at most ", kMaxConfigBytes));
  }
  return std::string(reinterpret_cast<const char*>(file->data()), file->size());
}

}  // namespace

absl::string_view ModelTypeName(ModelType type) {
  switch (type) {
    case ModelType::kLlama:
      return "llama";
    case ModelType::kMistral:
      return "mistral";
    case ModelType::kQwen2:
      return "qwen2";
  }
  return "unknown";
}

absl::string_view RopeScalingTypeName(RopeScalingType type) {
  switch (type) {
    case RopeScalingType::kNone:
      return "default";
    case RopeScalingType::kLinear:
      return "linear";
    case RopeScalingType::kLlama3:
      return "llama3";
  }
  return "unknown";
}

std::vector<float> ModelConfig::RopeInvFreq() const {
  // Each step is its own statement in float32, in transformers' order, so that no compiler can
  // fuse or reassociate across torch's rounding points.
  const int half = head_dim / 2;
  const float base = static_cast<float>(rope_theta);
  const float dim = static_cast<float>(head_dim);
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / dim;
    const float power = std::pow(base, exponent);  // float overload: powf
    inv_freq[static_cast<size_t>(i)] = 1.0f / power;
  }
  const float factor = static_cast<float>(rope_scaling.factor);
  switch (rope_scaling.type) {
    case RopeScalingType::kNone:
      break;
    case RopeScalingType::kLinear:
      for (float& f : inv_freq) f = f / factor;
      break;
    case RopeScalingType::kLlama3: {
      // Python computes these in double; torch then compares and divides in float32.
      const double old_ctx = static_cast<double>(rope_scaling.original_max_position_embeddings);
      const float low_freq_wavelen = static_cast<float>(old_ctx / rope_scaling.low_freq_factor);
      const float high_freq_wavelen = static_cast<float>(old_ctx / rope_scaling.high_freq_factor);
      const float band =
          static_cast<float>(rope_scaling.high_freq_factor - rope_scaling.low_freq_factor);
      const float low_freq_factor = static_cast<float>(rope_scaling.low_freq_factor);
      const float old_ctx_f = static_cast<float>(old_ctx);
      const float two_pi = static_cast<float>(2.0 * kPi);
      for (float& f : inv_freq) {
        const float wavelen = two_pi / f;
        const float scaled = f / factor;
        const float llama = wavelen > low_freq_wavelen ? scaled : f;
        const float ratio = old_ctx_f / wavelen;
        const float shifted = ratio - low_freq_factor;
        const float smooth = shifted / band;
        const float one_minus = 1.0f - smooth;
        const float low_part_num = one_minus * llama;
        const float low_part = low_part_num / factor;
        const float high_part = smooth * llama;
        const float smoothed = low_part + high_part;
        const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
        f = medium ? smoothed : llama;
      }
      break;
    }
  }
  return inv_freq;
}

std::string ModelConfig::Summary() const {
  std::string rope =
      absl::StrCat("rope_theta=", rope_theta, " rope=", RopeScalingTypeName(rope_scaling.type));
  if (rope_scaling.type != RopeScalingType::kNone) {
    absl::StrAppend(&rope, "(factor=", rope_scaling.factor);
    if (rope_scaling.type == RopeScalingType::kLlama3) {
      absl::StrAppend(
          &rope, ", low_freq_factor=", rope_scaling.low_freq_factor,
          ", high_freq_factor=", rope_scaling.high_freq_factor,
          ", original_max_position_embeddings=", rope_scaling.original_max_position_embeddings);
    }
    absl::StrAppend(&rope, ")");
  }
  return absl::StrCat(
      ModelTypeName(model_type), architecture.empty() ? "" : absl::StrCat(" (", architecture, ")"),
      ": layers=", num_hidden_layers, " hidden=", hidden_size, " intermediate=", intermediate_size,
      " heads=", num_attention_heads, " kv_heads=", num_key_value_heads, " head_dim=", head_dim,
      " vocab=", vocab_size, " ", rope, " rms_norm_eps=", rms_norm_eps,
      " tied=", tie_word_embeddings ? "yes" : "no", " qkv_bias=", attention_qkv_bias ? "yes" : "no",
      " o_bias=", attention_o_bias ? "yes" : "no",
      " max_position_embeddings=", max_position_embeddings, " max_model_len=", max_model_len,
      " eos=[", absl::StrJoin(eos_token_ids, ","), "]",
      torch_dtype.empty() ? "" : " torch_dtype=", torch_dtype);
}

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view config_json,
                                             absl::string_view generation_config_json_or_empty,
                                             const ConfigOptions& opts) {
  return ParseImpl(config_json, "config.json", generation_config_json_or_empty,
                   "generation_config.json", opts);
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir,
                                            const ConfigOptions& opts) {
  const std::string config_path = model_dir + "/config.json";
  const std::string generation_path = model_dir + "/generation_config.json";
  LS_ASSIGN_OR_RETURN(const std::string config_json, ReadSmallFile(config_path));
  std::string generation_json;
  absl::StatusOr<std::string> generation = ReadSmallFile(generation_path);
  if (generation.ok()) {
    generation_json = *std::move(generation);
    if (generation_json.empty()) {
      return Invalid(generation_path, "file is empty; expected a JSON object");
    }
  } else if (!absl::IsNotFound(generation.status())) {
    return generation.status();
  }
  return ParseImpl(config_json, config_path, generation_json, generation_path, opts);
}

}  // namespace ls
