// Internal to the CPU backend: the loop structure every ISA shares, written once as templates over
// an `Ops` struct that each kernels_<isa>.cc defines. Only the innermost pieces differ per ISA:
//
//   Ops::Tile<MR, NR, W>(x, ldx, w, ldw, k, dots)
//       dots[i * NR + r] = dot(x[i * ldx + 0..k), w[r * ldw + 0..k)) for i < MR, r < NR, each in
//       the canonical order of kernels/backend.h (16 lanes, lane l takes k = l mod 16 with FMA,
//       combined 8/4/2/1). W is float (F32 weights) or uint16_t (BF16 bits, widened exactly).
//   Ops::Axpy(a, v, out, d)
//       out[j] = fma(a, v[j], out[j]) for j < d (elementwise, so any vector width gives the same
//       bits as the scalar fma).
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

// ---- MatMul --------------------------------------------------------------------------------------

// y = dot + bias, or y += dot + bias: the bias joins the finished dot product, then y.
inline void StoreTile(const MatMulArgs& a, int64_t i0, int64_t j0, int mr, int nr,
                      const float* dots) {
  for (int i = 0; i < mr; ++i) {
    float* y = a.y + (i0 + i) * a.ldy + j0;
    for (int r = 0; r < nr; ++r) {
      float v = dots[i * nr + r];
      if (a.bias != nullptr) v = v + a.bias[j0 + r];
      y[r] = a.accumulate ? y[r] + v : v;
    }
  }
}

// Columns [c0, c1) of y.
//
// Skinny (decode) path, m <= Ops::kSkinnyMaxRows: walk the weight rows once, SkinnyCols() at a
// time; for each group, every row of x in tiles of SkinnyRows() rows (usually all m at once). The
// group's weights come from memory once and from L1 for any further row tile, so each weight byte
// crosses the memory bus once per call however many rows there are.
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
    for (int64_t j = c0; j < c1; j += cols) {
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

// ---- RmsNorm -------------------------------------------------------------------------------------

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

// ---- Attention -----------------------------------------------------------------------------------

// One (row, query head): scores s_t = dot(q, k_t) * scale for t = 0..p in increasing t, m = max
// s_t, e_t = expf(s_t - m), sum = e_0 + e_1 + ... (sequential, increasing t), acc = 0 then
// acc = fma(e_t, v_t, acc) for increasing t, out = acc / sum.
template <class Ops>
void AttentionHeadKernel(const AttentionArgs& a, int64_t row, int head, float* scores) {
  const int head_dim = a.head_dim;
  const int kv_head = head / (a.num_heads / a.num_kv_heads);
  const int64_t token_stride = static_cast<int64_t>(a.num_kv_heads) * head_dim;
  const float* k_base = a.k_cache + static_cast<int64_t>(kv_head) * head_dim;
  const float* v_base = a.v_cache + static_cast<int64_t>(kv_head) * head_dim;
  const float* q = a.q + row * a.ldq + static_cast<int64_t>(head) * head_dim;
  float* out = a.out + row * a.ldo + static_cast<int64_t>(head) * head_dim;
  const int32_t* table = a.block_tables + row * a.block_table_stride;
  const int64_t num_tokens = static_cast<int64_t>(a.positions[row]) + 1;
  const int64_t block_tokens = a.block_tokens;

  float max_score = -INFINITY;
  for (int64_t t0 = 0, b = 0; t0 < num_tokens; t0 += block_tokens, ++b) {
    const int64_t n = MinOf(block_tokens, num_tokens - t0);
    const int64_t slot0 = static_cast<int64_t>(table[b]) * block_tokens;
    for (int64_t o = 0; o < n; ++o) {
      const float s = Dot<Ops>(q, k_base + (slot0 + o) * token_stride, head_dim) * a.scale;
      scores[t0 + o] = s;
      if (s > max_score) max_score = s;
    }
  }
  float sum = 0.0f;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float e = expf(scores[t] - max_score);
    scores[t] = e;
    sum += e;
  }
  for (int d = 0; d < head_dim; ++d) out[d] = 0.0f;
  for (int64_t t0 = 0, b = 0; t0 < num_tokens; t0 += block_tokens, ++b) {
    const int64_t n = MinOf(block_tokens, num_tokens - t0);
    const int64_t slot0 = static_cast<int64_t>(table[b]) * block_tokens;
    for (int64_t o = 0; o < n; ++o) {
      Ops::Axpy(scores[t0 + o], v_base + (slot0 + o) * token_stride, out, head_dim);
    }
  }
  for (int d = 0; d < head_dim; ++d) out[d] = out[d] / sum;
}

template <class Ops>
constexpr KernelTable MakeKernelTable() {
  KernelTable table{};
  table.matmul = &MatMulKernel<Ops>;
  table.rms_norm_row = &RmsNormRowKernel<Ops>;
  table.attention_head = &AttentionHeadKernel<Ops>;
  return table;
}

}  // namespace
}  // namespace ls::cpu_internal

#endif  // LORASERVE_KERNELS_CPU_KERNEL_IMPL_H_
