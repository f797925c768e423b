// Token selection for one sequence: the logit transforms, filters and seeded draw of
// loraserve.v1.SamplingParams, the token-level stopping rules of StoppingCriteria (EOS, stop token
// ids, max/min_new_tokens; stop strings are matched on text, above this layer) and the raw
// log-probabilities of OutputOptions. No protobuf type appears here: the server maps the request
// onto SamplingParams and resolves its defaults (seed, max_new_tokens) first.
//
// One step, in the order the proto documents (every value below is a double):
//   1. x = raw logit; x += logit_bias[token]
//   2. repetition_penalty p, for every token seen in the prompt or the output so far (HF rule):
//      x = x > 0 ? x / p : x * p
//   3. presence a and frequency f, for every token generated c > 0 times (OpenAI rule, output
//      only): x -= f * c + a
//   4. while fewer than min_new_tokens tokens were generated: x = -inf for every stop_token_ids
//      entry and, unless ignore_eos, every eos_token_ids entry
//   5. temperature < kGreedyTemperature (greedy): the token with the largest x, ties to the lowest
//      id; steps 6-9 are skipped and the seed is not used.
//   6. y = x / temperature; m = max y; p = exp(y - m) (unnormalised, the top token has p = 1;
//      tokens with p == 0, e.g. masked ones, are never kept)
//   7. top_k: keep the k tokens ranked first by (p descending, id ascending)
//   8. top_p: Z = sum of the kept p in increasing id order; walking the kept tokens by
//      (p descending, id ascending), keep the shortest prefix whose running sum reaches top_p * Z
//   9. min_p: keep the tokens with p >= min_p (the top token has p = 1, so this is min_p times
//      the most likely token's probability)
//  10. draw: u = SamplerUniform(seed, n) for the n-th generated token (0-based); Z = sum of the
//      kept p in increasing id order; the token is the first kept one, in increasing id order,
//      whose running sum exceeds u * Z.
// The draw accumulates by id rather than by probability: the distribution is the same, no sort
// is needed when nothing is filtered, and a small perturbation of the logits (CUDA vs CPU) moves
// only the interval boundaries instead of reordering the intervals. The result is a pure
// function of (params, prompt, the logits of every step so far): the same whatever else is
// batched, bit for bit on any machine that computes exp/log the same way (libm; sampler.cc is
// built without floating-point contraction).
//
// Token ids are int32_t, the engine's type. The proto's uint32 ids must be mapped with a
// saturating conversion (min(id, INT32_MAX)) so an out-of-range id stays out of range and is
// rejected here.
#ifndef LORASERVE_MODEL_SAMPLER_H_
#define LORASERVE_MODEL_SAMPLER_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace ls {

// Temperatures below this select greedy decoding (the proto: "values below 1e-5 count as 0").
inline constexpr float kGreedyTemperature = 1e-5f;
// Limits from the proto.
inline constexpr uint32_t kMaxTopLogprobs = 20;
inline constexpr size_t kMaxLogitBiasEntries = 1024;
inline constexpr size_t kMaxStopTokenIds = 64;

// A bias added to one token's logit (loraserve.v1.TokenBias).
struct TokenBias {
  int32_t token_id = 0;
  float bias = 0.0f;
};

// Everything that decides one sequence's tokens. Defaults are the proto's, except max_new_tokens,
// which the server must resolve (its proto default depends on the server and the prompt).
// Ranges are checked by ValidateSamplingParams; messages use the proto field paths in brackets.
struct SamplingParams {
  // --- loraserve.v1.SamplingParams [sampling.*] ---
  float temperature = 1.0f;           // [0, 100]; below kGreedyTemperature: greedy.
  uint32_t top_k = 0;                 // 0 or >= vocab size: keep all.
  float top_p = 1.0f;                 // (0, 1]; 1 keeps all.
  float min_p = 0.0f;                 // [0, 1]; 0 keeps all.
  float repetition_penalty = 1.0f;    // (0, 10]; 1: none.
  float presence_penalty = 0.0f;      // [-2, 2]
  float frequency_penalty = 0.0f;     // [-2, 2]
  uint64_t seed = 0;                  // Always set by the caller (the server draws one if unset).
  std::vector<TokenBias> logit_bias;  // <= 1024 entries, distinct ids < vocab, bias [-100, 100].

  // --- loraserve.v1.StoppingCriteria, token part [stopping.*] ---
  uint32_t max_new_tokens = 0;          // >= 1; the effective value, defaults resolved.
  uint32_t min_new_tokens = 0;          // <= max_new_tokens.
  std::vector<int32_t> stop_token_ids;  // <= 64 ids, each < vocab; duplicates are harmless.
  bool ignore_eos = false;              // EOS is then an ordinary token (never masked, never ends).
  // From the model (generation_config / tokenizer), not the request [eos_token_ids]; ids < vocab.
  std::vector<int32_t> eos_token_ids;

  // --- loraserve.v1.OutputOptions [output.*] ---
  bool logprobs = false;      // Report the sampled token's raw logprob and rank.
  uint32_t top_logprobs = 0;  // [0, 20]; > 0 implies logprobs.
};

// Checks every range above against a vocabulary of `vocab_size` (>= 1) tokens. Returns
// INVALID_ARGUMENT naming the first offending field and its value, e.g.
//   "sampling.top_p must be in (0, 1], found 1.5"
//   "sampling.logit_bias[3].token_id must be in [0, 32000) (the vocabulary), found 40000"
// Floats must be finite. Allocates (to find duplicate bias ids); call it off the step path.
absl::Status ValidateSamplingParams(const SamplingParams& params, int32_t vocab_size);

