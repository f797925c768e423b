// A PEFT LoRA adapter loaded for one base model: adapter_config.json (model/peft_config.h) plus
// adapter_model.safetensors, validated against the base model and packed, in the compute dtype,
// into one contiguous buffer that the LoRA kernels read through LoraGroups (kernels/lora.h).
//
// Tensor names (PEFT's save_pretrained, utils/save_and_load.py):
//   [base_model.model.]<module>.lora_A[.<adapter>].weight           [r, in]      nn.Linear
//   [base_model.model.]<module>.lora_B[.<adapter>].weight           [out, r]
//   [base_model.model.]model.embed_tokens.lora_embedding_A[.<adapter>]   [r, vocab]
//   [base_model.model.]model.embed_tokens.lora_embedding_B[.<adapter>]   [hidden, r]
// where <module> is model.layers.N.self_attn.{q,k,v,o}_proj, model.layers.N.mlp.{gate,up,down}_proj
// or lm_head. The "base_model.model." prefix and the adapter-name infix (".default") are
// optional; one file uses one infix throughout. PEFT also saves a copy of the base embedding
// (model.embed_tokens.base_layer.weight, lm_head.base_layer.weight, or model.embed_tokens.weight /
// lm_head.weight after a resize) when embed_tokens or lm_head is targeted; such a copy is accepted
// only when it equals the base model's own weights (LoraLoadOptions::base_weights), since an
// adapter cannot replace base weights here.
//
// The tensors are the truth and the config must agree with them: every targeted module (PEFT's
// matching rules over this model's module names) has a complete A/B pair, every pair belongs to
// a targeted module, and each pair's rank (from its shapes) equals the config's rank for that
// module (r, or its rank_pattern entry). Scales are per module: alpha / r, or alpha / sqrt(r)
// with rsLoRA, alpha from alpha_pattern or lora_alpha, computed in double (as Python does) and
// rounded to float.
//
// Disk dtypes F32, F16 and BF16 load into the compute dtype (BF16 or F32) with the conversions of
// model/weights.h (F32/F16 -> BF16 round to nearest even; widening exact). Every value must be
// finite on disk and after conversion (a large F32 can overflow BF16).
#ifndef LORASERVE_MODEL_LORA_ADAPTER_H_
#define LORASERVE_MODEL_LORA_ADAPTER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"
#include "kernels/lora.h"
#include "model/config.h"
#include "model/peft_config.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace ls {

// The fused projection groups of one decoder layer (model/weights.h LayerWeights).
enum class LoraProjection : uint8_t {
  kQkv = 0,     // slices q, k, v at out_offset 0, Q, Q + KV (those present, in that order)
  kO = 1,       // one slice
  kGateUp = 2,  // slices gate, up at out_offset 0, I
  kDown = 3,    // one slice
};
inline constexpr int kNumLoraProjections = 4;

// The modules a LoRA adapter may target in a Llama-family model.
enum class LoraModule : uint8_t { kQ, kK, kV, kO, kGate, kUp, kDown, kLmHead, kEmbedTokens };
inline constexpr int kNumLoraModules = 9;
// "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
// "embed_tokens".
absl::string_view LoraModuleName(LoraModule module);

struct LoraLoadOptions {
  // The dtype every A and B is stored in: kBF16 or kF32.
  DType dtype = DType::kBF16;
  // Largest rank accepted for any module (the kernels' and the page pool's bound).
  int32_t max_lora_rank = 256;
  // The base model's weights, used only to check copies of the embedding / lm_head that PEFT
  // saves alongside adapters targeting them. Null: such a copy is an error. Not retained.
  const ModelWeights* base_weights = nullptr;
  // Names the adapter at the start of every error message ("adapter \"<name>\": ...") and in the
  // report; e.g. the adapter id or directory.
  std::string name = "adapter";
  // Recorded in the report (model/adapter_store.h computes it); not checked.
  std::string version;
  // An error lists every problem, up to this many lines, then "... and N more".
  size_t max_problem_lines = 100;
};

