// Tests for model/sampler.h: every ValidateSamplingParams rule, greedy decoding and its tie-break,
// the sampled distribution against softmax(logits / T), the exact kept sets of top_k, top_p and
// min_p and their order of application, a bit-exact comparison with an independent reference of
// the documented algorithm, the penalty and bias formulas, the stopping rules, reproducibility
// per (seed, step), raw logprobs and their top-N ordering, bad logits, and that Sample() never
// allocates. Logits come from a fixed mt19937 stream (fully specified by the standard) and are
// never degenerate.
#include "model/sampler.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

// Counts every operator new in this binary, so a test can prove Sample() does not allocate.
namespace {
std::atomic<int64_t> g_num_allocations{0};
}  // namespace

void* operator new(std::size_t size) {
  g_num_allocations.fetch_add(1, std::memory_order_relaxed);
  void* p = std::malloc(size == 0 ? 1 : size);
  if (p == nullptr) std::abort();
  return p;
}
// Out of line, so GCC's -Wmismatched-new-delete does not see free() meet operator new's pointer.
__attribute__((noinline)) void operator delete(void* p) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace ls {
namespace {

using ::testing::HasSubstr;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- Helpers -------------------------------------------------------------------------------

// Uniform in [-scale, scale) from mt19937's specified output (no distribution object, whose
// algorithm the standard leaves to the library).
std::vector<float> RandomLogits(uint32_t seed, int32_t vocab, float scale) {
  std::mt19937 gen(seed);
  std::vector<float> logits(static_cast<size_t>(vocab));
  for (float& v : logits) {
    v = static_cast<float>((static_cast<double>(gen()) / 4294967296.0 * 2.0 - 1.0) * scale);
  }
  return logits;
}

// Logits whose softmax is `probs` (up to float rounding).
std::vector<float> LogitsFromProbs(const std::vector<double>& probs) {
  std::vector<float> logits;
  for (const double p : probs) logits.push_back(static_cast<float>(std::log(p)));
  return logits;
}

std::vector<double> Softmax(absl::Span<const float> logits, double temperature) {
  double max = -kInf;
  for (const float v : logits) max = std::max(max, static_cast<double>(v) / temperature);
  std::vector<double> p;
  double sum = 0.0;
  for (const float v : logits) {
    p.push_back(std::exp(static_cast<double>(v) / temperature - max));
    sum += p.back();
  }
  for (double& x : p) x /= sum;
  return p;
}

SamplingParams BaseParams() {
  SamplingParams params;
  params.max_new_tokens = 1000;
  params.seed = 1;
  return params;
}

std::unique_ptr<SequenceSampler> MustCreate(const SamplingParams& params, int32_t vocab,
                                            const std::vector<int32_t>& prompt = {}) {
  absl::StatusOr<std::unique_ptr<SequenceSampler>> sampler =
      SequenceSampler::Create(params, prompt, vocab);
  EXPECT_TRUE(sampler.ok()) << sampler.status();
  return sampler.ok() ? std::move(sampler).value() : nullptr;
}

SampleResult MustSample(SequenceSampler& sampler, absl::Span<const float> logits) {
  absl::StatusOr<SampleResult> result = sampler.Sample(logits);
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *result : SampleResult{};
}

// Draws the first token with seeds 0..num_seeds-1 and counts how often each token comes out.
std::vector<int64_t> CountFirstDraws(SamplingParams params, absl::Span<const float> logits,
                                     int32_t num_seeds) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  std::vector<int64_t> counts(logits.size(), 0);
  for (int32_t seed = 0; seed < num_seeds; ++seed) {
    params.seed = static_cast<uint64_t>(seed) * 7919u + 3u;
    std::unique_ptr<SequenceSampler> sampler = MustCreate(params, vocab);
    if (sampler == nullptr) return counts;
    ++counts[static_cast<size_t>(MustSample(*sampler, logits).token_id)];
  }
  return counts;
}

// The set of tokens drawn at least once.
std::set<int32_t> Drawn(const std::vector<int64_t>& counts) {
  std::set<int32_t> drawn;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] > 0) drawn.insert(static_cast<int32_t>(i));
  }
  return drawn;
}

// A logit vector that makes `token` the clear argmax, for steering greedy decoding.
std::vector<float> OneHot(int32_t vocab, int32_t token) {
  std::vector<float> logits = RandomLogits(static_cast<uint32_t>(token) + 100u, vocab, 1.0f);
  logits[static_cast<size_t>(token)] = 50.0f;
  return logits;
}

// ---- ValidateSamplingParams ------------------------------------------------------------------

TEST(ValidateSamplingParamsTest, AcceptsDefaultsAndEveryBoundary) {
  EXPECT_TRUE(ValidateSamplingParams(BaseParams(), 100).ok());

  SamplingParams params = BaseParams();
  params.temperature = 0.0f;
  params.top_p = 1.0f;
  params.min_p = 0.0f;
  params.repetition_penalty = 10.0f;
  params.presence_penalty = -2.0f;
  params.frequency_penalty = 2.0f;
  params.top_k = 4'000'000'000u;  // >= vocab: same as 0
  params.top_logprobs = 20;
  params.max_new_tokens = 5;
  params.min_new_tokens = 5;
  for (int32_t i = 0; i < 1024; ++i) params.logit_bias.push_back({i, i % 2 ? 100.0f : -100.0f});
  for (int32_t i = 0; i < 64; ++i) params.stop_token_ids.push_back(2000 - 1 - i);
  params.eos_token_ids = {0, 1999};
  EXPECT_TRUE(ValidateSamplingParams(params, 2000).ok()) << ValidateSamplingParams(params, 2000);

  params.temperature = 100.0f;
  params.min_p = 1.0f;
  params.repetition_penalty = 1e-6f;
  params.presence_penalty = 2.0f;
  params.frequency_penalty = -2.0f;
  EXPECT_TRUE(ValidateSamplingParams(params, 2000).ok()) << ValidateSamplingParams(params, 2000);
}

struct RejectCase {
  std::string name;
  std::function<void(SamplingParams&)> mutate;
  std::string field;
  std::string found;
};

