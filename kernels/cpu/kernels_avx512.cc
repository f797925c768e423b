// The AVX-512 path (avx512f/bw/vl/dq; this file alone is compiled with those flags).
//
// One zmm register is one canonical 16-lane accumulator: chunk c of a dot product (elements
// 16c..16c+15) lands lane for lane, so `acc = fmadd(x_chunk, w_chunk, acc)` is exactly the
// canonical per-lane FMA, and the tail chunk uses a masked FMA that leaves the missing lanes
// untouched (the "skip" of the canonical order). Reduce() is the 8/4/2/1 combine.
//
// BF16 weights are widened by zero-extending each 16-bit value into a 32-bit lane and shifting
// it left by 16 (vpmovzxwd + vpslld), which is exact. AVX512_BF16 offers no bf16 -> fp32
// conversion (only vdpbf16ps, whose pairwise products are not the canonical order), so it is
// not used.
//
// Tile<MR, NR>: MR rows of x against NR weight rows, MR * NR zmm accumulators (at most 24, so
// that the NR widened weight chunks and one x chunk also fit in the 32 registers). Decode path:
// up to 4 rows of x per tile (5..8 rows: two tiles) against the widest NR that fits (8, 8, 7, 6
// for 1..4 rows): each weight chunk is loaded and widened once per tile and feeds MR FMAs, the
// weight rows stream from memory once per call, NR independent streams keep the memory system
// busy, and a software prefetch runs kPrefetchBytes ahead on each. Prefill path: 4 x 6 tiles.
// These shapes were picked by measurement on a Sapphire Rapids class Xeon (taller tiles, e.g.
// 8 x 3, ran markedly slower); any shape gives the same bits.

// GCC 12 warns about the `__Y = __Y` idiom inside its own AVX-512 intrinsic headers wherever they
// are inlined (GCC bug 105593); the warning says nothing about this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <immintrin.h>
#include <stdint.h>

#include "kernels/cpu/kernel_impl.h"
#include "kernels/cpu/kernel_table.h"

namespace ls::cpu_internal {
namespace {

constexpr int64_t kPrefetchBytes = 1024;

inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 Load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 Load16Masked(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}

inline __m512 Load16Masked(const uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <class W>
inline void Prefetch(const W* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// s[l] += s[l + 8] (l < 8), s[l] += s[l + 4] (l < 4), s[l] += s[l + 2] (l < 2), s[0] + s[1].
inline float Reduce(__m512 v) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

struct Avx512Ops {
  static constexpr int kMaxTile = 24;
  static constexpr int kSkinnyMaxRows = 8;
  static constexpr int kTileRows = 4;
  static constexpr int kTileCols = 6;
  static int SkinnyRows(int64_t m) { return static_cast<int>(m <= 4 ? m : (m + 1) / 2); }
  static int SkinnyCols(int rows) {
    constexpr int kCols[5] = {0, 8, 8, 7, 6};
    return kCols[rows];
  }

  template <int MR, int NR, class W>
  static void Tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k, float* dots) {
    __m512 acc[MR][NR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
    }
    // One step: chunk kk of every weight row into its accumulators (the canonical order).
    auto step = [&](int64_t kk) __attribute__((always_inline)) {
      __m512 wv[NR];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) wv[r] = Load16(w + r * ldw + kk);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * ldx + kk);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
      }
    };
    // One software prefetch per 64-byte line of each weight row: 16 elements for fp32, 32 for
    // bf16 (two steps). A prefetch per step would issue two per bf16 line, and the redundant
    // ones take fill-buffer slots from the useful ones.
    constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(W));
    int64_t kk = 0;
    for (; kk + kLine <= k; kk += kLine) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) Prefetch(w + r * ldw + kk);
#pragma GCC unroll 2
      for (int64_t c = 0; c < kLine; c += 16) step(kk + c);
    }
    for (; kk + 16 <= k; kk += 16) step(kk);
    if (kk < k) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (k - kk)) - 1u);
      __m512 wv[NR];
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) wv[r] = Load16Masked(w + r * ldw + kk, mask);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = Load16Masked(x + i * ldx + kk, mask);
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_mask3_fmadd_ps(xv, wv[r], acc[i][r], mask);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) dots[i * NR + r] = Reduce(acc[i][r]);
    }
  }

  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kAttentionHeads = 4;
  static constexpr int kAttentionKeys = 6;
  static constexpr int kValueAccumulators = 24;
  static Mask MakeMask(int lanes) { return static_cast<Mask>((1u << lanes) - 1u); }
  static Vec Zero() { return _mm512_setzero_ps(); }
  static Vec Set1(float a) { return _mm512_set1_ps(a); }
  static Vec Load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec LoadMasked(const float* p, Mask mask) { return _mm512_maskz_loadu_ps(mask, p); }
  static void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static void StoreMasked(float* p, Vec v, Mask mask) { _mm512_mask_storeu_ps(p, mask, v); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
};

constexpr KernelTable kAvx512Table = MakeKernelTable<Avx512Ops>();

}  // namespace

const KernelTable& Avx512KernelTable() { return kAvx512Table; }

}  // namespace ls::cpu_internal
