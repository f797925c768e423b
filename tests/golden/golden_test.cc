// The model against Hugging Face: for every fixture in tests/golden/fixtures (tiny random
// Llama/Qwen2/Mistral models written and run by tools/make_fixtures.py), logits within 1e-4
// relative (max |ours - HF| over a row / max |HF| of that row) and 32-token greedy
// continuations token-identical, with fp32 weights and with bf16 weights (against HF run on
// the bf16-rounded weights). Then batch invariance: every row's logits are bit-identical alone,
// batched with other sequences, in prefill chunks of any size, and in decode steps mixed with
// other sequences' prefill.
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/golden/golden_harness.h"

namespace ls {
namespace {

using golden::Argmax;
using golden::FixtureNames;
using golden::FixturesDir;
using golden::Harness;
using golden::kGreedySteps;
using golden::kRelTolerance;
using golden::Prompt;
using golden::ReadExpected;
using golden::RelativeError;

struct Param {
  std::string fixture;
  DType dtype;
};

class GoldenTest : public testing::TestWithParam<Param> {};

TEST_P(GoldenTest, MatchesHuggingFace) {
  const std::string dir = FixturesDir() + "/" + GetParam().fixture;
  const std::string suffix = GetParam().dtype == DType::kF32 ? "f32" : "bf16";
  Harness h(dir, GetParam().dtype);
  const int vocab = h.vocab();
  const std::vector<Prompt> prompts = ReadExpected(dir, suffix);

  // Each prompt alone: prefill with logits at every position, then greedy decode.
  std::vector<std::vector<std::vector<float>>> alone_prefill, alone_decode;
  for (const Prompt& p : prompts) {
    const int len = static_cast<int>(p.ids.size());
    const int seq = h.NewSequence(len + kGreedySteps);
    std::vector<Harness::Row> rows;
    for (int t = 0; t < len; ++t) rows.push_back({seq, p.ids[t], t, true});
    auto logits = h.Run(rows);
    for (int t = 0; t < len; ++t) {
      EXPECT_LE(RelativeError(logits[t], p.logits.data() + static_cast<size_t>(t) * vocab, vocab),
                kRelTolerance)
          << "position " << t << " of a " << len << "-token prompt";
    }
    std::vector<std::vector<float>> steps;
    int32_t next = Argmax(logits.back());
    std::vector<int32_t> generated;
    for (int s = 0; s < kGreedySteps; ++s) {
      generated.push_back(next);
      auto step = h.Run({{seq, next, len + s, true}});
      steps.push_back(step[0]);
      next = Argmax(step[0]);
    }
    EXPECT_EQ(generated, p.greedy) << "greedy continuation of a " << len << "-token prompt";
    alone_prefill.push_back(std::move(logits));
    alone_decode.push_back(std::move(steps));
  }

  // All prompts in one prefill batch: bit-identical to alone.
  {
    std::vector<Harness::Row> rows;
    std::vector<int> seqs;
    for (const Prompt& p : prompts) {
      const int seq = h.NewSequence(static_cast<int>(p.ids.size()) + kGreedySteps);
      seqs.push_back(seq);
      for (size_t t = 0; t < p.ids.size(); ++t) {
        rows.push_back({seq, p.ids[t], static_cast<int32_t>(t), true});
      }
    }
    auto logits = h.Run(rows);
    size_t k = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      for (size_t t = 0; t < prompts[i].ids.size(); ++t, ++k) {
        ASSERT_EQ(logits[k], alone_prefill[i][t])
            << "batched prefill, prompt " << i << " pos " << t;
      }
    }
    // Decode all sequences together, one step at a time: bit-identical to alone decode.
    for (int s = 0; s < kGreedySteps; ++s) {
      std::vector<Harness::Row> step;
      for (size_t i = 0; i < prompts.size(); ++i) {
        const int32_t token =
            s == 0 ? Argmax(alone_prefill[i].back()) : Argmax(alone_decode[i][s - 1]);
        step.push_back({seqs[i], token, static_cast<int32_t>(prompts[i].ids.size()) + s, true});
      }
      auto out = h.Run(step);
      for (size_t i = 0; i < prompts.size(); ++i) {
        ASSERT_EQ(out[i], alone_decode[i][s]) << "batched decode, prompt " << i << " step " << s;
      }
    }
  }

  // Chunked prefill (chunks of 1, 3 and 7 rows), each chunk sharing its batch with a decode row
  // of another sequence: bit-identical to alone.
  for (int chunk : {1, 3, 7}) {
    const Prompt& p = prompts.back();  // the longest prompts come last
    const int len = static_cast<int>(p.ids.size());
    const int seq = h.NewSequence(len + kGreedySteps);
    const Prompt& other = prompts.front();
    const int other_len = static_cast<int>(other.ids.size());
    const int other_seq = h.NewSequence(other_len + kGreedySteps);
    std::vector<Harness::Row> warm;
    for (int t = 0; t < other_len; ++t) warm.push_back({other_seq, other.ids[t], t, false});
    h.Run(warm);
    int decode_step = 0;
    for (int start = 0; start < len; start += chunk) {
      std::vector<Harness::Row> rows;
      const int32_t other_token = decode_step == 0 ? Argmax(alone_prefill[0].back())
                                                   : Argmax(alone_decode[0][decode_step - 1]);
      const bool other_active = decode_step < kGreedySteps;
      if (other_active) rows.push_back({other_seq, other_token, other_len + decode_step, true});
      for (int t = start; t < std::min(len, start + chunk); ++t) {
        rows.push_back({seq, p.ids[t], t, true});
      }
      auto out = h.Run(rows);
      size_t k = 0;
      if (other_active) {
        ASSERT_EQ(out[k++], alone_decode[0][decode_step]) << "decode beside a chunk of " << chunk;
        ++decode_step;
      }
      for (int t = start; t < std::min(len, start + chunk); ++t) {
        ASSERT_EQ(out[k++], alone_prefill.back()[t]) << "chunk " << chunk << " position " << t;
      }
    }
  }
}

std::vector<Param> AllParams() {
  std::vector<Param> params;
  for (const std::string& name : FixtureNames()) {
    params.push_back({name, DType::kF32});
    params.push_back({name, DType::kBF16});
  }
  return params;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenTest, testing::ValuesIn(AllParams()),
                         [](const testing::TestParamInfo<Param>& info) {
                           return info.param.fixture + "_" +
                                  (info.param.dtype == DType::kF32 ? "f32" : "bf16");
                         });

TEST(GoldenFixtures, Present) {
  // The suite above would silently instantiate nothing without fixtures.
  EXPECT_GE(FixtureNames().size(), 4u) << "no fixtures under " << FixturesDir();
}

}  // namespace
}  // namespace ls