TEST(ValidateSamplingParamsTest, EachRuleRejectsNamingFieldAndValue) {
  constexpr int32_t kVocab = 100;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<RejectCase> cases = {
      {"temperature below 0", [](SamplingParams& p) { p.temperature = -0.5f; },
       "sampling.temperature", "found -0.5"},
      {"temperature above 100", [](SamplingParams& p) { p.temperature = 100.5f; },
       "sampling.temperature", "found 100.5"},
      {"temperature NaN", [&](SamplingParams& p) { p.temperature = nan; }, "sampling.temperature",
       "found nan"},
      {"temperature inf", [&](SamplingParams& p) { p.temperature = inf; }, "sampling.temperature",
       "found inf"},
      {"top_p 0", [](SamplingParams& p) { p.top_p = 0.0f; }, "sampling.top_p", "found 0"},
      {"top_p above 1", [](SamplingParams& p) { p.top_p = 1.25f; }, "sampling.top_p", "found 1.25"},
      {"top_p NaN", [&](SamplingParams& p) { p.top_p = nan; }, "sampling.top_p", "found nan"},
      {"min_p below 0", [](SamplingParams& p) { p.min_p = -0.25f; }, "sampling.min_p",
       "found -0.25"},
      {"min_p above 1", [](SamplingParams& p) { p.min_p = 1.5f; }, "sampling.min_p", "found 1.5"},
      {"repetition_penalty 0", [](SamplingParams& p) { p.repetition_penalty = 0.0f; },
       "sampling.repetition_penalty", "found 0"},
      {"repetition_penalty negative", [](SamplingParams& p) { p.repetition_penalty = -1.0f; },
       "sampling.repetition_penalty", "found -1"},
      {"repetition_penalty above 10", [](SamplingParams& p) { p.repetition_penalty = 10.5f; },
       "sampling.repetition_penalty", "found 10.5"},
      {"presence_penalty above 2", [](SamplingParams& p) { p.presence_penalty = 2.5f; },
       "sampling.presence_penalty", "found 2.5"},
      {"presence_penalty below -2", [](SamplingParams& p) { p.presence_penalty = -2.5f; },
       "sampling.presence_penalty", "found -2.5"},
      {"frequency_penalty above 2", [](SamplingParams& p) { p.frequency_penalty = 3.0f; },
       "sampling.frequency_penalty", "found 3"},
      {"frequency_penalty -inf", [&](SamplingParams& p) { p.frequency_penalty = -inf; },
       "sampling.frequency_penalty", "found -inf"},
      {"logit_bias too many",
       [](SamplingParams& p) {
         p.logit_bias.clear();
         for (int32_t i = 0; i < 1025; ++i) p.logit_bias.push_back({i % kVocab, 0.0f});
       },
       "sampling.logit_bias must have at most 1024 entries", "found 1025"},
      {"logit_bias id == vocab",
       [](SamplingParams& p) {
         p.logit_bias = {{1, 1.0f}, {100, 1.0f}};
       },
       "sampling.logit_bias[1].token_id", "found 100"},
      {"logit_bias id negative",
       [](SamplingParams& p) {
         p.logit_bias = {{-3, 1.0f}};
       },
       "sampling.logit_bias[0].token_id", "found -3"},
      {"logit_bias bias above 100",
       [](SamplingParams& p) {
         p.logit_bias = {{5, 100.5f}};
       },
       "sampling.logit_bias[0].bias", "found 100.5"},
      {"logit_bias bias below -100",
       [](SamplingParams& p) {
         p.logit_bias = {{5, -101.0f}};
       },
       "sampling.logit_bias[0].bias", "found -101"},
      {"logit_bias bias NaN",
       [&](SamplingParams& p) {
         p.logit_bias = {{5, nan}};
       },
       "sampling.logit_bias[0].bias", "found nan"},
      {"logit_bias duplicate id",
       [](SamplingParams& p) {
         p.logit_bias = {{7, 1.0f}, {8, 1.0f}, {7, -1.0f}};
       },
       "sampling.logit_bias[2].token_id", "found 7 again (first at sampling.logit_bias[0])"},
      {"max_new_tokens 0", [](SamplingParams& p) { p.max_new_tokens = 0; },
       "stopping.max_new_tokens", "found 0"},
      {"min_new_tokens above max",
       [](SamplingParams& p) {
         p.max_new_tokens = 10;
         p.min_new_tokens = 11;
       },
       "stopping.min_new_tokens must be <= stopping.max_new_tokens (10)", "found 11"},
      {"stop_token_ids too many",
       [](SamplingParams& p) { p.stop_token_ids = std::vector<int32_t>(65, 3); },
       "stopping.stop_token_ids must have at most 64", "found 65"},
      {"stop_token_ids id >= vocab",
       [](SamplingParams& p) {
         p.stop_token_ids = {4, 250};
       },
       "stopping.stop_token_ids[1]", "found 250"},
      {"stop_token_ids id negative", [](SamplingParams& p) { p.stop_token_ids = {-1}; },
       "stopping.stop_token_ids[0]", "found -1"},
      {"eos_token_ids id >= vocab", [](SamplingParams& p) { p.eos_token_ids = {100}; },
       "eos_token_ids[0]", "found 100"},
      {"top_logprobs above 20", [](SamplingParams& p) { p.top_logprobs = 21; },
       "output.top_logprobs", "found 21"},
  };
  for (const RejectCase& c : cases) {
    SCOPED_TRACE(c.name);
    SamplingParams params = BaseParams();
    c.mutate(params);
    const absl::Status status = ValidateSamplingParams(params, kVocab);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(status.message(), HasSubstr(c.field));
    EXPECT_THAT(status.message(), HasSubstr(c.found));
    // Create() applies the same rules.
    const auto sampler = SequenceSampler::Create(params, {}, kVocab);
    EXPECT_EQ(sampler.status(), status);
  }
}

TEST(ValidateSamplingParamsTest, RejectsEmptyVocabulary) {
  const absl::Status status = ValidateSamplingParams(BaseParams(), 0);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("vocab_size must be >= 1, found 0"));
}

TEST(SequenceSamplerTest, CreateRejectsPromptIdsOutsideVocabulary) {
  const std::vector<int32_t> prompt = {1, 2, 10};
  const auto sampler = SequenceSampler::Create(BaseParams(), prompt, 10);
  EXPECT_EQ(sampler.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(sampler.status().message(), HasSubstr("prompt_token_ids[2]"));
  EXPECT_THAT(sampler.status().message(), HasSubstr("found 10"));
}

// ---- Greedy ----------------------------------------------------------------------------------

TEST(SequenceSamplerTest, GreedyPicksTheArgmaxWhateverTheSeedAndFilters) {
  constexpr int32_t kVocab = 500;
  for (uint32_t step = 0; step < 20; ++step) {
    const std::vector<float> logits = RandomLogits(step, kVocab, 4.0f);
    const int32_t argmax =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    for (const uint64_t seed : {0ull, 1ull, 12345ull}) {
      SamplingParams params = BaseParams();
      params.temperature = 0.0f;
      params.seed = seed;
      params.top_k = 3;
      params.top_p = 0.01f;
      params.min_p = 0.9f;
      std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab);
      ASSERT_NE(sampler, nullptr);
      EXPECT_EQ(MustSample(*sampler, logits).token_id, argmax);
    }
  }
}

