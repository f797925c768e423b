// Internal to the CPU backend: the loop structure every ISA shares, written once as templates over
// an `Ops` struct that each kernels_<isa>.cc defines. Only the innermost pieces differ per ISA:
//
//   Ops::Tile<MR, NR, W>(x, ldx, w, ldw, k, dots)
//       dots[i * NR + r] = dot(x[i * ldx + 0..k), w[r * ldw + 0..k)) for i < MR, r < NR, each in
//       the canonical order of kernels/backend.h (16 lanes, lane l takes k = l mod 16 with FMA,
//       combined 8/4/2/1). W is float (F32 weights) or uint16_t (BF16 bits, widened exactly).
//   Ops::Vec, kLanes, Mask, MakeMask(n), Zero(), Set1(a), Load(p), LoadMasked(p, mask),
//   Store(p, v), StoreMasked(p, v, mask), Fma(a, b, c)
//       a vector of kLanes floats for elementwise work (attention's weighted values); Fma is the
//       fused multiply-add per lane, so any vector width gives the same bits as scalar fmaf.
//   Ops::kAttentionHeads, kAttentionKeys, kValueAccumulators
//       attention: query heads per work item (at most 4), keys per score tile (heads * keys at
//       most kMaxTile), vector accumulators the weighted-value pass may keep in registers.
//   Ops::kMaxTile, kSkinnyMaxRows, SkinnyRows(m), SkinnyCols(rows), kTileRows, kTileCols
//       register-blocking choices (see MatMulColumns).
//
// Every element of a MatMul, every RmsNorm sum of squares and every attention score is one
// Tile<..> dot, so the bits cannot depend on the tile shape, the path (skinny or tiled), the
// batch, the thread split or the ISA: only on that element's inputs.
//
// Why everything below sits in an unnamed namespace in a header: this file is compiled into
// translation units built with different -m flags. Entities with external linkage (templates,
// inline functions) would be merged by the linker, which could then run an AVX-512 copy on a
// CPU without AVX-512. Internal linkage gives each ISA file its own copies. For the same reason
// these files use no std:: templates (std::min, std::fma, containers): only <math.h>, <string.h>
// and intrinsics.
#ifndef LORASERVE_KERNELS_CPU_KERNEL_IMPL_H_
#define LORASERVE_KERNELS_CPU_KERNEL_IMPL_H_

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cpu/kernel_table.h"

