// The Backend interface: every op the model's forward pass calls. kernels/cpu implements it (the
// reference and a fast path); kernels/cuda mirrors it op for op. The model never touches memory
// layouts or ISA details beyond what is written here.
//
// Conventions for every op:
// - Activations are float32, row-major, one row per token of the flat batch ("rows", m). Row
//   strides are given in elements where rows may be views into a wider buffer.
// - Weights are WeightViews: row-major [out, in] exactly as Hugging Face stores them, in F32 or
//   BF16 (the engine converts F16 on load). Bias and norm vectors are float32.
// - Pointers are to memory on the backend's device. Ops never allocate on the step path: any
//   scratch is sized when the backend is created.
// - Shapes are checked once above (when the model is built); ops check cheap invariants only and
//   return INVALID_ARGUMENT naming the op when one is broken.
//
// Batch invariance (docs/batch_invariance.md): every reduction over K happens in one canonical
// order that depends only on K, never on the number of rows, which rows they are, or which code
// path (prefill tile or decode stream) runs them:
//   dot(x, w) over k = 0..K-1: 16 fp32 partial sums, lane l accumulates x[k]*w[k] for
//   k = l, l+16, l+32, ... in increasing k with fused multiply-add (round once per step); lanes
//   start at 0 and missing tail elements are skipped (as if zero, which leaves the lane exact);
//   then the lanes combine pairwise: s[l] += s[l+8] for l<8, then s[l] += s[l+4] for l<4, then
//   s[l] += s[l+2] for l<2, then s[0] + s[1]. Bias is added after the dot product.
// So a row's result is a pure function of that row's inputs and the weights: bit-identical
// alone or in any batch, and across the CPU's ISA paths (scalar uses fmaf).
#ifndef LORASERVE_KERNELS_BACKEND_H_
#define LORASERVE_KERNELS_BACKEND_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/dtype.h"

namespace ls {

struct LoraSegment;  // kernels/lora.h

// A weight matrix [rows, cols] (HF: [out_features, in_features]), row-major, F32 or BF16.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
};

// The KV cache of one layer: `num_blocks` blocks of `block_tokens` token slots each. Layout of
// both K and V: [num_blocks, block_tokens, num_kv_heads, head_dim], float32.
struct KvLayerView {
  float* k = nullptr;
  float* v = nullptr;
  int32_t num_blocks = 0;
  int32_t block_tokens = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
};

// Per-row attention metadata for a flat batch of m rows. Row i belongs to a sequence whose
// block table is block_tables[i * block_table_stride ...]; it sits at position positions[i] and
// attends to that sequence's positions 0..positions[i] (causal), whose K/V must already be in
// the cache (the caller writes the batch's own K/V first with WriteKv).
struct AttentionRows {
  int64_t m = 0;
  const int32_t* positions = nullptr;     // [m]
  const int32_t* block_tables = nullptr;  // [m, block_table_stride] (rows of one sequence may
                                          // point at the same table)
  int64_t block_table_stride = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;

  // y[i, j] (+)= dot(x[i, :], w[j, :]) + (bias ? bias[j] : 0), i < m, j < w.rows, K = w.cols.
  // `accumulate` adds into y instead of overwriting it. x has row stride ldx, y has ldy.
  virtual absl::Status MatMul(const float* x, int64_t m, int64_t ldx, const WeightView& w,
                              const float* bias, float* y, int64_t ldy, bool accumulate) = 0;

  // out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight, d = weight.cols (weight.rows 1).
  // The mean's sum uses the canonical reduction order. out may equal x.
  virtual absl::Status RmsNorm(const float* x, int64_t m, int64_t d, const WeightView& weight,
                               float eps, float* out) = 0;