TEST(SequenceSamplerTest, GreedyTiesGoToTheLowestId) {
  std::vector<float> logits = RandomLogits(7, 20, 1.0f);
  logits[9] = 3.0f;
  logits[5] = 3.0f;
  logits[14] = 3.0f;
  // Below 1e-5 counts as greedy: the tie never resolves to 9 or 14, for any seed.
  for (const float temperature : {0.0f, 5e-6f, 9.9e-6f}) {
    SamplingParams params = BaseParams();
    params.temperature = temperature;
    const std::vector<int64_t> counts = CountFirstDraws(params, logits, 200);
    EXPECT_EQ(counts[5], 200) << "temperature " << temperature;
  }
  // At 1e-5 it samples, and the three tied tokens share the draws.
  SamplingParams params = BaseParams();
  params.temperature = 1e-5f;
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 200)), (std::set<int32_t>{5, 9, 14}));
}

TEST(SequenceSamplerTest, GreedyChoosesAfterBiasAndPenalties) {
  std::vector<float> logits = RandomLogits(3, 10, 1.0f);
  logits[2] = 5.0f;
  logits[4] = 4.0f;
  logits[6] = 3.0f;
  SamplingParams params = BaseParams();
  params.temperature = 0.0f;
  params.logit_bias = {{6, 1.5f}};   // 6 -> 4.5
  params.repetition_penalty = 2.0f;  // 2 is in the prompt -> 2.5
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, 10, {2});
  ASSERT_NE(sampler, nullptr);
  EXPECT_EQ(MustSample(*sampler, logits).token_id, 6);
  EXPECT_EQ(MustSample(*sampler, logits).token_id, 4);  // 6 is now penalised: 2.25
}

// ---- Temperature and the sampled distribution -------------------------------------------------

TEST(SequenceSamplerTest, SamplesFollowSoftmaxOfLogitsOverTemperature) {
  constexpr int32_t kVocab = 10;
  constexpr int32_t kDraws = 40000;
  const std::vector<float> logits = RandomLogits(11, kVocab, 2.0f);
  for (const float temperature : {0.5f, 1.0f, 2.5f}) {
    SCOPED_TRACE(temperature);
    SamplingParams params = BaseParams();
    params.temperature = temperature;
    const std::vector<int64_t> counts = CountFirstDraws(params, logits, kDraws);
    const std::vector<double> p = Softmax(logits, temperature);
    double chi2 = 0.0;
    for (int32_t i = 0; i < kVocab; ++i) {
      const double expected = p[static_cast<size_t>(i)] * kDraws;
      const double observed = static_cast<double>(counts[static_cast<size_t>(i)]);
      chi2 += (observed - expected) * (observed - expected) / expected;
      EXPECT_NEAR(observed / kDraws, p[static_cast<size_t>(i)], 0.01) << "token " << i;
    }
    // 9 degrees of freedom: P(chi2 > 33.7) = 1e-4.
    EXPECT_LT(chi2, 33.7);
  }
}

// ---- top_k, top_p, min_p ----------------------------------------------------------------------

TEST(SequenceSamplerTest, TopKKeepsExactlyTheKMostLikely) {
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.5f, 0.7f, 3.0f, -0.3f, 1.1f, 0.0f, 2.5f};
  SamplingParams params = BaseParams();
  params.temperature = 3.0f;  // Flat enough that every kept token shows up.
  params.top_k = 4;
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 3000)), (std::set<int32_t>{5, 9, 1, 3}));
  params.top_k = 1;
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 300)), (std::set<int32_t>{5}));
  for (const uint32_t k : {0u, 10u, 11u, 1'000'000u}) {
    params.top_k = k;
    EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 3000)).size(), 10u) << "top_k " << k;
  }
}

TEST(SequenceSamplerTest, TopKTiesAtTheBoundaryKeepTheLowerIds) {
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f, 3.0f, 3.0f, 0.0f};
  SamplingParams params = BaseParams();
  params.top_k = 2;
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 500)), (std::set<int32_t>{1, 3}));
  params.top_k = 5;
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 2000)), (std::set<int32_t>{1, 2, 3, 4, 5}));
}

TEST(SequenceSamplerTest, TopPKeepsTheSmallestPrefixReachingP) {
  // By probability: 1 (0.4), 3 (0.3), 4 (0.15), 2 (0.1), 0 (0.05).
  const std::vector<float> logits = LogitsFromProbs({0.05, 0.4, 0.1, 0.3, 0.15});
  const std::vector<std::pair<float, std::set<int32_t>>> cases = {
      {0.05f, {1}},
      {0.39f, {1}},
      {0.41f, {1, 3}},
      {0.69f, {1, 3}},
      {0.71f, {1, 3, 4}},
      {0.84f, {1, 3, 4}},
      {0.86f, {1, 3, 4, 2}},
      {0.94f, {1, 3, 4, 2}},
      {0.96f, {0, 1, 2, 3, 4}},
      {1.0f, {0, 1, 2, 3, 4}},
  };
  for (const auto& [top_p, kept] : cases) {
    SamplingParams params = BaseParams();
    params.top_p = top_p;
    EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 3000)), kept) << "top_p " << top_p;
  }
}

TEST(SequenceSamplerTest, TopPBoundaryIsInclusiveAndTiesGoToLowerIds) {
  // Equal logits: every p is exactly 1, so the running sums are exact. With top_p = 0.5 of 4
  // tokens the first two reach the target 2.0 exactly and suffice.
  const std::vector<float> logits = {0.3f, 0.3f, 0.3f, 0.3f};
  SamplingParams params = BaseParams();
  params.top_p = 0.5f;
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 500)), (std::set<int32_t>{0, 1}));
  params.top_p = 0.25f;
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 500)), (std::set<int32_t>{0}));
  params.top_p = 0.75f;
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 500)), (std::set<int32_t>{0, 1, 2}));
}

TEST(SequenceSamplerTest, MinPDropsTokensBelowAFractionOfTheTopProbability) {
  const std::vector<float> logits = LogitsFromProbs({0.4, 0.2, 0.19, 0.1, 0.11});
  const std::vector<std::pair<float, std::set<int32_t>>> cases = {
      {0.0f, {0, 1, 2, 3, 4}},
      {0.24f, {0, 1, 2, 3, 4}},
      {0.26f, {0, 1, 2, 4}},
      {0.45f, {0, 1, 2}},
      {0.49f, {0, 1}},
      {0.51f, {0}},
      {1.0f, {0}},
  };
  for (const auto& [min_p, kept] : cases) {
    SamplingParams params = BaseParams();
    params.min_p = min_p;
    EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 3000)), kept) << "min_p " << min_p;
  }  // The bound is inclusive: min_p = 1 keeps every token tied with the top one.
  SamplingParams params = BaseParams();
  params.min_p = 1.0f;
  EXPECT_EQ(Drawn(CountFirstDraws(params, {0.5f, 2.0f, 2.0f, 1.0f, 2.0f}, 1000)),
            (std::set<int32_t>{1, 2, 4}));
}