namespace ls::cpu_internal {
namespace {  // NOLINT(build/namespaces): see the file comment

// Tiles are at most kMaxTileDim x kMaxTileDim (rows of x times rows of w).
constexpr int kMaxTileDim = 8;

// The tiled (prefill) path works on blocks of weight rows of about this many bytes, so a block
// stays in L2 while every row tile of x passes over it.
constexpr int64_t kWeightBlockBytes = 512 * 1024;

template <class T>
inline T MinOf(T a, T b) {
  return a < b ? a : b;
}

inline float Bf16BitsToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float LoadWeight(const float* w, int64_t i) { return w[i]; }
inline float LoadWeight(const uint16_t* w, int64_t i) { return Bf16BitsToFloat(w[i]); }

// Asks for the cache lines of `count` floats at p. Attention uses it one KV block ahead: blocks
// are scattered through the cache, so the hardware prefetchers cannot see the next one coming.
inline void PrefetchFloats(const float* p, int count) {
  for (int i = 0; i < count; i += 16) __builtin_prefetch(p + i);
}

// ---- Tile dispatch: run-time (mr, nr) to the compile-time Tile<MR, NR, W>. ----------------------

template <class Ops, int MR, int NR, class W>
void TileFixed(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k, float* dots) {
  if constexpr (MR * NR <= Ops::kMaxTile) {
    Ops::template Tile<MR, NR, W>(x, ldx, w, ldw, k, dots);
  } else {
    __builtin_trap();  // the drivers never ask for a tile larger than Ops::kMaxTile
  }
}

template <class Ops, int MR, class W>
void TileWithRows(int nr, const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k,
                  float* dots) {
  switch (nr) {
    case 1:
      return TileFixed<Ops, MR, 1, W>(x, ldx, w, ldw, k, dots);
    case 2:
      return TileFixed<Ops, MR, 2, W>(x, ldx, w, ldw, k, dots);
    case 3:
      return TileFixed<Ops, MR, 3, W>(x, ldx, w, ldw, k, dots);
    case 4:
      return TileFixed<Ops, MR, 4, W>(x, ldx, w, ldw, k, dots);
    case 5:
      return TileFixed<Ops, MR, 5, W>(x, ldx, w, ldw, k, dots);
    case 6:
      return TileFixed<Ops, MR, 6, W>(x, ldx, w, ldw, k, dots);
    case 7:
      return TileFixed<Ops, MR, 7, W>(x, ldx, w, ldw, k, dots);
    case 8:
      return TileFixed<Ops, MR, 8, W>(x, ldx, w, ldw, k, dots);
  }
  __builtin_trap();
}

// dots[i * nr + r] for i < mr, r < nr; 1 <= mr, nr <= kMaxTileDim and mr * nr <= Ops::kMaxTile.
template <class Ops, class W>
void RunTile(int mr, int nr, const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k,
             float* dots) {
  switch (mr) {
    case 1:
      return TileWithRows<Ops, 1, W>(nr, x, ldx, w, ldw, k, dots);
    case 2:
      return TileWithRows<Ops, 2, W>(nr, x, ldx, w, ldw, k, dots);
    case 3:
      return TileWithRows<Ops, 3, W>(nr, x, ldx, w, ldw, k, dots);
    case 4:
      return TileWithRows<Ops, 4, W>(nr, x, ldx, w, ldw, k, dots);
    case 5:
      return TileWithRows<Ops, 5, W>(nr, x, ldx, w, ldw, k, dots);
    case 6:
      return TileWithRows<Ops, 6, W>(nr, x, ldx, w, ldw, k, dots);
    case 7:
      return TileWithRows<Ops, 7, W>(nr, x, ldx, w, ldw, k, dots);
    case 8:
      return TileWithRows<Ops, 8, W>(nr, x, ldx, w, ldw, k, dots);
  }
  __builtin_trap();
}

// The canonical dot of two float vectors (RmsNorm's sum of squares, attention scores).
template <class Ops>
float Dot(const float* a, const float* b, int64_t k) {
  float dot;
  Ops::template Tile<1, 1, float>(a, 0, b, 0, k, &dot);
  return dot;
}

// ---- MatMul -------------------------------------------------------------------------------------

// y = dot + bias, or y += dot + bias: the bias joins the finished dot product, then y. Tile
// column r is output column j0 + r * jstride.
inline void StoreTile(const MatMulArgs& a, int64_t i0, int64_t j0, int mr, int nr,
                      const float* dots, int64_t jstride = 1) {
  for (int i = 0; i < mr; ++i) {
    float* y = a.y + (i0 + i) * a.ldy + j0;
    for (int r = 0; r < nr; ++r) {
      const int64_t j = r * jstride;
      float v = dots[i * nr + r];
      if (a.bias != nullptr) v = v + a.bias[j0 + j];
      y[j] = a.accumulate ? y[j] + v : v;
    }
  }
}

// Columns [c0, c1) of y.
//
// Skinny (decode) path, m <= Ops::kSkinnyMaxRows: walk the weight rows once, in groups of
// SkinnyCols() rows; for each group, every row of x in tiles of SkinnyRows() rows (usually all m
// at once). The group's weights come from memory once and from L1 for any further row tile, so
// each weight byte crosses the memory bus once per call however many rows there are. The range
// is cut into SkinnyCols() equal stretches of `len` rows and a group takes the same row of each
// (a tile with row stride len * k): every tile row is then one long sequential stream through
// its stretch, which keeps SkinnyCols() streams in flight at once (the memory system delivers
// markedly more bandwidth to several far-apart streams than to one). Rows left over after the
// stretches go in ordinary adjacent groups.
//
// Tiled (prefill) path: blocks of weight rows sized to stay in L2; for each block, every
// kTileRows-row tile of x against the block's kTileCols-row groups. The x tile is reused from L1
// across the block's groups and the block from L2 across x tiles.
template <class Ops, class W>
void MatMulColumns(const MatMulArgs& a, int64_t c0, int64_t c1) {
  const W* w = static_cast<const W*>(a.w);
  const int64_t k = a.k;
  float dots[kMaxTileDim * kMaxTileDim];
  if (a.m <= Ops::kSkinnyMaxRows) {
    const int rows = Ops::SkinnyRows(a.m);
    const int cols = Ops::SkinnyCols(rows);
    const int64_t len = (c1 - c0) / cols;
    for (int64_t j = c0; j < c0 + len; ++j) {
      for (int64_t i = 0; i < a.m; i += rows) {
        const int mr = static_cast<int>(MinOf<int64_t>(rows, a.m - i));
        RunTile<Ops, W>(mr, cols, a.x + i * a.ldx, a.ldx, w + j * k, len * k, k, dots);
        StoreTile(a, i, j, mr, cols, dots, len);
      }
    }
    for (int64_t j = c0 + len * cols; j < c1; j += cols) {
      const int nr = static_cast<int>(MinOf<int64_t>(cols, c1 - j));
      for (int64_t i = 0; i < a.m; i += rows) {
        const int mr = static_cast<int>(MinOf<int64_t>(rows, a.m - i));
        RunTile<Ops, W>(mr, nr, a.x + i * a.ldx, a.ldx, w + j * k, k, k, dots);
        StoreTile(a, i, j, mr, nr, dots);
      }
    }
    return;
  }
  constexpr int kRows = Ops::kTileRows;
  constexpr int kCols = Ops::kTileCols;
  const int64_t row_bytes = (k > 0 ? k : 1) * static_cast<int64_t>(sizeof(W));
  int64_t block = kWeightBlockBytes / row_bytes / kCols * kCols;
  if (block < kCols) block = kCols;
  for (int64_t jb = c0; jb < c1; jb += block) {
    const int64_t je = MinOf(jb + block, c1);
    for (int64_t i = 0; i < a.m; i += kRows) {
      const int mr = static_cast<int>(MinOf<int64_t>(kRows, a.m - i));
      for (int64_t j = jb; j < je; j += kCols) {
        const int nr = static_cast<int>(MinOf<int64_t>(kCols, je - j));
        RunTile<Ops, W>(mr, nr, a.x + i * a.ldx, a.ldx, w + j * k, k, k, dots);
        StoreTile(a, i, j, mr, nr, dots);
      }
    }
  }
}

template <class Ops>
void MatMulKernel(const MatMulArgs& args, int64_t col_begin, int64_t col_end) {
  if (args.w_bf16) {
    MatMulColumns<Ops, uint16_t>(args, col_begin, col_end);
  } else {
    MatMulColumns<Ops, float>(args, col_begin, col_end);
  }
}

// ---- RmsNorm ------------------------------------------------------------------------------------

template <class Ops, class W>
void RmsNormRowTyped(const float* x, int64_t d, const W* weight, float eps, float* out) {
  const float sum_squares = Dot<Ops>(x, x, d);
  const float inv = 1.0f / sqrtf(sum_squares / static_cast<float>(d) + eps);
  for (int64_t j = 0; j < d; ++j) out[j] = (x[j] * inv) * LoadWeight(weight, j);
}

template <class Ops>
void RmsNormRowKernel(const float* x, int64_t d, const void* weight, bool weight_bf16, float eps,
                      float* out) {
  if (weight_bf16) {
    RmsNormRowTyped<Ops>(x, d, static_cast<const uint16_t*>(weight), eps, out);
  } else {
    RmsNormRowTyped<Ops>(x, d, static_cast<const float*>(weight), eps, out);
  }
}

// ---- Attention ----------------------------------------------------------------------------------

// One pass of the weighted value sum for H heads over C vectors of head_dim (the last one
// partial when kPartialLast): H * C accumulators stay in registers across all keys, each value
// vector is loaded once for the H heads, and the H * C fma chains are independent.
template <class Ops, int H, int C, bool kPartialLast>
void ValuePass(const float* e, int64_t e_stride, const float* v_base, int64_t token_stride,
               const int32_t* table, int64_t block_tokens, int64_t num_tokens, int last_lanes,
               float* out, int64_t out_stride) {
  if constexpr (H * C > Ops::kValueAccumulators) {
    __builtin_trap();  // AttentionKernel never asks for more accumulators than registers
  } else {
    using Vec = typename Ops::Vec;
    constexpr int kLanes = Ops::kLanes;
    const typename Ops::Mask last_mask = Ops::MakeMask(last_lanes);
    Vec acc[H][C];
#pragma GCC unroll 8
    for (int h = 0; h < H; ++h) {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[h][c] = Ops::Zero();
    }
    const int64_t block_stride = block_tokens * token_stride;
    for (int64_t t0 = 0, b = 0; t0 < num_tokens; t0 += block_tokens, ++b) {
      const int64_t n = MinOf(block_tokens, num_tokens - t0);
      const float* v_block = v_base + static_cast<int64_t>(table[b]) * block_stride;
      const bool has_next = t0 + block_tokens < num_tokens;
      const float* v_next =
          has_next ? v_base + static_cast<int64_t>(table[b + 1]) * block_stride : nullptr;
      for (int64_t o = 0; o < n; ++o) {
        const float* v = v_block + o * token_stride;
        if (has_next) PrefetchFloats(v_next + o * token_stride, C * kLanes);
        Vec vc[C];
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) {
          vc[c] = (kPartialLast && c == C - 1) ? Ops::LoadMasked(v + c * kLanes, last_mask)
                                               : Ops::Load(v + c * kLanes);
        }
#pragma GCC unroll 8
        for (int h = 0; h < H; ++h) {
          const Vec p = Ops::Set1(e[h * e_stride + t0 + o]);
#pragma GCC unroll 8
          for (int c = 0; c < C; ++c) acc[h][c] = Ops::Fma(p, vc[c], acc[h][c]);
        }
      }
    }
#pragma GCC unroll 8
    for (int h = 0; h < H; ++h) {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        if (kPartialLast && c == C - 1) {
          Ops::StoreMasked(out + h * out_stride + c * kLanes, acc[h][c], last_mask);
        } else {
          Ops::Store(out + h * out_stride + c * kLanes, acc[h][c]);
        }
      }
    }
  }
}