// One targeted module as loaded.
struct LoraModuleReport {
  std::string name;  // the transformers module name, e.g. "model.layers.0.self_attn.q_proj"
  LoraModule module = LoraModule::kQ;
  int layer = -1;  // -1 for lm_head and embed_tokens
  int32_t rank = 0;
  double alpha = 0.0;
  float scale = 0.f;
  DType disk_dtype = DType::kF32;  // of lora_A (lora_B may differ)
};

// Aggregate over every loaded module of one kind.
struct LoraModuleKindReport {
  LoraModule module = LoraModule::kQ;
  int count = 0;  // layers (1 for lm_head / embed_tokens)
  int32_t rank_min = 0;
  int32_t rank_max = 0;
  double alpha_min = 0.0;
  double alpha_max = 0.0;
  float scale_min = 0.f;
  float scale_max = 0.f;
};

struct LoraAdapterReport {
  std::string name;
  std::string version;
  // From adapter_config.json.
  std::string peft_version;
  std::string base_model_name_or_path;
  int64_t r = 0;
  double lora_alpha = 0.0;
  bool use_rslora = false;
  std::string target_modules;  // PeftLoraConfig::DescribeTargets()
  size_t num_rank_pattern = 0;
  size_t num_alpha_pattern = 0;
  std::vector<std::string> ignored_config_keys;

  std::vector<LoraModuleReport> modules;    // by layer, then q k v o gate up down; then
                                            // lm_head, embed_tokens
  std::vector<LoraModuleKindReport> kinds;  // kinds with at least one module, in enum order
  int num_layers_touched = 0;               // decoder layers with at least one module

  std::vector<DType> disk_dtypes;  // distinct dtypes of the LoRA tensors, in enum order
  DType dtype = DType::kBF16;      // in memory
  uint64_t disk_bytes = 0;         // LoRA tensors' bytes in the file
  size_t packed_bytes = 0;         // LoraAdapter::packed_bytes()
  int64_t num_parameters = 0;      // elements of every A and B
  // Tensor-name forms met: whether names carried "base_model.model.", and the adapter-name infix
  // (empty when none).
  bool names_prefixed = false;
  std::string adapter_infix;
  // Verified copies of base weights that were skipped (tensor names).
  std::vector<std::string> skipped_base_copies;

  // One line: name, version prefix, modules per kind with rank range, scales, dtypes, bytes.
  std::string Summary() const;
};

class LoraAdapter;

// A LoraGroup for every projection of every layer plus lm_head and embed_tokens, pointing into
// one packed buffer. Groups of projections the adapter does not touch have num_slices == 0.
// Plain data; copyable; does not own the buffer it points into.
class LoraGroupTable {
 public:
  LoraGroupTable() = default;

  int num_layers() const { return num_layers_; }
  // 0 <= layer < num_layers (not checked: this is on the step path).
  const LoraGroup& group(int layer, LoraProjection which) const {
    return groups_[static_cast<size_t>(layer) * kNumLoraProjections + static_cast<size_t>(which)];
  }
  const LoraGroup& lm_head() const { return groups_[groups_.size() - 2]; }
  // a is A transposed, [vocab, rank] (kernels/lora.h); slices[0].b is [hidden, rank].
  const LoraGroup& embed() const { return groups_[groups_.size() - 1]; }

 private:
  friend class LoraAdapter;
  friend absl::StatusOr<std::unique_ptr<LoraAdapter>> LoadLoraAdapter(absl::string_view,
                                                                      const SafetensorsFile&,
                                                                      const ModelConfig&,
                                                                      const LoraLoadOptions&);
  int num_layers_ = 0;
  std::vector<LoraGroup> groups_;  // num_layers * 4 + 2
};

