// Tokenizer encode throughput, one thread: loads a tokenizer folder (tokenizer.json and friends),
// reads a UTF-8 text file, splits it into documents and encodes them one by one, --iters times;
// reports MB/s (10^6 bytes of input per second) of the best pass, for Tokenizer::Encode (the
// full Encoding: ids, token strings, offsets) and for Tokenizer::EncodeIds, plus a checksum of
// the ids. Prints one JSON object on stdout.
//
//   build/bench/tokenizer_bench --tokenizer_dir=tests/golden/tokenizers/anthropic_sdk
//       --text=/tmp/text.txt [--iters=5] [--doc_bytes=0] [--ids_out=/tmp/ids.bin]
//
// Documents: with --doc_bytes=0 the file is split on blank lines, exactly as Python's
// text.split("\n\n") (empty pieces dropped); with --doc_bytes=N into pieces of N bytes, each end
// moved back to a UTF-8 character boundary. --ids_out writes the ids for a comparison with
// another implementation (bench/tokenizer_bench.py): per document a little-endian uint32 count,
// then that many little-endian int32 ids. The checksum is FNV-1a 64 over those same bytes.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/escaping.h"
#include "absl/strings/string_view.h"
#include "tokenizer/tokenizer.h"

ABSL_FLAG(std::string, tokenizer_dir, "", "Folder with tokenizer.json (required)");
ABSL_FLAG(std::string, text, "", "UTF-8 text file to encode (required)");
ABSL_FLAG(int, iters, 5, "Timed passes over all documents (the best one is reported)");
ABSL_FLAG(int, doc_bytes, 0, "0: split on blank lines; N: documents of about N bytes");
ABSL_FLAG(bool, add_special_tokens, true, "EncodeOptions::add_special_tokens (HF default: true)");
ABSL_FLAG(bool, parse_special, true,
          "EncodeOptions::parse_special (true matches HF Tokenizer.encode's default)");
ABSL_FLAG(std::string, ids_out, "", "Write the ids here (see the header comment for the layout)");

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::vector<absl::string_view> SplitDocs(absl::string_view text, int doc_bytes) {
  std::vector<absl::string_view> docs;
  if (doc_bytes <= 0) {
    size_t pos = 0;
    while (true) {
      const size_t next = text.find("\n\n", pos);
      const absl::string_view piece =
          text.substr(pos, next == absl::string_view::npos ? absl::string_view::npos : next - pos);
      if (!piece.empty()) docs.push_back(piece);
      if (next == absl::string_view::npos) break;
      pos = next + 2;
    }
    return docs;
  }
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = std::min(text.size(), pos + static_cast<size_t>(doc_bytes));
    while (end < text.size() && end > pos + 1 &&
           (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) {
      --end;
    }
    docs.push_back(text.substr(pos, end - pos));
    pos = end;
  }
  return docs;
}

void AppendU32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

uint64_t Fnv1a(absl::string_view bytes) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  return h;
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "tokenizer_bench: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string dir = absl::GetFlag(FLAGS_tokenizer_dir);
  const std::string text_path = absl::GetFlag(FLAGS_text);
  const int iters = std::max(1, absl::GetFlag(FLAGS_iters));
  if (dir.empty() || text_path.empty()) return Fail("--tokenizer_dir and --text are required");

  std::ifstream in(text_path, std::ios::binary);
  if (!in) return Fail("cannot read " + text_path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string text = buffer.str();
  const std::vector<absl::string_view> docs = SplitDocs(text, absl::GetFlag(FLAGS_doc_bytes));
  size_t doc_bytes_total = 0;
  for (absl::string_view d : docs) doc_bytes_total += d.size();

  const auto load_start = Clock::now();
  absl::StatusOr<std::unique_ptr<ls::Tokenizer>> loaded = ls::Tokenizer::LoadFromDir(dir);
  const double load_s = Seconds(Clock::now() - load_start);
  if (!loaded.ok()) return Fail(std::string(loaded.status().message()));
  const ls::Tokenizer& tok = **loaded;

  ls::EncodeOptions options;
  options.add_special_tokens = absl::GetFlag(FLAGS_add_special_tokens);
  options.parse_special = absl::GetFlag(FLAGS_parse_special);

  // Untimed pass: the ids (for the checksum and --ids_out) and a warm-up.
  std::string serialized;
  size_t tokens = 0;
  for (absl::string_view d : docs) {
    absl::StatusOr<std::vector<int32_t>> ids = tok.EncodeIds(d, options);
    if (!ids.ok()) return Fail(std::string(ids.status().message()));
    AppendU32(&serialized, static_cast<uint32_t>(ids->size()));
    for (int32_t id : *ids) AppendU32(&serialized, static_cast<uint32_t>(id));
    tokens += ids->size();
  }
  if (!absl::GetFlag(FLAGS_ids_out).empty()) {
    std::ofstream out(absl::GetFlag(FLAGS_ids_out), std::ios::binary);
    out.write(serialized.data(), static_cast<std::streamsize>(serialized.size()));
    if (!out) return Fail("cannot write " + absl::GetFlag(FLAGS_ids_out));
  }

  // Timed passes. `sink` keeps the work observable.
  double best_full = std::numeric_limits<double>::infinity();
  double best_ids = std::numeric_limits<double>::infinity();
  size_t sink = 0;
  for (int it = 0; it < iters; ++it) {
    auto start = Clock::now();
    for (absl::string_view d : docs) {
      absl::StatusOr<ls::Encoding> e = tok.Encode(d, options);
      if (!e.ok()) return Fail(std::string(e.status().message()));
      sink += e->ids.size() + e->offsets.size();
    }
    best_full = std::min(best_full, Seconds(Clock::now() - start));
    start = Clock::now();
    for (absl::string_view d : docs) {
      absl::StatusOr<std::vector<int32_t>> ids = tok.EncodeIds(d, options);
      if (!ids.ok()) return Fail(std::string(ids.status().message()));
      sink += ids->size();
    }
    best_ids = std::min(best_ids, Seconds(Clock::now() - start));
  }
  if (sink != static_cast<size_t>(iters) * 3 * tokens)
    return Fail("token counts vary between passes");

  const double mb = static_cast<double>(doc_bytes_total) / 1e6;
  std::printf(
      "{\"tokenizer_dir\": \"%s\", \"text_bytes\": %zu, \"doc_bytes\": %zu, \"docs\": %zu, "
      "\"tokens\": %zu, \"iters\": %d, \"load_s\": %.4f, \"encode_best_s\": %.5f, "
      "\"encode_mb_per_s\": %.3f, \"encode_ids_best_s\": %.5f, \"encode_ids_mb_per_s\": %.3f, "
      "\"checksum\": \"%016llx\"}\n",
      absl::CHexEscape(dir).c_str(), text.size(), doc_bytes_total, docs.size(), tokens, iters,
      load_s, best_full, mb / best_full, best_ids, mb / best_ids,
      static_cast<unsigned long long>(Fnv1a(serialized)));
  return 0;
}
