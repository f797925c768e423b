// CpuBackend::LoraLinear and LoraEmbedding: segmented batched LoRA (Punica SGMV style) on top of
// the per-ISA MatMul kernel. kernels/lora.h has the data contract and the arithmetic.
//
// Algorithm. Two phases, each one ThreadPool::ParallelFor, with the pool's barrier between them
// (an expand needs every rank column of its rows' t):
//   1. shrink   scratch[rows, q] = dot(x[row, :], A[q, :]) for the segment's rows and the A rows
//               q of the item, each then multiplied by its slice's scale. The MatMul kernel runs
//               it with A as the weight: its skinny (decode) path for segments of up to 8 rows,
//               its tiled (prefill) path above that. LoraEmbedding gathers instead:
//               scratch[row, q] = float(A[ids[row], q]) * scale.
//   2. expand   y[rows, out_offset_j + c] += dot(scratch[row, slice j], B_j[c, :]): the MatMul
//               kernel with accumulate, B_j as the weight (K = rank_j) and y offset to the
//               slice's columns.
// Every element is one canonical dot (or one multiply), a function of its own row and adapter
// only, so neither the split below nor the ISA nor the other segments can change a bit of it.
//
// Work split. A phase's work is cut into items (segment, row chunk, column block): a segment's
// columns (rank_total A rows for the shrink; the concatenated slices' out columns for the expand)
// in blocks of a multiple of 16, and, once those run out, its rows in chunks of at least
// kMinChunkRows. Items are sized from the phase's total work: about kItemsPerThread per thread
// and never under kMinItemWork multiply-adds, so a decode batch of many 1-row, rank-4..64
// segments gets about one item per segment (the A rows of an item are read once, at the
// adapter's true rank), a lone decode row splits its columns across threads, and one long
// prefill segment (the whole batch on one adapter) splits into row chunks that each run the
// tiled path. Threads claim items dynamically from an atomic counter: items differ in size
// (ranks and segment lengths vary) and the machine may be shared, and a claim changes only who
// computes an element, never how. Small phases (under kMinParallelWork) run on the calling
// thread, one item per segment. A long segment cut into row chunks reads its A once per chunk
// (each chunk is at least kMinChunkRows rows, so A's traffic stays amortized over many rows).
//
// Nothing here allocates: the item list is never materialized (each thread walks the segments
// in claim order, recomputing a segment's split, a few integer operations).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/kernel_table.h"
#include "kernels/lora.h"

