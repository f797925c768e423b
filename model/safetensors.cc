#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace ls {
namespace {

// Tensor bytes are used in place, so the host must share the format's byte order.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian");

constexpr absl::string_view kMetadataKey = "__metadata__";

constexpr absl::string_view kBufferName = "<buffer>";
constexpr uint64_t kMaxDim = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
// A safetensors header nests three levels (header, entry, shape); a little slack keeps error
// messages precise ("shape[0] must be an unsigned integer, found array") for near-misses while
// deep nesting is still refused early.
constexpr int kHeaderJsonDepth = 8;
// Names and strings echoed into messages are cut to this many bytes.
constexpr size_t kMaxQuotedBytes = 128;

// A double-quoted, C-escaped copy of `s` for messages, cut at a UTF-8 boundary after at most
// `max_bytes`, so a hostile name can neither forge log lines nor flood them.
std::string Quote(absl::string_view s, size_t max_bytes = kMaxQuotedBytes) {
  bool cut = false;
  if (s.size() > max_bytes) {
    size_t n = max_bytes;
    while (n > 0 && (static_cast<uint8_t>(s[n]) & 0xc0) == 0x80) --n;
    s = s.substr(0, n);
    cut = true;
  }
  return absl::StrCat("\"", absl::Utf8SafeCEscape(s), cut ? "\"..." : "\"");
}

absl::Status Invalid(absl::string_view what, absl::string_view detail) {
  return absl::InvalidArgumentError(absl::StrCat(what, ": ", detail));
}

absl::Status TensorInvalid(absl::string_view what, absl::string_view name,
                           absl::string_view detail) {
  return absl::InvalidArgumentError(absl::StrCat(what, ": tensor ", Quote(name), ": ", detail));
}

// "unsigned integer 3", "integer -1", "number 1.5", "string \"x\"", "array", ...
std::string Describe(const Json& v) {
  if (v.is_number()) return absl::StrCat(JsonTypeName(v), " ", v.dump());
  if (v.is_string()) return absl::StrCat("string ", Quote(v.get_ref<const std::string&>()));
  return std::string(JsonTypeName(v));
}

// Offset of the first byte of the first ill-formed UTF-8 sequence (overlong forms, surrogates
// and code points above U+10FFFF included), or npos when `s` is valid.
size_t FindInvalidUtf8(absl::string_view s) {
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t c = static_cast<uint8_t>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    uint32_t min;
    if ((c & 0xe0) == 0xc0) {
      len = 2, cp = c & 0x1fu, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3, cp = c & 0x0fu, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4, cp = c & 0x07u, min = 0x10000;
    } else {
      return i;
    }
    if (n - i < len) return i;
    for (size_t k = 1; k < len; ++k) {
      const uint8_t cc = static_cast<uint8_t>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return i;
      cp = (cp << 6) | (cc & 0x3fu);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
    i += len;
  }
  return absl::string_view::npos;
}

size_t ElementAlignment(DType dtype) {
  return static_cast<size_t>(std::max(1, DTypeBits(dtype) / 8));
}

std::string AllDTypeNames() {
  std::vector<absl::string_view> names;
  for (int i = 0; i <= static_cast<int>(DType::kF4); ++i) {
    names.push_back(DTypeName(static_cast<DType>(i)));
  }
  return absl::StrJoin(names, ", ");
}

// Element and byte counts of `shape` x `dtype`, with the checks every reader and the writer
// share. The running product must fit int64 (Shape and TensorView use int64), numel * bits must
// fit uint64, and the bit count must be whole bytes.
struct TensorSize {
  int64_t numel;
  uint64_t nbytes;
};

absl::StatusOr<TensorSize> CheckedTensorSize(absl::string_view what, absl::string_view name,
                                             DType dtype, absl::Span<const int64_t> shape) {
  uint64_t numel = 1;
  for (int64_t dim : shape) {
    const uint64_t d = static_cast<uint64_t>(dim);
    if (d != 0 && numel > kMaxDim / d) {
      return TensorInvalid(what, name,
                           absl::StrCat("shape ", ShapeToString(shape),
                                        " overflows: its element count exceeds 2^63-1"));
    }
    numel *= d;
  }
  const uint64_t bits_per_element = static_cast<uint64_t>(DTypeBits(dtype));
  if (numel > std::numeric_limits<uint64_t>::max() / bits_per_element) {
    return TensorInvalid(what, name,
                         absl::StrCat("shape ", ShapeToString(shape), " of ", DTypeName(dtype),
                                      " overflows: its bit count exceeds 2^64-1"));
  }
  const uint64_t bits = numel * bits_per_element;
  if (bits % 8 != 0) {
    return TensorInvalid(
        what, name,
        absl::StrCat("misaligned slice: shape ", ShapeToString(shape), " of ", DTypeName(dtype),
                     " holds ", bits, " bits, expected a whole number of bytes"));
  }
  return TensorSize{static_cast<int64_t>(numel), bits / 8};
}

absl::Status CheckName(absl::string_view what, absl::string_view name,
                       const SafetensorsLimits& limits) {
  if (name.empty()) {
    return Invalid(
        what, absl::StrCat("empty tensor name: expected 1 to ", limits.max_name_bytes, " bytes"));
  }
  if (name.size() > limits.max_name_bytes) {
    return TensorInvalid(what, name,
                         absl::StrCat("name too long: expected at most ", limits.max_name_bytes,
                                      " bytes, found ", name.size()));
  }
  return absl::OkStatus();
}

// Reads an unsigned integer no larger than `max` out of `v`; `field` names it ("shape[1]").
absl::StatusOr<uint64_t> ParseUnsigned(absl::string_view what, absl::string_view name,
                                       absl::string_view field, const Json& v, uint64_t max) {
  if (!v.is_number_unsigned()) {
    return TensorInvalid(what, name,
                         absl::StrCat(field, " must be an unsigned integer: found ", Describe(v)));
  }
  const uint64_t value = v.get<uint64_t>();
  if (value > max) {
    return TensorInvalid(
        what, name, absl::StrCat(field, " too large: expected at most ", max, ", found ", value));
  }
  return value;
}

absl::Status ParseMetadata(absl::string_view what, const Json& value,
                           std::map<std::string, std::string>* metadata) {
  if (!value.is_object()) {
    return Invalid(what,
                   absl::StrCat(kMetadataKey, " must be an object of string to string: found ",
                                Describe(value)));
  }
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (!it.value().is_string()) {
      return Invalid(what, absl::StrCat(kMetadataKey, ": value of ", Quote(it.key()),
                                        " must be a string: found ", Describe(it.value())));
    }
    metadata->emplace(it.key(), it.value().get<std::string>());
  }
  return absl::OkStatus();
}

