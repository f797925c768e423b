// libFuzzer target for adapter_config.json (model/peft_config.h) and the loader's use of it
// (model/lora_adapter.h).
//
// Each input is the text of an adapter_config.json. Beyond "no crash, no sanitizer report, no
// hang" (patterns are Python regexes run on PCRE2 under match limits), the target checks:
//   - ParsePeftLoraConfig either succeeds or fails with INVALID_ARGUMENT naming the file;
//   - an accepted config has r >= 1, finite alphas, ranks >= 1, and answers Targets / RankFor /
//     AlphaFor for every module name of a small Llama (plus names that are not modules) with
//     either a value or RESOURCE_EXHAUSTED (a pattern over its match limits), and Scale() of
//     those answers is finite;
//   - LoadLoraAdapter of the config against a fixed, valid q_proj/v_proj adapter of that model
//     returns OK or INVALID_ARGUMENT, never anything else, and an accepted adapter's groups are
//     consistent (slice ranks add up, scales finite).
// A broken check calls __builtin_trap(), which libFuzzer reports as a crash.
//
// Run: tests/fuzz/run_fuzz.sh BUILD_DIR SECONDS adapter_config (see docs/fuzzing.md).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "model/config.h"
#include "model/lora_adapter.h"
#include "model/peft_config.h"
#include "model/safetensors.h"

namespace {

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

// hidden 16, 4 heads of 4, 2 KV heads (Q 16, KV 8), intermediate 24, vocab 32, 2 layers.
const ls::ModelConfig& Base() {
  static const ls::ModelConfig* config = [] {
    const char* json =
        R"({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64})";
    absl::StatusOr<ls::ModelConfig> c = ls::ParseModelConfig(json, "", {});
    Check(c.ok());
    return new ls::ModelConfig(*c);
  }();
  return *config;
}

// lora_A/lora_B of q_proj and v_proj in both layers, rank 8 (PEFT's default r), F32.
const ls::SafetensorsFile& Weights() {
  static const std::string* bytes = [] {
    std::vector<ls::SafetensorsTensorRef> refs;
    static std::vector<std::vector<uint8_t>> data;
    auto add = [&](std::string name, int64_t rows, int64_t cols) {
      std::vector<float> values(static_cast<size_t>(rows * cols));
      for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i % 7) / 8.f;
      std::vector<uint8_t> raw(values.size() * 4);
      std::memcpy(raw.data(), values.data(), raw.size());
      data.push_back(std::move(raw));
      refs.push_back({std::move(name), ls::DType::kF32, {rows, cols}, {}});
    };
    for (int layer = 0; layer < 2; ++layer) {
      const std::string p = absl::StrCat("base_model.model.model.layers.", layer, ".self_attn.");
      add(p + "q_proj.lora_A.weight", 8, 16);
      add(p + "q_proj.lora_B.weight", 16, 8);
      add(p + "v_proj.lora_A.weight", 8, 16);
      add(p + "v_proj.lora_B.weight", 8, 8);
    }
    for (size_t i = 0; i < refs.size(); ++i) refs[i].data = data[i];
    absl::StatusOr<std::string> s = ls::SerializeSafetensors(refs);
    Check(s.ok());
    return new std::string(*s);
  }();
  static const ls::SafetensorsFile* file = [] {
    auto f = ls::SafetensorsFile::Parse(
        absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size()));
    Check(f.ok());
    return f->release();
  }();
  return *file;
}

const std::vector<std::string>& ModuleNames() {
  static const std::vector<std::string>* names = [] {
    auto* n =
        new std::vector<std::string>{"model",        "model.embed_tokens", "lm_head", "model.norm",
                                     "model.layers", "layers.0.q_proj",    ""};
    for (int l = 0; l < 2; ++l) {
      for (const char* m :
           {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp", "self_attn", "mlp.act_fn"}) {
        n->push_back(absl::StrCat("model.layers.", l, ".", m));
      }
    }
    return n;
  }();
  return *names;
}

bool OkOrExhausted(const absl::Status& s) {
  return s.ok() || s.code() == absl::StatusCode::kResourceExhausted;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view text(reinterpret_cast<const char*>(data), size);
  const absl::StatusOr<ls::PeftLoraConfig> config = ls::ParsePeftLoraConfig(text);
  if (!config.ok()) {
    Check(config.status().code() == absl::StatusCode::kInvalidArgument);
    Check(absl::StartsWith(config.status().message(), "adapter_config.json"));
  } else {
    Check(config->r >= 1);
    Check(std::isfinite(config->lora_alpha));
    Check(config->patterns != nullptr);
    for (const auto& [key, rank] : config->rank_pattern) Check(rank >= 1);
    for (const auto& [key, alpha] : config->alpha_pattern) Check(std::isfinite(alpha));
    (void)config->DescribeTargets();
    for (const std::string& name : ModuleNames()) {
      const absl::StatusOr<bool> targeted = config->Targets(name, absl::EndsWith(name, "proj"));
      Check(OkOrExhausted(targeted.status()));
      const absl::StatusOr<int64_t> rank = config->RankFor(name);
      const absl::StatusOr<double> alpha = config->AlphaFor(name);
      Check(OkOrExhausted(rank.status()) && OkOrExhausted(alpha.status()));
      if (rank.ok() && alpha.ok()) {
        Check(*rank >= 1);
        Check(std::isfinite(config->Scale(*rank, *alpha)));
      }
    }
  }

  ls::LoraLoadOptions options;
  options.dtype = ls::DType::kF32;
  const absl::StatusOr<std::unique_ptr<ls::LoraAdapter>> adapter =
      ls::LoadLoraAdapter(text, Weights(), Base(), options);
  if (!adapter.ok()) {
    Check(adapter.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  Check(config.ok());
  const ls::LoraAdapter& a = **adapter;
  Check(a.packed_bytes() % ls::LoraAdapter::kPackAlignment == 0);
  for (int layer = 0; layer < a.num_layers(); ++layer) {
    for (int p = 0; p < ls::kNumLoraProjections; ++p) {
      const ls::LoraGroup& g = a.group(layer, static_cast<ls::LoraProjection>(p));
      int32_t total = 0;
      for (int j = 0; j < g.num_slices; ++j) {
        Check(g.slices[j].rank_offset == total);
        Check(g.slices[j].rank == 8);
        Check(std::isfinite(g.slices[j].scale));
        total += g.slices[j].rank;
      }
      Check(total == g.rank_total);
    }
  }
  return 0;
}
