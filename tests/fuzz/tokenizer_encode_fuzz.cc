// libFuzzer target for encoding arbitrary text (tokenizer/tokenizer.h) with real layouts.
//
// The golden tokenizers of tests/golden/tokenizers/ (GPT-2, Llama 3, Qwen2, both SentencePiece
// layouts, and the vendored Anthropic SDK tokenizer) are loaded once. Each input is a text,
// encoded by every one of them with parse_special off and on:
//   - input that is not valid UTF-8 must give INVALID_ARGUMENT (never a crash), and its repaired
//     form (each invalid byte replaced by U+FFFD) is encoded instead, so every input reaches the
//     normalizers, pre-tokenizers and BPE;
//   - valid UTF-8 must encode, to a well-formed Encoding (tokenizer_fuzz_util.h: parallel arrays,
//     ids in the vocabulary, offsets inside the text on character boundaries, no special token
//     from text with parse_special off), and EncodeIds must agree with Encode;
//   - the byte-level tokenizers without a normalizer (GPT-2, Llama 3) must round-trip:
//     Decode(ids, skip_special_tokens=true) == text, with parse_special off;
//   - the ids are decoded (skip_special_tokens off and on) and stream-decoded (skipping special
//     tokens for the parse_special ids, not for the others): valid UTF-8, a bounded window, and
//     the streamed chunks plus Flush() equal Decode() when that holds no U+FFFD.
// A broken property calls __builtin_trap(), which libFuzzer reports as a crash.
//
// Run: tests/fuzz/run_fuzz.sh BUILD_DIR SECONDS tokenizer_encode (see docs/fuzzing.md).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "tests/fuzz/tokenizer_fuzz_util.h"
#include "tokenizer/tokenizer.h"

#ifndef LS_TOKENIZER_FIXTURES_DIR
#error \
    "LS_TOKENIZER_FIXTURES_DIR must name tests/golden/tokenizers (set by tests/fuzz/CMakeLists.txt)"
#endif

namespace {

using ls_fuzz::Check;

struct Loaded {
  std::string name;
  std::unique_ptr<ls::Tokenizer> tok;
  bool round_trips;  // byte-level, no normalizer: decode(encode(text)) == text
};

std::vector<Loaded>* g_tokenizers = nullptr;

void Exercise(const Loaded& l, absl::string_view text) {
  const ls::Tokenizer& tok = *l.tok;
  for (bool parse_special : {false, true}) {
    ls::EncodeOptions options;
    options.parse_special = parse_special;
    absl::StatusOr<ls::Encoding> e = tok.Encode(text, options);
    Check(e.ok(), "a golden tokenizer encodes valid UTF-8");
    ls_fuzz::CheckEncoding(tok, text, *e, parse_special, /*strict=*/true);
    if (!parse_special) {
      absl::StatusOr<std::vector<int32_t>> ids = tok.EncodeIds(text, options);
      Check(ids.ok() && *ids == e->ids, "EncodeIds == Encode().ids");
      if (l.round_trips) {
        Check(tok.Decode(e->ids, /*skip_special_tokens=*/true) == text,
              "byte-level round trip: Decode(Encode(text)) == text");
      }
    }
    ls_fuzz::ExerciseDecode(tok, e->ids, /*stream_skip=*/parse_special, /*check_concat=*/true);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  struct Fixture {
    const char* name;
    bool round_trips;
  };
  const Fixture fixtures[] = {
      {"bytelevel_gpt2", true},
      {"bytelevel_llama3", true},
      {"qwen2_style", false},
      {"sentencepiece_bpe", false},
      {"sentencepiece_bpe_metaspace", false},
      {"anthropic_sdk", false},
  };
  g_tokenizers = new std::vector<Loaded>();
  for (const Fixture& f : fixtures) {
    const std::string dir = absl::StrCat(LS_TOKENIZER_FIXTURES_DIR, "/", f.name);
    absl::StatusOr<std::unique_ptr<ls::Tokenizer>> tok = ls::Tokenizer::LoadFromDir(dir);
    if (!tok.ok()) {
      // Every golden tokenizer must load; the golden tests say why one does not.
      std::fprintf(stderr, "tokenizer_encode_fuzz: cannot load %s: %s\n", dir.c_str(),
                   std::string(tok.status().message()).c_str());
      std::abort();
    }
    g_tokenizers->push_back({f.name, std::move(*tok), f.round_trips});
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  const bool valid = ls_fuzz::IsValidUtf8(input);
  const std::string repaired = valid ? std::string() : ls_fuzz::RepairUtf8(input);
  Check(ls_fuzz::IsValidUtf8(repaired), "RepairUtf8 gives valid UTF-8");
  for (const Loaded& l : *g_tokenizers) {
    if (!valid) {
      for (bool parse_special : {false, true}) {
        ls::EncodeOptions options;
        options.parse_special = parse_special;
        absl::StatusOr<ls::Encoding> e = l.tok->Encode(input, options);
        Check(!e.ok() && absl::IsInvalidArgument(e.status()),
              "invalid UTF-8 gives INVALID_ARGUMENT");
        Check(!l.tok->EncodeIds(input, options).ok(), "EncodeIds refuses invalid UTF-8 too");
      }
    }
    Exercise(l, valid ? input : absl::string_view(repaired));
  }
  return 0;
}