// Validates one header entry on its own; the layout checks that need every entry come later.
absl::StatusOr<SafetensorsEntry> ParseEntry(absl::string_view what, const std::string& name,
                                            const Json& value, const SafetensorsLimits& limits,
                                            uint64_t data_size) {
  LS_RETURN_IF_ERROR(CheckName(what, name, limits));
  if (!value.is_object()) {
    return TensorInvalid(
        what, name,
        absl::StrCat("entry must be an object with keys dtype, shape, data_offsets: found ",
                     Describe(value)));
  }
  for (auto it = value.begin(); it != value.end(); ++it) {
    const std::string& key = it.key();
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      return TensorInvalid(what, name,
                           absl::StrCat("unknown key ", Quote(key),
                                        ": expected exactly dtype, shape, data_offsets"));
    }
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(key)) {
      return TensorInvalid(
          what, name,
          absl::StrCat("missing key \"", key, "\": expected exactly dtype, shape, data_offsets"));
    }
  }

  SafetensorsEntry entry;
  entry.name = name;

  const Json& dtype = value["dtype"];
  if (!dtype.is_string()) {
    return TensorInvalid(what, name,
                         absl::StrCat("dtype must be a string: found ", Describe(dtype)));
  }
  const std::optional<DType> parsed_dtype = DTypeFromName(dtype.get_ref<const std::string&>());
  if (!parsed_dtype) {
    return TensorInvalid(what, name,
                         absl::StrCat("unknown dtype ", Quote(dtype.get_ref<const std::string&>()),
                                      ": expected one of ", AllDTypeNames()));
  }
  entry.dtype = *parsed_dtype;

  const Json& shape = value["shape"];
  if (!shape.is_array()) {
    return TensorInvalid(what, name,
                         absl::StrCat("shape must be an array: found ", Describe(shape)));
  }
  if (shape.size() > limits.max_rank) {
    return TensorInvalid(what, name,
                         absl::StrCat("rank too large: expected at most ", limits.max_rank,
                                      " dimensions, found ", shape.size()));
  }
  for (size_t i = 0; i < shape.size(); ++i) {
    LS_ASSIGN_OR_RETURN(
        const uint64_t dim,
        ParseUnsigned(what, name, absl::StrCat("shape[", i, "]"), shape[i], kMaxDim));
    entry.shape.push_back(static_cast<int64_t>(dim));
  }

  const Json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2) {
    return TensorInvalid(
        what, name,
        absl::StrCat(
            "data_offsets must be an array of exactly 2 unsigned integers: found ",
            offsets.is_array() ? absl::StrCat("array of ", offsets.size()) : Describe(offsets)));
  }
  constexpr uint64_t kMaxOffset = std::numeric_limits<uint64_t>::max();
  LS_ASSIGN_OR_RETURN(entry.begin,
                      ParseUnsigned(what, name, "data_offsets[0]", offsets[0], kMaxOffset));
  LS_ASSIGN_OR_RETURN(entry.end,
                      ParseUnsigned(what, name, "data_offsets[1]", offsets[1], kMaxOffset));
  if (entry.begin > entry.end) {
    return TensorInvalid(
        what, name,
        absl::StrCat("data_offsets [", entry.begin, ", ", entry.end, "]: expected begin <= end"));
  }

  LS_ASSIGN_OR_RETURN(const TensorSize size,
                      CheckedTensorSize(what, name, entry.dtype, entry.shape));
  if (entry.end - entry.begin != size.nbytes) {
    return TensorInvalid(
        what, name,
        absl::StrCat("size/shape mismatch: shape ", ShapeToString(entry.shape), " of ",
                     DTypeName(entry.dtype), " needs ", size.nbytes, " bytes, data_offsets [",
                     entry.begin, ", ", entry.end, "] span ", entry.end - entry.begin));
  }
  if (entry.end > data_size) {
    return TensorInvalid(
        what, name,
        absl::StrCat("data past end of file: data_offsets [", entry.begin, ", ", entry.end,
                     "] end beyond the ", data_size, "-byte data section"));
  }
  return entry;
}

}  // namespace

