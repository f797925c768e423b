// Stop strings: StopStringMatcher against a brute-force reference of the documented semantics
// (stop_strings.h), chunk by chunk and character by character, and TextStreamer on the golden
// tokenizers.
#include "tokenizer/stop_strings.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/decode_test_util.h"

namespace ls {
namespace {

using ::testing::HasSubstr;

struct Expected {
  std::string emitted;  // what the client must see
  int index = -1;       // matched stop string, -1: none
  size_t end = 0;       // where the match ends in the text (when index >= 0)
};

// The semantics, by brute force: the first end position where any stop string completes; of
// the occurrences ending there the longest (earliest start), lowest index on ties.
Expected Reference(const std::string& text, const std::vector<std::string>& stops) {
  for (size_t e = 1; e <= text.size(); ++e) {
    int best = -1;
    for (size_t k = 0; k < stops.size(); ++k) {
      const std::string& s = stops[k];
      if (s.size() <= e && text.compare(e - s.size(), s.size(), s) == 0 &&
          (best < 0 || s.size() > stops[static_cast<size_t>(best)].size())) {
        best = static_cast<int>(k);
      }
    }
    if (best >= 0) {
      return {text.substr(0, e - stops[static_cast<size_t>(best)].size()), best, e};
    }
  }
  return {text, -1, 0};
}

// Longest suffix of `text` that is a proper prefix of a stop string: what must be held back.
size_t MinimalHoldBack(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = 0;
  for (const std::string& s : stops) {
    for (size_t len = std::min(s.size() - 1, text.size()); len > best; --len) {
      if (text.compare(text.size() - len, len, s, 0, len) == 0) {
        best = len;
        break;
      }
    }
  }
  return best;
}

std::vector<std::string> Utf8Chars(const std::string& text) {
  std::vector<std::string> chars;
  for (size_t i = 0; i < text.size();) {
    size_t n = 1;
    while (i + n < text.size() && (static_cast<uint8_t>(text[i + n]) & 0xC0) == 0x80) ++n;
    chars.push_back(text.substr(i, n));
    i += n;
  }
  return chars;
}

// Feeds `chunks` and checks after every one: nothing past the stop is ever emitted (what was
// emitted so far is a prefix of the final answer), the matcher holds back no more than it must
// (emitted + held = consumed, held = the minimal hold-back), and every emitted piece is UTF-8.
// Returns the full emitted text (Flush() included when no stop matched).
std::string RunAndCheck(StopStringMatcher& matcher, const std::vector<std::string>& chunks,
                        const std::vector<std::string>& stops, const Expected& want) {
  std::string consumed, emitted;
  for (size_t i = 0; i < chunks.size(); ++i) {
    consumed += chunks[i];
    const std::string out = matcher.Consume(chunks[i]);
    EXPECT_TRUE(detok::IsValidUtf8(out)) << "chunk " << i;
    emitted += out;
    EXPECT_EQ(want.emitted.compare(0, emitted.size(), emitted), 0)
        << "emitted past the stop after chunk " << i << ": \"" << emitted << "\"";
    if (!matcher.stopped()) {
      EXPECT_EQ(emitted.size() + matcher.held_back_bytes(), consumed.size()) << "chunk " << i;
      EXPECT_EQ(matcher.held_back_bytes(), MinimalHoldBack(consumed, stops)) << "chunk " << i;
    } else {
      EXPECT_EQ(matcher.held_back_bytes(), 0u);
    }
  }
  if (matcher.stopped()) {
    // Nothing after the stop, ever.
    EXPECT_EQ(matcher.Consume("more text"), "");
    EXPECT_EQ(matcher.Flush(), "");
  } else {
    emitted += matcher.Flush();
    EXPECT_EQ(matcher.Flush(), "");
  }
  return emitted;
}

// Runs `text` char by char through a fresh matcher and compares with the reference.
void CheckCharByChar(const std::string& text, const std::vector<std::string>& stops) {
  SCOPED_TRACE(::testing::Message() << "text \"" << text << "\"");
  const Expected want = Reference(text, stops);
  absl::StatusOr<StopStringMatcher> matcher = StopStringMatcher::Create(stops);
  ASSERT_TRUE(matcher.ok()) << matcher.status();
  EXPECT_EQ(RunAndCheck(*matcher, Utf8Chars(text), stops, want), want.emitted);
  EXPECT_EQ(matcher->matched_index(), want.index);
  if (want.index >= 0) {
    EXPECT_EQ(matcher->matched_stop(), stops[static_cast<size_t>(want.index)]);
  }
}

TEST(StopStringsValidateTest, Limits) {
  EXPECT_TRUE(StopStringMatcher::Validate({}).ok());
  const std::vector<std::string> sixteen(StopStringMatcher::kMaxStopStrings, "x");
  EXPECT_TRUE(StopStringMatcher::Validate(sixteen).ok());
  std::vector<std::string> seventeen = sixteen;
  seventeen.push_back("y");
  absl::Status status = StopStringMatcher::Validate(seventeen);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "17 stop strings given; at most 16 are allowed");

