// The CPU backend: the reference semantics of every Backend op and the fast path, with run-time
// ISA dispatch (scalar, AVX2, AVX-512; see isa.h) and a fixed thread pool.
//
// Numerics. Every reduction over K (MatMul, RmsNorm's sum of squares, attention's q.k) is the
// canonical 16-lane order of kernels/backend.h, whichever path computes it, so a row's result is
// bit-identical alone or in any batch, on any supported ISA and with any thread count. The rest
// is pinned down here, element by element, in float32 (no fused multiply-add except where
// written as fma; the kernels are built with -ffp-contract=off):
//   MatMul     r = dot; if (bias) r = r + bias[j]; y = accumulate ? y + r : r.
//   RmsNorm    ss = dot(x, x); inv = 1.0f / sqrtf(ss / float(d) + eps);
//              out[j] = (x[j] * inv) * weight[j]
//              (HF LlamaRMSNorm: variance = mean(x^2) in fp32, x * rsqrt(variance + eps), then
//              weight * that.)
//   Rope       angle = float(p) * inv_freq[j]; c = float(cos(double(angle))),
//              s = float(sin(double(angle))); x[j] = a * c - b * s; x[j + half] = b * c + a * s
//              (each product rounded, then the sum).
//   Attention  s_t = dot(q, k_t) * scale for t = 0..p; mx = max s_t; e_t = expf(s_t - mx);
//              sum = e_0 + e_1 + ... sequentially in increasing t; acc = 0, acc = fma(e_t, v_t,
//              acc) in increasing t; out = acc / sum (a division per element, not a multiply
//              by 1/sum).
//   SiluMul    out = (g / (1.0f + expf(-g))) * u.
//   Embedding  exact widening (BF16 -> F32 is a 16-bit shift).
//   LoraLinear t = dot(x, A[q]); t = t * scale_j; y = y + dot(t[slice j], B_j[c]).
//   LoraEmbedding  t = float(A[id, q]) * scale_j; then LoraLinear's expand.
// expf is the C library's, called one element at a time by every ISA path.
//
// Work split: MatMul over weight rows (columns of y) in blocks of 16; Attention over (row, kv
// head, up to 4 of its query heads) items, which share each key and value row they load; the
// row-wise ops over rows; the LoRA ops over (segment, row chunk, column block) items per phase.
// Small calls run on the calling thread alone. The partition never changes a result.
//
// Thread safety: a CpuBackend is driven by one thread at a time (the engine thread); ops are not
// reentrant (they share the pool and the attention scratch). Pointers must not alias except
// where an op says so (RmsNorm's out may equal x, Rope works in place).
#ifndef LORASERVE_KERNELS_CPU_CPU_BACKEND_H_
#define LORASERVE_KERNELS_CPU_CPU_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/thread_pool.h"
#include "kernels/backend.h"
#include "kernels/cpu/isa.h"
#include "kernels/lora.h"

namespace ls {

namespace cpu_internal {
struct KernelTable;
}  // namespace cpu_internal

struct CpuBackendOptions {
  // Threads the ops use, the calling thread included. 0: the CPUs this process may run on.
  int threads = 0;
  // The longest sequence Attention serves: positions must be < max_context. Sizes the per-thread
  // attention scratch (threads * 4 * max_context floats).
  int64_t max_context = 4096;
  // kAuto picks DetectIsa(); forcing a path this CPU lacks fails with FAILED_PRECONDITION.
  Isa isa = Isa::kAuto;
};

class CpuBackend final : public Backend {
 public:
  // INVALID_ARGUMENT for threads < 0 or max_context < 1; FAILED_PRECONDITION when options.isa is
  // not supported here (IsaSupported()).
  static absl::StatusOr<std::unique_ptr<CpuBackend>> Create(const CpuBackendOptions& options);

  ~CpuBackend() override;
  CpuBackend(const CpuBackend&) = delete;
  CpuBackend& operator=(const CpuBackend&) = delete;

  // "cpu-avx512", "cpu-avx2" or "cpu-scalar".
  std::string name() const override;
  Isa isa() const { return isa_; }
  int threads() const { return pool_.num_threads(); }
  int64_t max_context() const { return max_context_; }

  // y must not overlap x.
  absl::Status MatMul(const float* x, int64_t m, int64_t ldx, const WeightView& w,
                      const float* bias, float* y, int64_t ldy, bool accumulate) override;
  absl::Status RmsNorm(const float* x, int64_t m, int64_t d, const WeightView& weight, float eps,
                       float* out) override;
  absl::Status Rope(float* x, int64_t m, int64_t ld, int num_heads, int head_dim,
                    const int32_t* positions, const float* inv_freq) override;
  absl::Status WriteKv(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t m,
                       const int32_t* slot_mapping, const KvLayerView& cache) override;
  // Also INVALID_ARGUMENT when a position is >= max_context() or a block id the row needs is
  // outside the cache.
  absl::Status Attention(const float* q, int64_t ldq, int num_heads, const AttentionRows& rows,
                         const KvLayerView& cache, float scale, float* out, int64_t ldo) override;
  absl::Status SiluMul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t m,
                       int64_t f, float* out, int64_t ldo) override;
  absl::Status Embedding(const int32_t* ids, int64_t m, const WeightView& table, float* out,
                         int64_t ldo) override;
  // LoRA ops: kernels/cpu/cpu_lora.cc (its file comment has the work split). Same bits for
  // every thread count, ISA and segment layout.
  absl::Status LoraLinear(const float* x, int64_t ldx, const LoraSegment* segments,
                          int num_segments, float* scratch, int64_t ld_scratch, float* y,
                          int64_t ldy) override;
  absl::Status LoraEmbedding(const int32_t* ids, const LoraSegment* segments, int num_segments,
                             float* scratch, int64_t ld_scratch, float* y, int64_t ldy) override;

 private:
  CpuBackend(Isa isa, const cpu_internal::KernelTable* kernels, int threads, int64_t max_context);

  // The LoRA ops' expand phase (cpu_lora.cc), shared by LoraLinear and LoraEmbedding after their
  // checks; total_work sizes the work items.
  void ExpandLora(const LoraSegment* segments, int num_segments, int64_t total_work,
                  const float* scratch, int64_t ld_scratch, float* y, int64_t ldy);

  const Isa isa_;
  const cpu_internal::KernelTable* const kernels_;
  const int64_t max_context_;
  ThreadPool pool_;
  // Attention scores: thread t's live at t * attention_scratch_per_thread_ (room for the query
  // heads of one work item times max_context).
  const int64_t attention_scratch_per_thread_;
  std::unique_ptr<float[]> attention_scratch_;
};

}  // namespace ls

#endif  // LORASERVE_KERNELS_CPU_CPU_BACKEND_H_