int64_t SafetensorsEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Parse(
    absl::Span<const uint8_t> bytes, const SafetensorsLimits& limits) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->what_ = std::string(kBufferName);
  LS_RETURN_IF_ERROR(file->Init(bytes, limits));
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path, const SafetensorsLimits& limits) {
  LS_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> mapping, MappedFile::Open(path));
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->what_ = path;
  const absl::Span<const uint8_t> bytes = mapping->bytes();
  file->mapping_ = std::move(mapping);
  LS_RETURN_IF_ERROR(file->Init(bytes, limits));
  return file;
}

absl::Status SafetensorsFile::Init(absl::Span<const uint8_t> bytes,
                                   const SafetensorsLimits& limits) {
  const absl::string_view what = what_;
  const uint64_t size = bytes.size();
  if (size < 8) {
    return Invalid(what, absl::StrCat("header too small: expected at least 8 bytes for the header "
                                      "length, found ",
                                      size));
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<size_t>(i)];
  if (n > limits.max_header_bytes) {
    return Invalid(what, absl::StrCat("header too large: expected at most ",
                                      limits.max_header_bytes, " header bytes, found ", n));
  }
  // Written as a subtraction so that no header length can overflow it.
  if (n > size - 8) {
    return Invalid(what, absl::StrCat("header length past end of file: expected 8 + ", n,
                                      " bytes at least, found a ", size, "-byte file"));
  }
  header_bytes_ = n;
  const absl::string_view header(reinterpret_cast<const char*>(bytes.data()) + 8,
                                 static_cast<size_t>(n));
  data_ = bytes.subspan(static_cast<size_t>(8 + n));

  if (const size_t bad = FindInvalidUtf8(header); bad != absl::string_view::npos) {
    return Invalid(what, absl::StrCat("header is not valid UTF-8: ill-formed sequence starting "
                                      "with byte 0x",
                                      absl::Hex(static_cast<uint8_t>(header[bad]), absl::kZeroPad2),
                                      " at header offset ", bad));
  }
  absl::string_view json_text = header;
  while (!json_text.empty() && json_text.back() == ' ') json_text.remove_suffix(1);
  if (json_text.empty() || json_text.front() != '{') {
    return Invalid(
        what, absl::StrCat("header must start with '{': found ",
                           json_text.empty() ? std::string("only spaces") : Quote(json_text, 16)));
  }
  LS_ASSIGN_OR_RETURN(
      Json root, ParseJsonStrict(json_text, absl::StrCat(what, ": header"), {kHeaderJsonDepth}));
  // The text starts with '{' and parsed, so it is one object followed only by JSON whitespace;
  // the format allows spaces alone, which were trimmed above.
  if (json_text.back() != '}') {
    const size_t pos = json_text.rfind('}') + 1;
    return Invalid(what,
                   absl::StrCat("header may be padded only with spaces after the JSON "
                                "object: found byte 0x",
                                absl::Hex(static_cast<uint8_t>(json_text[pos]), absl::kZeroPad2),
                                " at header offset ", pos));
  }
  if (!root.is_object()) {
    return Invalid(what, absl::StrCat("header must be a JSON object: found ", Describe(root)));
  }

  const size_t num_tensors = root.size() - (root.contains(std::string(kMetadataKey)) ? 1 : 0);
  if (num_tensors > limits.max_tensors) {
    return Invalid(what, absl::StrCat("too many tensors: expected at most ", limits.max_tensors,
                                      ", found ", num_tensors));
  }
  entries_.reserve(num_tensors);
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == kMetadataKey) {
      LS_RETURN_IF_ERROR(ParseMetadata(what, it.value(), &metadata_));
      continue;
    }
    LS_ASSIGN_OR_RETURN(SafetensorsEntry entry,
                        ParseEntry(what, it.key(), it.value(), limits, data_.size()));
    entries_.push_back(std::move(entry));
  }

  // The reference rule: sorted by offsets, the tensors tile the data section exactly, so no byte
  // is shared (an allocation DoS) or unaccounted for (a polyglot file).
  std::sort(entries_.begin(), entries_.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
              return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
            });
  uint64_t expected = 0;
  const SafetensorsEntry* prev = nullptr;
  for (const SafetensorsEntry& entry : entries_) {
    if (entry.begin > expected) {
      return TensorInvalid(
          what, entry.name,
          absl::StrCat("hole in the data section: expected data_offsets to begin at ", expected,
                       prev == nullptr
                           ? " (the start of the data section)"
                           : absl::StrCat(" (the end of tensor ", Quote(prev->name), ")"),
                       ", found ", entry.begin));
    }
    if (entry.begin < expected) {
      return TensorInvalid(
          what, entry.name,
          absl::StrCat("overlap: expected data_offsets to begin at ", expected,
                       " (the end of tensor ", Quote(prev->name), "), found ", entry.begin));
    }
    expected = entry.end;
    prev = &entry;
  }
  if (expected != data_.size()) {
    const std::string detail =
        absl::StrCat("trailing bytes: expected a ", expected, "-byte data section, found ",
                     data_.size(), " bytes after the header");
    if (prev == nullptr) return Invalid(what, detail);
    return TensorInvalid(what, prev->name, absl::StrCat(detail, " (after the last tensor)"));
  }

  index_.reserve(entries_.size());
  for (size_t i = 0; i < entries_.size(); ++i) {
    SafetensorsEntry& entry = entries_[i];
    entry.data = data_.data() + entry.begin;
    index_.emplace(entry.name, i);
  }
  return absl::OkStatus();
}