  status = StopStringMatcher::Validate({"ok", ""});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "stop string 1 is empty");

  EXPECT_TRUE(
      StopStringMatcher::Validate({std::string(StopStringMatcher::kMaxStopStringBytes, 'a')}).ok());
  status = StopStringMatcher::Validate({"a", std::string(257, 'a')});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "stop string 1 is 257 bytes long; at most 256 are allowed");

  status = StopStringMatcher::Validate({"\xE6\x97"});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), "stop string 0 is not valid UTF-8");

  EXPECT_EQ(StopStringMatcher::Create({""}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(StopStringMatcherTest, NoStopStringsPassesTextThrough) {
  absl::StatusOr<StopStringMatcher> matcher = StopStringMatcher::Create({});
  ASSERT_TRUE(matcher.ok());
  EXPECT_EQ(matcher->Consume("abc"), "abc");
  EXPECT_EQ(matcher->held_back_bytes(), 0u);
  EXPECT_FALSE(matcher->stopped());
  EXPECT_EQ(matcher->Flush(), "");
}

TEST(StopStringMatcherTest, PrefixOfAnotherStopString) {
  // Same start: "ab" completes first and wins; "abc" can never match.
  CheckCharByChar("xxabcd", {"abc", "ab"});
  EXPECT_EQ(Reference("xxabcd", {"abc", "ab"}).index, 1);
  CheckCharByChar("xxabd", {"abc", "ab"});
  // "ab" is held back (it could grow into "abc") until "d" shows it cannot.
  absl::StatusOr<StopStringMatcher> m = StopStringMatcher::Create({"abc"});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->Consume("xxab"), "xx");
  EXPECT_EQ(m->held_back_bytes(), 2u);
  EXPECT_EQ(m->Consume("d"), "abd");
}

TEST(StopStringMatcherTest, SuffixAndInnerStopStrings) {
  // Both end at the same place: the longer one starts earlier and wins.
  CheckCharByChar("xabc", {"bc", "abc"});
  EXPECT_EQ(Reference("xabc", {"bc", "abc"}).emitted, "x");
  // "b" completes before "abc" could: generation stops there (see stop_strings.h).
  CheckCharByChar("abc", {"abc", "b"});
  EXPECT_EQ(Reference("abc", {"abc", "b"}).emitted, "a");
}

TEST(StopStringMatcherTest, OverlappingCandidates) {
  CheckCharByChar("aaab", {"aab"});
  EXPECT_EQ(Reference("aaab", {"aab"}).emitted, "a");
  CheckCharByChar("abababc", {"ababc"});
  CheckCharByChar("aabaabaaab", {"aabaaab"});
  absl::StatusOr<StopStringMatcher> m = StopStringMatcher::Create({"aab"});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->Consume("aaa"), "a");  // "aa" may still start "aab"
  EXPECT_EQ(m->Consume("b"), "");
  EXPECT_TRUE(m->stopped());
}

