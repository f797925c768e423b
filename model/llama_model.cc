#include "model/llama_model.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace ls {

LlamaModel::LlamaModel(const ModelConfig* config, const ModelWeights* weights, Backend* backend,
                       int64_t max_rows, int32_t max_lora_rank)
    : config_(config),
      weights_(weights),
      backend_(backend),
      max_rows_(max_rows),
      max_lora_rank_(max_lora_rank) {}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(const ModelConfig* config,
                                                               const ModelWeights* weights,
                                                               Backend* backend,
                                                               int64_t max_batch_rows,
                                                               int32_t max_lora_rank) {
  if (max_batch_rows <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch_rows must be positive, got ", max_batch_rows));
  }
  if (max_lora_rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_lora_rank must be >= 0, got ", max_lora_rank));
  }
  std::unique_ptr<LlamaModel> model(
      new LlamaModel(config, weights, backend, max_batch_rows, max_lora_rank));
  const ModelConfig& c = *config;
  const int64_t h = c.hidden_size;
  const int64_t q_cols = int64_t{c.num_attention_heads} * c.head_dim;
  const int64_t qkv_cols = q_cols + 2 * int64_t{c.num_key_value_heads} * c.head_dim;
  const size_t rows = static_cast<size_t>(max_batch_rows);
  model->hidden_.assign(rows * h, 0.f);
  model->normed_.assign(rows * h, 0.f);
  model->gathered_.assign(rows * h, 0.f);
  model->qkv_.assign(rows * qkv_cols, 0.f);
  model->attn_.assign(rows * q_cols, 0.f);
  model->gate_up_.assign(rows * 2 * c.intermediate_size, 0.f);
  model->act_.assign(rows * c.intermediate_size, 0.f);
  model->slots_.assign(rows, 0);
  model->inv_freq_ = c.RopeInvFreq();
  if (max_lora_rank > 0) {
    model->lora_ld_ = int64_t{kMaxLoraSlices} * max_lora_rank;
    model->lora_scratch_.assign(rows * static_cast<size_t>(model->lora_ld_), 0.f);
    model->row_runs_.resize(rows);
    model->logit_runs_.resize(rows);
    model->segments_.resize(rows);
  }
  return model;
}

absl::Status LlamaModel::PlanLora(const ForwardBatch& batch) {
  num_row_runs_ = 0;
  num_logit_runs_ = 0;
  if (batch.row_adapters.empty()) return absl::OkStatus();
  const int64_t m = static_cast<int64_t>(batch.token_ids.size());
  if (static_cast<int64_t>(batch.row_adapters.size()) != m) {
    return absl::InvalidArgumentError(
        absl::StrCat("Forward: ", batch.row_adapters.size(), " row adapters for ", m, " rows"));
  }
  bool any = false;
  for (const LoraGroupTable* table : batch.row_adapters) {
    if (table == nullptr) continue;
    any = true;
    if (table->num_layers() != config_->num_hidden_layers) {
      return absl::InvalidArgumentError(absl::StrCat("Forward: an adapter has ",
                                                     table->num_layers(), " layers, the model ",
                                                     config_->num_hidden_layers));
    }
  }
  if (!any) return absl::OkStatus();
  if (max_lora_rank_ == 0) {
    return absl::FailedPreconditionError(
        "Forward: a row has a LoRA adapter but the model was created with max_lora_rank 0");
  }
  auto build = [](auto&& table_of, int64_t n, std::vector<LoraRun>& runs) {
    int count = 0;
    for (int64_t i = 0; i < n; ++i) {
      const LoraGroupTable* t = table_of(i);
      if (count > 0 && runs[count - 1].table == t) {
        runs[count - 1].end = i + 1;
      } else {
        runs[count++] = LoraRun{i, i + 1, t};
      }
    }
    return count;
  };
  num_row_runs_ = build([&](int64_t i) { return batch.row_adapters[i]; }, m, row_runs_);
  num_logit_runs_ = build([&](int64_t j) { return batch.row_adapters[batch.logits_rows[j]]; },
                          static_cast<int64_t>(batch.logits_rows.size()), logit_runs_);
  return absl::OkStatus();
}