const SafetensorsEntry* SafetensorsFile::Find(absl::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

absl::StatusOr<const SafetensorsEntry*> SafetensorsFile::Get(absl::string_view name) const {
  const SafetensorsEntry* entry = Find(name);
  if (entry == nullptr) {
    return absl::NotFoundError(absl::StrCat(what_, ": no tensor named ", Quote(name)));
  }
  return entry;
}

bool SafetensorsFile::IsAligned(const SafetensorsEntry& entry) {
  return reinterpret_cast<uintptr_t>(entry.data) % ElementAlignment(entry.dtype) == 0;
}

absl::StatusOr<TensorView> SafetensorsFile::View(const SafetensorsEntry& entry) const {
  if (!IsAligned(entry)) {
    return absl::FailedPreconditionError(absl::StrCat(
        what_, ": tensor ", Quote(entry.name), ": data at file offset ",
        8 + header_bytes_ + entry.begin, " is not aligned to the ", ElementAlignment(entry.dtype),
        "-byte elements of ", DTypeName(entry.dtype), ": copy it with CopyTo"));
  }
  // TensorView has no const flavour; the header documents that this memory is read-only.
  return TensorView(const_cast<uint8_t*>(entry.data), entry.dtype, entry.shape);
}

void SafetensorsFile::ReleasePages(const SafetensorsEntry& entry) const {
  if (mapping_ == nullptr) return;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t start = reinterpret_cast<uintptr_t>(entry.data);
  const uintptr_t begin = (start + page - 1) & ~(page - 1);
  const uintptr_t end = (start + entry.nbytes()) & ~(page - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

void SafetensorsFile::CopyTo(const SafetensorsEntry& entry, void* dst) {
  if (entry.nbytes() != 0) std::memcpy(dst, entry.data, static_cast<size_t>(entry.nbytes()));
}

absl::Status SafetensorsFile::ReadAsFloat32(const SafetensorsEntry& entry,
                                            absl::Span<float> dst) const {
  const DType dtype = entry.dtype;
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) {
    return TensorInvalid(
        what_, entry.name,
        absl::StrCat("ReadAsFloat32: expected dtype F32, F16 or BF16, found ", DTypeName(dtype)));
  }
  const size_t numel = static_cast<size_t>(entry.numel());
  if (dst.size() != numel) {
    return TensorInvalid(what_, entry.name,
                         absl::StrCat("ReadAsFloat32: expected a destination of ", numel,
                                      " floats, found ", dst.size()));
  }
  if (dtype == DType::kF32) {
    CopyTo(entry, dst.data());
    return absl::OkStatus();
  }
  // memcpy per element: the source may be unaligned, and compilers turn it into a plain load.
  for (size_t i = 0; i < numel; ++i) {
    uint16_t h;
    std::memcpy(&h, entry.data + 2 * i, sizeof(h));
    dst[i] = dtype == DType::kF16 ? Fp16ToFloat(h) : Bf16ToFloat(h);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ReadAsFloat32(
    const SafetensorsEntry& entry) const {
  std::vector<float> out;
  // Check the dtype before allocating.
  if (entry.dtype == DType::kF32 || entry.dtype == DType::kF16 || entry.dtype == DType::kBF16) {
    out.resize(static_cast<size_t>(entry.numel()));
  }
  LS_RETURN_IF_ERROR(ReadAsFloat32(entry, absl::MakeSpan(out)));
  return out;
}

// ---- Writer --------------------------------------------------------------------------------

namespace {

// What both writers emit: the 8-byte length and padded header, then each tensor's bytes in
// `order`.
struct WritePlan {
  std::string header;
  std::vector<const SafetensorsTensorRef*> order;
};

absl::StatusOr<WritePlan> PlanWrite(absl::string_view what,
                                    const std::vector<SafetensorsTensorRef>& tensors,
                                    const std::map<std::string, std::string>& metadata) {
  // The reader's defaults, so that whatever we write we can read back.
  const SafetensorsLimits limits;
  if (tensors.size() > limits.max_tensors) {
    return Invalid(what, absl::StrCat("too many tensors: expected at most ", limits.max_tensors,
                                      ", found ", tensors.size()));
  }
  absl::flat_hash_set<absl::string_view> names;
  std::vector<uint64_t> sizes;  // by position in `tensors`
  sizes.reserve(tensors.size());
  for (const SafetensorsTensorRef& t : tensors) {
    LS_RETURN_IF_ERROR(CheckName(what, t.name, limits));
    if (FindInvalidUtf8(t.name) != absl::string_view::npos) {
      return TensorInvalid(what, t.name, "name is not valid UTF-8");
    }
    if (t.name == kMetadataKey) {
      return TensorInvalid(what, t.name, "name is reserved for the metadata map");
    }
    if (!names.insert(t.name).second) return TensorInvalid(what, t.name, "duplicate tensor name");
    if (t.shape.size() > limits.max_rank) {
      return TensorInvalid(what, t.name,
                           absl::StrCat("rank too large: expected at most ", limits.max_rank,
                                        " dimensions, found ", t.shape.size()));
    }
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (t.shape[i] < 0) {
        return TensorInvalid(
            what, t.name,
            absl::StrCat("shape[", i, "] must not be negative: found ", ShapeToString(t.shape)));
      }
    }
    LS_ASSIGN_OR_RETURN(const TensorSize size, CheckedTensorSize(what, t.name, t.dtype, t.shape));
    if (t.data.size() != size.nbytes) {
      return TensorInvalid(what, t.name,
                           absl::StrCat("size/shape mismatch: shape ", ShapeToString(t.shape),
                                        " of ", DTypeName(t.dtype), " needs ", size.nbytes,
                                        " bytes, found ", t.data.size()));
    }
    sizes.push_back(size.nbytes);
  }
  for (const auto& [key, value] : metadata) {
    if (FindInvalidUtf8(key) != absl::string_view::npos ||
        FindInvalidUtf8(value) != absl::string_view::npos) {
      return Invalid(what,
                     absl::StrCat(kMetadataKey, ": entry ", Quote(key), " is not valid UTF-8"));
    }
  }

  // Descending alignment, then name: each tensor's size is a multiple of its alignment, so every
  // offset stays aligned for the tensors that follow (the reference writer's order).
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const size_t align_a = ElementAlignment(tensors[a].dtype);
    const size_t align_b = ElementAlignment(tensors[b].dtype);
    if (align_a != align_b) return align_a > align_b;
    return tensors[a].name < tensors[b].name;
  });

  Json header = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header[std::string(kMetadataKey)] = std::move(meta);
  }
  WritePlan plan;
  uint64_t offset = 0;
  for (size_t i : order) {
    const SafetensorsTensorRef& t = tensors[i];
    Json shape = Json::array();
    for (int64_t d : t.shape) shape.push_back(static_cast<uint64_t>(d));
    Json entry = Json::object();
    entry["dtype"] = std::string(DTypeName(t.dtype));
    entry["shape"] = std::move(shape);
    entry["data_offsets"] = Json::array({offset, offset + sizes[i]});
    header[t.name] = std::move(entry);
    offset += sizes[i];
    plan.order.push_back(&t);
  }
  // Every string was checked to be UTF-8 above, so dump() cannot throw.
  std::string json = header.dump();
  const uint64_t padded = (static_cast<uint64_t>(json.size()) + 7) / 8 * 8;
  if (padded > limits.max_header_bytes) {
    return Invalid(what, absl::StrCat("header too large: expected at most ",
                                      limits.max_header_bytes, " header bytes, found ", padded));
  }
  json.resize(static_cast<size_t>(padded), ' ');
  plan.header.resize(8);
  for (int i = 0; i < 8; ++i)
    plan.header[static_cast<size_t>(i)] = static_cast<char>(padded >> (8 * i));
  plan.header += json;
  return plan;
}

absl::Status ErrnoStatus(int err, absl::string_view call, absl::string_view path) {
  const std::string msg = absl::StrCat(call, "(", path, "): ", std::strerror(err));
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(msg);
    case EACCES:
    case EPERM:
    case EROFS:
      return absl::PermissionDeniedError(msg);
    case ENOSPC:
    case EDQUOT:
      return absl::ResourceExhaustedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

absl::Status WriteAll(int fd, const void* data, size_t size, absl::string_view path) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "write", path);
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// The temporary file of one WriteSafetensors call: closed, and removed unless committed, on
// every way out.
class TempFile {
 public:
  TempFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(path_.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  absl::Status Close() {
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) return ErrnoStatus(errno, "close", path_);
    return absl::OkStatus();
  }
  void Commit() { committed_ = true; }

 private:
  int fd_;
  std::string path_;
  bool committed_ = false;
};

std::string JoinPath(absl::string_view dir, absl::string_view name) {
  if (dir.empty()) return std::string(name);
  if (dir.back() == '/') return absl::StrCat(dir, name);
  return absl::StrCat(dir, "/", name);
}

}  // namespace

