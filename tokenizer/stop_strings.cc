#include "tokenizer/stop_strings.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace ls {

absl::Status StopStringMatcher::Validate(absl::Span<const std::string> stop_strings) {
  if (stop_strings.size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat(
        stop_strings.size(), " stop strings given; at most ", kMaxStopStrings, " are allowed"));
  }
  for (size_t i = 0; i < stop_strings.size(); ++i) {
    const std::string& s = stop_strings[i];
    if (s.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("stop string ", i, " is empty"));
    }
    if (s.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stop string ", i, " is ", s.size(),
                                                     " bytes long; at most ", kMaxStopStringBytes,
                                                     " are allowed"));
    }
    if (!detok::IsValidUtf8(s)) {
      return absl::InvalidArgumentError(absl::StrCat("stop string ", i, " is not valid UTF-8"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<StopStringMatcher> StopStringMatcher::Create(std::vector<std::string> stop_strings) {
  LS_RETURN_IF_ERROR(Validate(stop_strings));
  StopStringMatcher matcher;
  matcher.patterns_.reserve(stop_strings.size());
  for (std::string& s : stop_strings) {
    Pattern p;
    p.failure.assign(s.size(), 0);
    uint32_t k = 0;
    for (size_t i = 1; i < s.size(); ++i) {
      while (k > 0 && s[i] != s[k]) k = p.failure[k - 1];
      if (s[i] == s[k]) ++k;
      p.failure[i] = k;
    }
    p.text = std::move(s);
    matcher.patterns_.push_back(std::move(p));
  }
  matcher.state_.assign(matcher.patterns_.size(), 0);
  return matcher;
}

std::string StopStringMatcher::Consume(absl::string_view chunk) {
  if (stopped()) return {};
  const size_t base = held_.size();
  held_.append(chunk.data(), chunk.size());
  // Every partial match lies inside held_ (held_ always keeps at least max(state_) bytes), so a
  // completed occurrence starts inside held_ too.
  for (size_t pos = base; pos < held_.size(); ++pos) {
    const char c = held_[pos];
    int best = -1;
    for (size_t k = 0; k < patterns_.size(); ++k) {
      const Pattern& p = patterns_[k];
      uint32_t s = state_[k];
      if (s == p.text.size()) s = p.failure[s - 1];  // cannot happen before a stop; kept safe
      while (s > 0 && p.text[s] != c) s = p.failure[s - 1];
      if (p.text[s] == c) ++s;
      state_[k] = s;
      // Several stop strings completing here: the longest starts earliest; ties keep the lowest
      // index.
      if (s == p.text.size() &&
          (best < 0 || p.text.size() > patterns_[static_cast<size_t>(best)].text.size())) {
        best = static_cast<int>(k);
      }
    }
    if (best >= 0) {
      matched_index_ = best;
      const size_t start = pos + 1 - patterns_[static_cast<size_t>(best)].text.size();
      std::string out = held_.substr(0, start);
      held_.clear();
      return out;
    }
  }
  const uint32_t hold = state_.empty() ? 0 : *std::max_element(state_.begin(), state_.end());
  std::string out = held_.substr(0, held_.size() - hold);
  held_.erase(0, held_.size() - hold);
  return out;
}

std::string StopStringMatcher::Flush() {
  if (stopped()) return {};
  std::fill(state_.begin(), state_.end(), 0);
  std::string out = std::move(held_);
  held_.clear();
  return out;
}

absl::StatusOr<TextStreamer> TextStreamer::Create(const Detokenizer& detokenizer,
                                                  bool skip_special_tokens,
                                                  std::vector<std::string> stop_strings) {
  LS_ASSIGN_OR_RETURN(StopStringMatcher matcher,
                      StopStringMatcher::Create(std::move(stop_strings)));
  return TextStreamer(StreamDecoder(detokenizer, skip_special_tokens), std::move(matcher));
}

StreamChunk TextStreamer::Feed(const std::string& text, bool flush) {
  StreamChunk chunk;
  chunk.text = matcher_.Consume(text);
  if (flush && !matcher_.stopped()) chunk.text += matcher_.Flush();
  chunk.stopped = matcher_.stopped();
  chunk.stop_index = matcher_.matched_index();
  return chunk;
}

StreamChunk TextStreamer::Step(int32_t id) {
  if (matcher_.stopped()) return Feed("", false);
  return Feed(decoder_.Step(id), false);
}

StreamChunk TextStreamer::Finish() {
  if (matcher_.stopped()) return Feed("", false);
  return Feed(decoder_.Flush(), true);
}

}  // namespace ls
