// The base model's weights, loaded from a Hugging Face safetensors checkpoint into one arena in
// the layouts the forward pass wants.
//
// Checkpoint names and shapes (nn.Linear is [out, in]; H hidden, I intermediate, V vocab,
// Q = heads * head_dim, KV = kv_heads * head_dim):
//   model.embed_tokens.weight                       [V, H]
//   model.layers.N.input_layernorm.weight           [H]
//   model.layers.N.self_attn.{q,k,v}_proj.weight    [Q, H], [KV, H], [KV, H]
//   model.layers.N.self_attn.{q,k,v}_proj.bias      [Q], [KV], [KV]   (config.attention_qkv_bias)
//   model.layers.N.self_attn.o_proj.weight          [H, Q]
//   model.layers.N.self_attn.o_proj.bias            [H]               (config.attention_o_bias)
//   model.layers.N.post_attention_layernorm.weight  [H]
//   model.layers.N.mlp.{gate,up}_proj.weight        [I, H]
//   model.layers.N.mlp.down_proj.weight             [H, I]
//   model.norm.weight                               [H]
//   lm_head.weight                                  [V, H]  (may be absent when tied; when
//                                                    present and tied it is ignored)
// `model.layers.N.self_attn.rotary_emb.inv_freq` (old conversions) is tolerated and skipped.
// Disk dtypes F32, F16 and BF16 are accepted.
#ifndef LORASERVE_MODEL_WEIGHTS_H_
#define LORASERVE_MODEL_WEIGHTS_H_

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "common/huge_buffer.h"
#include "kernels/backend.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace ls {

// One decoder layer. Matrices are in the model's weights dtype, norms and biases in F32.
struct LayerWeights {
  WeightView input_norm;  // F32 [1, H]
  // q_proj, k_proj and v_proj rows stacked in that order: [Q + 2*KV, H]. One MatMul yields
  // [q | k | v] per row.
  WeightView qkv;
  // [Q + 2*KV] in the same order, or nullptr when the model has no q/k/v biases.
  const float* qkv_bias = nullptr;
  WeightView o;                   // [H, Q]
  const float* o_bias = nullptr;  // [H], or nullptr
  WeightView post_norm;           // F32 [1, H]
  // gate_proj rows, then up_proj rows: [2*I, H]. One MatMul yields [gate | up] per row.
  WeightView gate_up;
  WeightView down;  // [H, I]
};

// The loaded weights. Owns one 64-byte-aligned allocation (the arena) that every WeightView and
// bias pointer below points into; they are valid for as long as this object lives.
//
// Thread safety: immutable after LoadModelWeights; every method is const and may be called from
// any number of threads. The arena is host memory: a device backend copies from it.
class ModelWeights {
 public:
  ModelWeights(const ModelWeights&) = delete;
  ModelWeights& operator=(const ModelWeights&) = delete;

  // kF32 or kBF16: the dtype of every matrix (norms and biases are always F32).
  DType dtype() const { return dtype_; }

  const WeightView& embed() const { return embed_; }            // [V, H]
  const WeightView& final_norm() const { return final_norm_; }  // F32 [1, H]
  // [V, H]; the same memory as embed() when the embeddings are tied.
  const WeightView& lm_head() const { return lm_head_; }
  bool lm_head_tied() const { return lm_head_.data == embed_.data; }
  const std::vector<LayerWeights>& layers() const { return layers_; }

  // Bytes of the arena (alignment padding included).
  size_t arena_bytes() const { return arena_bytes_; }
  // Parameters loaded, counting tied embeddings once (as transformers' num_parameters() does).
  int64_t num_parameters() const { return num_parameters_; }

 private:
  friend absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(
      const SafetensorsCheckpoint& ckpt, const ModelConfig& config, DType weights_dtype);

  ModelWeights() = default;

  HugeBuffer arena_;  // huge pages: decode streams all of it every step
  size_t arena_bytes_ = 0;
  int64_t num_parameters_ = 0;
  DType dtype_ = DType::kF32;
  WeightView embed_;
  WeightView final_norm_;
  WeightView lm_head_;
  std::vector<LayerWeights> layers_;
};

// Checks `ckpt` against `config` and loads it as `weights_dtype` (kF32 or kBF16; anything else
// is INVALID_ARGUMENT). Conversions: F16 and BF16 widen to F32 exactly; F32 and F16 narrow to
// BF16 with round-to-nearest-even (common/dtype.h FloatToBf16); BF16 to BF16 is a bit-exact copy.
//
// Every problem is found before anything is allocated and reported together as one
// INVALID_ARGUMENT: a first line with the count, then one line per missing tensor, mis-shaped
// tensor (expected vs found shape), tensor of an unsupported dtype, and unexpected tensor
// (at most 1000 lines, then "... and N more"). RESOURCE_EXHAUSTED when the arena cannot be
// allocated.
//
// The checkpoint is only read; it may be closed once this returns.
absl::StatusOr<std::unique_ptr<ModelWeights>> LoadModelWeights(const SafetensorsCheckpoint& ckpt,
                                                               const ModelConfig& config,
                                                               DType weights_dtype);

}  // namespace ls

#endif  // LORASERVE_MODEL_WEIGHTS_H_