TEST(SequenceSamplerTest, TopPRenormalisesOverTheTopKSet) {
  const std::vector<float> logits = LogitsFromProbs({0.4, 0.3, 0.2, 0.1});
  SamplingParams params = BaseParams();
  params.top_p = 0.5f;
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 2000)), (std::set<int32_t>{0, 1}));
  // After top_k = 2 the top token holds 0.4 / 0.7 = 0.57 >= 0.5 on its own.
  params.top_k = 2;
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 2000)), (std::set<int32_t>{0}));
}

TEST(SequenceSamplerTest, TemperatureAppliesBeforeTheFilters) {
  const std::vector<float> logits = LogitsFromProbs({0.4, 0.3, 0.2, 0.1});
  SamplingParams params = BaseParams();
  params.min_p = 0.6f;  // At T = 1: keeps p >= 0.24.
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 2000)), (std::set<int32_t>{0, 1}));
  params.temperature = 4.0f;  // Ratios to the top become (p / 0.4)^(1/4) >= 0.707.
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 2000)), (std::set<int32_t>{0, 1, 2, 3}));
  params.min_p = 0.0f;
  params.top_p = 0.65f;  // At T = 4 the top two hold 0.55, so a third is needed.
  EXPECT_EQ(Drawn(CountFirstDraws(params, logits, 3000)), (std::set<int32_t>{0, 1, 2}));
}

// An independent transcription of steps 6-10 of the header, with full sorts instead of the
// sampler's selection and doubling partial sorts. Returns the token for uniform `u`.
int32_t ReferenceDraw(absl::Span<const double> x, const SamplingParams& params, double u) {
  const double t = static_cast<double>(params.temperature);
  double m = -kInf;
  for (const double v : x) m = std::max(m, v / t);
  std::vector<double> p;
  for (const double v : x) p.push_back(std::exp(v / t - m));
  std::vector<int32_t> ids;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] > 0.0) ids.push_back(static_cast<int32_t>(i));
  }
  const auto by_prob = [&](int32_t a, int32_t b) {
    const size_t ua = static_cast<size_t>(a), ub = static_cast<size_t>(b);
    return p[ua] > p[ub] || (p[ua] == p[ub] && a < b);
  };
  const auto id_order_sum = [&](std::vector<int32_t> set) {
    std::sort(set.begin(), set.end());
    double sum = 0.0;
    for (const int32_t i : set) sum += p[static_cast<size_t>(i)];
    return sum;
  };
  std::sort(ids.begin(), ids.end(), by_prob);
  if (params.top_k > 0 && params.top_k < ids.size()) ids.resize(params.top_k);
  if (params.top_p < 1.0f && ids.size() > 1) {
    const double target = static_cast<double>(params.top_p) * id_order_sum(ids);
    double running = 0.0;
    size_t kept = 0;
    while (kept < ids.size()) {
      running += p[static_cast<size_t>(ids[kept++])];
      if (running >= target) break;
    }
    ids.resize(kept);
  }
  std::vector<int32_t> kept;
  for (const int32_t i : ids) {
    if (p[static_cast<size_t>(i)] >= static_cast<double>(params.min_p)) kept.push_back(i);
  }
  std::sort(kept.begin(), kept.end());
  const double target = u * id_order_sum(kept);
  double running = 0.0;
  for (const int32_t i : kept) {
    running += p[static_cast<size_t>(i)];
    if (running > target) return i;
  }
  return kept.back();
}

