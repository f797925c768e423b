#include "kernels/cpu/reference.h"

#include <cmath>
#include <vector>

#include "common/dtype.h"

namespace ls::reference {

double WeightAt(const WeightView& w, int64_t i) {
  if (w.dtype == DType::kBF16) return Bf16ToFloat(static_cast<const uint16_t*>(w.data)[i]);
  return static_cast<const float*>(w.data)[i];
}

void MatMul(const float* x, int64_t m, int64_t ldx, const WeightView& w, const float* bias,
            const float* y_in, double* y, double* magnitude) {
  const int64_t n = w.rows;
  const int64_t k = w.cols;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double sum = 0.0;
      double abs_sum = 0.0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const double p = static_cast<double>(x[i * ldx + kk]) * WeightAt(w, j * k + kk);
        sum += p;
        abs_sum += std::fabs(p);
      }
      if (bias != nullptr) {
        sum += bias[j];
        abs_sum += std::fabs(bias[j]);
      }
      if (y_in != nullptr) {
        sum += y_in[i * n + j];
        abs_sum += std::fabs(y_in[i * n + j]);
      }
      y[i * n + j] = sum;
      if (magnitude != nullptr) magnitude[i * n + j] = abs_sum;
    }
  }
}

void RmsNorm(const float* x, int64_t m, int64_t d, const WeightView& weight, float eps,
             double* out) {
  for (int64_t i = 0; i < m; ++i) {
    double sum_squares = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      sum_squares += static_cast<double>(x[i * d + j]) * x[i * d + j];
    }
    const double inv = 1.0 / std::sqrt(sum_squares / static_cast<double>(d) + eps);
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = x[i * d + j] * inv * WeightAt(weight, j);
  }
}

void Rope(const float* x, int64_t m, int64_t ld, int num_heads, int head_dim,
          const int32_t* positions, const float* inv_freq, double* out) {
  const int half = head_dim / 2;
  const int64_t width = static_cast<int64_t>(num_heads) * head_dim;
  for (int64_t i = 0; i < m; ++i) {
    for (int j = 0; j < half; ++j) {
      const float angle = static_cast<float>(positions[i]) * inv_freq[j];
      const double c = std::cos(static_cast<double>(angle));
      const double s = std::sin(static_cast<double>(angle));
      for (int h = 0; h < num_heads; ++h) {
        const double a = x[i * ld + h * head_dim + j];
        const double b = x[i * ld + h * head_dim + j + half];
        out[i * width + h * head_dim + j] = a * c - b * s;
        out[i * width + h * head_dim + j + half] = b * c + a * s;
      }
    }
  }
}

void WriteKv(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t m,
             const int32_t* slot_mapping, const KvLayerView& cache) {
  const int64_t width = static_cast<int64_t>(cache.num_kv_heads) * cache.head_dim;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < width; ++j) {
      cache.k[slot_mapping[i] * width + j] = k[i * ldk + j];
      cache.v[slot_mapping[i] * width + j] = v[i * ldv + j];
    }
  }
}

void Attention(const float* q, int64_t ldq, int num_heads, const AttentionRows& rows,
               const KvLayerView& cache, float scale, double* out) {
  const int head_dim = cache.head_dim;
  const int group = num_heads / cache.num_kv_heads;
  const int64_t width = static_cast<int64_t>(num_heads) * head_dim;
  const int64_t token_stride = static_cast<int64_t>(cache.num_kv_heads) * head_dim;
  for (int64_t i = 0; i < rows.m; ++i) {
    const int32_t* table = rows.block_tables + i * rows.block_table_stride;
    const int64_t num_tokens = static_cast<int64_t>(rows.positions[i]) + 1;
    for (int h = 0; h < num_heads; ++h) {
      const int kv_head = h / group;
      auto key_row = [&](const float* base, int64_t t) {
        const int64_t slot =
            static_cast<int64_t>(table[t / cache.block_tokens]) * cache.block_tokens +
            t % cache.block_tokens;
        return base + slot * token_stride + static_cast<int64_t>(kv_head) * head_dim;
      };
      std::vector<double> scores(num_tokens);
      double max_score = -INFINITY;
      for (int64_t t = 0; t < num_tokens; ++t) {
        const float* key = key_row(cache.k, t);
        double dot = 0.0;
        for (int d = 0; d < head_dim; ++d) {
          dot += static_cast<double>(q[i * ldq + h * head_dim + d]) * key[d];
        }
        scores[t] = dot * scale;
        if (scores[t] > max_score) max_score = scores[t];
      }
      double sum = 0.0;
      for (double& s : scores) {
        s = std::exp(s - max_score);
        sum += s;
      }
      for (int d = 0; d < head_dim; ++d) {
        double acc = 0.0;
        for (int64_t t = 0; t < num_tokens; ++t) acc += scores[t] * key_row(cache.v, t)[d];
        out[i * width + h * head_dim + d] = acc / sum;
      }
    }
  }
}

