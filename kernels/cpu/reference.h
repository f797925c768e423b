// Plain float64 implementations of every Backend op, for tests: the textbook formula in double
// precision, with no attempt at speed or at the float32 rounding of the real kernels. Inputs are
// taken as the Backend takes them (float32 activations, F32/BF16 weights widened exactly);
// outputs are double, dense ([m, width], row stride = width) unless stated.
//
// Where the Backend contract itself fixes a float32 step, the reference follows it, because the
// step is part of the specification rather than a rounding artifact: Rope's angle is
// float(p) * inv_freq[j] rounded to float32 (as Hugging Face computes it).
//
// Thread-compatible: no shared state.
#ifndef LORASERVE_KERNELS_CPU_REFERENCE_H_
#define LORASERVE_KERNELS_CPU_REFERENCE_H_

#include <cstdint>

#include "kernels/backend.h"
#include "kernels/lora.h"

namespace ls::reference {

// Element `i` of a F32 or BF16 weight, exactly.
double WeightAt(const WeightView& w, int64_t i);

// y[i * n + j] = dot(x[i, :], w[j, :]) + bias[j] (+ y_in[i * n + j] when y_in is not null), with
// n = w.rows. When `magnitude` is not null it receives sum_k |x[i,k] * w[j,k]| + |bias[j]| +
// |y_in[i * n + j]|, the scale against which float32 rounding error is measured.
void MatMul(const float* x, int64_t m, int64_t ldx, const WeightView& w, const float* bias,
            const float* y_in, double* y, double* magnitude);

// out[i * d + j] = x[i, j] / sqrt(mean_j(x[i, j]^2) + eps) * weight[j]; x rows are contiguous.
void RmsNorm(const float* x, int64_t m, int64_t d, const WeightView& weight, float eps,
             double* out);

// Rotate-half RoPE of x ([m, num_heads * head_dim], row stride ld) into out (row stride
// num_heads * head_dim).
void Rope(const float* x, int64_t m, int64_t ld, int num_heads, int head_dim,
          const int32_t* positions, const float* inv_freq, double* out);

// Copies rows into the cache exactly as Backend::WriteKv specifies.
void WriteKv(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t m,
             const int32_t* slot_mapping, const KvLayerView& cache);

// Causal paged attention with GQA, softmax in double; out is [m, num_heads * head_dim].
void Attention(const float* q, int64_t ldq, int num_heads, const AttentionRows& rows,
               const KvLayerView& cache, float scale, double* out);

// out[i * f + j] = silu(gate[i, j]) * up[i, j].
void SiluMul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t m, int64_t f,
             double* out);

// out[i * cols + j] = table[ids[i], j].
void Embedding(const int32_t* ids, int64_t m, const WeightView& table, double* out);

// Backend::LoraLinear in double: y and magnitude are [rows, ldy] like the op's y; y starts as
// y_in (every element, padding included) and each segment's rows get, for slice j of its group,
//   y[i, out_offset_j + c] += scale_j * sum_r B_j[c, r] * sum_k x[i, k] * A[rank_offset_j + r, k]
// (the shrink is not rounded to float32 before the expand). When `magnitude` is not null it
// receives |y_in| + sum_r |B_j[c, r]| * |scale_j| * sum_k |x[i, k] * A[rank_offset_j + r, k]|,
// the scale against which float32 rounding error is measured. Arguments are not checked.
void LoraLinear(const float* x, int64_t ldx, const LoraSegment* segments, int num_segments,
                const float* y_in, int64_t rows, int64_t ldy, double* y, double* magnitude);

// Backend::LoraEmbedding in double, laid out as LoraLinear above: the shrink is t[r] = A[ids[i],
// r] (A stored [vocab, rank_total]); magnitude is |y_in| + sum_r |B_j[c, r] * scale_j * t[r]|.
void LoraEmbedding(const int32_t* ids, const LoraSegment* segments, int num_segments,
                   const float* y_in, int64_t rows, int64_t ldy, double* y, double* magnitude);

}  // namespace ls::reference

#endif  // LORASERVE_KERNELS_CPU_REFERENCE_H_