TEST(SequenceSamplerTest, MatchesAnIndependentReferenceOfTheDocumentedAlgorithm) {
  // Large nearly-flat vocabularies make top_p nuclei of hundreds or thousands of tokens, so the
  // sampler's partial sort has to grow its sorted prefix several times.
  struct Shape {
    int32_t vocab;
    float scale;
  };
  int32_t checked = 0;
  for (const Shape shape : {Shape{7, 2.0f}, Shape{300, 3.0f}, Shape{3000, 0.5f}}) {
    for (const float temperature : {0.3f, 1.0f, 1.7f}) {
      for (const uint32_t top_k : {0u, 1u, 5u, 64u, 299u, 5000u}) {
        for (const float top_p : {1.0f, 0.999f, 0.9f, 0.5f, 0.1f}) {
          for (const float min_p : {0.0f, 0.05f, 0.5f}) {
            SamplingParams params = BaseParams();
            params.temperature = temperature;
            params.top_k = top_k;
            params.top_p = top_p;
            params.min_p = min_p;
            params.seed = static_cast<uint64_t>(checked) * 1000003u;
            std::unique_ptr<SequenceSampler> sampler = MustCreate(params, shape.vocab);
            ASSERT_NE(sampler, nullptr);
            for (uint32_t step = 0; step < 4; ++step) {
              const std::vector<float> logits =
                  RandomLogits(static_cast<uint32_t>(checked) + step, shape.vocab, shape.scale);
              const std::vector<double> x(logits.begin(), logits.end());
              const int32_t expected = ReferenceDraw(x, params, SamplerUniform(params.seed, step));
              ASSERT_EQ(MustSample(*sampler, logits).token_id, expected)
                  << "vocab " << shape.vocab << " T " << temperature << " top_k " << top_k
                  << " top_p " << top_p << " min_p " << min_p << " step " << step;
            }
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_EQ(checked, 3 * 3 * 6 * 5 * 3);
}

// ---- Penalties and bias ------------------------------------------------------------------------

TEST(SequenceSamplerTest, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogits) {
  constexpr int32_t kVocab = 12;
  SamplingParams params = BaseParams();
  params.temperature = 0.0f;
  params.repetition_penalty = 1.7f;
  const double penalty = static_cast<double>(params.repetition_penalty);
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab, {1, 2, 2, 9});
  ASSERT_NE(sampler, nullptr);
  // Every logit nonzero, both signs among the penalised ones.
  std::vector<float> logits = RandomLogits(5, kVocab, 3.0f);
  logits[1] = 2.5f;
  logits[2] = -1.25f;
  logits[9] = 0.75f;
  logits[7] = -0.5f;
  std::vector<double> out(kVocab);
  ASSERT_TRUE(sampler->ApplyLogitTransforms(logits, absl::MakeSpan(out)).ok());
  for (int32_t i = 0; i < kVocab; ++i) {
    const double raw = logits[static_cast<size_t>(i)];
    const bool seen = i == 1 || i == 2 || i == 9;
    const double expected = !seen ? raw : raw > 0 ? raw / penalty : raw * penalty;
    EXPECT_EQ(out[static_cast<size_t>(i)], expected) << "token " << i;
  }
  // A generated token joins the penalised set, once however often it repeats.
  MustSample(*sampler, OneHot(kVocab, 7));
  MustSample(*sampler, OneHot(kVocab, 7));
  ASSERT_TRUE(sampler->ApplyLogitTransforms(logits, absl::MakeSpan(out)).ok());
  EXPECT_EQ(out[7], static_cast<double>(logits[7]) * penalty);
  EXPECT_EQ(out[1], static_cast<double>(logits[1]) / penalty);
  EXPECT_EQ(out[3], static_cast<double>(logits[3]));
}

TEST(SequenceSamplerTest, PresenceAndFrequencyPenaltiesCountGeneratedTokensOnly) {
  constexpr int32_t kVocab = 16;
  for (const std::pair<float, float>& penalties :
       {std::pair{0.5f, 0.25f}, std::pair{-1.5f, 2.0f}, std::pair{2.0f, -0.75f}}) {
    const float presence = penalties.first;
    const float frequency = penalties.second;
    SamplingParams params = BaseParams();
    params.temperature = 0.0f;
    params.presence_penalty = presence;
    params.frequency_penalty = frequency;
    std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab, {3, 4});
    ASSERT_NE(sampler, nullptr);
    for (const int32_t token : {4, 4, 6, 4, 11}) {
      ASSERT_EQ(MustSample(*sampler, OneHot(kVocab, token)).token_id, token);
    }
    const std::vector<float> logits = RandomLogits(9, kVocab, 3.0f);
    std::vector<double> out(kVocab);
    ASSERT_TRUE(sampler->ApplyLogitTransforms(logits, absl::MakeSpan(out)).ok());
    const auto expected = [&](int32_t token, int count) {
      const double raw = logits[static_cast<size_t>(token)];
      if (count == 0) return raw;
      return raw - (static_cast<double>(frequency) * count + static_cast<double>(presence));
    };
    for (int32_t i = 0; i < kVocab; ++i) {
      const int count = i == 4 ? 3 : (i == 6 || i == 11) ? 1 : 0;  // 3 (prompt only): 0
      EXPECT_EQ(out[static_cast<size_t>(i)], expected(i, count)) << "token " << i;
    }
  }
}

TEST(SequenceSamplerTest, TransformsApplyInTheDocumentedOrder) {
  // Token 1: in the prompt and generated twice; its raw logit is negative but the bias makes it
  // positive, so the repetition penalty divides; then presence and frequency subtract.
  constexpr int32_t kVocab = 8;
  SamplingParams params = BaseParams();
  params.temperature = 0.0f;
  params.logit_bias = {{1, 1.5f}, {5, -0.25f}};
  params.repetition_penalty = 1.3f;
  params.presence_penalty = 0.4f;
  params.frequency_penalty = 0.3f;
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab, {1, 5});
  ASSERT_NE(sampler, nullptr);
  MustSample(*sampler, OneHot(kVocab, 1));
  MustSample(*sampler, OneHot(kVocab, 1));
  std::vector<float> logits = RandomLogits(2, kVocab, 1.0f);
  logits[1] = -0.5f;
  logits[5] = 0.125f;
  std::vector<double> out(kVocab);
  ASSERT_TRUE(sampler->ApplyLogitTransforms(logits, absl::MakeSpan(out)).ok());
  const double rep = static_cast<double>(params.repetition_penalty);
  const double one = (-0.5 + 1.5) / rep - (0.3 * 2 + 0.4);
  EXPECT_EQ(out[1], (static_cast<double>(-0.5f) + static_cast<double>(1.5f)) / rep -
                        (static_cast<double>(0.3f) * 2 + static_cast<double>(0.4f)));
  EXPECT_NEAR(out[1], one, 1e-7);
  // Token 5: bias makes it negative (-0.125), so the penalty multiplies.
  EXPECT_EQ(out[5], (static_cast<double>(0.125f) + static_cast<double>(-0.25f)) * rep);
}

TEST(SequenceSamplerTest, LogitBiasOfMinus100BansAndPlus100Forces) {
  constexpr int32_t kVocab = 20;
  const std::vector<float> logits = RandomLogits(21, kVocab, 3.0f);
  const int32_t argmax =
      static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  SamplingParams params = BaseParams();
  params.logit_bias = {{argmax, -100.0f}};
  const std::vector<int64_t> banned = CountFirstDraws(params, logits, 3000);
  EXPECT_EQ(banned[static_cast<size_t>(argmax)], 0);
  EXPECT_EQ(Drawn(banned).size(), static_cast<size_t>(kVocab - 1));

  const int32_t argmin =
      static_cast<int32_t>(std::min_element(logits.begin(), logits.end()) - logits.begin());
  params.logit_bias = {{argmin, 100.0f}};
  EXPECT_EQ(CountFirstDraws(params, logits, 1000)[static_cast<size_t>(argmin)], 1000);
}

TEST(SequenceSamplerTest, LogitBiasShiftsTheDistributionBySoftmax) {
  constexpr int32_t kDraws = 40000;
  const std::vector<float> logits = RandomLogits(8, 6, 1.0f);
  SamplingParams params = BaseParams();
  params.logit_bias = {{0, 1.0f}, {3, -2.0f}};
  std::vector<float> biased = logits;
  biased[0] += 1.0f;
  biased[3] -= 2.0f;
  const std::vector<double> p = Softmax(biased, 1.0);
  const std::vector<int64_t> counts = CountFirstDraws(params, logits, kDraws);
  for (size_t i = 0; i < p.size(); ++i) {
    EXPECT_NEAR(static_cast<double>(counts[i]) / kDraws, p[i], 0.01) << "token " << i;
  }
}

// ---- Stopping ----------------------------------------------------------------------------------

TEST(SequenceSamplerTest, MinNewTokensMasksEosAndStopIdsUntilReached) {
  constexpr int32_t kVocab = 10;
  std::vector<float> logits = RandomLogits(4, kVocab, 1.0f);
  logits[2] = 9.0f;  // EOS, the favourite
  logits[7] = 8.0f;  // stop token
  logits[4] = 7.0f;
  SamplingParams params = BaseParams();
  params.temperature = 0.0f;
  params.eos_token_ids = {2};
  params.stop_token_ids = {7};
  params.min_new_tokens = 3;
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab);
  ASSERT_NE(sampler, nullptr);
  std::vector<double> out(kVocab);
  for (int step = 0; step < 3; ++step) {
    ASSERT_TRUE(sampler->ApplyLogitTransforms(logits, absl::MakeSpan(out)).ok());
    EXPECT_EQ(out[2], -kInf);
    EXPECT_EQ(out[7], -kInf);
    const SampleResult result = MustSample(*sampler, logits);
    EXPECT_EQ(result.token_id, 4);
    EXPECT_EQ(result.finish_reason, FinishReason::kNone);
  }
  ASSERT_TRUE(sampler->ApplyLogitTransforms(logits, absl::MakeSpan(out)).ok());
  EXPECT_EQ(out[2], static_cast<double>(logits[2]));
  const SampleResult result = MustSample(*sampler, logits);
  EXPECT_EQ(result.token_id, 2);
  EXPECT_EQ(result.finish_reason, FinishReason::kEos);

  // Sampling too: with EOS and the stop id holding nearly all the mass, neither comes out early.
  params.temperature = 1.0f;
  params.min_new_tokens = 2;
  for (uint64_t seed = 0; seed < 300; ++seed) {
    params.seed = seed;
    std::unique_ptr<SequenceSampler> s = MustCreate(params, kVocab);
    ASSERT_NE(s, nullptr);
    for (int step = 0; step < 2; ++step) {
      const int32_t token = MustSample(*s, logits).token_id;
      EXPECT_NE(token, 2);
      EXPECT_NE(token, 7);
    }
  }
}

TEST(SequenceSamplerTest, IgnoreEosMakesEosAnOrdinaryToken) {
  constexpr int32_t kVocab = 10;
  std::vector<float> logits = RandomLogits(4, kVocab, 1.0f);
  logits[2] = 9.0f;
  SamplingParams params = BaseParams();
  params.temperature = 0.0f;
  params.eos_token_ids = {2};
  params.ignore_eos = true;
  params.min_new_tokens = 2;  // Does not mask EOS when it cannot end the sequence.
  params.max_new_tokens = 4;
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab);
  ASSERT_NE(sampler, nullptr);
  for (int step = 0; step < 3; ++step) {
    const SampleResult result = MustSample(*sampler, logits);
    EXPECT_EQ(result.token_id, 2);
    EXPECT_EQ(result.finish_reason, FinishReason::kNone);
  }
  const SampleResult last = MustSample(*sampler, logits);
  EXPECT_EQ(last.token_id, 2);
  EXPECT_EQ(last.finish_reason, FinishReason::kLength);
}

