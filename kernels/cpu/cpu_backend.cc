// Argument checks, the work split over the thread pool, and the ops whose arithmetic is the same
// on every ISA (Rope, WriteKv, SiluMul, Embedding). The per-ISA kernels are in
// kernels_{scalar,avx2,avx512}.cc behind cpu_internal::KernelTable.
#include "kernels/cpu/cpu_backend.h"

#include <sched.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "kernels/cpu/kernel_table.h"

namespace ls {
namespace {

using cpu_internal::AttentionArgs;
using cpu_internal::KernelTable;
using cpu_internal::MatMulArgs;

// Below this many multiply-adds (or element operations) an op runs on the calling thread alone:
// waking the workers would cost more than it saves.
constexpr int64_t kMinParallelWork = int64_t{1} << 15;

// MatMul hands threads whole blocks of this many weight rows.
constexpr int64_t kMatMulColumnBlock = 16;

// Skinny (decode-sized) MatMuls with at most this many rows are scheduled guided, claims of at
// least kMatMulGuidedMinCols weight rows (see MatMul).
constexpr int64_t kMatMulGuidedMaxRows = 8;
constexpr int64_t kMatMulGuidedMinCols = 64;

// SiluMul splits each row into chunks of this many elements.
constexpr int64_t kSiluChunk = 2048;

// Attention's scratch is threads * max_context floats; this bounds it.
constexpr int64_t kMaxContextLimit = int64_t{1} << 24;

int AvailableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int count = CPU_COUNT(&set);
    if (count > 0) return count;
  }
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? static_cast<int>(hardware) : 1;
}

bool IsWeightDType(DType dtype) { return dtype == DType::kF32 || dtype == DType::kBF16; }

absl::Status Invalid(absl::string_view op, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", what));
}

const KernelTable* TableFor(Isa isa) {
  switch (isa) {
#if defined(LS_CPU_X86_KERNELS)
    case Isa::kAvx512:
      return &cpu_internal::Avx512KernelTable();
    case Isa::kAvx2:
      return &cpu_internal::Avx2KernelTable();
#endif
    default:
      return &cpu_internal::ScalarKernelTable();
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<CpuBackend>> CpuBackend::Create(const CpuBackendOptions& options) {
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("CpuBackend: threads = ", options.threads, ", expected >= 0 (0 = all CPUs)"));
  }
  if (options.max_context < 1 || options.max_context > kMaxContextLimit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CpuBackend: max_context = ", options.max_context, ", expected 1..", kMaxContextLimit));
  }
  const Isa isa = options.isa == Isa::kAuto ? DetectIsa() : options.isa;
  if (!IsaSupported(isa)) {
    return absl::FailedPreconditionError(
        absl::StrCat("CpuBackend: ISA ", IsaName(isa),
                     " was requested but this CPU or build does not support it (best available: ",
                     IsaName(DetectIsa()), ")"));
  }
  const int threads = options.threads == 0 ? AvailableCpus() : options.threads;
  return std::unique_ptr<CpuBackend>(
      new CpuBackend(isa, TableFor(isa), threads, options.max_context));
}

CpuBackend::CpuBackend(Isa isa, const KernelTable* kernels, int threads, int64_t max_context)
    : isa_(isa),
      kernels_(kernels),
      max_context_(max_context),
      pool_(threads),
      attention_scratch_per_thread_(kernels->attention_heads_per_item * max_context),
      attention_scratch_(
          new float[static_cast<size_t>(pool_.num_threads()) * attention_scratch_per_thread_]) {}

CpuBackend::~CpuBackend() = default;

std::string CpuBackend::name() const { return absl::StrCat("cpu-", IsaName(isa_)); }

