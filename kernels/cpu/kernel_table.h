// Internal to the CPU backend: the per-ISA kernels behind CpuBackend, as a table of plain
// function pointers. cpu_backend.cc validates arguments, splits the work over the thread pool and
// calls these; kernels_{scalar,avx2,avx512}.cc each fill one table.
//
// This header is included by files compiled with different -m flags, so it holds only trivial
// structs (value-initialize them: `MatMulArgs args{};`) and declarations: nothing here may be an
// inline function or a template instance that the linker could share between an AVX-512 file and
// a baseline one.
#ifndef LORASERVE_KERNELS_CPU_KERNEL_TABLE_H_
#define LORASERVE_KERNELS_CPU_KERNEL_TABLE_H_

#include <stdint.h>

namespace ls::cpu_internal {

// One MatMul call (Backend::MatMul) after validation: y[i, j] (+)= dot(x[i, :], w[j, :]) + bias[j]
// for i < m, j < n, K = k. `w` holds n rows of k elements, F32 (`w_bf16` false) or BF16 bits.
struct MatMulArgs {
  const float* x;
  int64_t m;
  int64_t ldx;
  const void* w;
  bool w_bf16;
  int64_t n;
  int64_t k;
  const float* bias;  // [n] or null
  float* y;
  int64_t ldy;
  bool accumulate;
};

// One Attention call after validation (see Backend::Attention); the cache is float32
// [num_blocks, block_tokens, num_kv_heads, head_dim].
struct AttentionArgs {
  const float* q;
  int64_t ldq;
  int num_heads;
  int num_kv_heads;
  int head_dim;
  const int32_t* positions;
  const int32_t* block_tables;
  int64_t block_table_stride;
  const float* k_cache;
  const float* v_cache;
  int32_t block_tokens;
  float scale;
  float* out;
  int64_t ldo;
};

struct KernelTable {
  // Columns [col_begin, col_end) of y, for all m rows. Any column range gives the same bits for
  // each element (the canonical order), so ranges can be split across threads freely.
  void (*matmul)(const MatMulArgs& args, int64_t col_begin, int64_t col_end);
  // One row: out = x / sqrt(mean(x^2) + eps) * weight (see CpuBackend::RmsNorm for the exact
  // float32 formula). `weight` is F32, or BF16 bits when `weight_bf16`. out may equal x.
  void (*rms_norm_row)(const float* x, int64_t d, const void* weight, bool weight_bf16, float eps,
                       float* out);
  // Query heads [head0, head0 + heads) of row `row`, which must all map to one kv head and number
  // at most attention_heads_per_item. `scores` has room for heads * (positions[row] + 1) floats.
  void (*attention)(const AttentionArgs& args, int64_t row, int head0, int heads, float* scores);
  int attention_heads_per_item;
};

// Always available.
const KernelTable& ScalarKernelTable();
// Only defined where the x86 kernels are compiled (LS_CPU_X86_KERNELS); only call after
// IsaSupported() said yes.
const KernelTable& Avx2KernelTable();
const KernelTable& Avx512KernelTable();

}  // namespace ls::cpu_internal

#endif  // LORASERVE_KERNELS_CPU_KERNEL_TABLE_H_