TEST(StopStringMatcherTest, MultipleStopStrings) {
  const std::vector<std::string> stops = {"xyz", "bc", "q", "\n\n"};
  CheckCharByChar("abcxyz", stops);
  EXPECT_EQ(Reference("abcxyz", stops).index, 1);
  CheckCharByChar("line\nline\n\nrest", stops);
  CheckCharByChar("nothing here", stops);
  CheckCharByChar("", stops);
  // Duplicates: the lowest index is reported.
  CheckCharByChar("aXb", {"X", "Y", "X"});
  EXPECT_EQ(Reference("aXb", {"X", "Y", "X"}).index, 0);
}

TEST(StopStringMatcherTest, StopAtTheVeryFirstChunk) {
  absl::StatusOr<StopStringMatcher> m = StopStringMatcher::Create({"Hello"});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->Consume("Hello world"), "");
  EXPECT_TRUE(m->stopped());
  EXPECT_EQ(m->matched_stop(), "Hello");
  CheckCharByChar("Hello", {"Hello"});
}

TEST(StopStringMatcherTest, MultiByteCharacters) {
  // "é" is c3 a9, "è" is c3 a8: the shared lead byte must neither match nor be emitted alone.
  CheckCharByChar("aèbé", {"é"});
  CheckCharByChar("日曜日本", {"日本"});
  CheckCharByChar("日日本", {"日本"});
  absl::StatusOr<StopStringMatcher> m = StopStringMatcher::Create({"日本"});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->Consume("今日"), "今");  // "日" could start "日本"
  EXPECT_EQ(m->Consume("曜"), "日曜");
  EXPECT_EQ(m->Consume("日"), "");
  EXPECT_EQ(m->Consume("本です"), "");
  EXPECT_TRUE(m->stopped());
  CheckCharByChar("x\U0001F600\U0001F601y", {"\U0001F601"});
}

TEST(StopStringMatcherTest, FlushReleasesAPartialStopString) {
  absl::StatusOr<StopStringMatcher> m = StopStringMatcher::Create({"abc"});
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->Consume("xxab"), "xx");
  EXPECT_EQ(m->Flush(), "ab");
  EXPECT_FALSE(m->stopped());
  // A new text: "c" does not complete the "ab" flushed before.
  EXPECT_EQ(m->Consume("c"), "c");
}

TEST(StopStringMatcherTest, RandomTextsAndChunkingsMatchTheReference) {
  std::mt19937 rng(20240611);
  const std::vector<std::string> alphabet = {"a", "b", "c", "日", "é", "\n"};
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  for (int iter = 0; iter < 3000; ++iter) {
    std::vector<std::string> stops(1 + pick(3));
    for (std::string& s : stops) {
      const size_t len = 1 + pick(4);
      for (size_t i = 0; i < len; ++i) s += alphabet[pick(alphabet.size())];
    }
    std::string text;
    const size_t len = pick(30);
    for (size_t i = 0; i < len; ++i) text += alphabet[pick(3 + (iter % 4))];  // often a-c only
    const std::vector<std::string> chars = Utf8Chars(text);
    std::vector<std::string> chunks;
    for (size_t i = 0; i < chars.size();) {
      const size_t n = std::min(chars.size() - i, pick(5));  // empty chunks too
      std::string chunk;
      for (size_t k = 0; k < n; ++k) chunk += chars[i + k];
      chunks.push_back(chunk);
      i += n;
    }
    SCOPED_TRACE(::testing::Message() << "iteration " << iter << " text \"" << text << "\"");
    const Expected want = Reference(text, stops);
    absl::StatusOr<StopStringMatcher> matcher = StopStringMatcher::Create(stops);
    ASSERT_TRUE(matcher.ok());
    ASSERT_EQ(RunAndCheck(*matcher, chunks, stops, want), want.emitted);
    ASSERT_EQ(matcher->matched_index(), want.index);
  }
}

// ---- TextStreamer on the golden tokenizers --------------------------------------------------

struct Fixture {
  std::string name;
  std::unique_ptr<Detokenizer> detok;
  Json expected;
};

