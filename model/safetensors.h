// Reading and writing safetensors files (https://github.com/huggingface/safetensors), the only
// weight format loraserve accepts for base models and adapters.
//
// Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON (an object that starts
// with '{', optionally right-padded with spaces), then the data section. The header maps each
// tensor name to {"dtype", "shape", "data_offsets": [begin, end)} with offsets relative to the
// start of the data section, plus an optional "__metadata__" object of string -> string.
//
// The reader treats every file as hostile. It enforces every check of the reference reader
// (safetensors/src/tensor.rs) and more: exact entry schema, known dtypes, unsigned integers only,
// checked arithmetic, data that tiles the data section with no hole, overlap or trailing byte,
// and caps on header size, tensor count, rank and name length. Every rejection is
// INVALID_ARGUMENT with a message of the form
//   "<file>: tensor \"<name>\": <rule>: expected <x>, found <y>"
// where <file> is the path (or "<buffer>" for Parse) and the tensor part appears when the rule
// concerns one tensor. Names in messages are C-escaped so a hostile name cannot forge log lines.
#ifndef LORASERVE_MODEL_SAFETENSORS_H_
#define LORASERVE_MODEL_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/dtype.h"
#include "common/json.h"
#include "common/mmap_file.h"
#include "common/tensor.h"

namespace ls {

// Caps applied while parsing, on top of the format's own rules. The defaults accept every real
// checkpoint we know of (the largest have a few thousand tensors of rank <= 5).
struct SafetensorsLimits {
  // The JSON header; the reference reader's MAX_HEADER_SIZE.
  uint64_t max_header_bytes = 100'000'000;
  // Tensor entries in one file, "__metadata__" not counted.
  size_t max_tensors = 1'000'000;
  size_t max_rank = 8;
  // Tensor names are 1..max_name_bytes bytes of UTF-8.
  size_t max_name_bytes = 1024;
};

// One tensor of a parsed file. Offsets are relative to the start of the data section;
// `data` is the absolute address of the first byte, inside the buffer the file was parsed from.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;  // [] is a one-element scalar; a 0 anywhere means an empty tensor.
  uint64_t begin = 0;
  uint64_t end = 0;
  const uint8_t* data = nullptr;

  uint64_t nbytes() const { return end - begin; }
  // Fits int64: the reader rejects shapes whose running product overflows.
  int64_t numel() const;
};

// A validated, indexed safetensors file.
//
// Ownership: Open() owns its mapping; Parse() borrows `bytes`, which must outlive the result.
// Every SafetensorsEntry, TensorView and pointer handed out points into that memory and must not
// outlive the SafetensorsFile (or, for Parse, the buffer). The memory is read-only: a mapped file
// is PROT_READ, so writing through a TensorView from View() faults.
//
// Thread safety: immutable after creation; every method is const and safe to call from any
// number of threads at once.
class SafetensorsFile {
 public:
  // Validates and indexes an in-memory file. Errors name the file "<buffer>".
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(
      absl::Span<const uint8_t> bytes, const SafetensorsLimits& limits = {});
  // Maps `path` read-only and validates it. Errors from mapping keep MappedFile's codes
  // (NOT_FOUND for a missing file); format errors are INVALID_ARGUMENT naming `path`.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(
      const std::string& path, const SafetensorsLimits& limits = {});

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // The path given to Open, or "<buffer>".
  const std::string& what() const { return what_; }
  // N, the length of the JSON header (padding included).
  uint64_t header_bytes() const { return header_bytes_; }
  // The data section: everything after the header.
  absl::Span<const uint8_t> data() const { return data_; }

  // Every tensor in file order, i.e. by ascending data offset (ties, which only zero-size
  // tensors can have, broken by name). The header's key order is not kept: the format gives it
  // no meaning, and the JSON object is parsed into a sorted map.
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  size_t size() const { return entries_.size(); }
  // O(1) lookup; nullptr when absent.
  const SafetensorsEntry* Find(absl::string_view name) const;
  // As Find, but NOT_FOUND naming the file and the tensor when absent.
  absl::StatusOr<const SafetensorsEntry*> Get(absl::string_view name) const;
  // The "__metadata__" map; empty when the header has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The methods below take an entry of this file.
  //
  // Whether the entry's data pointer is aligned to its element size (1 for sub-byte and 8-bit
  // dtypes, 8 for 64-bit ones). Files from our writer and the reference writer, mapped, are
  // always aligned; other writers need not align.
  static bool IsAligned(const SafetensorsEntry& entry);
  // A zero-copy contiguous CPU view. FAILED_PRECONDITION naming the tensor when !IsAligned:
  // copy with CopyTo instead.
  absl::StatusOr<TensorView> View(const SafetensorsEntry& entry) const;
  // Copies the entry's nbytes() raw bytes to `dst` (any alignment).
  static void CopyTo(const SafetensorsEntry& entry, void* dst);
  // Tells the kernel the entry's bytes will not be read again soon, so a file mapping's pages
  // can leave memory (a later read faults them back in from the file). Does nothing for Parse()
  // buffers, whose memory is the caller's.
  void ReleasePages(const SafetensorsEntry& entry) const;
  // Converts an F32, F16 or BF16 tensor to float32, aligned or not. INVALID_ARGUMENT naming the
  // file and tensor for any other dtype, or when `dst` does not hold exactly numel() floats.
  absl::Status ReadAsFloat32(const SafetensorsEntry& entry, absl::Span<float> dst) const;
  absl::StatusOr<std::vector<float>> ReadAsFloat32(const SafetensorsEntry& entry) const;

 private:
  SafetensorsFile() = default;
  absl::Status Init(absl::Span<const uint8_t> bytes, const SafetensorsLimits& limits);

  std::string what_ = "<buffer>";
  std::unique_ptr<MappedFile> mapping_;  // null for Parse
  uint64_t header_bytes_ = 0;
  absl::Span<const uint8_t> data_;
  std::vector<SafetensorsEntry> entries_;
  // Keys view entries_[i].name; entries_ never changes after Init, so they stay valid.
  absl::flat_hash_map<absl::string_view, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// One tensor to write. `data` holds the little-endian, row-major bytes (numel * bits / 8 of