// A loaded adapter. It owns a host copy of its packed buffer and the group table over it; the
// same bytes can be copied anywhere else (a device page of the adapter pool) with PackInto and
// addressed there through GroupsAt.
//
// Layout of the packed buffer: for each layer, for each projection in LoraProjection order, the
// group's stacked A [rank_total, in] and then each slice's B [out_j, rank_j]; then lm_head, then
// embed_tokens (A transposed). Every matrix starts at a multiple of kPackAlignment bytes and
// packed_bytes() is a multiple of it. The bytes are position-independent: no pointers inside.
//
// Thread safety: immutable after LoadLoraAdapter; every method is const and may be called from
// any number of threads.
class LoraAdapter {
 public:
  static constexpr size_t kPackAlignment = 256;

  LoraAdapter(const LoraAdapter&) = delete;
  LoraAdapter& operator=(const LoraAdapter&) = delete;
  ~LoraAdapter();

  int num_layers() const { return host_groups_.num_layers(); }
  DType dtype() const { return report_.dtype; }

  // Views into the host copy.
  const LoraGroupTable& groups() const { return host_groups_; }
  const LoraGroup& group(int layer, LoraProjection which) const {
    return host_groups_.group(layer, which);
  }
  const LoraGroup& lm_head() const { return host_groups_.lm_head(); }
  const LoraGroup& embed() const { return host_groups_.embed(); }

  // The packed buffer: packed_bytes() bytes at packed_data() (host memory, kPackAlignment
  // aligned). A device placement copies these bytes as they are (cudaMemcpy from packed_data()).
  size_t packed_bytes() const { return packed_bytes_; }
  const void* packed_data() const { return packed_; }

  // Copies the packed bytes to host memory at `dst`, which must hold packed_bytes() bytes and be
  // kPackAlignment aligned (INVALID_ARGUMENT otherwise; nothing is written).
  absl::Status PackInto(void* dst, size_t dst_bytes) const;
  // The group table for a copy of the packed bytes placed at `base` (host or device address;
  // never dereferenced here). `base` must be kPackAlignment aligned for the kernels' loads.
  LoraGroupTable GroupsAt(const void* base) const;

  const LoraAdapterReport& report() const { return report_; }

 private:
  friend absl::StatusOr<std::unique_ptr<LoraAdapter>> LoadLoraAdapter(absl::string_view,
                                                                      const SafetensorsFile&,
                                                                      const ModelConfig&,
                                                                      const LoraLoadOptions&);

  // Where one group's matrices live in the packed buffer.
  struct GroupOffsets {
    size_t a = 0;
    size_t b[kMaxLoraSlices] = {};
  };

  LoraAdapter() = default;

  uint8_t* packed_ = nullptr;  // aligned allocation, freed in the destructor
  size_t packed_bytes_ = 0;
  // The table with null data pointers, and where each group's matrices are.
  LoraGroupTable layout_;
  std::vector<GroupOffsets> offsets_;
  LoraGroupTable host_groups_;
  LoraAdapterReport report_;
};

// Validates `config_json` (adapter_config.json's text) and `weights` (adapter_model.safetensors,
// already parsed, which rejects hostile files) against `base` and loads them. Every problem found
// in either file is reported together in one INVALID_ARGUMENT:
//   adapter "<name>": N problems (adapter_config.json: ..., adapter_model.safetensors: ...)
// followed by one line per problem: unparseable or unsupported config options, unknown tensor
// names, modules that do not exist in the base model or layers out of range, shapes that do not
// match the base dims, incomplete A/B pairs, ranks above max_lora_rank, rank mismatches with the
// config, tensors of untargeted modules and targeted modules without tensors, dtypes other than
// F32/F16/BF16, non-finite values, and base-weight copies that differ from the base. Nothing is
// allocated for the adapter until every check passes. RESOURCE_EXHAUSTED when the buffer cannot
// be allocated. `weights` is only read and may be closed once this returns.
absl::StatusOr<std::unique_ptr<LoraAdapter>> LoadLoraAdapter(absl::string_view config_json,
                                                             const SafetensorsFile& weights,
                                                             const ModelConfig& base,
                                                             const LoraLoadOptions& options);

}  // namespace ls

#endif  // LORASERVE_MODEL_LORA_ADAPTER_H_
