// The portable path: plain C++ with one fmaf per step, in exactly the canonical order. It is the
// executable statement of what the vector paths must reproduce bit for bit, and the fallback on
// CPUs without AVX2. Built with the baseline flags (fmaf is a library call there, which is
// correctly rounded like the FMA instruction).
#include <math.h>
#include <stdint.h>

#include "kernels/cpu/kernel_impl.h"
#include "kernels/cpu/kernel_table.h"

namespace ls::cpu_internal {
namespace {

struct ScalarOps {
  static constexpr int kMaxTile = kMaxTileDim * kMaxTileDim;
  static constexpr int kSkinnyMaxRows = 8;
  static constexpr int kTileRows = 4;
  static constexpr int kTileCols = 4;
  static int SkinnyRows(int64_t m) { return static_cast<int>(m); }
  static int SkinnyCols(int /*rows*/) { return 4; }

  template <int MR, int NR, class W>
  static void Tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t k, float* dots) {
    for (int i = 0; i < MR; ++i) {
      for (int r = 0; r < NR; ++r) {
        const float* xi = x + i * ldx;
        const W* wr = w + r * ldw;
        float lanes[16] = {};
        for (int64_t kk = 0; kk < k; ++kk) {
          lanes[kk & 15] = fmaf(xi[kk], LoadWeight(wr, kk), lanes[kk & 15]);
        }
        for (int l = 0; l < 8; ++l) lanes[l] += lanes[l + 8];
        for (int l = 0; l < 4; ++l) lanes[l] += lanes[l + 4];
        for (int l = 0; l < 2; ++l) lanes[l] += lanes[l + 2];
        dots[i * NR + r] = lanes[0] + lanes[1];
      }
    }
  }

  using Vec = float;
  using Mask = int;
  static constexpr int kLanes = 1;
  static constexpr int kAttentionHeads = 4;
  static constexpr int kAttentionKeys = 8;
  static constexpr int kValueAccumulators = 32;
  static Mask MakeMask(int lanes) { return lanes; }
  static Vec Zero() { return 0.0f; }
  static Vec Set1(float a) { return a; }
  static Vec Load(const float* p) { return *p; }
  static Vec LoadMasked(const float* p, Mask /*mask*/) { return *p; }
  static void Store(float* p, Vec v) { *p = v; }
  static void StoreMasked(float* p, Vec v, Mask /*mask*/) { *p = v; }
  static Vec Fma(Vec a, Vec b, Vec c) { return fmaf(a, b, c); }
};

constexpr KernelTable kScalarTable = MakeKernelTable<ScalarOps>();

}  // namespace

const KernelTable& ScalarKernelTable() { return kScalarTable; }

}  // namespace ls::cpu_internal