// them) and must stay valid for the duration of the call.
struct SafetensorsTensorRef {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  absl::Span<const uint8_t> data;
};

// Serializes a safetensors file the way the reference writer does: the header is padded with
// spaces so the data section starts at a multiple of 8, and tensors are laid out by descending
// element alignment, then by name, so every tensor is naturally aligned when the file is mapped.
// The output always passes SafetensorsFile::Parse with default limits. INVALID_ARGUMENT for an
// empty, duplicate, reserved ("__metadata__"), over-long or non-UTF-8 name, a negative
// dimension, a shape whose size overflows, a sub-byte tensor of fractional byte size, a byte
// count that does not match dtype and shape, or non-UTF-8 metadata.
absl::StatusOr<std::string> SerializeSafetensors(
    const std::vector<SafetensorsTensorRef>& tensors,
    const std::map<std::string, std::string>& metadata = {});

// Writes the same bytes to `path` atomically: into a temporary file in the same directory,
// fsync, rename over `path`, fsync the directory. On any error the temporary file is removed and
// `path` is untouched. Thread-safe (distinct temporary names), but concurrent writers of the
// same path race: the last rename wins.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsTensorRef>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// A tensor located in a checkpoint: the shard file that holds it and its entry there.
struct SafetensorsTensor {
  const SafetensorsFile* file = nullptr;
  const SafetensorsEntry* entry = nullptr;
};

// A Hugging Face checkpoint directory: either a single `model.safetensors`, or shards listed by
// `model.safetensors.index.json` = {"metadata": {...}, "weight_map": {tensor: shard_file}}.
// When both exist the single file wins, as in transformers.
//
// The index is parsed strictly (duplicate keys, unknown top-level keys and non-string shard names
// are rejected). Shard names must be bare file names: not empty, no '/', no "..", no leading '.'.
// Every mapped tensor must exist in its shard, every tensor of a shard must be mapped to that
// shard, and no tensor may appear in two shards. All of these are INVALID_ARGUMENT naming the
// index file; a missing shard file is NOT_FOUND naming it.
//
// Ownership and thread safety: owns every shard mapping; immutable after Open and safe to share
// across threads. Pointers it hands out live as long as it does.
class SafetensorsCheckpoint {
 public:
  static constexpr absl::string_view kSingleFileName = "model.safetensors";
  static constexpr absl::string_view kIndexFileName = "model.safetensors.index.json";

  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(
      const std::string& dir, const SafetensorsLimits& limits = {});

  SafetensorsCheckpoint(const SafetensorsCheckpoint&) = delete;
  SafetensorsCheckpoint& operator=(const SafetensorsCheckpoint&) = delete;

  // True when loaded through the index.
  bool sharded() const { return sharded_; }
  // The shards, sorted by file name (one for a single-file checkpoint).
  const std::vector<std::unique_ptr<SafetensorsFile>>& shards() const { return shards_; }
  // The index's "metadata" object (e.g. {"total_size": 123}); an empty object when there is no
  // index or it has no metadata. Not validated beyond being an object.
  const Json& index_metadata() const { return index_metadata_; }

  size_t size() const { return names_.size(); }
  // O(1) lookup across shards; nullptr when absent.
  const SafetensorsTensor* Find(absl::string_view name) const;
  // As Find, but NOT_FOUND naming the checkpoint and the tensor when absent.
  absl::StatusOr<SafetensorsTensor> Get(absl::string_view name) const;
  // Every tensor name: shard by shard, each in file order, which is also the order that reads
  // the files sequentially.
  const std::vector<absl::string_view>& names() const { return names_; }

 private:
  SafetensorsCheckpoint() = default;
  // Takes ownership of `shard` and indexes its tensors; `what` names the checkpoint in errors.
  absl::Status AddShard(std::unique_ptr<SafetensorsFile> shard, absl::string_view what);

  std::string dir_;
  bool sharded_ = false;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  Json index_metadata_ = Json::object();
  // Keys and names_ view entry names owned by shards_.
  absl::flat_hash_map<absl::string_view, SafetensorsTensor> index_;
  std::vector<absl::string_view> names_;
};

}  // namespace ls

#endif  // LORASERVE_MODEL_SAFETENSORS_H_
