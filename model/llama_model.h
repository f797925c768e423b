// The Llama-family forward pass (llama, mistral, qwen2) over a flat batch of token rows from
// many sequences: prefill chunks and decode rows mixed, K/V in the paged cache, logits only for
// the rows that ask for them. Every op goes through the Backend, whose canonical reduction
// order makes each row's result independent of the rest of the batch
// (docs/batch_invariance.md).
#ifndef LORASERVE_MODEL_LLAMA_MODEL_H_
#define LORASERVE_MODEL_LLAMA_MODEL_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/backend.h"
#include "kernels/lora.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/lora_adapter.h"
#include "model/weights.h"

namespace ls {

// One step's rows. Row i is token token_ids[i] at position positions[i] of its sequence, whose
// block table starts at block_tables[i * block_table_stride] (rows of one sequence may share a
// table) and must already cover position positions[i]. All rows of a sequence up to and
// including its last row in this batch are attended over, so a prefill chunk may be any
// contiguous range of positions whose earlier positions are already in the cache.
struct ForwardBatch {
  absl::Span<const int32_t> token_ids;
  absl::Span<const int32_t> positions;
  absl::Span<const int32_t> block_tables;
  int64_t block_table_stride = 0;
  // Rows whose logits are wanted, in the order their logits are written.
  absl::Span<const int32_t> logits_rows;
  // LoRA: the adapter of each row (its group table, model/lora_adapter.h), null for the base
  // model; empty means every row runs on the base model. The engine orders rows so that each
  // adapter's rows are contiguous: the model makes one segment per run of equal tables (rows in
  // any order still work, with more segments). The tables must outlive the call.
  absl::Span<const LoraGroupTable* const> row_adapters;
};

// Not thread-safe: one engine thread calls Forward. Holds its activation workspace, sized at
// creation for `max_batch_rows`; Forward never allocates.
class LlamaModel {
 public:
  // `config`, `weights` and `backend` must outlive the model.
  // `max_lora_rank` > 0 sizes the LoRA scratch for adapters of up to that rank per module (a
  // fused q/k/v group stacks up to three); 0 serves the base model only.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Create(const ModelConfig* config,
                                                            const ModelWeights* weights,
                                                            Backend* backend,
                                                            int64_t max_batch_rows,
                                                            int32_t max_lora_rank = 0);

  // Runs every layer over the batch, writes each row's K/V into `cache`, and writes
  // logits[j, :] (vocab floats) for row batch.logits_rows[j]. INVALID_ARGUMENT when the batch
  // is larger than the workspace, a token id is outside the vocabulary, or a position has no
  // block; also when a row's adapter does not fit this model (layer count, rank above
  // max_lora_rank).
  absl::Status Forward(const ForwardBatch& batch, const KvCache& cache, float* logits);

  const ModelConfig& config() const { return *config_; }
  int64_t max_batch_rows() const { return max_rows_; }

 private:
  LlamaModel(const ModelConfig* config, const ModelWeights* weights, Backend* backend,
             int64_t max_rows, int32_t max_lora_rank);

  // LoRA plan of one step, built on the host before the layers run: runs of rows sharing an
  // adapter, for the batch rows and for the logits rows, in buffers sized at creation.
  struct LoraRun {
    int64_t begin = 0, end = 0;
    const LoraGroupTable* table = nullptr;
  };
  absl::Status PlanLora(const ForwardBatch& batch);
  // Segments of `runs` for the group `pick(table)` of each run (runs without an adapter skipped).
  template <class Pick>
  int FillSegments(const std::vector<LoraRun>& runs, int num_runs, Pick pick);

  const ModelConfig* config_;
  const ModelWeights* weights_;
  Backend* backend_;
  const int64_t max_rows_;
  std::vector<float> inv_freq_;
  // Workspace, [max_rows, width] each.
  std::vector<float> hidden_, normed_, gathered_, qkv_, attn_, gate_up_, act_;
  std::vector<int32_t> slots_;

  const int32_t max_lora_rank_;
  int64_t lora_ld_ = 0;              // scratch row stride: 3 * max_lora_rank
  std::vector<float> lora_scratch_;  // [max_rows, lora_ld_]
  std::vector<LoraRun> row_runs_, logit_runs_;
  int num_row_runs_ = 0, num_logit_runs_ = 0;
  std::vector<LoraSegment> segments_;  // [max_rows], refilled per projection
};

}  // namespace ls

#endif  // LORASERVE_MODEL_LLAMA_MODEL_H_
