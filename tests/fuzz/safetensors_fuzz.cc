// libFuzzer target for the safetensors reader (model/safetensors.h).
//
// Each input is a whole file handed to SafetensorsFile::Parse. Beyond "no crash, no sanitizer
// report", the target checks the reader's contract on every input:
//   - a rejection is INVALID_ARGUMENT and names "<buffer>";
//   - an accepted file's tensors lie inside the input, tile the data section exactly, are found
//     by name, and every byte of each is read (CopyTo, View, ReadAsFloat32), so ASan sees any
//     read outside the input;
//   - what the reader accepts, the writer reproduces, and the reader accepts again with the
//     same names, dtypes, shapes, bytes and metadata.
// A broken check calls __builtin_trap(), which libFuzzer reports as a crash.
//
// Run: tests/fuzz/run_fuzz.sh BUILD_DIR SECONDS (see docs/fuzzing.md).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "model/safetensors.h"

namespace {

void Check(bool condition) {
  if (!condition) __builtin_trap();
}

// Folds bytes into a value the optimizer cannot drop.
volatile uint64_t g_sink;

uint64_t Fold(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

void CheckRoundTrip(const ls::SafetensorsFile& file) {
  std::vector<ls::SafetensorsTensorRef> refs;
  refs.reserve(file.size());
  for (const ls::SafetensorsEntry& e : file.entries()) {
    refs.push_back({e.name, e.dtype, e.shape,
                    absl::Span<const uint8_t>(e.data, static_cast<size_t>(e.nbytes()))});
  }
  const absl::StatusOr<std::string> bytes = ls::SerializeSafetensors(refs, file.metadata());
  Check(bytes.ok());
  const absl::StatusOr<std::unique_ptr<ls::SafetensorsFile>> again = ls::SafetensorsFile::Parse(
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size()));
  Check(again.ok());
  Check((*again)->size() == file.size());
  Check((*again)->metadata() == file.metadata());
  Check((*again)->header_bytes() % 8 == 0);
  for (const ls::SafetensorsEntry& e : file.entries()) {
    const ls::SafetensorsEntry* f = (*again)->Find(e.name);
    Check(f != nullptr);
    Check(f->dtype == e.dtype && f->shape == e.shape && f->nbytes() == e.nbytes());
    Check(e.nbytes() == 0 || std::memcmp(f->data, e.data, static_cast<size_t>(e.nbytes())) == 0);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::StatusOr<std::unique_ptr<ls::SafetensorsFile>> parsed =
      ls::SafetensorsFile::Parse(absl::Span<const uint8_t>(data, size));
  if (!parsed.ok()) {
    Check(parsed.status().code() == absl::StatusCode::kInvalidArgument);
    Check(absl::StartsWith(parsed.status().message(), "<buffer>: "));
    return 0;
  }
  const ls::SafetensorsFile& file = **parsed;
  Check(8 + file.header_bytes() + file.data().size() == size);

  uint64_t h = 0;
  uint64_t covered = 0;
  std::vector<uint8_t> copy;
  std::vector<float> floats;
  for (const ls::SafetensorsEntry& e : file.entries()) {
    Check(file.Find(e.name) == &e);
    Check(e.begin <= e.end && e.end <= file.data().size());
    Check(e.data == file.data().data() + e.begin);
    Check(e.shape.size() <= ls::SafetensorsLimits().max_rank);
    Check(e.numel() >= 0);
    covered += e.nbytes();

    copy.resize(static_cast<size_t>(e.nbytes()));
    ls::SafetensorsFile::CopyTo(e, copy.data());
    h ^= Fold(copy.data(), copy.size());

    const absl::StatusOr<ls::TensorView> view = file.View(e);
    Check(view.ok() == ls::SafetensorsFile::IsAligned(e));
    if (view.ok()) {
      Check(view->nbytes() == e.nbytes());
      h ^= Fold(view->data(), view->nbytes());
    }

    const bool is_float =
        e.dtype == ls::DType::kF32 || e.dtype == ls::DType::kF16 || e.dtype == ls::DType::kBF16;
    floats.assign(static_cast<size_t>(is_float ? e.numel() : 0), 0.0f);
    const absl::Status converted = file.ReadAsFloat32(e, absl::MakeSpan(floats));
    Check(converted.ok() == is_float);
    h ^= Fold(floats.data(), floats.size() * sizeof(float));
  }
  Check(covered == file.data().size());  // the tensors tile the data section
  for (const auto& [key, value] : file.metadata()) h ^= Fold(key.data(), key.size()) + value.size();
  g_sink = h;

  CheckRoundTrip(file);
  return 0;
}