TEST(SequenceSamplerTest, MaxNewTokensFinishesWithLengthAndThenRefuses) {
  SamplingParams params = BaseParams();
  params.max_new_tokens = 3;
  params.eos_token_ids = {0};
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, 50);
  ASSERT_NE(sampler, nullptr);
  std::vector<float> logits = RandomLogits(1, 50, 1.0f);
  logits[0] = -50.0f;  // EOS practically never
  for (int step = 0; step < 3; ++step) {
    EXPECT_FALSE(sampler->finished());
    const SampleResult result = MustSample(*sampler, logits);
    EXPECT_EQ(result.finish_reason, step < 2 ? FinishReason::kNone : FinishReason::kLength);
  }
  EXPECT_TRUE(sampler->finished());
  EXPECT_EQ(sampler->num_generated(), 3u);
  const absl::StatusOr<SampleResult> after = sampler->Sample(logits);
  EXPECT_EQ(after.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(sampler->num_generated(), 3u);
}

TEST(SequenceSamplerTest, StopTokenIdsFinishWithStopToken) {
  constexpr int32_t kVocab = 30;
  SamplingParams params = BaseParams();
  params.temperature = 0.0f;
  params.stop_token_ids = {17, 23};
  params.eos_token_ids = {1};
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab);
  ASSERT_NE(sampler, nullptr);
  EXPECT_EQ(MustSample(*sampler, OneHot(kVocab, 5)).finish_reason, FinishReason::kNone);
  const SampleResult result = MustSample(*sampler, OneHot(kVocab, 23));
  EXPECT_EQ(result.token_id, 23);
  EXPECT_EQ(result.finish_reason, FinishReason::kStopToken);
  EXPECT_TRUE(sampler->finished());
}

TEST(SequenceSamplerTest, FinishReasonPrecedenceIsEosThenStopTokenThenLength) {
  constexpr int32_t kVocab = 10;
  SamplingParams params = BaseParams();
  params.temperature = 0.0f;
  params.max_new_tokens = 1;
  params.eos_token_ids = {3};
  params.stop_token_ids = {3, 4};
  {
    std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab);
    ASSERT_NE(sampler, nullptr);
    EXPECT_EQ(MustSample(*sampler, OneHot(kVocab, 3)).finish_reason, FinishReason::kEos);
  }
  {
    std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab);
    ASSERT_NE(sampler, nullptr);
    EXPECT_EQ(MustSample(*sampler, OneHot(kVocab, 4)).finish_reason, FinishReason::kStopToken);
  }
  params.ignore_eos = true;  // 3 is still a stop token id.
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab);
  ASSERT_NE(sampler, nullptr);
  EXPECT_EQ(MustSample(*sampler, OneHot(kVocab, 3)).finish_reason, FinishReason::kStopToken);
}

// ---- Reproducibility ---------------------------------------------------------------------------

std::vector<int32_t> Generate(const SamplingParams& params, int32_t vocab, int32_t steps,
                              SequenceSampler* interleaved = nullptr) {
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, vocab, {1, 2, 3});
  std::vector<int32_t> tokens;
  if (sampler == nullptr) return tokens;
  for (int32_t step = 0; step < steps; ++step) {
    const std::vector<float> logits = RandomLogits(static_cast<uint32_t>(step), vocab, 2.0f);
    // Another request's sampler running in between, as in a batch.
    if (interleaved != nullptr) MustSample(*interleaved, RandomLogits(999, vocab, 5.0f));
    tokens.push_back(MustSample(*sampler, logits).token_id);
  }
  return tokens;
}

TEST(SequenceSamplerTest, SameSeedGivesTheSameTokensInAnyBatch) {
  constexpr int32_t kVocab = 64;
  SamplingParams params = BaseParams();
  params.seed = 42;
  params.temperature = 0.9f;
  params.top_k = 40;
  params.top_p = 0.95f;
  params.min_p = 0.02f;
  params.repetition_penalty = 1.1f;
  params.presence_penalty = 0.3f;
  params.frequency_penalty = 0.2f;
  const std::vector<int32_t> alone = Generate(params, kVocab, 200);
  ASSERT_EQ(alone.size(), 200u);
  EXPECT_EQ(Generate(params, kVocab, 200), alone);

  SamplingParams other = params;
  other.seed = 7;
  std::unique_ptr<SequenceSampler> neighbour = MustCreate(other, kVocab);
  ASSERT_NE(neighbour, nullptr);
  EXPECT_EQ(Generate(params, kVocab, 200, neighbour.get()), alone);

  params.seed = 43;
  const std::vector<int32_t> different = Generate(params, kVocab, 200);
  EXPECT_NE(different, alone);
  int32_t same_positions = 0;
  for (size_t i = 0; i < alone.size(); ++i) same_positions += alone[i] == different[i];
  EXPECT_LT(same_positions, 100);
}