std::vector<Fixture> LoadFixtures() {
  std::vector<Fixture> fixtures;
  for (const std::string& dir : ::ls::testing::GoldenTokenizerDirs()) {
    Fixture f;
    f.name = ::ls::testing::BaseName(dir);
    absl::StatusOr<std::unique_ptr<Detokenizer>> detok = ::ls::testing::DetokenizerFromDir(dir);
    absl::StatusOr<Json> expected = ::ls::testing::ReadJson(dir + "/expected.json");
    EXPECT_TRUE(detok.ok()) << detok.status();
    EXPECT_TRUE(expected.ok()) << expected.status();
    if (!detok.ok() || !expected.ok()) continue;
    f.detok = *std::move(detok);
    f.expected = *std::move(expected);
    fixtures.push_back(std::move(f));
  }
  EXPECT_GE(fixtures.size(), 5u);
  return fixtures;
}

struct StreamResult {
  std::string emitted;
  int stop_index = -1;
  int stop_step = -1;  // step at which `stopped` turned true (ids.size() for Finish())
};

StreamResult RunStreamer(const Detokenizer& detok, const std::vector<int32_t>& ids, bool skip,
                         const std::vector<std::string>& stops) {
  StreamResult result;
  absl::StatusOr<TextStreamer> streamer = TextStreamer::Create(detok, skip, stops);
  EXPECT_TRUE(streamer.ok()) << streamer.status();
  if (!streamer.ok()) return result;
  for (size_t i = 0; i <= ids.size(); ++i) {
    const StreamChunk chunk = i < ids.size() ? streamer->Step(ids[i]) : streamer->Finish();
    EXPECT_TRUE(detok::IsValidUtf8(chunk.text));
    result.emitted += chunk.text;
    if (chunk.stopped) {
      EXPECT_GE(chunk.stop_index, 0);
      result.stop_index = chunk.stop_index;
      result.stop_step = static_cast<int>(i);
      // Later steps return nothing and stay stopped.
      if (i < ids.size()) {
        const StreamChunk after = streamer->Step(ids[i]);
        EXPECT_TRUE(after.stopped);
        EXPECT_EQ(after.text, "");
        EXPECT_EQ(streamer->Finish().text, "");
      }
      break;
    }
  }
  return result;
}

TEST(TextStreamerTest, StopStringInsideByteFallbackCharacters) {
  // "日本" as six byte-fallback tokens: the decoder holds the bytes until a character is
  // complete; "日" and "本" share their lead byte e6.
  const std::string dir = ::ls::testing::SourceDir() + "/tests/golden/tokenizers/sentencepiece_bpe";
  absl::StatusOr<std::unique_ptr<Detokenizer>> detok = ::ls::testing::DetokenizerFromDir(dir);
  ASSERT_TRUE(detok.ok()) << detok.status();
  // ids 3..258 are <0x00>..<0xFF>.
  const std::vector<int32_t> ids = {3 + 0xE6, 3 + 0x97, 3 + 0xA5, 3 + 0xE6, 3 + 0x9C, 3 + 0xAC};
  ASSERT_EQ((*detok)->Decode(ids, true), "日本");
  const auto run = [&](const std::vector<std::string>& stops) {
    absl::StatusOr<TextStreamer> streamer = TextStreamer::Create(**detok, true, stops);
    EXPECT_TRUE(streamer.ok());
    std::vector<std::string> texts;
    for (int32_t id : ids) {
      const StreamChunk chunk = streamer->Step(id);
      texts.push_back(chunk.text + (chunk.stopped ? "|stop" : ""));
    }
    const StreamChunk last = streamer->Finish();
    texts.push_back(last.text + (last.stopped ? "|stop" : ""));
    return texts;
  };
  const std::string x = "|stop";
  EXPECT_THAT(run({"本"}), ::testing::ElementsAre("", "", "日", "", "", x, x));
  EXPECT_THAT(run({"日本"}), ::testing::ElementsAre("", "", "", "", "", x, x));
  EXPECT_THAT(run({"日"}), ::testing::ElementsAre("", "", x, x, x, x, x));
  // A partial stop string at the end is released by Finish().
  EXPECT_THAT(run({"本日"}), ::testing::ElementsAre("", "", "日", "", "", "", "本"));
  EXPECT_THAT(run({"日本語"}), ::testing::ElementsAre("", "", "", "", "", "", "日本"));
}