absl::StatusOr<std::string> SerializeSafetensors(
    const std::vector<SafetensorsTensorRef>& tensors,
    const std::map<std::string, std::string>& metadata) {
  LS_ASSIGN_OR_RETURN(WritePlan plan, PlanWrite("SerializeSafetensors", tensors, metadata));
  size_t total = plan.header.size();
  for (const SafetensorsTensorRef* t : plan.order) total += t->data.size();
  std::string out = std::move(plan.header);
  out.reserve(total);
  for (const SafetensorsTensorRef* t : plan.order) {
    out.append(reinterpret_cast<const char*>(t->data.data()), t->data.size());
  }
  return out;
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsTensorRef>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  LS_ASSIGN_OR_RETURN(WritePlan plan, PlanWrite(path, tensors, metadata));
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (base.empty() || base == "." || base == "..") {
    return Invalid(path, "WriteSafetensors: expected a path ending in a file name");
  }

  // A hidden name unique within this process and, through the pid, across processes; O_EXCL
  // makes a stale leftover an error rather than something we write through.
  static std::atomic<uint64_t> counter{0};
  const std::string temp_path =
      JoinPath(dir, absl::StrCat(".", base, ".tmp.", ::getpid(), ".", counter.fetch_add(1)));
  const int fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus(errno, "open", temp_path);
  TempFile temp(fd, temp_path);

  LS_RETURN_IF_ERROR(WriteAll(temp.fd(), plan.header.data(), plan.header.size(), temp.path()));
  for (const SafetensorsTensorRef* t : plan.order) {
    LS_RETURN_IF_ERROR(WriteAll(temp.fd(), t->data.data(), t->data.size(), temp.path()));
  }
  if (::fsync(temp.fd()) != 0) return ErrnoStatus(errno, "fsync", temp.path());
  LS_RETURN_IF_ERROR(temp.Close());
  if (::rename(temp.path().c_str(), path.c_str()) != 0) {
    return ErrnoStatus(errno, "rename", absl::StrCat(temp.path(), " -> ", path));
  }
  temp.Commit();
  // Makes the rename itself durable.
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return ErrnoStatus(errno, "open", dir);
  const int rc = ::fsync(dir_fd);
  const int fsync_errno = errno;
  ::close(dir_fd);
  if (rc != 0) return ErrnoStatus(fsync_errno, "fsync", dir);
  return absl::OkStatus();
}

