// The AVX2 + FMA path (this file alone is compiled with -mavx2 -mfma -mf16c).
//
// A canonical 16-lane accumulator is a pair of ymm registers: `lo` holds lanes 0..7 (elements
// 16c..16c+7 of chunk c) and `hi` lanes 8..15, each advanced by one FMA per chunk, so every lane
// sees exactly the canonical sequence of fused multiply-adds. The tail chunk is computed on
// zero-padded copies and blended back only where an element exists, which leaves missing lanes
// untouched as the canonical order requires (a plain FMA with zeros could turn a -0 lane into
// +0). Reduce() adds hi onto lo (s[l] += s[l + 8]) and then halves as in the AVX-512 path.
//
// BF16 weights: vpmovzxwd + vpslld by 16, exact. Tile<MR, NR> keeps 2 * MR * NR accumulators, at
// most 12 of the 16 ymm registers (kMaxTile = 6). Decode path: 1 row x 6 weight rows, 2 x 3 or
// 3 x 2; more rows go in 2-row tiles over the same weight rows (re-read from L1). Prefill path:
// 2 x 3 tiles. Chosen by measurement; any shape gives the same bits.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "kernels/cpu/kernel_impl.h"
#include "kernels/cpu/kernel_table.h"

namespace ls::cpu_internal {
namespace {

constexpr int64_t kPrefetchBytes = 1024;

inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 Load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <class W>
inline void Prefetch(const W* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// s[l] += s[l + 8] (l < 8), s[l] += s[l + 4] (l < 4), s[l] += s[l + 2] (l < 2), s[0] + s[1].
inline float Reduce(__m256 lo, __m256 hi) {
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// All-ones in lane l (of lanes first..first+7) when l < count.
inline __m256 LaneMask(int64_t count, int first) {
  const __m256i lanes =
      _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes));
}

struct Avx2Ops {
  static constexpr int kMaxTile = 6;
  static constexpr int kSkinnyMaxRows = 8;
  static constexpr int kTileRows = 2;
  static constexpr int kTileCols = 3;
  static int SkinnyRows(int64_t m) { return m <= 3 ? static_cast<int>(m) : 2; }
  static int SkinnyCols(int rows) {
    constexpr int kCols[4] = {0, 6, 3, 2};
    return kCols[rows];
  }

  template <int MR, int NR, class W>
  static void Tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k, float* dots) {
    __m256 lo[MR][NR];
    __m256 hi[MR][NR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        lo[i][r] = _mm256_setzero_ps();
        hi[i][r] = _mm256_setzero_ps();
      }
    }
    int64_t kk = 0;
    for (; kk + 16 <= k; kk += 16) {
      __m256 wv[NR];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) {
        Prefetch(w + r * ldw + kk);
        wv[r] = Load8(w + r * ldw + kk);
      }
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + i * ldx + kk);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) lo[i][r] = _mm256_fmadd_ps(xv, wv[r], lo[i][r]);
      }
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) wv[r] = Load8(w + r * ldw + kk + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + i * ldx + kk + 8);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) hi[i][r] = _mm256_fmadd_ps(xv, wv[r], hi[i][r]);
      }
    }
    if (kk < k) {
      const int64_t rem = k - kk;
      alignas(32) float xt[MR][16] = {};
      alignas(32) W wt[NR][16] = {};
      for (int i = 0; i < MR; ++i) memcpy(xt[i], x + i * ldx + kk, rem * sizeof(float));
      for (int r = 0; r < NR; ++r) memcpy(wt[r], w + r * ldw + kk, rem * sizeof(W));
      const __m256 mask_lo = LaneMask(rem, 0);
      const __m256 mask_hi = LaneMask(rem, 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 x_lo = _mm256_load_ps(xt[i]);
        const __m256 x_hi = _mm256_load_ps(xt[i] + 8);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
          const __m256 w_lo = Load8(wt[r]);
          const __m256 w_hi = Load8(wt[r] + 8);
          lo[i][r] = _mm256_blendv_ps(lo[i][r], _mm256_fmadd_ps(x_lo, w_lo, lo[i][r]), mask_lo);
          hi[i][r] = _mm256_blendv_ps(hi[i][r], _mm256_fmadd_ps(x_hi, w_hi, hi[i][r]), mask_hi);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) dots[i * NR + r] = Reduce(lo[i][r], hi[i][r]);
    }
  }

  using Vec = __m256;
  using Mask = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int kAttentionHeads = 2;
  static constexpr int kAttentionKeys = 3;
  static constexpr int kValueAccumulators = 8;
  static Mask MakeMask(int lanes) { return _mm256_castps_si256(LaneMask(lanes, 0)); }
  static Vec Zero() { return _mm256_setzero_ps(); }
  static Vec Set1(float a) { return _mm256_set1_ps(a); }
  static Vec Load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec LoadMasked(const float* p, Mask mask) { return _mm256_maskload_ps(p, mask); }
  static void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static void StoreMasked(float* p, Vec v, Mask mask) { _mm256_maskstore_ps(p, mask, v); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
};

constexpr KernelTable kAvx2Table = MakeKernelTable<Avx2Ops>();

}  // namespace

const KernelTable& Avx2KernelTable() { return kAvx2Table; }

}  // namespace ls::cpu_internal
