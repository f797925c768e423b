#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status.h"

namespace ls {
namespace {

constexpr uint8_t kSeen = 1;
constexpr uint8_t kEos = 2;
constexpr uint8_t kStop = 4;
constexpr uint8_t kKept = 8;  // Scratch mark, clear between calls.

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// top_p sorts at least this many candidates by probability before walking them; below it, the
// mass-per-bucket bound is not worth its pass.
constexpr int32_t kFirstSortChunk = 64;

// Probabilities p in (0, 1] fall into buckets by binary exponent: bucket b holds
// p in [2^-(b+1), 2^-b), the last one also every subnormal.
constexpr size_t kNumProbBuckets = 1024;

size_t ProbBucket(double p) {
  uint64_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  return std::min<size_t>(kNumProbBuckets - 1, 1023 - static_cast<size_t>(bits >> 52));
}

// Written so that NaN fails every check.
absl::Status CheckRange(absl::string_view field, float value, float lo, bool lo_open, float hi) {
  const bool ok = (lo_open ? value > lo : value >= lo) && value <= hi;
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " must be ", std::isfinite(value) ? "" : "finite and ", "in ",
                   lo_open ? "(" : "[", lo, ", ", hi, "], found ", value));
}

absl::Status CheckTokenId(absl::string_view field, int32_t id, int32_t vocab_size) {
  if (id >= 0 && id < vocab_size) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " must be in [0, ", vocab_size, ") (the vocabulary), found ", id));
}

// Larger probability first, then the lower id: a strict total order, so every sort and selection
// below has one possible result whatever the standard library's algorithm.
struct ByProbThenId {
  const double* p;
  bool operator()(int32_t a, int32_t b) const { return p[a] > p[b] || (p[a] == p[b] && a < b); }
};

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& params, int32_t vocab_size) {
  if (vocab_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size must be >= 1, found ", vocab_size));
  }
  LS_RETURN_IF_ERROR(CheckRange("sampling.temperature", params.temperature, 0.0f, false, 100.0f));
  LS_RETURN_IF_ERROR(CheckRange("sampling.top_p", params.top_p, 0.0f, true, 1.0f));
  LS_RETURN_IF_ERROR(CheckRange("sampling.min_p", params.min_p, 0.0f, false, 1.0f));
  LS_RETURN_IF_ERROR(
      CheckRange("sampling.repetition_penalty", params.repetition_penalty, 0.0f, true, 10.0f));
  LS_RETURN_IF_ERROR(
      CheckRange("sampling.presence_penalty", params.presence_penalty, -2.0f, false, 2.0f));
  LS_RETURN_IF_ERROR(
      CheckRange("sampling.frequency_penalty", params.frequency_penalty, -2.0f, false, 2.0f));

  if (params.logit_bias.size() > kMaxLogitBiasEntries) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.logit_bias must have at most ",
                                                   kMaxLogitBiasEntries, " entries, found ",
                                                   params.logit_bias.size()));
  }
  absl::flat_hash_map<int32_t, size_t> first_index;
  first_index.reserve(params.logit_bias.size());
  for (size_t i = 0; i < params.logit_bias.size(); ++i) {
    const TokenBias& entry = params.logit_bias[i];
    const std::string field = absl::StrCat("sampling.logit_bias[", i, "]");
    LS_RETURN_IF_ERROR(CheckTokenId(absl::StrCat(field, ".token_id"), entry.token_id, vocab_size));
    LS_RETURN_IF_ERROR(
        CheckRange(absl::StrCat(field, ".bias"), entry.bias, -100.0f, false, 100.0f));
    const auto [it, inserted] = first_index.emplace(entry.token_id, i);
    if (!inserted) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".token_id must be distinct, found ", entry.token_id,
                       " again (first at sampling.logit_bias[", it->second, "])"));
    }
  }

  if (params.max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("stopping.max_new_tokens must be >= 1, found ", params.max_new_tokens));
  }
  if (params.min_new_tokens > params.max_new_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("stopping.min_new_tokens must be <= stopping.max_new_tokens (",
                     params.max_new_tokens, "), found ", params.min_new_tokens));
  }
  if (params.stop_token_ids.size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(absl::StrCat("stopping.stop_token_ids must have at most ",
                                                   kMaxStopTokenIds, " ids, found ",
                                                   params.stop_token_ids.size()));
  }
  for (size_t i = 0; i < params.stop_token_ids.size(); ++i) {
    LS_RETURN_IF_ERROR(CheckTokenId(absl::StrCat("stopping.stop_token_ids[", i, "]"),
                                    params.stop_token_ids[i], vocab_size));
  }
  for (size_t i = 0; i < params.eos_token_ids.size(); ++i) {
    LS_RETURN_IF_ERROR(
        CheckTokenId(absl::StrCat("eos_token_ids[", i, "]"), params.eos_token_ids[i], vocab_size));
  }

  if (params.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "output.top_logprobs must be in [0, ", kMaxTopLogprobs, "], found ", params.top_logprobs));
  }
  return absl::OkStatus();
}