namespace ls {
namespace {

using cpu_internal::MatMulArgs;

// Below this many multiply-adds a phase runs on the calling thread alone. Higher than MatMul's
// threshold: every LoRA op has two phases, hence two pool barriers, and a decode-sized phase
// (rank 16 on one row: 30..300 thousand) gains only microseconds from a second thread, while a
// barrier costs a scheduler tick whenever a worker has been preempted (measured on a shared
// 2-core VM: batch-1 LoRA time per layer 0.09 ms quiet either way, but 0.24 ms instead of
// 0.87 ms with one core busy elsewhere).
constexpr int64_t kMinParallelWork = int64_t{1} << 17;
// An item is at least this much work (a few microseconds), so small ranks do not drown in
// claims.
constexpr int64_t kMinItemWork = int64_t{1} << 14;
// Items per thread a phase aims for: enough to even out unequal items and a noisy machine.
constexpr int64_t kItemsPerThread = 4;
// Column blocks are multiples of this (the MatMul kernels' natural grain).
constexpr int64_t kColumnBlock = 16;
// Row chunks of a long segment are at least this long, so they stay on the tiled path.
constexpr int64_t kMinChunkRows = 16;
// Per output element, the horizontal reduction and the store cost about as much as this many
// multiply-adds of a weight-streaming dot, on top of the K of its own (it dominates the expand,
// whose dots are only rank long: about 3 ns per output on AVX-512).
constexpr int64_t kPerElementWork = 32;

absl::Status Invalid(absl::string_view op, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", what));
}

bool Active(const LoraSegment& s) {
  return s.group != nullptr && s.group->num_slices > 0 && s.row_end > s.row_begin;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The columns of a phase on one segment and the work per (row, column).
struct PhaseShape {
  int64_t cols = 0;  // 0: nothing to do on this segment
  int64_t work_per_element = 0;
};

PhaseShape ShrinkShape(const LoraSegment& s, bool gather) {
  if (!Active(s)) return {};
  const LoraGroup& g = *s.group;
  return {g.rank_total, gather ? 1 : g.a.cols + kPerElementWork};
}

PhaseShape ExpandShape(const LoraSegment& s) {
  if (!Active(s)) return {};
  const LoraGroup& g = *s.group;
  int64_t cols = 0;
  int64_t work = 0;
  for (int j = 0; j < g.num_slices; ++j) {
    cols += g.slices[j].b.rows;
    work += g.slices[j].b.rows * (g.slices[j].rank + kPerElementWork);
  }
  return {cols, CeilDiv(work, cols)};
}

// How one segment's phase is cut into row_chunks x col_blocks items (row-chunk major).
struct SegmentSplit {
  int64_t rows_per_chunk = 1;
  int64_t row_chunks = 0;
  int64_t cols_per_block = 1;
  int64_t col_blocks = 0;
  int64_t items() const { return row_chunks * col_blocks; }
};

SegmentSplit Split(const LoraSegment& s, const PhaseShape& shape, int64_t target_work) {
  SegmentSplit split;
  if (shape.cols == 0) return split;
  const int64_t rows = s.row_end - s.row_begin;
  // Segment work can reach 2^31 rows x 2^31 columns in principle; the cut only needs a ratio, so
  // compute it in double.
  const double work = static_cast<double>(rows) * static_cast<double>(shape.cols) *
                      static_cast<double>(shape.work_per_element);
  const double wanted = std::ceil(work / static_cast<double>(target_work));
  const int64_t want = wanted <= 1.0 ? 1 : static_cast<int64_t>(std::min(wanted, 1e9));
  const int64_t col_units = CeilDiv(shape.cols, kColumnBlock);
  split.col_blocks = std::min(want, col_units);
  split.cols_per_block = CeilDiv(col_units, split.col_blocks) * kColumnBlock;
  split.col_blocks = CeilDiv(shape.cols, split.cols_per_block);
  split.row_chunks =
      std::max<int64_t>(1, std::min(CeilDiv(want, split.col_blocks), rows / kMinChunkRows));
  split.rows_per_chunk = CeilDiv(rows, split.row_chunks);
  split.row_chunks = CeilDiv(rows, split.rows_per_chunk);
  return split;
}

// Runs body(segment, row_begin, row_end, col_begin, col_end) over every item of a phase; see
// the file comment. `total_work` is the phase's work summed over segments.
template <class ShapeFn, class Body>
void RunPhase(ThreadPool& pool, const LoraSegment* segments, int num_segments, int64_t total_work,
              ShapeFn shape_of, Body body) {
  const int threads = pool.num_threads();
  if (threads == 1 || total_work < kMinParallelWork) {
    for (int s = 0; s < num_segments; ++s) {
      const PhaseShape shape = shape_of(segments[s]);
      if (shape.cols > 0) body(s, segments[s].row_begin, segments[s].row_end, 0, shape.cols);
    }
    return;
  }
  const int64_t target = std::max(kMinItemWork, CeilDiv(total_work, threads * kItemsPerThread));
  int64_t total_items = 0;
  for (int s = 0; s < num_segments; ++s) {
    total_items += Split(segments[s], shape_of(segments[s]), target).items();
  }
  std::atomic<int64_t> next{0};
  pool.ParallelFor(std::min<int64_t>(threads, total_items), [&](int64_t, int64_t, int) {
    // This thread's walk over the segments: claims only grow, so it never walks back.
    int s = 0;
    int64_t first_item = 0;  // the global index of segment s's first item
    SegmentSplit split = Split(segments[0], shape_of(segments[0]), target);
    for (int64_t claim = next.fetch_add(1, std::memory_order_relaxed); claim < total_items;
         claim = next.fetch_add(1, std::memory_order_relaxed)) {
      while (claim >= first_item + split.items()) {
        first_item += split.items();
        ++s;
        split = Split(segments[s], shape_of(segments[s]), target);
      }
      const LoraSegment& seg = segments[s];
      const int64_t item = claim - first_item;
      const int64_t r0 = seg.row_begin + item / split.col_blocks * split.rows_per_chunk;
      const int64_t c0 = item % split.col_blocks * split.cols_per_block;
      body(s, r0, std::min(r0 + split.rows_per_chunk, seg.row_end), c0,
           std::min(c0 + split.cols_per_block, shape_of(seg).cols));
    }
  });
}

// t[i, q] *= scale of q's slice, for rows [r0, r1) and columns [c0, c1) of the scratch.
void ScaleColumns(const LoraGroup& g, float* scratch, int64_t ld_scratch, int64_t r0, int64_t r1,
                  int64_t c0, int64_t c1) {
  for (int j = 0; j < g.num_slices; ++j) {
    const LoraSlice& slice = g.slices[j];
    const int64_t lo = std::max<int64_t>(c0, slice.rank_offset);
    const int64_t hi = std::min<int64_t>(c1, slice.rank_offset + slice.rank);
    for (int64_t i = r0; i < r1; ++i) {
      float* t = scratch + i * ld_scratch;
      for (int64_t q = lo; q < hi; ++q) t[q] = t[q] * slice.scale;
    }
  }
}

// What the checks learned about a call.
struct LoraCall {
  bool any_active = false;
  int64_t max_active_row_end = 0;
  int64_t max_out_end = 0;  // widest out_offset + out_j over active groups
  int64_t in = -1;          // A.cols shared by every group (LoraLinear)
  int64_t shrink_work = 0;
  int64_t expand_work = 0;
};

// The checks both ops share. `embedding`: A is [vocab, rank_total] instead of [rank_total, in].
absl::Status CheckSegments(absl::string_view op, bool embedding, const LoraSegment* segments,
                           int num_segments, int64_t ld_scratch, LoraCall* call) {
  if (num_segments < 0) {
    return Invalid(op, absl::StrCat("num_segments = ", num_segments, ", expected >= 0"));
  }
  if (num_segments > 0 && segments == nullptr) return Invalid(op, "segments is null");
  int64_t previous_end = 0;
  for (int s = 0; s < num_segments; ++s) {
    const LoraSegment& seg = segments[s];
    if (seg.row_begin < 0 || seg.row_end < seg.row_begin) {
      return Invalid(op, absl::StrCat("segment ", s, " has rows [", seg.row_begin, ", ",
                                      seg.row_end, "), expected 0 <= row_begin <= row_end"));
    }
    if (seg.row_begin < previous_end) {
      return Invalid(op, absl::StrCat("segment ", s, " starts at row ", seg.row_begin,
                                      " but an earlier segment ends at row ", previous_end,
                                      ": segments must be disjoint and in increasing row order"));
    }
    previous_end = std::max(previous_end, seg.row_end);
    if (seg.group == nullptr) continue;
    const LoraGroup& g = *seg.group;
    if (g.num_slices < 0 || g.num_slices > kMaxLoraSlices) {
      return Invalid(op, absl::StrCat("segment ", s, ": num_slices = ", g.num_slices,
                                      ", expected 0..", kMaxLoraSlices));
    }
    if (g.num_slices == 0) continue;
    if (g.a.dtype != DType::kF32 && g.a.dtype != DType::kBF16) {
      return Invalid(op, absl::StrCat("segment ", s, ": A dtype ", DTypeName(g.a.dtype),
                                      ", expected F32 or BF16"));
    }
    if (g.a.data == nullptr) return Invalid(op, absl::StrCat("segment ", s, ": A is null"));
    const int64_t a_rank = embedding ? g.a.cols : g.a.rows;
    const int64_t a_other = embedding ? g.a.rows : g.a.cols;
    if (g.rank_total < 1 || a_rank != g.rank_total || a_other < 1) {
      return Invalid(
          op, absl::StrCat("segment ", s, ": A is [", g.a.rows, ", ", g.a.cols, "], expected ",
                           embedding ? "[vocab >= 1, " : "[", g.rank_total,
                           embedding ? "]" : ", in >= 1]", " (rank_total = ", g.rank_total, ")"));
    }
    if (!embedding) {
      if (call->in >= 0 && g.a.cols != call->in) {
        return Invalid(op, absl::StrCat("segment ", s, ": A has ", g.a.cols,
                                        " columns (in), an earlier segment's has ", call->in));
      }
      call->in = g.a.cols;
    }
    if (ld_scratch < g.rank_total) {
      return Invalid(op, absl::StrCat("ld_scratch = ", ld_scratch, " is less than segment ", s,
                                      "'s rank_total = ", g.rank_total));
    }
    int64_t rank_sum = 0;
    for (int j = 0; j < g.num_slices; ++j) {
      const LoraSlice& slice = g.slices[j];
      if (slice.rank < 1 || slice.rank_offset != rank_sum) {
        return Invalid(op, absl::StrCat("segment ", s, " slice ", j, ": rank_offset = ",
                                        slice.rank_offset, ", rank = ", slice.rank,
                                        ", expected rank >= 1 stacked at offset ", rank_sum));
      }
      rank_sum += slice.rank;
      if (slice.b.dtype != g.a.dtype || slice.b.cols != slice.rank || slice.b.rows < 1 ||
          slice.b.data == nullptr || slice.out_offset < 0) {
        return Invalid(
            op, absl::StrCat("segment ", s, " slice ", j, ": B is ", DTypeName(slice.b.dtype), " [",
                             slice.b.rows, ", ", slice.b.cols, "] at out_offset ", slice.out_offset,
                             ", expected ", DTypeName(g.a.dtype), " [>= 1, ", slice.rank,
                             "] at out_offset >= 0, non-null"));
      }
      for (int k = 0; k < j; ++k) {
        const LoraSlice& other = g.slices[k];
        if (slice.out_offset < other.out_offset + other.b.rows &&
            other.out_offset < slice.out_offset + slice.b.rows) {
          return Invalid(op, absl::StrCat("segment ", s, ": slices ", k, " and ", j,
                                          " write overlapping columns of y"));
        }
      }
    }
    if (rank_sum != g.rank_total) {
      return Invalid(op, absl::StrCat("segment ", s, ": the slices' ranks sum to ", rank_sum,
                                      ", rank_total = ", g.rank_total));
    }
    if (seg.row_end == seg.row_begin) continue;
    call->any_active = true;
    call->max_active_row_end = std::max(call->max_active_row_end, seg.row_end);
    const int64_t rows = seg.row_end - seg.row_begin;
    int64_t expand_per_row = 0;
    for (int j = 0; j < g.num_slices; ++j) {
      const LoraSlice& slice = g.slices[j];
      call->max_out_end = std::max(call->max_out_end, slice.out_offset + slice.b.rows);
      expand_per_row += slice.b.rows * (slice.rank + kPerElementWork);
    }
    call->shrink_work += rows * g.rank_total * (embedding ? 1 : g.a.cols + kPerElementWork);
    call->expand_work += rows * expand_per_row;
  }
  return absl::OkStatus();
}

// The row-stride and pointer checks that need the whole call's extent.
absl::Status CheckOutputs(absl::string_view op, const LoraCall& call, const float* scratch,
                          const float* y, int64_t ldy) {
  if (scratch == nullptr || y == nullptr) return Invalid(op, "scratch or y is null");
  if (call.max_active_row_end > 1 && ldy < call.max_out_end) {
    return Invalid(op, absl::StrCat("ldy = ", ldy, " is less than the widest slice's end column ",
                                    call.max_out_end));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CpuBackend::LoraLinear(const float* x, int64_t ldx, const LoraSegment* segments,
                                    int num_segments, float* scratch, int64_t ld_scratch, float* y,
                                    int64_t ldy) {
  constexpr absl::string_view kOp = "LoraLinear";
  LoraCall call;
  absl::Status status =
      CheckSegments(kOp, /*embedding=*/false, segments, num_segments, ld_scratch, &call);
  if (!status.ok()) return status;
  if (!call.any_active) return absl::OkStatus();
  status = CheckOutputs(kOp, call, scratch, y, ldy);
  if (!status.ok()) return status;
  if (x == nullptr) return Invalid(kOp, "x is null");
  if (call.max_active_row_end > 1 && ldx < call.in) {
    return Invalid(kOp, absl::StrCat("ldx = ", ldx, " is less than in = ", call.in));
  }

  const auto matmul = kernels_->matmul;
  RunPhase(
      pool_, segments, num_segments, call.shrink_work,
      [](const LoraSegment& s) { return ShrinkShape(s, /*gather=*/false); },
      [&](int s, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
        const LoraGroup& g = *segments[s].group;
        MatMulArgs args{};
        args.x = x + r0 * ldx;
        args.m = r1 - r0;
        args.ldx = ldx;
        args.w = g.a.data;
        args.w_bf16 = g.a.dtype == DType::kBF16;
        args.n = g.rank_total;
        args.k = g.a.cols;
        args.y = scratch + r0 * ld_scratch;
        args.ldy = ld_scratch;
        matmul(args, c0, c1);
        ScaleColumns(g, scratch, ld_scratch, r0, r1, c0, c1);
      });
  ExpandLora(segments, num_segments, call.expand_work, scratch, ld_scratch, y, ldy);
  return absl::OkStatus();
}

absl::Status CpuBackend::LoraEmbedding(const int32_t* ids, const LoraSegment* segments,
                                       int num_segments, float* scratch, int64_t ld_scratch,
                                       float* y, int64_t ldy) {
  constexpr absl::string_view kOp = "LoraEmbedding";
  LoraCall call;
  absl::Status status =
      CheckSegments(kOp, /*embedding=*/true, segments, num_segments, ld_scratch, &call);
  if (!status.ok()) return status;
  if (!call.any_active) return absl::OkStatus();
  status = CheckOutputs(kOp, call, scratch, y, ldy);
  if (!status.ok()) return status;
  if (ids == nullptr) return Invalid(kOp, "ids is null");
  for (int s = 0; s < num_segments; ++s) {
    if (!Active(segments[s])) continue;
    const int64_t vocab = segments[s].group->a.rows;
    for (int64_t i = segments[s].row_begin; i < segments[s].row_end; ++i) {
      if (ids[i] < 0 || ids[i] >= vocab) {
        return Invalid(kOp, absl::StrCat("ids[", i, "] = ", ids[i], ", expected 0..", vocab - 1,
                                         " (segment ", s, "'s A has ", vocab, " rows)"));
      }
    }
  }

  RunPhase(
      pool_, segments, num_segments, call.shrink_work,
      [](const LoraSegment& s) { return ShrinkShape(s, /*gather=*/true); },
      [&](int s, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
        const LoraGroup& g = *segments[s].group;
        for (int64_t i = r0; i < r1; ++i) {
          const int64_t row = static_cast<int64_t>(ids[i]) * g.rank_total;
          float* t = scratch + i * ld_scratch;
          if (g.a.dtype == DType::kBF16) {
            const uint16_t* a = static_cast<const uint16_t*>(g.a.data) + row;
            for (int64_t q = c0; q < c1; ++q) t[q] = Bf16ToFloat(a[q]);
          } else {
            const float* a = static_cast<const float*>(g.a.data) + row;
            for (int64_t q = c0; q < c1; ++q) t[q] = a[q];
          }
        }
        ScaleColumns(g, scratch, ld_scratch, r0, r1, c0, c1);
      });
  ExpandLora(segments, num_segments, call.expand_work, scratch, ld_scratch, y, ldy);
  return absl::OkStatus();
}

void CpuBackend::ExpandLora(const LoraSegment* segments, int num_segments, int64_t total_work,
                            const float* scratch, int64_t ld_scratch, float* y, int64_t ldy) {
  const auto matmul = kernels_->matmul;
  RunPhase(pool_, segments, num_segments, total_work, ExpandShape,
           [&](int s, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
             // [c0, c1) counts the group's output columns slice after slice.
             const LoraGroup& g = *segments[s].group;
             int64_t slice_begin = 0;
             for (int j = 0; j < g.num_slices; ++j) {
               const LoraSlice& slice = g.slices[j];
               const int64_t slice_end = slice_begin + slice.b.rows;
               const int64_t lo = std::max(c0, slice_begin);
               const int64_t hi = std::min(c1, slice_end);
               if (lo < hi) {
                 MatMulArgs args{};
                 args.x = scratch + r0 * ld_scratch + slice.rank_offset;
                 args.m = r1 - r0;
                 args.ldx = ld_scratch;
                 args.w = slice.b.data;
                 args.w_bf16 = slice.b.dtype == DType::kBF16;
                 args.n = slice.b.rows;
                 args.k = slice.rank;
                 args.y = y + r0 * ldy + slice.out_offset;
                 args.ldy = ldy;
                 args.accumulate = true;
                 matmul(args, lo - slice_begin, hi - slice_begin);
               }
               slice_begin = slice_end;
             }
           });
}

}  // namespace ls