// Why a token ended its sequence. Values match loraserve.v1.FinishReason.
enum class FinishReason : int32_t {
  kNone = 0,       // The sequence continues.
  kLength = 1,     // max_new_tokens tokens have been generated.
  kEos = 2,        // An eos_token_ids entry was sampled (not with ignore_eos).
  kStopToken = 3,  // A stop_token_ids entry was sampled.
};

// A token and its log-probability under the raw distribution.
struct TokenLogprob {
  int32_t token_id = 0;
  float logprob = 0.0f;
};

// The outcome of one step. Holds no heap memory.
struct SampleResult {
  int32_t token_id = 0;
  // Only when params.logprobs or top_logprobs > 0 (else 0): log_softmax of the raw logits (no
  // bias, penalty, mask, temperature or filter) at token_id, computed in double, rounded to float;
  // and its 1-based rank: 1 + the number of tokens whose (float) logprob is strictly greater, so
  // ties share a rank.
  float logprob = 0.0f;
  int32_t rank = 0;
  // The min(top_logprobs, vocab) most likely tokens under the raw distribution, by logprob
  // descending, ties by id ascending. May include token_id. Read through top_logprobs().
  std::array<TokenLogprob, kMaxTopLogprobs> top{};
  int32_t num_top = 0;
  // When several apply, kEos before kStopToken before kLength.
  FinishReason finish_reason = FinishReason::kNone;

  absl::Span<const TokenLogprob> top_logprobs() const {
    return absl::MakeConstSpan(top.data(), static_cast<size_t>(num_top));
  }
};

// The n-th (0-based) output of SplitMix64 seeded with `seed`, as a double in [0, 1) (its top 53
// bits times 2^-53): the uniform draw of step `step`. A pure function of its arguments, so a
// sequence's random stream never depends on the batch it runs in or on earlier steps.
double SamplerUniform(uint64_t seed, uint64_t step);

// The sampler of one generation request: owns its parameters, the token counts the penalties
// need and scratch sized to the vocabulary (about 17 bytes per token: 1.6 MiB for a 100k
// vocabulary), all allocated by Create(); Sample() never allocates.
//
// Thread safety: none. Engine thread only: one sampler per sequence, used by one thread.
class SequenceSampler {
 public:
  // Validates `params` (ValidateSamplingParams) and `prompt_token_ids` (each in [0, vocab_size);
  // INVALID_ARGUMENT naming "prompt_token_ids[i]") and allocates. The prompt is only read here
  // (it seeds the repetition penalty) and may be empty.
  static absl::StatusOr<std::unique_ptr<SequenceSampler>> Create(
      const SamplingParams& params, absl::Span<const int32_t> prompt_token_ids, int32_t vocab_size);

  SequenceSampler(const SequenceSampler&) = delete;
  SequenceSampler& operator=(const SequenceSampler&) = delete;

  // Chooses the next token from this step's raw logits ([vocab_size] floats, borrowed for the
  // call) as the file comment describes, records it in the sequence's history and says whether
  // it ends the sequence. Errors, none of them the client's fault:
  //   FAILED_PRECONDITION: logits.size() != vocab_size, or the sequence already finished.
  //   INTERNAL: a logit is NaN or +inf (-inf is allowed: that token has probability 0), or no
  //             token is left to choose (every logit -inf after the transforms).
  // On error the history is unchanged.
  absl::StatusOr<SampleResult> Sample(absl::Span<const float> logits);

  // Steps 1-4 (bias, penalties, min_new_tokens mask) for the next step given the history so far:
  // writes the transformed logits into `out` ([vocab_size]). What Sample() draws from; public
  // for tests and debugging. Errors as Sample() (except "already finished").
  absl::Status ApplyLogitTransforms(absl::Span<const float> logits, absl::Span<double> out) const;

  // Tokens sampled so far.
  uint32_t num_generated() const { return num_generated_; }
  bool finished() const { return finished_; }
  int32_t vocab_size() const { return vocab_size_; }
  const SamplingParams& params() const { return params_; }

 private:
  SequenceSampler(const SamplingParams& params, absl::Span<const int32_t> prompt_token_ids,
                  int32_t vocab_size);

  // Steps 6-10 over work_ (transformed logits in, clobbered); returns the token or -1 when none
  // has a non-zero probability.
  int32_t Draw();
  // Reorders candidates_[0, n) by increasing id.
  void SortById(int32_t n);
  // Fills logprob, rank and top of `result` for `token` from the raw logits.
  void FillLogprobs(absl::Span<const float> logits, int32_t token, SampleResult* result) const;

  const SamplingParams params_;
  const int32_t vocab_size_;
  const bool greedy_;
  const bool want_logprobs_;

  // Per token: kSeen (in the prompt or output: repetition penalty), kEos, kStop bits.
  std::vector<uint8_t> flags_;
  // Per token: occurrences in the output (presence/frequency penalties).
  std::vector<uint32_t> output_counts_;
  // The ids with kSeen set / with output_counts_ > 0, in first-seen order, so the penalties
  // touch only those. Capacity reserved up front (each holds distinct ids, bounded by the
  // vocabulary and by prompt + max_new_tokens), so push_back never reallocates.
  std::vector<int32_t> seen_ids_;
  std::vector<int32_t> output_ids_;

  // Scratch for one step: transformed logits, then probabilities; candidate token ids; the
  // count and mass of the candidates per binary order of magnitude of p (for top_p).
  std::vector<double> work_;
  std::vector<int32_t> candidates_;
  std::vector<int32_t> bucket_counts_;
  std::vector<double> bucket_mass_;

  uint32_t num_generated_ = 0;
  bool finished_ = false;
};

}  // namespace ls

#endif  // LORASERVE_MODEL_SAMPLER_H_