template <class Ops, int H, bool kPartialLast>
void ValuePassWithHeads(int chunks, const float* e, int64_t e_stride, const float* v_base,
                        int64_t token_stride, const int32_t* table, int64_t block_tokens,
                        int64_t num_tokens, int last_lanes, float* out, int64_t out_stride) {
#define LS_VALUE_PASS_CASE(C)                                                            \
  case C:                                                                                \
    return ValuePass<Ops, H, C, kPartialLast>(e, e_stride, v_base, token_stride, table,  \
                                              block_tokens, num_tokens, last_lanes, out, \
                                              out_stride);
  switch (chunks) {
    LS_VALUE_PASS_CASE(1)
    LS_VALUE_PASS_CASE(2)
    LS_VALUE_PASS_CASE(3)
    LS_VALUE_PASS_CASE(4)
    LS_VALUE_PASS_CASE(5)
    LS_VALUE_PASS_CASE(6)
    LS_VALUE_PASS_CASE(7)
    LS_VALUE_PASS_CASE(8)
  }
#undef LS_VALUE_PASS_CASE
  __builtin_trap();
}

// heads in 1..4, chunks in 1..8, heads * chunks <= Ops::kValueAccumulators.
template <class Ops, bool kPartialLast>
void RunValuePass(int heads, int chunks, const float* e, int64_t e_stride, const float* v_base,
                  int64_t token_stride, const int32_t* table, int64_t block_tokens,
                  int64_t num_tokens, int last_lanes, float* out, int64_t out_stride) {
  switch (heads) {
    case 1:
      return ValuePassWithHeads<Ops, 1, kPartialLast>(chunks, e, e_stride, v_base, token_stride,
                                                      table, block_tokens, num_tokens, last_lanes,
                                                      out, out_stride);
    case 2:
      return ValuePassWithHeads<Ops, 2, kPartialLast>(chunks, e, e_stride, v_base, token_stride,
                                                      table, block_tokens, num_tokens, last_lanes,
                                                      out, out_stride);
    case 3:
      return ValuePassWithHeads<Ops, 3, kPartialLast>(chunks, e, e_stride, v_base, token_stride,
                                                      table, block_tokens, num_tokens, last_lanes,
                                                      out, out_stride);
    case 4:
      return ValuePassWithHeads<Ops, 4, kPartialLast>(chunks, e, e_stride, v_base, token_stride,
                                                      table, block_tokens, num_tokens, last_lanes,
                                                      out, out_stride);
  }
  __builtin_trap();
}

