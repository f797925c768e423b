#include "tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/strings/str_cat.h"
#include "tokenizer/utf8.h"

namespace ls::tok {
namespace {

// Generous enough for every tokenizer pattern on megabyte inputs (they are linear), small enough
// that catastrophic backtracking fails in well under a second.
constexpr uint32_t kMatchLimit = 50'000'000;
constexpr uint32_t kDepthLimit = 1'000'000;
constexpr size_t kJitStackStart = 32 * 1024;
constexpr size_t kJitStackMax = 8 * 1024 * 1024;

// Per-thread PCRE2 state shared by every pattern: one ovector pair is enough (only the whole
// match is read), and the JIT stack is only touched by the thread that owns it.
struct ThreadMatchState {
  pcre2_match_data* match_data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;

  ThreadMatchState() {
    match_data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    pcre2_set_match_limit(context, kMatchLimit);
    pcre2_set_depth_limit(context, kDepthLimit);
    jit_stack = pcre2_jit_stack_create(kJitStackStart, kJitStackMax, nullptr);
    if (jit_stack != nullptr) pcre2_jit_stack_assign(context, nullptr, jit_stack);
  }
  ~ThreadMatchState() {
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(match_data);
  }
  ThreadMatchState(const ThreadMatchState&) = delete;
  ThreadMatchState& operator=(const ThreadMatchState&) = delete;
};

ThreadMatchState& ThisThreadState() {
  thread_local ThreadMatchState state;
  return state;
}

std::string Pcre2ErrorText(int code) {
  PCRE2_UCHAR buffer[256];
  if (pcre2_get_error_message(code, buffer, sizeof(buffer)) < 0) {
    return absl::StrCat("PCRE2 error ", code);
  }
  return std::string(reinterpret_cast<const char*>(buffer));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(absl::string_view pattern,
                                                      absl::string_view what) {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset, nullptr);
  if (code == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " \"", pattern, "\" does not compile: ", Pcre2ErrorText(error_code),
                     " at offset ", error_offset));
  }
  std::unique_ptr<Regex> regex(new Regex());
  regex->pattern_ = std::string(pattern);
  regex->code_ = code;
  uint32_t have_jit = 0;
  if (pcre2_config(PCRE2_CONFIG_JIT, &have_jit) >= 0 && have_jit != 0) {
    regex->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  }
  return regex;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

absl::Status Regex::FindAll(absl::string_view subject, std::vector<MatchRange>* matches) const {
  ThreadMatchState& state = ThisThreadState();
  if (state.match_data == nullptr || state.context == nullptr) {
    return absl::ResourceExhaustedError("tokenizer: cannot allocate regex match data");
  }
  const auto* code = static_cast<const pcre2_code*>(code_);
  const auto* data = reinterpret_cast<PCRE2_SPTR>(subject.data());
  const size_t n = subject.size();
  size_t search_from = 0;
  bool have_last_end = false;
  size_t last_end = 0;
  while (search_from <= n) {
    const int rc = pcre2_match(code, data, n, search_from, PCRE2_NO_UTF_CHECK, state.match_data,
                               state.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("tokenizer: regex \"", pattern_, "\" failed on a ", n,
                       "-byte piece of input: ", Pcre2ErrorText(rc)));
    }
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(state.match_data);
    const size_t start = ovector[0];
    const size_t end = ovector[1];
    if (start == end && have_last_end && last_end == end) {
      // An empty match where the last one ended: step over one character, as the onig crate.
      search_from += search_from < n ? Utf8Len(static_cast<uint8_t>(subject[search_from])) : 1;
      continue;
    }
    matches->emplace_back(static_cast<uint32_t>(start), static_cast<uint32_t>(end));
    search_from = end;
    last_end = end;
    have_last_end = true;
  }
  return absl::OkStatus();
}

absl::StatusOr<Pattern> Pattern::FromJson(const Json& json, absl::string_view what) {
  if (!json.is_object() || json.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tokenizer.json: ", what, " pattern must be {\"String\": ...} or {\"Regex\": ...}"));
  }
  const auto it = json.begin();
  if (!it.value().is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json: ", what, " pattern ", it.key(), " must be a string"));
  }
  const std::string value = it.value().get<std::string>();
  Pattern pattern;
  if (it.key() == "String") {
    if (value.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: ", what, " with an empty String pattern is not supported"));
    }
    pattern.literal_ = value;
    return pattern;
  }
  if (it.key() == "Regex") {
    auto regex = Regex::Compile(value, absl::StrCat("tokenizer.json: ", what, " pattern"));
    if (!regex.ok()) return regex.status();
    pattern.regex_ = std::move(regex).value();
    return pattern;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer.json: ", what, " pattern kind \"", it.key(), "\" is not supported"));
}

absl::Status Pattern::FindAll(absl::string_view subject, std::vector<MatchRange>* matches) const {
  if (regex_ != nullptr) return regex_->FindAll(subject, matches);
  size_t pos = 0;
  while (true) {
    const size_t found = subject.find(literal_, pos);
    if (found == absl::string_view::npos) break;
    matches->emplace_back(static_cast<uint32_t>(found),
                          static_cast<uint32_t>(found + literal_.size()));
    pos = found + literal_.size();
  }
  return absl::OkStatus();
}

}  // namespace ls::tok
