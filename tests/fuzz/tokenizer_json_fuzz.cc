// libFuzzer target for the tokenizer.json loader (tokenizer/tokenizer.h).
//
// Each input is a whole tokenizer.json handed to Tokenizer::FromJson (no tokenizer_config.json).
// A rejection must be a non-OK status with a message; nothing else is checked about it. A
// tokenizer that loads is then driven: a few fixed strings (plain text, every script, the
// added-token literals of common tokenizers, whitespace runs, invalid UTF-8) are encoded with
// parse_special off and on, each Encoding must be well-formed (tokenizer_fuzz_util.h), EncodeIds
// must agree with Encode, and the ids are decoded and stream-decoded (valid UTF-8, bounded
// window; not "chunks add up to Decode", which HF's own stream breaks for some decoder chains).
//
// Run: tests/fuzz/run_fuzz.sh BUILD_DIR SECONDS tokenizer_json (see docs/fuzzing.md).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/json.h"
#include "tests/fuzz/tokenizer_fuzz_util.h"
#include "tokenizer/tokenizer.h"

namespace {

using ls_fuzz::Check;

const char* const kTexts[] = {
    "",
    " ",
    "Hello world! It's 2024-12-31, I'll pay $12,345.67.",
    "   leading and trailing   \t\n\r\n",
    "caf\xC3\xA9 cafe\xCC\x81 \xEF\xAC\x81 \xE2\x91\xA0 \xE2\x84\xAB",
    "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xD0\x9F\xD1\x80\xD0\xB8 \xF0\x9F\x98\x80\xE2\x80\x8D",
    "<s>x</s> <unk> <|endoftext|><|im_start|>a<|im_end|><think> <mask> <EOT> hello <x>",
    "\xE2\x96\x81hello\xE2\x96\x81world \xC4\xA0x",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 1234567890",
    "bad \xFF utf8 \xE6\x97",
};

void Exercise(const ls::Tokenizer& tok, absl::string_view text) {
  const bool valid = ls_fuzz::IsValidUtf8(text);
  for (bool parse_special : {false, true}) {
    ls::EncodeOptions options;
    options.parse_special = parse_special;
    absl::StatusOr<ls::Encoding> e = tok.Encode(text, options);
    if (!valid) {
      Check(!e.ok() && absl::IsInvalidArgument(e.status()), "invalid UTF-8 gives INVALID_ARGUMENT");
      continue;
    }
    // Encoding valid text may still fail on a file HF also loads but cannot encode with (an
    // unk_token missing from the vocabulary is an encode-time error in HF); it must say why.
    if (!e.ok()) {
      Check(!e.status().message().empty(), "an encode error says why");
      continue;
    }
    ls_fuzz::CheckEncoding(tok, text, *e, parse_special, /*strict=*/false);
    absl::StatusOr<std::vector<int32_t>> ids = tok.EncodeIds(text, options);
    Check(ids.ok() && *ids == e->ids, "EncodeIds == Encode().ids");
    ls_fuzz::ExerciseDecode(tok, e->ids, /*stream_skip=*/parse_special, /*check_concat=*/false);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view json(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<std::unique_ptr<ls::Tokenizer>> tok = ls::Tokenizer::FromJson(json);
  if (!tok.ok()) {
    Check(!tok.status().message().empty(), "a rejection says why");
    return 0;
  }
  Check(*tok != nullptr, "FromJson returns a tokenizer");
  for (const char* text : kTexts) Exercise(**tok, text);
  // Ids the encoder never produces: every id of a small vocabulary in order, and ids outside it
  // (skipped by Decode, as HF does).
  std::vector<int32_t> ids;
  const int32_t n = (*tok)->vocab_size();
  for (int32_t i = 0; i < n && i < 512; ++i) ids.push_back(i);
  ids.push_back(-1);
  ids.push_back(n);
  ls_fuzz::ExerciseDecode(**tok, ids, /*stream_skip=*/false, /*check_concat=*/false);
  ls_fuzz::ExerciseDecode(**tok, ids, /*stream_skip=*/true, /*check_concat=*/false);
  return 0;
}