// The step at which the decoder's text first reaches `end` bytes (HF's per-token stream).
int StepReaching(const Json& stream, size_t end) {
  size_t total = 0;
  for (size_t i = 0; i < stream.size(); ++i) {
    if (!stream[i].is_null()) total += stream[i].get<std::string>().size();
    if (total >= end) return static_cast<int>(i);
  }
  return static_cast<int>(stream.size());  // only reached by Finish()
}

TEST(TextStreamerTest, GoldenTextsWithStopStringsSpanningTokens) {
  std::mt19937 rng(7);
  int spanning_three = 0, checked = 0, first_token = 0;
  for (const Fixture& f : LoadFixtures()) {
    SCOPED_TRACE(f.name);
    for (const Json& c : f.expected.at("cases")) {
      const std::vector<int32_t> ids = c.at("ids").get<std::vector<int32_t>>();
      for (const bool skip : {false, true}) {
        const std::string text = c.at(skip ? "decode_skip_special" : "decode").get<std::string>();
        const Json& stream = c.at(skip ? "stream_skip_special" : "stream");
        std::vector<std::string> chunks;
        for (const Json& s : stream) chunks.push_back(s.is_null() ? "" : s.get<std::string>());
        std::vector<std::vector<std::string>> stop_sets;
        // A stop string spanning three tokens: the last character of one chunk, the whole next
        // non-empty chunk, the first character of the one after.
        std::vector<size_t> nonempty;
        for (size_t i = 0; i < chunks.size(); ++i) {
          if (!chunks[i].empty()) nonempty.push_back(i);
        }
        if (nonempty.size() >= 3) {
          const size_t k = 1 + rng() % (nonempty.size() - 2);
          const std::vector<std::string> a = Utf8Chars(chunks[nonempty[k - 1]]);
          const std::vector<std::string> b = Utf8Chars(chunks[nonempty[k + 1]]);
          stop_sets.push_back({a.back() + chunks[nonempty[k]] + b.front()});
          ++spanning_three;
        }
        // Stop at the very first token that shows text.
        if (!nonempty.empty()) {
          stop_sets.push_back({"never in any text \x01", chunks[nonempty[0]]});
          ++first_token;
        }
        // A few random substrings, several at once.
        const std::vector<std::string> chars = Utf8Chars(text);
        if (!chars.empty()) {
          std::vector<std::string> stops;
          for (int n = 0; n < 3; ++n) {
            const size_t at = rng() % chars.size();
            const size_t len = 1 + rng() % 6;
            std::string s;
            for (size_t i = at; i < std::min(chars.size(), at + len); ++i) s += chars[i];
            if (s.size() <= StopStringMatcher::kMaxStopStringBytes) stops.push_back(s);
          }
          stop_sets.push_back(stops);
        }
        stop_sets.push_back({});  // no stop strings: the whole text
        for (const std::vector<std::string>& stops : stop_sets) {
          const Expected want = Reference(text, stops);
          const StreamResult got = RunStreamer(*f.detok, ids, skip, stops);
          ASSERT_EQ(got.emitted, want.emitted) << "text \"" << text.substr(0, 80) << "\"";
          ASSERT_EQ(got.stop_index, want.index);
          if (want.index >= 0) {
            // Stopped at the very token that completed the stop string, not later.
            ASSERT_EQ(got.stop_step, StepReaching(stream, want.end));
          }
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(spanning_three, 100);
  EXPECT_GT(first_token, 100);
  std::printf("[ TextStreamer ] %d streams checked (%d with a stop string over 3 tokens)\n",
              checked, spanning_three);
}

}  // namespace
}  // namespace ls