  // Rotary embedding, rotate-half convention (HF Llama): for each row i and head h, with
  // p = positions[i] and half = head_dim / 2, for j < half:
  //   a = x[j], b = x[j + half], c = cos(p * inv_freq[j]), s = sin(p * inv_freq[j])
  //   x[j] = a*c - b*s, x[j + half] = b*c + a*s
  // where p * inv_freq[j] is computed in float32 (as HF does) and cos/sin of that float32 angle
  // are evaluated in double and rounded to float32. In place; row stride ld elements.
  virtual absl::Status Rope(float* x, int64_t m, int64_t ld, int num_heads, int head_dim,
                            const int32_t* positions, const float* inv_freq) = 0;

  // Writes rows' K and V (k/v: [m, num_kv_heads*head_dim] with row strides ldk/ldv) into the
  // cache at slot_mapping[i] = block * block_tokens + offset.
  virtual absl::Status WriteKv(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t m,
                               const int32_t* slot_mapping, const KvLayerView& cache) = 0;

  // Causal attention over the paged cache, GQA: query head h reads kv head
  // h / (num_heads / num_kv_heads). q: [m, num_heads*head_dim] (row stride ldq), out likewise
  // (row stride ldo). Scores are q·k * scale (canonical dot order), softmax in float32 with the
  // max subtracted, keys visited in increasing position; then out = sum p_t * v_t in increasing t.
  // The backend owns its scratch, sized at creation for the longest context it serves.
  virtual absl::Status Attention(const float* q, int64_t ldq, int num_heads,
                                 const AttentionRows& rows, const KvLayerView& cache, float scale,
                                 float* out, int64_t ldo) = 0;

  // out[i, j] = silu(gate[i, j]) * up[i, j], silu(g) = g / (1 + exp(-g)); f columns.
  virtual absl::Status SiluMul(const float* gate, int64_t ldg, const float* up, int64_t ldu,
                               int64_t m, int64_t f, float* out, int64_t ldo) = 0;

  // out[i, :] = table[ids[i], :] widened to float32; ids must be < table.rows.
  virtual absl::Status Embedding(const int32_t* ids, int64_t m, const WeightView& table, float* out,
                                 int64_t ldo) = 0;

  // Segmented batched LoRA (kernels/lora.h has the data contract and the exact arithmetic).
  // Adds every segment's adapter delta to y: for the rows of segment s, shrink
  // t = x[rows, :] · Aᵀ into scratch rows [row_begin, row_end), scale each slice's columns of t,
  // then expand y[rows, out_offset_j + c] += t[rows, slice j] · B_j[c, :]ᵀ, both dot products in
  // the canonical order. Rows in no segment, or in a segment whose group is null or has no
  // slices, are left untouched. Segments must be disjoint and in increasing row order; every
  // group's A has the same number of columns (K = in); a group's slices are stacked in order
  // (rank_offset is the sum of the earlier slices' ranks) and write disjoint column ranges of y.
  // scratch is caller-owned, [rows, ld_scratch] with ld_scratch >= every group's rank_total, and
  // indexed by the batch's row (so the caller can size it once, e.g. to capture it in a CUDA
  // graph); its contents on return are unspecified. x, y and scratch must not overlap. Row
  // strides ldx >= K and ldy >= the widest out_offset_j + out_j matter only past row 0.
  virtual absl::Status LoraLinear(const float* x, int64_t ldx, const LoraSegment* segments,
                                  int num_segments, float* scratch, int64_t ld_scratch, float* y,
                                  int64_t ldy) = 0;

  // The embedding form (kernels/lora.h): each group's A is stored transposed, [vocab,
  // rank_total], and the shrink is a gather, t[i, :] = A[ids[i], :] widened to float32; then
  // scale and expand as LoraLinear into the embedding output y. ids[i] is read for the rows of
  // segments with a (non-empty) group only, and must be < that group's A.rows. The other rules
  // are LoraLinear's.
  virtual absl::Status LoraEmbedding(const int32_t* ids, const LoraSegment* segments,
                                     int num_segments, float* scratch, int64_t ld_scratch, float* y,
                                     int64_t ldy) = 0;
};

}  // namespace ls

#endif  // LORASERVE_KERNELS_BACKEND_H_
