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

  static void Axpy(float a, const float* v, float* out, int64_t d) {
    for (int64_t j = 0; j < d; ++j) out[j] = fmaf(a, v[j], out[j]);
  }
};

constexpr KernelTable kScalarTable = MakeKernelTable<ScalarOps>();

}  // namespace

const KernelTable& ScalarKernelTable() { return kScalarTable; }

}  // namespace ls::cpu_internal