// Attention for query heads [head0, head0 + heads) of one row, all reading the same kv head.
// For each head: s_t = dot(q, k_t) * scale for t = 0..p, m = max s_t, e_t = expf(s_t - m),
// sum = e_0 + e_1 + ... (sequential, increasing t), acc = 0 then acc = fma(e_t, v_t, acc) for
// increasing t, out = acc / sum.
//
// Scores: Tile<heads, keys> over the heads' q vectors (adjacent in the row, stride head_dim) and
// up to Ops::kAttentionKeys consecutive keys of one block (stride num_kv_heads * head_dim), so a
// key is loaded once for all the heads of the item and the dots run as independent chains. Each
// score is still one canonical dot. Weighted values: ValuePass, all heads of the item at once,
// accumulators in registers (each element's fma chain still runs in increasing t).
template <class Ops>
void AttentionKernel(const AttentionArgs& a, int64_t row, int head0, int heads, float* scores) {
  const int head_dim = a.head_dim;
  const int kv_head = head0 / (a.num_heads / a.num_kv_heads);
  const int64_t token_stride = static_cast<int64_t>(a.num_kv_heads) * head_dim;
  const float* k_base = a.k_cache + static_cast<int64_t>(kv_head) * head_dim;
  const float* v_base = a.v_cache + static_cast<int64_t>(kv_head) * head_dim;
  const float* q = a.q + row * a.ldq + static_cast<int64_t>(head0) * head_dim;
  float* out = a.out + row * a.ldo + static_cast<int64_t>(head0) * head_dim;
  const int32_t* table = a.block_tables + row * a.block_table_stride;
  const int64_t num_tokens = static_cast<int64_t>(a.positions[row]) + 1;
  const int64_t block_tokens = a.block_tokens;
  constexpr int kKeys = Ops::kAttentionKeys;

  // scores[h * num_tokens + t].
  float dots[kMaxTileDim * kMaxTileDim];
  const int64_t block_stride = block_tokens * token_stride;
  for (int64_t t0 = 0, b = 0; t0 < num_tokens; t0 += block_tokens, ++b) {
    const int64_t n = MinOf(block_tokens, num_tokens - t0);
    const float* k_block = k_base + static_cast<int64_t>(table[b]) * block_stride;
    const bool has_next = t0 + block_tokens < num_tokens;
    const float* k_next =
        has_next ? k_base + static_cast<int64_t>(table[b + 1]) * block_stride : nullptr;
    for (int64_t o = 0; o < n; o += kKeys) {
      const int keys = static_cast<int>(MinOf<int64_t>(kKeys, n - o));
      if (has_next) {
        for (int r = 0; r < keys; ++r) PrefetchFloats(k_next + (o + r) * token_stride, head_dim);
      }
      RunTile<Ops, float>(heads, keys, q, head_dim, k_block + o * token_stride, token_stride,
                          head_dim, dots);
      for (int h = 0; h < heads; ++h) {
        for (int r = 0; r < keys; ++r) {
          scores[h * num_tokens + t0 + o + r] = dots[h * keys + r] * a.scale;
        }
      }
    }
  }

  // Softmax weights in place: e_t = expf(s_t - max), and each head's sum.
  float sums[kMaxTileDim];
  for (int h = 0; h < heads; ++h) {
    float* e = scores + h * num_tokens;
    float max_score = -INFINITY;
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (e[t] > max_score) max_score = e[t];
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < num_tokens; ++t) {
      e[t] = expf(e[t] - max_score);
      sum += e[t];
    }
    sums[h] = sum;
  }

  constexpr int kLanes = Ops::kLanes;
  const int chunks_per_pass = MinOf(kMaxTileDim, Ops::kValueAccumulators / heads);
  for (int d0 = 0; d0 < head_dim; d0 += chunks_per_pass * kLanes) {
    const int width = MinOf(chunks_per_pass * kLanes, head_dim - d0);
    const int chunks = (width + kLanes - 1) / kLanes;
    const int last_lanes = width - (chunks - 1) * kLanes;
    if (last_lanes == kLanes) {
      RunValuePass<Ops, false>(heads, chunks, scores, num_tokens, v_base + d0, token_stride, table,
                               block_tokens, num_tokens, last_lanes, out + d0, head_dim);
    } else {
      RunValuePass<Ops, true>(heads, chunks, scores, num_tokens, v_base + d0, token_stride, table,
                              block_tokens, num_tokens, last_lanes, out + d0, head_dim);
    }
  }
  for (int h = 0; h < heads; ++h) {
    float* out_h = out + h * head_dim;
    for (int d = 0; d < head_dim; ++d) out_h[d] = out_h[d] / sums[h];
  }
}

template <class Ops>
constexpr KernelTable MakeKernelTable() {
  KernelTable table{};
  table.matmul = &MatMulKernel<Ops>;
  table.rms_norm_row = &RmsNormRowKernel<Ops>;
  table.attention = &AttentionKernel<Ops>;
  table.attention_heads_per_item = Ops::kAttentionHeads;
  return table;
}

}  // namespace
}  // namespace ls::cpu_internal

#endif  // LORASERVE_KERNELS_CPU_KERNEL_IMPL_H_
