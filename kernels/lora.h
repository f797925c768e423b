// Segmented batched LoRA (after Punica's SGMV): the low-rank deltas of many adapters applied to
// one flat batch whose rows are ordered so that each adapter's rows are contiguous (a segment).
// The base projection runs once for the whole batch (Backend::MatMul); these ops then add each
// segment's own adapter delta.
//
// For a projection W [out, in] and an adapter whose group has slices j (q/k/v or gate/up fused
// into one group; a single projection has one slice), for every row i of the segment:
//   t[i, :]  = x[i, :] · Aᵀ                      shrink: A [rank_total, in], stacked slices
//   t[i, q] *= scale_j       for q in slice j     (one fp32 multiply)
//   y[i, out_offset_j + c] += t[i, slice j] · B_j[c, :]ᵀ     expand: B_j [out_j, rank_j]
// The shrink's dot products (K = in) and the expand's (K = rank_j) use the canonical reduction
// order of backend.h, exactly as MatMul computes them, so a row's result is a pure function of
// its input and its adapter: bit-identical alone or in any batch, whatever the other segments.
// (PEFT computes ((x·Aᵀ)·Bᵀ)·s; applying s to t instead differs by fp32 rounding only.)
//
// Embedding deltas (PEFT lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]): the
// "shrink" is a gather, t[i, :] = A_T[id_i, :] with A stored transposed as [vocab, r] (so the
// gather reads one contiguous row), then scale and expand as above into the embedding output.
//
// Ranks are never padded: a group's A has exactly rank_total rows and each B exactly rank_j
// columns, read once per segment per step. Segments whose group is null or has no slices are
// skipped (rows without an adapter keep the base result bit for bit).
#ifndef LORASERVE_KERNELS_LORA_H_
#define LORASERVE_KERNELS_LORA_H_

#include <cstdint>

#include "kernels/backend.h"

namespace ls {

// At most three projections are fused into one group (q, k, v).
inline constexpr int kMaxLoraSlices = 3;

// The ops (Backend::LoraLinear / LoraEmbedding) check these rules and return INVALID_ARGUMENT
// naming the op when one is broken: a group's slices are stacked in order (slice j's rank_offset
// is the sum of ranks 0..j-1, and rank_total their sum), their y column ranges
// [out_offset, out_offset + b.rows) are pairwise disjoint (so threads may expand them at the same
// time), A and every B share one dtype (F32 or BF16), and b is [out_j >= 1, rank].
struct LoraSlice {
  int32_t rank_offset = 0;  // first row of this slice in the group's stacked A
  int32_t rank = 0;         // >= 1
  int64_t out_offset = 0;   // first column of y this slice writes
  WeightView b;             // [out_j, rank], same dtype as the group's A
  float scale = 0.f;        // alpha / rank, or alpha / sqrt(rank) (rsLoRA), per module
};

// One adapter's delta on one (fused) projection of one layer. num_slices == 0: the adapter does
// not touch this projection.
struct LoraGroup {
  WeightView a;            // [rank_total, in] (embedding: [vocab, rank_total], see above)
  int32_t rank_total = 0;  // sum of the slices' ranks
  int num_slices = 0;
  LoraSlice slices[kMaxLoraSlices];
};

// Rows [row_begin, row_end) of the batch use `group` (null: no adapter on these rows). A batch's
// segments are disjoint and in increasing row order; rows between them have no adapter. One
// adapter may own several segments (row order is the scheduler's choice, not an adapter's).
struct LoraSegment {
  int64_t row_begin = 0;
  int64_t row_end = 0;
  const LoraGroup* group = nullptr;
};

}  // namespace ls

#endif  // LORASERVE_KERNELS_LORA_H_