TEST(SequenceSamplerTest, StepNDrawsWithTheUniformOfSeedAndN) {
  // Two equally likely tokens: token 0 exactly when u < 0.5 (u * 2 is exact in double).
  const std::vector<float> logits = {0.75f, 0.75f};
  SamplingParams params = BaseParams();
  params.seed = 0xdeadbeef;
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, 2);
  ASSERT_NE(sampler, nullptr);
  for (uint64_t step = 0; step < 200; ++step) {
    const int32_t expected = SamplerUniform(params.seed, step) < 0.5 ? 0 : 1;
    ASSERT_EQ(MustSample(*sampler, logits).token_id, expected) << "step " << step;
  }
}

TEST(SamplerUniformTest, IsTheSplitMix64Stream) {
  // Vigna's splitmix64.c with seed 1234567 starts 6457827717110365317, 3203168211198807973,
  // 9817491932198370423.
  EXPECT_EQ(SamplerUniform(1234567, 0),
            static_cast<double>(6457827717110365317ull >> 11) * 0x1p-53);
  EXPECT_EQ(SamplerUniform(1234567, 1),
            static_cast<double>(3203168211198807973ull >> 11) * 0x1p-53);
  EXPECT_EQ(SamplerUniform(1234567, 2),
            static_cast<double>(9817491932198370423ull >> 11) * 0x1p-53);
  // The stateful generator, step by step, for many seeds including the wrap-around ones.
  for (const uint64_t seed : {0ull, 1ull, 42ull, ~0ull, 0x9e3779b97f4a7c15ull}) {
    uint64_t state = seed;
    for (uint64_t step = 0; step < 1000; ++step) {
      state += 0x9e3779b97f4a7c15ull;
      uint64_t z = state;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      ASSERT_EQ(SamplerUniform(seed, step), static_cast<double>(z >> 11) * 0x1p-53);
    }
  }
  double sum = 0.0;
  for (uint64_t step = 0; step < 100000; ++step) {
    const double u = SamplerUniform(5, step);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
  }
  EXPECT_NEAR(sum / 100000, 0.5, 0.005);
}

// ---- Logprobs ----------------------------------------------------------------------------------

// log_softmax in long double, summed from the smallest term up: a different algorithm from the
// sampler's.
std::vector<double> ReferenceLogSoftmax(absl::Span<const float> logits) {
  long double max = -kInf;
  for (const float v : logits) max = std::max(max, static_cast<long double>(v));
  std::vector<long double> terms;
  for (const float v : logits) terms.push_back(std::exp(static_cast<long double>(v) - max));
  std::sort(terms.begin(), terms.end());
  long double sum = 0.0L;
  for (const long double t : terms) sum += t;
  const long double log_z = max + std::log(sum);
  std::vector<double> out;
  for (const float v : logits) out.push_back(static_cast<double>(v - log_z));
  return out;
}

TEST(SequenceSamplerTest, LogprobIsTheRawLogSoftmaxWhateverTheTransforms) {
  constexpr int32_t kVocab = 1000;
  SamplingParams params = BaseParams();
  params.logprobs = true;
  params.temperature = 0.3f;
  params.top_k = 50;
  params.repetition_penalty = 1.5f;
  params.frequency_penalty = 1.0f;
  params.logit_bias = {{3, 20.0f}, {10, -50.0f}};
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab, {4, 5, 6});
  ASSERT_NE(sampler, nullptr);
  for (uint32_t step = 0; step < 20; ++step) {
    const std::vector<float> logits = RandomLogits(step + 50, kVocab, 6.0f);
    const std::vector<double> reference = ReferenceLogSoftmax(logits);
    const SampleResult result = MustSample(*sampler, logits);
    EXPECT_NEAR(result.logprob, reference[static_cast<size_t>(result.token_id)], 2e-6);
    EXPECT_LE(result.logprob, 0.0f);
    int32_t rank = 1;
    for (const float v : logits) rank += v > logits[static_cast<size_t>(result.token_id)];
    EXPECT_EQ(result.rank, rank);
    EXPECT_EQ(result.num_top, 0);
  }
}

TEST(SequenceSamplerTest, TopLogprobsAreTheMostLikelyByLogprobThenId) {
  constexpr int32_t kVocab = 64;
  // Logits on a grid of eighths: many exact ties, distinct values far apart.
  std::vector<float> logits = RandomLogits(77, kVocab, 2.0f);
  for (float& v : logits) v = std::round(v * 8.0f) / 8.0f;
  SamplingParams params = BaseParams();
  params.top_logprobs = 20;
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab);
  ASSERT_NE(sampler, nullptr);
  const SampleResult result = MustSample(*sampler, logits);

  std::vector<int32_t> order(kVocab);
  for (int32_t i = 0; i < kVocab; ++i) order[static_cast<size_t>(i)] = i;
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    const float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
    return la > lb || (la == lb && a < b);
  });
  const std::vector<double> reference = ReferenceLogSoftmax(logits);
  ASSERT_EQ(result.num_top, 20);
  ASSERT_EQ(result.top_logprobs().size(), 20u);
  bool saw_tie = false;
  for (size_t j = 0; j < 20; ++j) {
    const TokenLogprob& entry = result.top_logprobs()[j];
    EXPECT_EQ(entry.token_id, order[j]) << "position " << j;
    EXPECT_NEAR(entry.logprob, reference[static_cast<size_t>(order[j])], 2e-6);
    if (j > 0) {
      const TokenLogprob& prev = result.top_logprobs()[j - 1];
      EXPECT_TRUE(prev.logprob > entry.logprob ||
                  (prev.logprob == entry.logprob && prev.token_id < entry.token_id));
      saw_tie |= prev.logprob == entry.logprob;
    }
  }
  EXPECT_TRUE(saw_tie) << "the grid should produce ties inside the top 20";
  // The sampled token's rank: ties share it.
  int32_t rank = 1;
  for (const float v : logits) rank += v > logits[static_cast<size_t>(result.token_id)];
  EXPECT_EQ(result.rank, rank);
  EXPECT_NEAR(result.logprob, reference[static_cast<size_t>(result.token_id)], 2e-6);
}