template <class Pick>
int LlamaModel::FillSegments(const std::vector<LoraRun>& runs, int num_runs, Pick pick) {
  int n = 0;
  for (int r = 0; r < num_runs; ++r) {
    if (runs[r].table == nullptr) continue;
    const LoraGroup& group = pick(*runs[r].table);
    if (group.num_slices == 0) continue;
    segments_[n++] = LoraSegment{runs[r].begin, runs[r].end, &group};
  }
  return n;
}

absl::Status LlamaModel::Forward(const ForwardBatch& batch, const KvCache& cache, float* logits) {
  const ModelConfig& c = *config_;
  const int64_t m = static_cast<int64_t>(batch.token_ids.size());
  if (m == 0) return absl::OkStatus();
  if (m > max_rows_ || batch.positions.size() != batch.token_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat("Forward: ", m, " rows (",
                                                   batch.positions.size(),
                                                   " positions) for a workspace of ", max_rows_));
  }
  const int32_t block_tokens = cache.block_tokens();
  for (int64_t i = 0; i < m; ++i) {
    const int32_t id = batch.token_ids[i];
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " outside the vocabulary [0, ", c.vocab_size, ")"));
    }
    const int32_t pos = batch.positions[i];
    const int64_t block_index = pos / block_tokens;
    if (pos < 0 || block_index >= batch.block_table_stride) {
      return absl::InvalidArgumentError(
          absl::StrCat("position ", pos, " of row ", i, " has no block"));
    }
    const int32_t block = batch.block_tables[i * batch.block_table_stride + block_index];
    if (block < 0 || block >= cache.num_blocks()) {
      return absl::InvalidArgumentError(absl::StrCat("row ", i, " maps to block ", block));
    }
    slots_[i] = block * block_tokens + pos % block_tokens;
  }
  for (int32_t r : batch.logits_rows) {
    if (r < 0 || r >= m) {
      return absl::InvalidArgumentError(absl::StrCat("logits row ", r, " outside the batch"));
    }
  }

  const int64_t h = c.hidden_size;
  const int nh = c.num_attention_heads;
  const int nkv = c.num_key_value_heads;
  const int hd = c.head_dim;
  const int64_t q_cols = int64_t{nh} * hd;
  const int64_t kv_cols = int64_t{nkv} * hd;
  const int64_t qkv_cols = q_cols + 2 * kv_cols;
  const int64_t f = c.intermediate_size;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  AttentionRows rows;
  rows.m = m;
  rows.positions = batch.positions.data();
  rows.block_tables = batch.block_tables.data();
  rows.block_table_stride = batch.block_table_stride;

  float* hidden = hidden_.data();
  float* normed = normed_.data();
  float* qkv = qkv_.data();
  float* attn = attn_.data();
  float* gate_up = gate_up_.data();
  float* act = act_.data();

  LS_RETURN_IF_ERROR(PlanLora(batch));
  // Adds the LoRA deltas of projection `pick` (a LoraGroupTable accessor) for the batch's rows.
  float* const scratch = lora_scratch_.data();
  auto lora = [&](auto pick, const float* x, int64_t ldx, float* y, int64_t ldy) {
    const int n = FillSegments(row_runs_, num_row_runs_, pick);
    if (n == 0) return absl::OkStatus();
    return backend_->LoraLinear(x, ldx, segments_.data(), n, scratch, lora_ld_, y, ldy);
  };
  auto proj = [](int layer, LoraProjection which) {
    return [layer, which](const LoraGroupTable& t) -> const LoraGroup& {
      return t.group(layer, which);
    };
  };

  LS_RETURN_IF_ERROR(backend_->Embedding(batch.token_ids.data(), m, weights_->embed(), hidden, h));
  if (const int n =
          FillSegments(row_runs_, num_row_runs_,
                       [](const LoraGroupTable& t) -> const LoraGroup& { return t.embed(); });
      n > 0) {
    LS_RETURN_IF_ERROR(backend_->LoraEmbedding(batch.token_ids.data(), segments_.data(), n, scratch,
                                               lora_ld_, hidden, h));
  }
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& w = weights_->layers()[static_cast<size_t>(l)];
    const KvLayerView& kv = cache.layer_views()[static_cast<size_t>(l)];
    // Attention block: h += o(attn(rope(qkv(norm(h))))).
    LS_RETURN_IF_ERROR(backend_->RmsNorm(hidden, m, h, w.input_norm, c.rms_norm_eps, normed));
    LS_RETURN_IF_ERROR(
        backend_->MatMul(normed, m, h, w.qkv, w.qkv_bias, qkv, qkv_cols, /*accumulate=*/false));
    LS_RETURN_IF_ERROR(lora(proj(l, LoraProjection::kQkv), normed, h, qkv, qkv_cols));
    LS_RETURN_IF_ERROR(
        backend_->Rope(qkv, m, qkv_cols, nh, hd, batch.positions.data(), inv_freq_.data()));
    LS_RETURN_IF_ERROR(backend_->Rope(qkv + q_cols, m, qkv_cols, nkv, hd, batch.positions.data(),
                                      inv_freq_.data()));
    LS_RETURN_IF_ERROR(backend_->WriteKv(qkv + q_cols, qkv_cols, qkv + q_cols + kv_cols, qkv_cols,
                                         m, slots_.data(), kv));
    LS_RETURN_IF_ERROR(backend_->Attention(qkv, qkv_cols, nh, rows, kv, scale, attn, q_cols));
    LS_RETURN_IF_ERROR(
        backend_->MatMul(attn, m, q_cols, w.o, w.o_bias, hidden, h, /*accumulate=*/true));
    // The delta joins the residual after the base projection: h + o(x) + d instead of
    // h + (o(x) + d), a difference of one rounding.
    LS_RETURN_IF_ERROR(lora(proj(l, LoraProjection::kO), attn, q_cols, hidden, h));
    // MLP block: h += down(silu(gate(norm(h))) * up(norm(h))).
    LS_RETURN_IF_ERROR(backend_->RmsNorm(hidden, m, h, w.post_norm, c.rms_norm_eps, normed));
    LS_RETURN_IF_ERROR(
        backend_->MatMul(normed, m, h, w.gate_up, nullptr, gate_up, 2 * f, /*accumulate=*/false));
    LS_RETURN_IF_ERROR(lora(proj(l, LoraProjection::kGateUp), normed, h, gate_up, 2 * f));
    LS_RETURN_IF_ERROR(backend_->SiluMul(gate_up, 2 * f, gate_up + f, 2 * f, m, f, act, f));
    LS_RETURN_IF_ERROR(
        backend_->MatMul(act, m, f, w.down, nullptr, hidden, h, /*accumulate=*/true));
    LS_RETURN_IF_ERROR(lora(proj(l, LoraProjection::kDown), act, f, hidden, h));
  }
  // Final norm and head for the requested rows only, gathered first.
  const int64_t n_logits = static_cast<int64_t>(batch.logits_rows.size());
  if (n_logits == 0) return absl::OkStatus();
  for (int64_t j = 0; j < n_logits; ++j) {
    const float* src = hidden + static_cast<int64_t>(batch.logits_rows[j]) * h;
    std::copy(src, src + h, gathered_.data() + j * h);
  }
  LS_RETURN_IF_ERROR(backend_->RmsNorm(gathered_.data(), n_logits, h, weights_->final_norm(),
                                       c.rms_norm_eps, normed));
  LS_RETURN_IF_ERROR(backend_->MatMul(normed, n_logits, h, weights_->lm_head(), nullptr, logits,
                                      c.vocab_size, /*accumulate=*/false));
  const int n =
      FillSegments(logit_runs_, num_logit_runs_,
                   [](const LoraGroupTable& t) -> const LoraGroup& { return t.lm_head(); });
  if (n == 0) return absl::OkStatus();
  return backend_->LoraLinear(normed, h, segments_.data(), n, scratch, lora_ld_, logits,
                              c.vocab_size);
}

}  // namespace ls