absl::Status CpuBackend::MatMul(const float* x, int64_t m, int64_t ldx, const WeightView& w,
                                const float* bias, float* y, int64_t ldy, bool accumulate) {
  constexpr absl::string_view kOp = "MatMul";
  if (m < 0) return Invalid(kOp, absl::StrCat("m = ", m, ", expected >= 0"));
  if (!IsWeightDType(w.dtype)) {
    return Invalid(kOp,
                   absl::StrCat("weight dtype ", DTypeName(w.dtype), ", expected F32 or BF16"));
  }
  if (w.rows < 0 || w.cols < 0) {
    return Invalid(kOp, absl::StrCat("weight shape [", w.rows, ", ", w.cols, "]"));
  }
  if (m == 0 || w.rows == 0) return absl::OkStatus();
  if (y == nullptr) return Invalid(kOp, "y is null");
  if (w.cols > 0 && (x == nullptr || w.data == nullptr)) return Invalid(kOp, "x or w is null");
  if (m > 1 && ldx < w.cols) {
    return Invalid(kOp, absl::StrCat("ldx = ", ldx, " is less than K = ", w.cols));
  }
  if (m > 1 && ldy < w.rows) {
    return Invalid(kOp, absl::StrCat("ldy = ", ldy, " is less than N = ", w.rows));
  }
  MatMulArgs args{};
  args.x = x;
  args.m = m;
  args.ldx = ldx;
  args.w = w.data;
  args.w_bf16 = w.dtype == DType::kBF16;
  args.n = w.rows;
  args.k = w.cols;
  args.bias = bias;
  args.y = y;
  args.ldy = ldy;
  args.accumulate = accumulate;
  const auto matmul = kernels_->matmul;
  if (m * w.rows * (w.cols + 1) < kMinParallelWork) {
    matmul(args, 0, w.rows);
    return absl::OkStatus();
  }
  if (m <= kMatMulGuidedMaxRows && pool_.num_threads() > 1) {
    // Decode: memory-bound, and the threads do not stream at exactly the same speed (nor start
    // at the same moment), so a static split leaves one waiting at the end of every matrix.
    // Guided scheduling instead: each claim takes a share of what is left (at least
    // kMatMulGuidedMinCols rows), so the last claims are short and the threads finish together.
    // Every column's value is independent of the range it is computed in, so which thread takes
    // which claim never changes a result.
    const int64_t n = w.rows;
    const int64_t parts = 2 * pool_.num_threads();
    std::atomic<int64_t> next{0};
    pool_.ParallelFor(pool_.num_threads(), [&](int64_t, int64_t, int) {
      int64_t begin = next.load(std::memory_order_relaxed);
      while (begin < n) {
        int64_t size = (n - begin) / parts;
        size = (size + kMatMulColumnBlock - 1) / kMatMulColumnBlock * kMatMulColumnBlock;
        if (size < kMatMulGuidedMinCols) size = kMatMulGuidedMinCols;
        const int64_t end = begin + size < n ? begin + size : n;
        if (next.compare_exchange_weak(begin, end, std::memory_order_relaxed)) {
          matmul(args, begin, end);
          begin = next.load(std::memory_order_relaxed);
        }
      }
    });
    return absl::OkStatus();
  }
  const int64_t blocks = (w.rows + kMatMulColumnBlock - 1) / kMatMulColumnBlock;
  pool_.ParallelFor(blocks, [&](int64_t begin, int64_t end, int) {
    const int64_t col_end = end * kMatMulColumnBlock;
    matmul(args, begin * kMatMulColumnBlock, col_end < w.rows ? col_end : w.rows);
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::RmsNorm(const float* x, int64_t m, int64_t d, const WeightView& weight,
                                 float eps, float* out) {
  constexpr absl::string_view kOp = "RmsNorm";
  if (m < 0 || d < 1) return Invalid(kOp, absl::StrCat("m = ", m, ", d = ", d));
  if (!IsWeightDType(weight.dtype)) {
    return Invalid(
        kOp, absl::StrCat("weight dtype ", DTypeName(weight.dtype), ", expected F32 or BF16"));
  }
  if (weight.cols != d || weight.rows != 1) {
    return Invalid(kOp, absl::StrCat("weight shape [", weight.rows, ", ", weight.cols,
                                     "], expected [1, ", d, "]"));
  }
  if (m == 0) return absl::OkStatus();
  if (x == nullptr || out == nullptr || weight.data == nullptr) return Invalid(kOp, "null pointer");
  const auto rms_norm_row = kernels_->rms_norm_row;
  const bool bf16 = weight.dtype == DType::kBF16;
  auto rows = [&](int64_t begin, int64_t end, int) {
    for (int64_t i = begin; i < end; ++i) {
      rms_norm_row(x + i * d, d, weight.data, bf16, eps, out + i * d);
    }
  };
  if (m * d < kMinParallelWork) {
    rows(0, m, 0);
  } else {
    pool_.ParallelFor(m, rows);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Rope(float* x, int64_t m, int64_t ld, int num_heads, int head_dim,
                              const int32_t* positions, const float* inv_freq) {
  constexpr absl::string_view kOp = "Rope";
  if (m < 0) return Invalid(kOp, absl::StrCat("m = ", m, ", expected >= 0"));
  if (num_heads < 1 || head_dim < 2 || head_dim % 2 != 0) {
    return Invalid(kOp, absl::StrCat("num_heads = ", num_heads, ", head_dim = ", head_dim,
                                     ", expected >= 1 and an even head_dim >= 2"));
  }
  if (m == 0) return absl::OkStatus();
  if (x == nullptr || positions == nullptr || inv_freq == nullptr) {
    return Invalid(kOp, "null pointer");
  }
  const int64_t width = static_cast<int64_t>(num_heads) * head_dim;
  if (m > 1 && ld < width) {
    return Invalid(kOp, absl::StrCat("ld = ", ld, " is less than num_heads * head_dim = ", width));
  }
  for (int64_t i = 0; i < m; ++i) {
    if (positions[i] < 0) {
      return Invalid(kOp, absl::StrCat("positions[", i, "] = ", positions[i], ", expected >= 0"));
    }
  }
  const int half = head_dim / 2;
  auto rows = [&](int64_t begin, int64_t end, int) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = x + i * ld;
      const float p = static_cast<float>(positions[i]);
      for (int j = 0; j < half; ++j) {
        const float angle = p * inv_freq[j];
        const float c = static_cast<float>(std::cos(static_cast<double>(angle)));
        const float s = static_cast<float>(std::sin(static_cast<double>(angle)));
        for (int h = 0; h < num_heads; ++h) {
          float* head = row + static_cast<int64_t>(h) * head_dim;
          const float a = head[j];
          const float b = head[j + half];
          head[j] = a * c - b * s;
          head[j + half] = b * c + a * s;
        }
      }
    }
  };
  // cos and sin in double dominate: about 50 ns per (row, j).
  if (m * half * 16 < kMinParallelWork) {
    rows(0, m, 0);
  } else {
    pool_.ParallelFor(m, rows);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::WriteKv(const float* k, int64_t ldk, const float* v, int64_t ldv,
                                 int64_t m, const int32_t* slot_mapping, const KvLayerView& cache) {
  constexpr absl::string_view kOp = "WriteKv";
  if (m < 0) return Invalid(kOp, absl::StrCat("m = ", m, ", expected >= 0"));
  if (cache.num_blocks < 1 || cache.block_tokens < 1 || cache.num_kv_heads < 1 ||
      cache.head_dim < 1) {
    return Invalid(
        kOp, absl::StrCat("cache geometry: ", cache.num_blocks, " blocks of ", cache.block_tokens,
                          " tokens, ", cache.num_kv_heads, " kv heads of ", cache.head_dim));
  }
  if (m == 0) return absl::OkStatus();
  if (k == nullptr || v == nullptr || slot_mapping == nullptr || cache.k == nullptr ||
      cache.v == nullptr) {
    return Invalid(kOp, "null pointer");
  }
  const int64_t width = static_cast<int64_t>(cache.num_kv_heads) * cache.head_dim;
  if (m > 1 && (ldk < width || ldv < width)) {
    return Invalid(kOp, absl::StrCat("ldk = ", ldk, ", ldv = ", ldv,
                                     " must be at least num_kv_heads * head_dim = ", width));
  }
  const int64_t slots = static_cast<int64_t>(cache.num_blocks) * cache.block_tokens;
  for (int64_t i = 0; i < m; ++i) {
    if (slot_mapping[i] < 0 || slot_mapping[i] >= slots) {
      return Invalid(kOp, absl::StrCat("slot_mapping[", i, "] = ", slot_mapping[i],
                                       ", expected 0..", slots - 1));
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    const int64_t slot = slot_mapping[i];
    std::memcpy(cache.k + slot * width, k + i * ldk, width * sizeof(float));
    std::memcpy(cache.v + slot * width, v + i * ldv, width * sizeof(float));
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Attention(const float* q, int64_t ldq, int num_heads,
                                   const AttentionRows& rows, const KvLayerView& cache, float scale,
                                   float* out, int64_t ldo) {
  constexpr absl::string_view kOp = "Attention";
  const int64_t m = rows.m;
  if (m < 0) return Invalid(kOp, absl::StrCat("m = ", m, ", expected >= 0"));
  if (num_heads < 1 || cache.num_kv_heads < 1 || num_heads % cache.num_kv_heads != 0) {
    return Invalid(kOp, absl::StrCat("num_heads = ", num_heads, " is not a positive multiple of ",
                                     "num_kv_heads = ", cache.num_kv_heads));
  }
  if (cache.num_blocks < 1 || cache.block_tokens < 1 || cache.head_dim < 1) {
    return Invalid(kOp, absl::StrCat("cache geometry: ", cache.num_blocks, " blocks of ",
                                     cache.block_tokens, " tokens, head_dim ", cache.head_dim));
  }
  if (m == 0) return absl::OkStatus();
  if (q == nullptr || out == nullptr || rows.positions == nullptr || rows.block_tables == nullptr ||
      cache.k == nullptr || cache.v == nullptr) {
    return Invalid(kOp, "null pointer");
  }
  const int64_t width = static_cast<int64_t>(num_heads) * cache.head_dim;
  if (m > 1 && (ldq < width || ldo < width)) {
    return Invalid(kOp, absl::StrCat("ldq = ", ldq, ", ldo = ", ldo,
                                     " must be at least num_heads * head_dim = ", width));
  }
  int64_t total_tokens = 0;  // keys visited, summed over rows
  for (int64_t i = 0; i < m; ++i) {
    const int32_t position = rows.positions[i];
    if (position < 0 || position >= max_context_) {
      return Invalid(kOp, absl::StrCat("positions[", i, "] = ", position, ", expected 0..",
                                       max_context_ - 1, " (max_context)"));
    }
    const int32_t* table = rows.block_tables + i * rows.block_table_stride;
    total_tokens += position + 1;
    const int64_t blocks = position / cache.block_tokens + 1;
    for (int64_t b = 0; b < blocks; ++b) {
      if (table[b] < 0 || table[b] >= cache.num_blocks) {
        return Invalid(kOp, absl::StrCat("row ", i, ": block_tables[", b, "] = ", table[b],
                                         ", expected 0..", cache.num_blocks - 1));
      }
    }
  }
  AttentionArgs args{};
  args.q = q;
  args.ldq = ldq;
  args.num_heads = num_heads;
  args.num_kv_heads = cache.num_kv_heads;
  args.head_dim = cache.head_dim;
  args.positions = rows.positions;
  args.block_tables = rows.block_tables;
  args.block_table_stride = rows.block_table_stride;
  args.k_cache = cache.k;
  args.v_cache = cache.v;
  args.block_tokens = cache.block_tokens;
  args.scale = scale;
  args.out = out;
  args.ldo = ldo;
  // Work items: (row, kv head, a run of up to attention_heads_per_item of its query heads).
  const auto attention = kernels_->attention;
  const int group = num_heads / cache.num_kv_heads;
  const int per_item = kernels_->attention_heads_per_item;
  const int items_per_group = (group + per_item - 1) / per_item;
  const int64_t items_per_row = static_cast<int64_t>(cache.num_kv_heads) * items_per_group;
  float* const scratch = attention_scratch_.get();
  const int64_t scratch_per_thread = attention_scratch_per_thread_;
  auto items = [&](int64_t begin, int64_t end, int thread_index) {
    float* scores = scratch + thread_index * scratch_per_thread;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / items_per_row;
      const int64_t in_row = item % items_per_row;
      const int kv_head = static_cast<int>(in_row / items_per_group);
      const int first = static_cast<int>(in_row % items_per_group) * per_item;
      const int heads = first + per_item <= group ? per_item : group - first;
      attention(args, row, kv_head * group + first, heads, scores);
    }
  };
  // Two passes over head_dim per key (q.k and p.v), plus an expf.
  if (total_tokens * num_heads * (2 * cache.head_dim + 16) < kMinParallelWork) {
    items(0, m * items_per_row, 0);
  } else {
    pool_.ParallelFor(m * items_per_row, items);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::SiluMul(const float* gate, int64_t ldg, const float* up, int64_t ldu,
                                 int64_t m, int64_t f, float* out, int64_t ldo) {
  constexpr absl::string_view kOp = "SiluMul";
  if (m < 0 || f < 0) return Invalid(kOp, absl::StrCat("m = ", m, ", f = ", f));
  if (m == 0 || f == 0) return absl::OkStatus();
  if (gate == nullptr || up == nullptr || out == nullptr) return Invalid(kOp, "null pointer");
  if (m > 1 && (ldg < f || ldu < f || ldo < f)) {
    return Invalid(kOp, absl::StrCat("ldg = ", ldg, ", ldu = ", ldu, ", ldo = ", ldo,
                                     " must be at least f = ", f));
  }
  const int64_t chunks = (f + kSiluChunk - 1) / kSiluChunk;
  auto items = [&](int64_t begin, int64_t end, int) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / chunks;
      const int64_t j0 = item % chunks * kSiluChunk;
      const int64_t j1 = j0 + kSiluChunk < f ? j0 + kSiluChunk : f;
      const float* g = gate + i * ldg;
      const float* u = up + i * ldu;
      float* o = out + i * ldo;
      for (int64_t j = j0; j < j1; ++j) o[j] = (g[j] / (1.0f + std::exp(-g[j]))) * u[j];
    }
  };
  // expf dominates: count it as about 16 element operations.
  if (m * f * 16 < kMinParallelWork) {
    items(0, m * chunks, 0);
  } else {
    pool_.ParallelFor(m * chunks, items);
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Embedding(const int32_t* ids, int64_t m, const WeightView& table,
                                   float* out, int64_t ldo) {
  constexpr absl::string_view kOp = "Embedding";
  if (m < 0) return Invalid(kOp, absl::StrCat("m = ", m, ", expected >= 0"));
  if (!IsWeightDType(table.dtype)) {
    return Invalid(kOp,
                   absl::StrCat("table dtype ", DTypeName(table.dtype), ", expected F32 or BF16"));
  }
  if (m == 0) return absl::OkStatus();
  if (ids == nullptr || out == nullptr || table.data == nullptr) {
    return Invalid(kOp, "null pointer");
  }
  const int64_t d = table.cols;
  if (m > 1 && ldo < d) {
    return Invalid(kOp, absl::StrCat("ldo = ", ldo, " is less than the row width ", d));
  }
  for (int64_t i = 0; i < m; ++i) {
    if (ids[i] < 0 || ids[i] >= table.rows) {
      return Invalid(kOp,
                     absl::StrCat("ids[", i, "] = ", ids[i], ", expected 0..", table.rows - 1));
    }
  }
  auto rows = [&](int64_t begin, int64_t end, int) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t id = ids[i];
      if (table.dtype == DType::kF32) {
        std::memcpy(out + i * ldo, static_cast<const float*>(table.data) + id * d,
                    d * sizeof(float));
      } else {
        Bf16ToFloat(static_cast<const uint16_t*>(table.data) + id * d, out + i * ldo,
                    static_cast<size_t>(d));
      }
    }
  };
  if (m * d < kMinParallelWork * 8) {
    rows(0, m, 0);
  } else {
    pool_.ParallelFor(m, rows);
  }
  return absl::OkStatus();
}

}  // namespace ls
