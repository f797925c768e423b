// Writing an uploaded adapter into the adapter root without ever exposing a partial one
// (docs/adapters.md, "Upload"). The bytes go to a staging directory inside the root,
// `<root>/.upload-<random>/<id>/`, whose name is not a valid id, so List and Acquire never see
// it; they are size- and hash-checked as they arrive, fsync'd, and only then published with one
// rename into `<root>/<id>` (an existing adapter is swapped out atomically with
// renameat2(RENAME_EXCHANGE) and removed afterwards). An upload that is abandoned (error,
// cancel, interrupted stream, a crash before publish) leaves only its staging directory, which
// the destructor removes, or RemoveLeftovers at the next start.
//
// No gRPC here: the admin service drives it; the unit tests drive it directly.
//
// Thread safety: one AdapterUpload is used by one thread at a time (its RPC's).
#ifndef LORASERVE_SERVER_ADAPTERS_UPLOAD_H_
#define LORASERVE_SERVER_ADAPTERS_UPLOAD_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "model/adapter_store.h"

namespace ls {

inline constexpr absl::string_view kUploadDirPrefix = ".upload-";
inline constexpr absl::string_view kDeletedDirPrefix = ".deleted-";
inline constexpr uint64_t kMaxUploadChunkBytes = uint64_t{1} << 20;
inline constexpr uint64_t kMaxUploadConfigBytes = uint64_t{1} << 20;

enum class UploadFile : int { kConfig = 0, kWeights = 1 };

// What the header declares for one file.
struct UploadFileSpec {
  uint64_t size = 0;
  std::string sha256;  // 64 hex digits, any case
};

struct UploadLimits {
  uint64_t max_upload_bytes = uint64_t{1} << 30;  // --max_adapter_upload_bytes (both files)
  uint64_t root_max_bytes = 0;                    // --adapter_root_max_bytes; 0 = unlimited
  // Bytes of the directory this upload would replace (or equals): not counted against the
  // quota, since they go when it is published.
  uint64_t replaced_bytes = 0;
};

// Sum of the sizes of the regular files under `dir` (symlinks are not followed); 0 when it does
// not exist.
uint64_t TreeBytes(const std::string& dir);

// Removes the staging directories of uploads and the renamed-away directories of deletes that
// a previous process left in `root` (it stopped mid-upload or crashed). A staging directory
// whose lock a live upload holds (another replica sharing the root) is left alone. Returns the
// names removed.
std::vector<std::string> RemoveLeftovers(const std::string& root);

class AdapterUpload {
 public:
  // Checks the id and the declared files (INVALID_ARGUMENT), the limits (RESOURCE_EXHAUSTED:
  // over max_upload_bytes, or the root's files plus this upload over root_max_bytes), then
  // creates the staging directory (RESOURCE_EXHAUSTED when the disk is full).
  static absl::StatusOr<std::unique_ptr<AdapterUpload>> Begin(const std::string& root,
                                                              absl::string_view id,
                                                              const UploadFileSpec& config,
                                                              const UploadFileSpec& weights,
                                                              const UploadLimits& limits);
  // Removes the staging directory (with whatever it holds) unless Publish moved it in.
  ~AdapterUpload();
  AdapterUpload(const AdapterUpload&) = delete;
  AdapterUpload& operator=(const AdapterUpload&) = delete;

  // Appends one chunk: `offset` must equal the bytes of that file received so far, `data` must
  // be 1 byte to 1 MiB and must not run past the declared size (INVALID_ARGUMENT otherwise).
  // RESOURCE_EXHAUSTED when the disk is full.
  absl::Status Write(UploadFile file, uint64_t offset, absl::string_view data);
  // After the last chunk: INVALID_ARGUMENT when a file is short, DATA_LOSS when a SHA-256
  // differs from the declared one; then fsyncs both files and the directory.
  absl::Status Finish();

  // `<root>/.upload-<random>`: open an AdapterStore on it to load `<id>` from there.
  const std::string& staging_root() const { return staging_root_; }
  const std::string& id() const { return id_; }
  uint64_t received_bytes() const { return received_[0] + received_[1]; }
  uint64_t declared_bytes() const { return declared_[0] + declared_[1]; }

  // Moves the staged adapter to `<root>/<id>`. `disabled`: it is published with the disabled
  // marker. An existing `<root>/<id>` is ALREADY_EXISTS unless `replace`; with `replace` it is
  // swapped out atomically and removed. Fsyncs the root. After an error nothing was published.
  absl::Status Publish(bool replace, bool disabled);

 private:
  AdapterUpload() = default;

  std::string root_;
  std::string id_;
  std::string staging_root_;
  std::string dir_;  // staging_root_/id_
  uint64_t declared_[2] = {0, 0};
  uint64_t received_[2] = {0, 0};
  std::string sha256_[2];
  Sha256Hasher hashers_[2];
  int fds_[2] = {-1, -1};
  int lock_fd_ = -1;  // flock'd `<staging>/.lock`: this upload is alive
  bool published_ = false;
};

}  // namespace ls

#endif  // LORASERVE_SERVER_ADAPTERS_UPLOAD_H_