// ---- Checkpoints ---------------------------------------------------------------------------

namespace {

bool IsBareFileName(absl::string_view name) {
  return !name.empty() && name.front() != '.' && name.find('/') == absl::string_view::npos &&
         name.find("..") == absl::string_view::npos && name.find('\0') == absl::string_view::npos;
}

absl::string_view BaseName(absl::string_view path) {
  const size_t slash = path.rfind('/');
  return slash == absl::string_view::npos ? path : path.substr(slash + 1);
}

// OK(true) when `path` exists, OK(false) when it does not.
absl::StatusOr<bool> PathExists(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) return true;
  if (errno == ENOENT) return false;
  return ErrnoStatus(errno, "stat", path);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(
    const std::string& dir, const SafetensorsLimits& limits) {
  std::unique_ptr<SafetensorsCheckpoint> ckpt(new SafetensorsCheckpoint());
  ckpt->dir_ = dir;

  const std::string single_path = JoinPath(dir, kSingleFileName);
  LS_ASSIGN_OR_RETURN(const bool has_single, PathExists(single_path));
  if (has_single) {
    LS_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                        SafetensorsFile::Open(single_path, limits));
    LS_RETURN_IF_ERROR(ckpt->AddShard(std::move(file), single_path));
    return ckpt;
  }
  const std::string index_path = JoinPath(dir, kIndexFileName);
  LS_ASSIGN_OR_RETURN(const bool has_index, PathExists(index_path));
  if (!has_index) {
    return absl::NotFoundError(
        absl::StrCat(dir, ": no checkpoint: expected ", kSingleFileName, " or ", kIndexFileName));
  }
  ckpt->sharded_ = true;