void SiluMul(const float* gate, int64_t ldg, const float* up, int64_t ldu, int64_t m, int64_t f,
             double* out) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < f; ++j) {
      const double g = gate[i * ldg + j];
      out[i * f + j] = g / (1.0 + std::exp(-g)) * up[i * ldu + j];
    }
  }
}

void Embedding(const int32_t* ids, int64_t m, const WeightView& table, double* out) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < table.cols; ++j) {
      out[i * table.cols + j] = WeightAt(table, ids[i] * table.cols + j);
    }
  }
}

namespace {

// Adds the expand of one row: t[r] is the unscaled shrink of the group's stacked rank r and
// t_abs[r] its magnitude.
void ExpandRow(const LoraGroup& g, const std::vector<double>& t, const std::vector<double>& t_abs,
               double* y, double* magnitude) {
  for (int j = 0; j < g.num_slices; ++j) {
    const LoraSlice& slice = g.slices[j];
    const double scale = slice.scale;
    for (int64_t c = 0; c < slice.b.rows; ++c) {
      double sum = 0.0;
      double abs_sum = 0.0;
      for (int32_t r = 0; r < slice.rank; ++r) {
        const double b = WeightAt(slice.b, c * slice.rank + r);
        sum += b * t[slice.rank_offset + r];
        abs_sum += std::fabs(b) * t_abs[slice.rank_offset + r];
      }
      y[slice.out_offset + c] += scale * sum;
      if (magnitude != nullptr) magnitude[slice.out_offset + c] += std::fabs(scale) * abs_sum;
    }
  }
}

void StartFrom(const float* y_in, int64_t rows, int64_t ldy, double* y, double* magnitude) {
  for (int64_t i = 0; i < rows * ldy; ++i) {
    y[i] = y_in[i];
    if (magnitude != nullptr) magnitude[i] = std::fabs(y_in[i]);
  }
}

}  // namespace

void LoraLinear(const float* x, int64_t ldx, const LoraSegment* segments, int num_segments,
                const float* y_in, int64_t rows, int64_t ldy, double* y, double* magnitude) {
  StartFrom(y_in, rows, ldy, y, magnitude);
  for (int s = 0; s < num_segments; ++s) {
    if (segments[s].group == nullptr || segments[s].group->num_slices == 0) continue;
    const LoraGroup& g = *segments[s].group;
    const int64_t in = g.a.cols;
    std::vector<double> t(g.rank_total), t_abs(g.rank_total);
    for (int64_t i = segments[s].row_begin; i < segments[s].row_end; ++i) {
      for (int32_t q = 0; q < g.rank_total; ++q) {
        double sum = 0.0;
        double abs_sum = 0.0;
        for (int64_t k = 0; k < in; ++k) {
          const double p = static_cast<double>(x[i * ldx + k]) * WeightAt(g.a, q * in + k);
          sum += p;
          abs_sum += std::fabs(p);
        }
        t[q] = sum;
        t_abs[q] = abs_sum;
      }
      ExpandRow(g, t, t_abs, y + i * ldy, magnitude != nullptr ? magnitude + i * ldy : nullptr);
    }
  }
}

void LoraEmbedding(const int32_t* ids, const LoraSegment* segments, int num_segments,
                   const float* y_in, int64_t rows, int64_t ldy, double* y, double* magnitude) {
  StartFrom(y_in, rows, ldy, y, magnitude);
  for (int s = 0; s < num_segments; ++s) {
    if (segments[s].group == nullptr || segments[s].group->num_slices == 0) continue;
    const LoraGroup& g = *segments[s].group;
    std::vector<double> t(g.rank_total), t_abs(g.rank_total);
    for (int64_t i = segments[s].row_begin; i < segments[s].row_end; ++i) {
      for (int32_t q = 0; q < g.rank_total; ++q) {
        t[q] = WeightAt(g.a, static_cast<int64_t>(ids[i]) * g.rank_total + q);
        t_abs[q] = std::fabs(t[q]);
      }
      ExpandRow(g, t, t_abs, y + i * ldy, magnitude != nullptr ? magnitude + i * ldy : nullptr);
    }
  }
}

}  // namespace ls::reference