TEST(SequenceSamplerTest, TopLogprobsStopAtTheVocabularyAndImplyLogprobs) {
  SamplingParams params = BaseParams();
  params.top_logprobs = 20;
  params.logprobs = false;
  const std::vector<float> logits = {0.5f, -1.0f, 2.0f, 0.5f, 1.0f};
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, 5);
  ASSERT_NE(sampler, nullptr);
  const SampleResult result = MustSample(*sampler, logits);
  ASSERT_EQ(result.num_top, 5);
  const std::vector<int32_t> expected_order = {2, 4, 0, 3, 1};
  for (size_t j = 0; j < 5; ++j) EXPECT_EQ(result.top_logprobs()[j].token_id, expected_order[j]);
  EXPECT_EQ(result.top_logprobs()[2].logprob, result.top_logprobs()[3].logprob);
  EXPECT_LT(result.logprob, 0.0f);
  EXPECT_GE(result.rank, 1);
}

TEST(SequenceSamplerTest, NoLogprobsUnlessAsked) {
  std::unique_ptr<SequenceSampler> sampler = MustCreate(BaseParams(), 10);
  ASSERT_NE(sampler, nullptr);
  const SampleResult result = MustSample(*sampler, RandomLogits(1, 10, 1.0f));
  EXPECT_EQ(result.logprob, 0.0f);
  EXPECT_EQ(result.rank, 0);
  EXPECT_EQ(result.num_top, 0);
  EXPECT_TRUE(result.top_logprobs().empty());
}

// ---- Bad logits ------------------------------------------------------------------------------

TEST(SequenceSamplerTest, RejectsAWrongNumberOfLogits) {
  std::unique_ptr<SequenceSampler> sampler = MustCreate(BaseParams(), 10);
  ASSERT_NE(sampler, nullptr);
  const absl::StatusOr<SampleResult> result = sampler->Sample(RandomLogits(1, 9, 1.0f));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(result.status().message(), HasSubstr("expected 10 logits"));
  EXPECT_EQ(sampler->num_generated(), 0u);
}

TEST(SequenceSamplerTest, RejectsNanAndPositiveInfinityAsInternal) {
  for (const float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::unique_ptr<SequenceSampler> sampler = MustCreate(BaseParams(), 10);
    ASSERT_NE(sampler, nullptr);
    std::vector<float> logits = RandomLogits(1, 10, 1.0f);
    logits[3] = bad;
    const absl::StatusOr<SampleResult> result = sampler->Sample(logits);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal);
    EXPECT_THAT(result.status().message(), HasSubstr("logits[3]"));
    EXPECT_EQ(sampler->num_generated(), 0u);
    // The history is untouched: the next good step works.
    EXPECT_TRUE(sampler->Sample(RandomLogits(1, 10, 1.0f)).ok());
  }
}

TEST(SequenceSamplerTest, NegativeInfinityLogitsAreNeverChosen) {
  std::vector<float> logits = RandomLogits(6, 12, 1.0f);
  for (size_t i = 0; i < logits.size(); i += 2) logits[i] = -std::numeric_limits<float>::infinity();
  SamplingParams params = BaseParams();
  params.logprobs = true;
  params.temperature = 5.0f;
  const std::vector<int64_t> counts = CountFirstDraws(params, logits, 2000);
  EXPECT_EQ(Drawn(counts), (std::set<int32_t>{1, 3, 5, 7, 9, 11}));

  params.top_logprobs = 12;
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, 12);
  ASSERT_NE(sampler, nullptr);
  const SampleResult result = MustSample(*sampler, logits);
  EXPECT_EQ(result.top_logprobs()[11].logprob, -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isfinite(result.logprob));
}

TEST(SequenceSamplerTest, NothingLeftToChooseIsInternal) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> logits(6, neg_inf);
  logits[4] = 1.0f;  // Only EOS is possible, and min_new_tokens masks it.
  for (const float temperature : {0.0f, 1.0f}) {
    SamplingParams params = BaseParams();
    params.temperature = temperature;
    params.eos_token_ids = {4};
    params.min_new_tokens = 1;
    std::unique_ptr<SequenceSampler> sampler = MustCreate(params, 6);
    ASSERT_NE(sampler, nullptr);
    const absl::StatusOr<SampleResult> result = sampler->Sample(logits);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInternal);
    EXPECT_THAT(result.status().message(), HasSubstr("no token can be chosen"));
  }
}

// ---- Allocation --------------------------------------------------------------------------------

TEST(SequenceSamplerTest, SampleDoesNotAllocate) {
  constexpr int32_t kVocab = 5000;
  SamplingParams params = BaseParams();
  params.temperature = 0.8f;
  params.top_k = 1000;
  params.top_p = 0.9f;
  params.min_p = 0.01f;
  params.repetition_penalty = 1.2f;
  params.presence_penalty = 0.5f;
  params.frequency_penalty = 0.5f;
  params.logit_bias = {{1, 2.0f}, {2, -3.0f}};
  params.stop_token_ids = {7};
  params.eos_token_ids = {0};
  params.min_new_tokens = 100;
  params.max_new_tokens = 300;
  params.top_logprobs = 20;
  std::vector<int32_t> prompt;
  for (int32_t i = 0; i < 500; ++i) prompt.push_back((i * 37) % kVocab);
  std::vector<std::vector<float>> steps;
  for (uint32_t i = 0; i < 8; ++i) steps.push_back(RandomLogits(i, kVocab, 0.5f));
  for (const float top_p : {0.9f, 1.0f}) {
    params.top_p = top_p;
    params.top_k = top_p < 1.0f ? 1000 : 0;  // The second run sorts nothing: full vocabulary.
    std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab, prompt);
    ASSERT_NE(sampler, nullptr);
    const int64_t before = g_num_allocations.load();
    for (size_t step = 0; step < 300; ++step) {
      const absl::StatusOr<SampleResult> result = sampler->Sample(steps[step % steps.size()]);
      if (!result.ok() || result->finish_reason != FinishReason::kNone) break;
    }
    const int64_t allocations = g_num_allocations.load() - before;
    EXPECT_EQ(allocations, 0);
    EXPECT_GE(sampler->num_generated(), 100u);
  }
  params.temperature = 0.0f;  // And greedy.
  std::unique_ptr<SequenceSampler> sampler = MustCreate(params, kVocab, prompt);
  ASSERT_NE(sampler, nullptr);
  const int64_t before = g_num_allocations.load();
  for (size_t step = 0; step < 50; ++step) (void)sampler->Sample(steps[step % steps.size()]);
  EXPECT_EQ(g_num_allocations.load() - before, 0);
}

}  // namespace
}  // namespace ls