double SamplerUniform(uint64_t seed, uint64_t step) {
  // SplitMix64 (Steele, Lea, Flood 2014; constants from Vigna's splitmix64.c): the state after
  // step + 1 increments, then the output mix. Unsigned arithmetic wraps, as the algorithm needs.
  uint64_t z = seed + (step + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

absl::StatusOr<std::unique_ptr<SequenceSampler>> SequenceSampler::Create(
    const SamplingParams& params, absl::Span<const int32_t> prompt_token_ids, int32_t vocab_size) {
  LS_RETURN_IF_ERROR(ValidateSamplingParams(params, vocab_size));
  for (size_t i = 0; i < prompt_token_ids.size(); ++i) {
    LS_RETURN_IF_ERROR(
        CheckTokenId(absl::StrCat("prompt_token_ids[", i, "]"), prompt_token_ids[i], vocab_size));
  }
  return std::unique_ptr<SequenceSampler>(
      new SequenceSampler(params, prompt_token_ids, vocab_size));
}

SequenceSampler::SequenceSampler(const SamplingParams& params,
                                 absl::Span<const int32_t> prompt_token_ids, int32_t vocab_size)
    : params_(params),
      vocab_size_(vocab_size),
      greedy_(params.temperature < kGreedyTemperature),
      want_logprobs_(params.logprobs || params.top_logprobs > 0),
      flags_(static_cast<size_t>(vocab_size), 0),
      output_counts_(static_cast<size_t>(vocab_size), 0),
      work_(static_cast<size_t>(vocab_size)),
      candidates_(static_cast<size_t>(vocab_size)),
      bucket_counts_(kNumProbBuckets),
      bucket_mass_(kNumProbBuckets) {
  for (const int32_t id : params_.eos_token_ids) flags_[static_cast<size_t>(id)] |= kEos;
  for (const int32_t id : params_.stop_token_ids) flags_[static_cast<size_t>(id)] |= kStop;
  // Both lists hold distinct ids, so these bounds make every later push_back fit.
  const size_t vocab = static_cast<size_t>(vocab_size);
  seen_ids_.reserve(std::min(vocab, prompt_token_ids.size() + params_.max_new_tokens));
  output_ids_.reserve(std::min<size_t>(vocab, params_.max_new_tokens));
  for (const int32_t id : prompt_token_ids) {
    uint8_t& flag = flags_[static_cast<size_t>(id)];
    if (!(flag & kSeen)) {
      flag |= kSeen;
      seen_ids_.push_back(id);
    }
  }
}

absl::Status SequenceSampler::ApplyLogitTransforms(absl::Span<const float> logits,
                                                   absl::Span<double> out) const {
  const size_t vocab = static_cast<size_t>(vocab_size_);
  if (logits.size() != vocab || out.size() != vocab) {
    return absl::FailedPreconditionError(absl::StrCat("sampler: expected ", vocab_size_,
                                                      " logits (the vocabulary), found ",
                                                      logits.size(), " (output ", out.size(), ")"));
  }
  for (size_t i = 0; i < vocab; ++i) {
    const float v = logits[i];
    // -inf is a token the model rules out; NaN and +inf mean the forward pass went wrong.
    if (std::isnan(v) || v == std::numeric_limits<float>::infinity()) {
      return absl::InternalError(
          absl::StrCat("sampler: logits[", i, "] must be finite or -inf, found ", v));
    }
    out[i] = static_cast<double>(v);
  }
  for (const TokenBias& entry : params_.logit_bias) {
    out[static_cast<size_t>(entry.token_id)] += static_cast<double>(entry.bias);
  }
  if (params_.repetition_penalty != 1.0f) {
    const double penalty = static_cast<double>(params_.repetition_penalty);
    for (const int32_t id : seen_ids_) {
      double& x = out[static_cast<size_t>(id)];
      x = x > 0.0 ? x / penalty : x * penalty;
    }
  }
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f) {
    const double presence = static_cast<double>(params_.presence_penalty);
    const double frequency = static_cast<double>(params_.frequency_penalty);
    for (const int32_t id : output_ids_) {
      const double count = static_cast<double>(output_counts_[static_cast<size_t>(id)]);
      out[static_cast<size_t>(id)] -= frequency * count + presence;
    }
  }
  if (num_generated_ < params_.min_new_tokens) {
    for (const int32_t id : params_.stop_token_ids) out[static_cast<size_t>(id)] = kNegInf;
    if (!params_.ignore_eos) {
      for (const int32_t id : params_.eos_token_ids) out[static_cast<size_t>(id)] = kNegInf;
    }
  }
  return absl::OkStatus();
}

void SequenceSampler::SortById(int32_t n) {
  int32_t* const cand = candidates_.data();
  // A comparison sort for a few ids; for many, marking and one pass over the vocabulary is
  // cheaper than n log n.
  if (static_cast<int64_t>(n) * 16 < vocab_size_) {
    std::sort(cand, cand + n);
    return;
  }
  for (int32_t j = 0; j < n; ++j) flags_[static_cast<size_t>(cand[j])] |= kKept;
  int32_t m = 0;
  for (int32_t i = 0; i < vocab_size_; ++i) {
    uint8_t& flag = flags_[static_cast<size_t>(i)];
    if (flag & kKept) {
      flag &= static_cast<uint8_t>(~kKept);
      cand[m++] = i;
    }
  }
}

int32_t SequenceSampler::Draw() {
  double* const p = work_.data();
  int32_t* const cand = candidates_.data();
  const ByProbThenId by_prob{p};

  // Step 6: temperature, then exp relative to the maximum.
  const double temperature = static_cast<double>(params_.temperature);
  double max_y = kNegInf;
  for (int32_t i = 0; i < vocab_size_; ++i) {
    p[i] /= temperature;
    max_y = std::max(max_y, p[i]);
  }
  if (max_y == kNegInf) return -1;
  int32_t n = 0;
  for (int32_t i = 0; i < vocab_size_; ++i) {
    p[i] = std::exp(p[i] - max_y);
    if (p[i] > 0.0) cand[n++] = i;
  }
  // cand[0, n) is in increasing id order here and again after every filter.

  // Step 7: top_k.
  if (params_.top_k > 0 && params_.top_k < static_cast<uint32_t>(n)) {
    const int32_t k = static_cast<int32_t>(params_.top_k);
    std::nth_element(cand, cand + k, cand + n, by_prob);
    n = k;
    SortById(n);
  }

  // Step 8: top_p, over the walk in probability order. Only a prefix of that order is sorted:
  // its length comes from the mass per binary order of magnitude of p (the tokens of the top
  // buckets are a prefix of the order), and it grows by doubling should rounding make the walk
  // run past it.
  if (params_.top_p < 1.0f && n > 1) {
    double total = 0.0;
    for (int32_t j = 0; j < n; ++j) total += p[cand[j]];
    const double target = static_cast<double>(params_.top_p) * total;
    int32_t sorted = n;
    if (n > kFirstSortChunk) {
      std::fill(bucket_counts_.begin(), bucket_counts_.end(), 0);
      std::fill(bucket_mass_.begin(), bucket_mass_.end(), 0.0);
      for (int32_t j = 0; j < n; ++j) {
        const size_t b = ProbBucket(p[cand[j]]);
        ++bucket_counts_[b];
        bucket_mass_[b] += p[cand[j]];
      }
      int32_t count = 0;
      double mass = 0.0;
      for (size_t b = 0; b < kNumProbBuckets; ++b) {
        count += bucket_counts_[b];
        mass += bucket_mass_[b];
        if (mass >= target) break;
      }
      sorted = std::min(n, std::max(count, kFirstSortChunk));
      if (sorted < n) std::nth_element(cand, cand + sorted, cand + n, by_prob);
    }
    std::sort(cand, cand + sorted, by_prob);
    double running = 0.0;
    int32_t kept = 0;
    while (kept < n) {
      if (kept == sorted) {
        const int32_t next = std::min(n, 2 * sorted);
        std::partial_sort(cand + sorted, cand + next, cand + n, by_prob);
        sorted = next;
      }
      running += p[cand[kept++]];
      if (running >= target) break;
    }
    n = kept;
    SortById(n);
  }

  // Step 9: min_p; the top token has p == 1 exactly (exp(0)) and always stays.
  if (params_.min_p > 0.0f) {
    const double threshold = static_cast<double>(params_.min_p);
    int32_t kept = 0;
    for (int32_t j = 0; j < n; ++j) {
      if (p[cand[j]] >= threshold) cand[kept++] = cand[j];
    }
    n = kept;
  }

  // Step 10: inverse CDF in increasing id order. The running sum repeats the total's additions
  // exactly, so it ends at `total` > u * total; the fallback covers u * total rounding up to it.
  double total = 0.0;
  for (int32_t j = 0; j < n; ++j) total += p[cand[j]];
  const double target = SamplerUniform(params_.seed, num_generated_) * total;
  double running = 0.0;
  for (int32_t j = 0; j < n; ++j) {
    running += p[cand[j]];
    if (running > target) return cand[j];
  }
  return cand[n - 1];
}

void SequenceSampler::FillLogprobs(absl::Span<const float> logits, int32_t token,
                                   SampleResult* result) const {
  double max_logit = kNegInf;
  for (const float v : logits) max_logit = std::max(max_logit, static_cast<double>(v));
  double sum = 0.0;
  for (const float v : logits) sum += std::exp(static_cast<double>(v) - max_logit);
  const double log_z = max_logit + std::log(sum);
  const auto logprob = [&](int32_t i) {
    return static_cast<float>(static_cast<double>(logits[static_cast<size_t>(i)]) - log_z);
  };

  const float token_logprob = logprob(token);
  const size_t num_top = std::min<size_t>(params_.top_logprobs, static_cast<size_t>(vocab_size_));
  TokenLogprob* const top = result->top.data();
  size_t filled = 0;
  int32_t better = 0;
  for (int32_t i = 0; i < vocab_size_; ++i) {
    const float lp = logprob(i);
    if (lp > token_logprob) ++better;
    // Ids arrive in increasing order, so an equal logprob never displaces an earlier entry.
    if (num_top == 0 || (filled == num_top && !(lp > top[num_top - 1].logprob))) continue;
    size_t pos = filled < num_top ? filled++ : num_top - 1;
    while (pos > 0 && lp > top[pos - 1].logprob) {
      top[pos] = top[pos - 1];
      --pos;
    }
    top[pos] = {i, lp};
  }
  result->logprob = token_logprob;
  result->rank = better + 1;
  result->num_top = static_cast<int32_t>(filled);
}

absl::StatusOr<SampleResult> SequenceSampler::Sample(absl::Span<const float> logits) {
  if (finished_) {
    return absl::FailedPreconditionError(
        absl::StrCat("sampler: the sequence already finished after ", num_generated_, " tokens"));
  }
  LS_RETURN_IF_ERROR(ApplyLogitTransforms(logits, absl::MakeSpan(work_)));

  int32_t token = -1;
  if (greedy_) {
    double best = kNegInf;
    for (int32_t i = 0; i < vocab_size_; ++i) {
      if (work_[static_cast<size_t>(i)] > best) {
        best = work_[static_cast<size_t>(i)];
        token = i;
      }
    }
  } else {
    token = Draw();
  }
  if (token < 0) {
    return absl::InternalError(
        "sampler: no token can be chosen: every logit is -inf after bias, penalties and the "
        "min_new_tokens mask");
  }

  SampleResult result;
  result.token_id = token;
  if (want_logprobs_) FillLogprobs(logits, token, &result);

  const size_t t = static_cast<size_t>(token);
  if (!(flags_[t] & kSeen)) {
    flags_[t] |= kSeen;
    seen_ids_.push_back(token);
  }
  if (output_counts_[t]++ == 0) output_ids_.push_back(token);
  ++num_generated_;

  if ((flags_[t] & kEos) && !params_.ignore_eos) {
    result.finish_reason = FinishReason::kEos;
  } else if (flags_[t] & kStop) {
    result.finish_reason = FinishReason::kStopToken;
  } else if (num_generated_ >= params_.max_new_tokens) {
    result.finish_reason = FinishReason::kLength;
  }
  finished_ = result.finish_reason != FinishReason::kNone;
  return result;
}

}  // namespace ls
