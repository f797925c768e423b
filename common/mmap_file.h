// A read-only memory-mapped file. Weights and adapters are read through this so that the bytes
// are paged in by the kernel and never copied unless a conversion needs it.
#ifndef LORASERVE_COMMON_MMAP_FILE_H_
#define LORASERVE_COMMON_MMAP_FILE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace ls {

// Immutable once created; safe to read from any thread. The mapping lives as long as the
// object; views into it must not outlive it.
class MappedFile {
 public:
  // Maps `path` read-only. Errors name the path and the failing call (NOT_FOUND when the file
  // does not exist, FAILED_PRECONDITION when it is not a regular file).
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  absl::Span<const uint8_t> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}

  std::string path_;
  const uint8_t* data_;  // nullptr for an empty file
  size_t size_;
};

}  // namespace ls

#endif  // LORASERVE_COMMON_MMAP_FILE_H_