  Json root;
  {
    LS_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> index_file, MappedFile::Open(index_path));
    if (index_file->size() > limits.max_header_bytes) {
      return Invalid(index_path,
                     absl::StrCat("index too large: expected at most ", limits.max_header_bytes,
                                  " bytes, found ", index_file->size()));
    }
    const absl::string_view text(reinterpret_cast<const char*>(index_file->data()),
                                 index_file->size());
    LS_ASSIGN_OR_RETURN(root, ParseJsonStrict(text, index_path));
  }
  if (!root.is_object()) {
    return Invalid(index_path, absl::StrCat("expected a JSON object, found ", Describe(root)));
  }
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() != "metadata" && it.key() != "weight_map") {
      return Invalid(index_path, absl::StrCat("unknown key ", Quote(it.key()),
                                              ": expected metadata and weight_map"));
    }
  }
  if (const auto it = root.find("metadata"); it != root.end()) {
    if (!it->is_object()) {
      return Invalid(index_path, absl::StrCat("metadata must be an object: found ", Describe(*it)));
    }
    ckpt->index_metadata_ = std::move(*it);
  }
  const auto weight_map_it = root.find("weight_map");
  if (weight_map_it == root.end() || !weight_map_it->is_object()) {
    return Invalid(index_path,
                   absl::StrCat("weight_map must be an object of tensor name to shard file: found ",
                                weight_map_it == root.end() ? std::string("nothing")
                                                            : Describe(*weight_map_it)));
  }
  const Json& weight_map = *weight_map_it;

  // Shard file name -> the first tensor mapped to it (for messages); sorted by file name.
  std::map<absl::string_view, absl::string_view> shard_names;
  for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
    if (!it.value().is_string()) {
      return TensorInvalid(
          index_path, it.key(),
          absl::StrCat("weight_map value must be a shard file name: found ", Describe(it.value())));
    }
    const std::string& shard = it.value().get_ref<const std::string&>();
    if (!IsBareFileName(shard)) {
      return TensorInvalid(index_path, it.key(),
                           absl::StrCat("bad shard name ", Quote(shard),
                                        ": expected a bare file name (not empty, no '/', no "
                                        "\"..\", no leading '.')"));
    }
    shard_names.emplace(shard, it.key());
  }

  for (const auto& [shard, first_tensor] : shard_names) {
    const std::string shard_path = JoinPath(dir, shard);
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::Open(shard_path, limits);
    if (absl::IsNotFound(file.status())) {
      return absl::NotFoundError(absl::StrCat(index_path, ": shard ", Quote(shard),
                                              " (holding tensor ", Quote(first_tensor),
                                              ") not found: ", file.status().message()));
    }
    LS_RETURN_IF_ERROR(file.status());
    LS_RETURN_IF_ERROR(ckpt->AddShard(*std::move(file), index_path));
  }

  // AddShard saw no tensor twice; now the weight_map and the shards must agree exactly.
  for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
    const std::string& shard = it.value().get_ref<const std::string&>();
    const SafetensorsTensor* found = ckpt->Find(it.key());
    if (found == nullptr) {
      return TensorInvalid(index_path, it.key(),
                           absl::StrCat("missing from its shard: weight_map maps it to ",
                                        Quote(shard), ", which has no such tensor"));
    }
    const absl::string_view actual = BaseName(found->file->what());
    if (actual != shard) {
      return TensorInvalid(index_path, it.key(),
                           absl::StrCat("missing from its shard: weight_map maps it to ",
                                        Quote(shard), ", found in shard ", Quote(actual)));
    }
  }
  if (ckpt->names_.size() != weight_map.size()) {
    for (const absl::string_view name : ckpt->names_) {
      if (!weight_map.contains(std::string(name))) {
        return TensorInvalid(index_path, name,
                             absl::StrCat("absent from weight_map: found in shard ",
                                          Quote(BaseName(ckpt->Find(name)->file->what()))));
      }
    }
  }
  return ckpt;
}

absl::Status SafetensorsCheckpoint::AddShard(std::unique_ptr<SafetensorsFile> shard,
                                             absl::string_view what_std) {
  const absl::string_view what = what_std;
  const SafetensorsFile* file = shard.get();
  shards_.push_back(std::move(shard));
  index_.reserve(index_.size() + file->size());
  for (const SafetensorsEntry& entry : file->entries()) {
    const auto [it, inserted] = index_.emplace(entry.name, SafetensorsTensor{file, &entry});
    if (!inserted) {
      return TensorInvalid(what, entry.name,
                           absl::StrCat("tensor in two shards: found in both ",
                                        Quote(BaseName(it->second.file->what())), " and ",
                                        Quote(BaseName(file->what()))));
    }
    names_.push_back(entry.name);
  }
  return absl::OkStatus();
}

const SafetensorsTensor* SafetensorsCheckpoint::Find(absl::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &it->second;
}

absl::StatusOr<SafetensorsTensor> SafetensorsCheckpoint::Get(absl::string_view name) const {
  const SafetensorsTensor* tensor = Find(name);
  if (tensor == nullptr) {
    return absl::NotFoundError(absl::StrCat(dir_, ": no tensor named ", Quote(name)));
  }
  return *tensor;
}

}  // namespace ls
